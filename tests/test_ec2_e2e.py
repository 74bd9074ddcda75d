"""The ``ec2`` system end to end: the real driver code (bigpi, an Executor, a Pool) in a hub
network namespace with no default route, against moto's EC2 API, with every instance booting
its user-data for real in a namespace of its own (``ec2_world``): cloud-init's files and
commands, an offline install from a wheelhouse, the agent, its workers. Killing the driver,
a spot interruption notice and a foreign CA are checked as EC2 and an attacker would do
them. Needs root and network namespaces (CI has them); skips with the reason elsewhere.
"""

from __future__ import annotations

import base64
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ec2_world import (
    BuiltWheelhouse,
    Ec2World,
    in_namespace,
    parse_user_data,
    running_world,
    wheelhouse_fixture,  # noqa: F401 (the wheelhouse fixture)
)
from waiting import wait_until

from bigexec.authority import Authority

ROOT = Path(__file__).resolve().parent.parent
AGENT_PORT = 7100
PRIVATE_KEY = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----",
                         re.S)


class Driver:
    """A driver process in the hub, its output lines collected as they come."""

    def __init__(self, world: Ec2World, argv: list[str], env: dict[str, str]) -> None:
        self.proc = world.run_driver(argv, env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self.lines.append("")  # the end
            self._cond.notify_all()

    def wait_for(self, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if text in line:
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or (self.lines and self.lines[-1] == "" and
                                 self.proc.poll() is not None):
                    raise AssertionError(f"the driver never printed {text!r}:\n"
                                         + "".join(self.lines)[-6000:])
                self._cond.wait(min(left, 0.5))

    def finish(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return code

    @property
    def output(self) -> str:
        return "".join(self.lines)


def ec2_env(wheelhouse: BuiltWheelhouse, **extra: str) -> dict[str, str]:
    env = {"BIGEXEC_EC2_WHEELHOUSE": str(wheelhouse.path),
           "BIGEXEC_EC2_PROCS_PER_INSTANCE": "2", "BIGEXEC_EC2_MARKET": "on-demand",
           "BIGEXEC_EC2_ADDRESS": "private", "PYTHONUNBUFFERED": "1"}
    env.update(extra)
    return env


def states(world: Ec2World) -> dict[str, tuple[str, str]]:
    found = world.in_hub(lambda: world.client().describe_instances())["Reservations"]
    return {i["InstanceId"]: (i["State"]["Name"], i.get("StateReason", {}).get("Code", ""))
            for r in found for i in r["Instances"]}


@pytest.fixture
def world(tmp_path: Path) -> Iterator[Ec2World]:
    with running_world(tmp_path / "world") as w:
        yield w


def test_bigpi_runs_on_ec2_instances_that_boot_for_real(world: Ec2World,
                                                        wheelhouse: BuiltWheelhouse) -> None:
    started = time.monotonic()
    driver = Driver(world, [sys.executable, "examples/bigpi.py", "-n", "400000", "--nmach",
                            "4", "--system", "ec2"], ec2_env(wheelhouse))
    code = driver.finish(240)
    out = driver.output
    assert code == 0, out[-6000:]
    pi = float(re.search(r"π = ([0-9.]+)", out).group(1))  # type: ignore[union-attr]
    assert abs(pi - 3.14159) < 0.05
    assert "distributing work among 4 cores" in out
    # 4 machines on 2 instances, each booted from its user-data, all terminated at the end
    ended = states(world)
    assert len(ended) == 2 and {s for s, _ in ended.values()} == {"terminated"}, ended
    assert len(world.instances) == 2
    for instance in world.instances.values():
        assert "bigexec-agent-listening" in instance.boot_log
    # the workers' output reached the driver's stderr, prefixed with their addresses
    assert re.search(r"10\.200\.0\.\d+:710[12]: 0/100000", out), out[-3000:]
    # the user-data carried the agent's key and no other (never the CA's)
    iid = next(iter(ended))
    stored = world.in_hub(lambda: world.client().describe_instance_attribute(
        InstanceId=iid, Attribute="userData"))["UserData"]["Value"]
    raw = base64.b64decode(stored)
    carried = b"".join([raw, *(f.content for f in parse_user_data(raw).write_files)])
    assert len(PRIVATE_KEY.findall(carried.replace(b"\\n", b"\n"))) == 1
    print(f"bigpi on 2 instances x 2 machines: {time.monotonic() - started:.1f}s")


DRIVER = """
import logging, os, sys, time
import bigexec
import ec2_e2e_work as work

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

ex = bigexec.Executor(4, system="ec2", keepalive_period=1.0, keepalive_lease=8.0,
                      keepalive_timeout=6.0, keepalive_rpc_timeout=3.0, boot_timeout=120)
first = list(ex.map(work.square_slowly, range(40)))
assert [r for r, _ in first] == [x * x for x in range(40)], first
print("MAPPED", len({pid for _, pid in first}), "workers", flush=True)
with bigexec.Pool(2, b=ex.session) as pool:
    assert [r for r, _ in pool.map(work.square_slowly, range(10))] == [x * x for x in range(10)]
print("POOLED", flush=True)
futures = [ex.submit(work.square_slowly, x, 0.5) for x in range(120)]
print("SUBMITTED", flush=True)
results = [f.result(timeout=300) for f in futures]
assert [r for r, _ in results] == [x * x for x in range(120)]
print("ALL", len(results), "RESULTS", flush=True)
print("HOLDING", flush=True)
time.sleep(600)
"""


def test_executor_survives_a_spot_interruption_and_a_killed_driver_leaves_nothing_running(
        world: Ec2World, wheelhouse: BuiltWheelhouse, tmp_path: Path) -> None:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    driver = Driver(world, [sys.executable, str(script)], ec2_env(wheelhouse))
    live: list[str] = []
    try:
        driver.wait_for("MAPPED", 180)
        driver.wait_for("POOLED", 60)
        driver.wait_for("SUBMITTED", 60)
        # the executor's 4 machines on 2 instances of 2 (the pool's instance has ended with
        # the pool: its machines did)
        def running() -> list[str]:
            return sorted(i for i, (s, _) in states(world).items() if s == "running")

        wait_until("the executor's 2 instances alone", lambda: len(running()) == 2, 60,
                   lambda: f"{states(world)}\n{driver.output[-5000:]}")
        first = running()
        # EC2 gives one instance its two-minute notice while tasks run on it
        noticed = first[0]
        world.interrupt(noticed)
        noticed_at = time.monotonic()
        # the driver gives the noticed instance up (terminated through the API, before EC2
        # would), its tasks rerun elsewhere, and none is lost
        wait_until("the noticed instance to end", lambda: states(world).get(noticed, ("",))[0]
                   == "terminated", 30, lambda: driver.output[-4000:])
        print(f"spot notice to the instance's end: {time.monotonic() - noticed_at:.1f}s")
        driver.wait_for("ALL 120 RESULTS", 240)
        out = driver.output
        assert "interruption notice" in out, out[-4000:]
        assert states(world)[noticed][1] == "Client.UserInitiatedShutdown"
        driver.wait_for("HOLDING", 30)
        live = [i for i, (s, _) in states(world).items() if s == "running"]
        assert live, states(world)
        # a client whose certificate another CA signed gets nothing from an agent
        target = world.instances[live[0]]
        foreign = Authority().issue_driver()
        assert in_namespace(world.hub, _handshake_fails, target.ip, foreign)
    finally:
        # the driver dies as a SIGKILL kills it: no shutdown, no terminate calls
        if driver.proc.poll() is None:
            os.killpg(driver.proc.pid, signal.SIGKILL)
        driver.finish(30)
    # each agent's lease (8 s) lapses: it kills its workers and powers its instance off
    killed_at = time.monotonic()
    for iid in live:
        world.wait_gone(iid, timeout=60)
    print(f"driver SIGKILL to {len(live)} instance(s) powered off: "
          f"{time.monotonic() - killed_at:.1f}s (lease 8 s)")
    ended = states(world)
    for iid in live:
        assert ended[iid] == ("terminated", "Client.InstanceInitiatedShutdown"), ended
        assert world.processes(iid) == []
    assert {s for s, _ in ended.values()} == {"terminated"}, ended


def _handshake_fails(host: str, creds: object) -> bool:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with tempfile.TemporaryDirectory() as d:
        pem = Path(d, "c.pem")
        pem.write_bytes(creds.cert_pem + creds.key_pem)  # type: ignore[attr-defined]
        ctx.load_cert_chain(str(pem))
    try:
        with socket.create_connection((host, AGENT_PORT), timeout=10) as raw:
            with ctx.wrap_socket(raw) as s:
                s.sendall(b"POST /bigrpc/Agent.identity HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
                return s.recv(100) == b""
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        return True
