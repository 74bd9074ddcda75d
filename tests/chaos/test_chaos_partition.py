"""Chaos: a machine on another "host" (a network namespace) whose link is cut, then healed.

    namespace hub (no default route)                 namespace m (no default route)
    ────────────────────────────────                 ──────────────────────────────
    driver process ── 10.200.K.1 ═══ veth pair ═══ 10.200.K.2 ── worker (local system,
    worker on hub's loopback                                      started through
                                                                  `ip netns exec m`)

Traffic stays inside namespaces the test made: a connect to any address that neither holds
fails with ENETUNREACH, as neither has a default route. The driver runs in ``hub`` as a
subprocess. Mid-map it cuts the link itself (the far end goes down, so packets vanish
silently), checks that the cut machine is declared stopped within its keepalive budget and
that its tasks ran on the other machine, heals the link and checks that the machine stays
stopped. Everything is torn down at the end, also when the test fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import netns_helpers
import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def partitionable():
    """Namespaces ``hub`` and ``m`` joined by a veth pair; yields their names and addresses."""
    if not netns_helpers.available():
        pytest.skip(netns_helpers.reason)
    k = os.getpid() % 200 + 20  # 10.200.K.0/24, our own subnet inside our own namespaces
    with netns_helpers.namespace() as hub, netns_helpers.linked_namespace(
            f"10.200.{k}.1", f"10.200.{k}.2", 24, near_ns=hub) as link:
        yield {"hub": hub, "m": link["far"], "m_if": link["far_if"], "m_addr": f"10.200.{k}.2"}


_DRIVER = textwrap.dedent("""
    import json, os, subprocess, sys, time
    import bigexec

    M_NS, M_IF, M_ADDR, WRAPPER = sys.argv[1:5]
    # Cut on the far side: the hub's end keeps its address and route, so packets to the machine
    # vanish silently (no carrier), as in a real partition, rather than failing at once.
    CUT = ["ip", "-n", M_NS, "link", "set", M_IF, "down"]
    HEAL = ["ip", "-n", M_NS, "link", "set", M_IF, "up"]
    FAST = dict(keepalive_period=0.2, keepalive_lease=4.0, keepalive_timeout=2.0,
                keepalive_rpc_timeout=0.5, boot_timeout=60)

    def square(x):
        time.sleep(0.01)
        return x * x

    if __name__ == "__main__":
        out = {}
        far = bigexec.start("local", host=M_ADDR, python=WRAPPER, **FAST)
        near = bigexec.start("local", **FAST)
        (cut,) = far.start(1)
        (kept,) = near.start(1)
        for m in (cut, kept):
            assert m.wait(bigexec.RUNNING, 60) and m.err is None, m.err
        out["cut_addr"] = cut.addr
        pid = cut.info["pid"]
        with bigexec.Executor(machines=[cut, kept]) as ex:
            futures = [ex.submit(square, x) for x in range(600)]
            time.sleep(1.0)  # both machines busy
            subprocess.run(CUT, check=True)
            t_cut = time.monotonic()
            while cut.state != bigexec.STOPPED and time.monotonic() - t_cut < 60:
                time.sleep(0.05)
            out["declared_stopped_after"] = time.monotonic() - t_cut
            out["err"] = str(cut.err)
            out["results_ok"] = [f.result(timeout=120) for f in futures] == [
                x * x for x in range(600)]
            subprocess.run(HEAL, check=True)
            time.sleep(3.0)  # healed: the machine must not come back
            out["state_after_heal"] = cut.state.name
            out["worker_gone"] = not os.path.exists(f"/proc/{pid}") or open(
                f"/proc/{pid}/stat").read().split()[2] == "Z"
            out["more_ok"] = list(ex.map(square, range(50))) == [x * x for x in range(50)]
        out["tasks_on_kept"] = kept.call("Supervisor.info")["pid"] > 0
        print(json.dumps(out), flush=True)
        near.shutdown()
        far.shutdown(timeout=5)
""")


def test_a_partitioned_machine_is_declared_stopped_and_stays_stopped(partitionable, tmp_path):
    net = partitionable
    wrapper = tmp_path / "python-in-m"
    wrapper.write_text(f"#!/bin/sh\nexec ip netns exec {net['m']} {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    script = tmp_path / "driver.py"
    script.write_text(_DRIVER)
    run = subprocess.run(
        ["ip", "netns", "exec", net["hub"], sys.executable, str(script), net["m"], net["m_if"],
         net["m_addr"], str(wrapper)],
        cwd=str(REPO), capture_output=True, text=True, timeout=150)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["cut_addr"].startswith(f"https://{net['m_addr']}:")
    assert out["results_ok"] and out["more_ok"], out
    # keepalive budget: the lease (4 s) plus a keepalive timeout and some slack
    assert out["declared_stopped_after"] < 4.0 + 2.0 + 4.0, out
    assert out["state_after_heal"] == "STOPPED", out
    assert out["worker_gone"], out  # killed by the driver, or its lease lapsed
    print(f"chaos: partition: the cut machine was declared stopped "
          f"{out['declared_stopped_after']:.1f}s after its link went down ({out['err']}); "
          f"all 600 results correct; still stopped after the link healed")
