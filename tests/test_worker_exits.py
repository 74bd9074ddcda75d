"""How a ``local`` worker ends: a lapsed lease is reported as one, and nothing a task started
outlives the worker (shutdown, a kill by the driver, or the driver's own death)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

import bigexec
from bigexec.worker import EXIT_LEASE_LAPSED

pytestmark = pytest.mark.timeout(120)

BOOT = 60.0


def start_sleeper() -> int:
    """Run on a machine: start a process that would live for long, return its pid."""
    return subprocess.Popen(["sleep", "1000"]).pid


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not: its reaper may be slow, or never come, in a
    container whose init does not reap)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return not _alive(pid)


def _kill_if_sleeper(pid: int) -> None:
    """Clean up after a failed test, without touching a process that reused the pid."""
    try:
        p = psutil.Process(pid)
        if p.cmdline()[:1] == ["sleep"]:
            p.kill()
    except (psutil.Error, IndexError):
        pass


@pytest.mark.parametrize("system", ["threads", "local"])
def test_a_lapsed_lease_is_reported_as_one(system):
    with bigexec.start(system, boot_timeout=BOOT, keepalive_period=0.5, keepalive_lease=2.0,
                       keepalive_timeout=120.0) as b:
        (m,) = b.start(1)
        assert m.wait(bigexec.RUNNING, timeout=BOOT) and m.err is None, m.err
        deadline = time.monotonic() + 10
        while not m.keepalive_reply_times and time.monotonic() < deadline:
            time.sleep(0.05)  # the lease is the keepalives' 2 s from now on, not the boot's
        assert m.keepalive_reply_times
        real = m._call_raw

        def keepalives_lost(method, *args):
            if method == "Supervisor.keepalive":
                raise TimeoutError("this keepalive was lost on the way (the test drops it)")
            return real(method, *args)

        m._call_raw = keepalives_lost  # type: ignore[method-assign]
        t0 = time.monotonic()
        assert m.wait(bigexec.STOPPED, timeout=30), "a machine whose lease lapsed must stop"
        took = time.monotonic() - t0
    print(f"lease lapse reported {took:.2f}s after the keepalives stopped")
    assert isinstance(m.err, bigexec.MachineLost), repr(m.err)
    msg = str(m.err)
    assert f"status {EXIT_LEASE_LAPSED}" in msg, msg
    assert "lease lapsed: the driver's keepalives did not arrive for 2s" in msg, msg
    assert "status 0" not in msg, msg


@pytest.mark.parametrize("how", ["kill", "shutdown"])
def test_processes_a_task_started_end_with_its_worker(how):
    pid = None
    try:
        with bigexec.Executor(1, system="local", boot_timeout=BOOT) as ex:
            pid = ex.submit(start_sleeper).result(timeout=BOOT)
            assert _alive(pid)
            (m,) = ex.machines()
            if how == "kill":
                ex.session.system.kill(m)
            else:
                m.shutdown()
            assert m.wait(bigexec.STOPPED, timeout=20)
            assert _gone_within(pid, 10), f"sleep {pid} outlived its worker ({how})"
    finally:
        if pid is not None:
            _kill_if_sleeper(pid)


_DRIVER = """
import sys, time
import bigexec
from test_worker_exits import start_sleeper

with bigexec.Executor(1, system="local") as ex:
    print(ex.submit(start_sleeper).result(timeout=60), flush=True)
    time.sleep(1000)
"""


def test_processes_a_task_started_end_when_the_driver_is_killed(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(_DRIVER))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(__file__)] + [p for p in sys.path if p]))
    driver = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, env=env)
    pid = None
    try:
        assert driver.stdout is not None
        line = driver.stdout.readline()
        assert line.strip().isdigit(), f"the driver printed {line!r}"
        pid = int(line)
        assert _alive(pid)
        driver.send_signal(signal.SIGKILL)  # no atexit, no shutdown: only the lifeline says it
        driver.wait(10)
        t0 = time.monotonic()
        assert _gone_within(pid, 10), f"sleep {pid} outlived the SIGKILLed driver"
        print(f"the task's process was gone {time.monotonic() - t0:.2f}s after the driver died")
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(10)
        if driver.stdout is not None:
            driver.stdout.close()
        if pid is not None:
            _kill_if_sleeper(pid)
