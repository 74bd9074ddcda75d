"""The examples run end to end, as a user would run them."""

from __future__ import annotations

import math
import os
import re
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _workers(marker: str) -> set[int]:
    """Worker processes that inherited ``BIGEXEC_TEST_MARKER=marker`` from their driver."""
    out = set()
    for p in psutil.process_iter(["cmdline"]):
        if "bigexec.worker" not in (p.info["cmdline"] or []):
            continue
        try:
            if p.environ().get("BIGEXEC_TEST_MARKER") == marker:
                out.add(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


@pytest.mark.parametrize("system", ["threads", "local"])
def test_bigpi_end_to_end(system):
    marker = uuid.uuid4().hex
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "bigpi.py"), "-n", "400000", "--nmach", "2",
         "--system", system],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={**os.environ, "BIGEXEC_SYSTEM": "", "BIGEXEC_TEST_MARKER": marker},
    )
    assert proc.returncode == 0, proc.stderr
    m = re.search(r"^π = (\d\.\d+)$", proc.stdout, re.M)
    assert m, proc.stdout
    assert abs(float(m.group(1)) - math.pi) < 0.02  # 400k samples: standard error ≈ 0.0026
    assert proc.stdout.count(" RUNNING") == 2
    assert "all machines are ready" in proc.stdout
    # bigexec.progress, logging (stderr is no terminal): the boot, then every sample call
    assert re.search(r" machines up: 2/2 \(100%\), in ", proc.stdout), proc.stdout
    assert re.search(r" samples: (\d+)/\1 \(100%\), in ", proc.stdout), proc.stdout
    if system == "local":
        # the workers' progress lines reach the driver's stderr, prefixed with their address
        prefixed = re.findall(r"^127\.0\.0\.1:(\d+): \d+/200000$", proc.stderr, re.M)
        assert len(set(prefixed)) == 2, proc.stderr
    assert _workers(marker) == set()  # none outlives the driver


@pytest.mark.parametrize("system", ["threads", "local"])
def test_map_cluster_runs_unchanged(system):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "map_cluster.py"), "--system", system,
         "-n", "60"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    # the same digests as the plain, serial computation
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import map_cluster
    finally:
        sys.path.remove(str(ROOT / "examples"))
    first, last = map_cluster.digest(0), map_cluster.digest(59)
    assert f"60 digests, first {first}, last {last}" in proc.stdout
    assert f"sum of squares below 60: {sum(x * x for x in range(60))}" in proc.stdout


def test_unittest_example_passes():
    proc = subprocess.run(
        [sys.executable, "-m", "unittest", "-v", "examples/test_with_threads.py"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Ran 4 tests" in proc.stderr and "OK" in proc.stderr


def _bigpi(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / "bigpi.py"), *args],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={**os.environ, "BIGEXEC_SYSTEM": "", **(env or {})},
    )


@pytest.mark.parametrize("args, complaint", [
    (["--system", "bogus"], "argument --system: invalid choice: 'bogus'"),
    (["--calls-per-machine", "-1"], "argument --calls-per-machine: must be at least 0, not -1"),
    (["--debug-addr", "127.0.0.1:99999"], "argument --debug-addr: bad debug address"),
    (["--debug-addr", "nowhere"], "argument --debug-addr: bad debug address 'nowhere'"),
    (["-n", "0"], "argument -n: must be at least 1"),
    (["--nmach", "two"], "argument --nmach: not a whole number: 'two'"),
])
def test_bigpi_refuses_bad_flags_with_a_usage_message(args, complaint):
    proc = _bigpi(*args)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert proc.stderr.startswith("usage: bigpi.py"), proc.stderr
    assert complaint in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout == ""  # refused before any machine was started


def test_bigpi_refuses_an_unknown_system_from_the_environment():
    proc = _bigpi(env={"BIGEXEC_SYSTEM": "bogus"})
    assert proc.returncode == 2, proc.stderr
    assert "unknown system 'bogus'" in proc.stderr and "Traceback" not in proc.stderr


def test_bigpi_reports_a_debug_port_in_use_without_a_traceback():
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        proc = _bigpi("--system", "threads", "-n", "1000", "--debug-addr", f"127.0.0.1:{port}")
    assert proc.returncode == 2, proc.stderr
    assert f"--debug-addr 127.0.0.1:{port}: Address already in use" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
