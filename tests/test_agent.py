"""The instance agent (``python -m bigexec.agent``), run for real on 127.0.0.1 only.

Every test gives the agent its instance id: nothing here asks the metadata service or dials
anything but loopback.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import pytest
from agent_harness import HOST, agent_document, driver_client, running_agent, worker_spec

from bigexec import __version__, tls
from bigexec.agent import Agent, AgentDocument, workers
from bigexec.authority import Authority
from bigexec.errors import NetworkError
from bigexec.rpc.client import Client
from bigexec.systems.bootstrap import Versions, WorkerSpec

pytestmark = pytest.mark.timeout(180)


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# --- the bootstrap document ----------------------------------------------------------------


def test_the_document_round_trips_with_the_ca_certificate_only():
    ca = Authority()
    doc = agent_document(ca, lease=12.5, poweroff=["sh", "-c", "exit 0"])
    obj = json.loads(doc.to_json())
    assert sorted(obj) == ["ca_pem", "cert_pem", "instance_id", "key_pem", "lease",
                           "port", "poweroff", "session"]
    assert "PRIVATE KEY" not in obj["ca_pem"]
    again = AgentDocument.from_json(doc.to_json())
    assert (again.session, again.lease, again.port, again.poweroff, again.instance_id) == (
        "session-test", 12.5, 0, ("sh", "-c", "exit 0"), "i-0123456789abcdef0")
    assert again.credentials.cert_pem == doc.credentials.cert_pem
    # the defaults of what the user-data may leave out
    del obj["port"], obj["poweroff"], obj["instance_id"]
    minimal = AgentDocument.from_json(json.dumps(obj).encode())
    assert (minimal.port, minimal.poweroff, minimal.instance_id) == (
        443, ("shutdown", "-h", "now"), None)


@pytest.mark.parametrize("change, complaint", [
    ({"ca_pem": "CA+KEY"}, "never its key"),
    ({"typo_port": 1}, "unknown keys: typo_port"),
    ({"lease": 0}, "lease must be a positive"),
    ({"poweroff": "shutdown -h now"}, "poweroff must be a list"),
    ({"session": ""}, "session must be"),
])
def test_a_bad_document_is_refused_saying_why(change, complaint):
    ca = Authority()
    obj = json.loads(agent_document(ca).to_json())
    if change.get("ca_pem") == "CA+KEY":  # the CA's whole file, key included: never
        change = {"ca_pem": obj["ca_pem"] + obj["key_pem"]}
    obj.update(change)
    with pytest.raises(ValueError, match=complaint):
        AgentDocument.from_json(json.dumps(obj).encode())


def test_reading_the_document_deletes_it_even_when_it_is_refused(tmp_path):
    path = tmp_path / "agent.json"
    path.write_bytes(b'{"session": "s"}')
    with pytest.raises(ValueError, match="lacks"):
        AgentDocument.read_and_delete(path)
    assert not path.exists()


# --- the agent, run as python -m bigexec.agent ---------------------------------------------


def test_the_agent_starts_workers_that_the_driver_reaches(tmp_path):
    ca = Authority()
    client = driver_client(ca)
    with running_agent(tmp_path, agent_document(ca)) as agent:
        assert not agent.document_path.exists()  # read, then deleted: no key left on disk
        ident = client.call(agent.addr, "Agent.identity", timeout=10)
        assert ident["instance_id"] == "i-0123456789abcdef0"
        assert ident["session"] == "session-test"
        assert ident["bigexec_version"] == __version__
        assert ident["python"].startswith(f"{sys.version_info[0]}.{sys.version_info[1]}.")
        assert ident["cpu_count"] >= 1

        ids = [client.call(agent.addr, "Agent.start_worker", (worker_spec(ca),), timeout=10)
               for _ in range(2)]
        assert len(set(ids)) == 2
        addrs = [client.call(agent.addr, "Agent.address", (w, 60.0), timeout=70) for w in ids]
        assert len(set(addrs)) == 2 and all(a.startswith(f"https://{HOST}:") for a in addrs)
        for n, addr in enumerate(addrs):  # the driver's own Client, mutual TLS, same CA
            assert client.call(addr, "Supervisor.ping", (n + 7,), timeout=10) == n + 7
        assert [client.call(agent.addr, "Agent.status", (w,), timeout=10) for w in ids] == [
            None, None]

        # a reader that is there before the line is printed gets it live...
        live: list[bytes] = []
        stream = client.call(agent.addr, "Agent.output", (ids[0],), timeout=30)
        reading = threading.Thread(target=lambda: live.extend(stream), daemon=True)
        reading.start()
        # (a moment after its reply: with no delay the worker may exit before the reply is out)
        client.call(addrs[0], "Supervisor.shutdown", (0.5, "first worker says goodbye"),
                    timeout=10)
        reading.join(30)
        assert not reading.is_alive(), "the output stream did not end with the worker"
        assert "first worker says goodbye\n" in b"".join(live).decode().splitlines(True)
        _wait_for(lambda: client.call(agent.addr, "Agent.status", (ids[0],), timeout=10) == 0,
                  20, "the first worker's exit status")

        # ...and a line printed before anyone read is not lost
        killed = ids[1]
        client.call(addrs[1], "Supervisor.shutdown", (5.0, "second worker's line"),
                    timeout=10)
        client.call(agent.addr, "Agent.kill", (killed,), timeout=10)
        assert _wait_for(lambda: client.call(agent.addr, "Agent.status", (killed,),
                                             timeout=10), 20, "the killed worker's status") == -9
        with pytest.raises(NetworkError):
            client.call(addrs[1], "Supervisor.ping", (1,), timeout=5)
        rest = client.call(agent.addr, "Agent.output", (ids[0],), timeout=30).read()
        assert b"first worker says goodbye\n" in rest  # from its start, for every reader
        with pytest.raises(LookupError, match="no worker 'w99'"):
            client.call(agent.addr, "Agent.status", ("w99",), timeout=10)


def test_a_worker_that_dies_before_listening_fails_its_address_with_its_last_lines(tmp_path):
    ca = Authority()
    client = driver_client(ca)
    other = Versions(python="2.7", bigexec=__version__, cloudpickle="0")
    spec = WorkerSpec(system="ec2", lease=30.0, listen_host=HOST,
                      credentials=ca.issue_machine(ips=[HOST]), versions=other).encode()
    with running_agent(tmp_path, agent_document(ca)) as agent:
        w = client.call(agent.addr, "Agent.start_worker", (spec,), timeout=10)
        with pytest.raises(Exception, match=r"(?s)exited \(status 5\).*before it listened.*"
                                            r"Python 2\.7") as err:
            client.call(agent.addr, "Agent.address", (w, 60.0), timeout=70)
        assert type(err.value).__name__ == "BootError"
        assert client.call(agent.addr, "Agent.status", (w,), timeout=10) == 5


def test_a_client_of_another_ca_is_refused(tmp_path):
    ca = Authority()
    with running_agent(tmp_path, agent_document(ca)) as agent:
        # it trusts the agent (its CA signed the agent's leaf) but holds a foreign client cert
        foreign = Authority().issue_driver()
        mixed = tls.Credentials(ca.cert_pem, foreign.cert_pem, foreign.key_pem)
        intruder = Client(tls.client_context(mixed), connect_timeout=5.0)
        with pytest.raises(NetworkError):
            intruder.call(agent.addr, "Agent.identity", timeout=10)
        assert driver_client(ca).call(agent.addr, "Agent.identity",
                                      timeout=10)["session"] == "session-test"


def test_a_lapsed_lease_kills_the_workers_and_powers_off_once(tmp_path):
    ca = Authority()
    client = driver_client(ca)
    marker = tmp_path / "powered-off"
    poweroff = [sys.executable, "-c",
                f"open({str(marker)!r}, 'a').write('off\\n')"]
    with running_agent(tmp_path, agent_document(ca, lease=30.0, poweroff=poweroff)) as agent:
        ids = [client.call(agent.addr, "Agent.start_worker", (worker_spec(ca),), timeout=10)
               for _ in range(2)]
        addrs = [client.call(agent.addr, "Agent.address", (w, 60.0), timeout=70) for w in ids]
        assert client.call(agent.addr, "Agent.keepalive", (1.5,), timeout=10) == 1.5
        assert not marker.exists()
        _wait_for(marker.exists, 30, "the poweroff command")
        # workers are killed before the poweroff: both are gone by now
        assert [client.call(agent.addr, "Agent.status", (w,), timeout=10) for w in ids] == [
            -9, -9]
        for addr in addrs:
            with pytest.raises(NetworkError):
                client.call(addr, "Supervisor.ping", (1,), timeout=5)
        with pytest.raises(Exception, match="lease lapsed"):
            client.call(agent.addr, "Agent.keepalive", (60.0,), timeout=10)
        with pytest.raises(Exception, match="lease lapsed"):
            client.call(agent.addr, "Agent.start_worker", (worker_spec(ca),), timeout=10)
        time.sleep(2.5)  # a few more watchdog rounds: it must not power off again
        assert marker.read_text() == "off\n"


# --- the output buffer, in process -----------------------------------------------------------


@pytest.mark.parametrize("bound, value", [
    ("MAX_BUFFERED_LINES", 5),
    ("MAX_BUFFERED_BYTES", len("line 7\nline 8\nline 9\nline 10\nline 11\n")),
])
def test_a_reader_that_falls_behind_the_bounded_buffer_is_told_what_it_missed(monkeypatch,
                                                                              bound, value):
    monkeypatch.setattr(workers, bound, value)
    ca = Authority()
    agent = Agent(session="s", instance_id="i-local", lease=60.0, poweroff=["true"])
    try:
        w = agent.start_worker(WorkerSpec.decode(worker_spec(ca)))
        addr = agent.worker(w).address(60.0)
        message = "\n".join(f"line {n}" for n in range(12))
        # a moment after its reply: with no delay the worker may exit before the reply is out
        driver_client(ca).call(addr, "Supervisor.shutdown", (0.5, message), timeout=10)
        assert agent.worker(w).wait(30) == 0
        out = b"".join(agent.worker(w).lines()).decode()
        assert out.splitlines()[-5:] == [f"line {n}" for n in range(7, 12)]
        assert "output lines were dropped" in out.splitlines()[0]
        assert "line 6\n" not in out
    finally:
        agent.close()


def test_a_worker_gets_the_environment_it_is_given_as_its_whole_environment(monkeypatch):
    # the ec2 driver sends each machine's environment with its start: it replaces the agent's
    monkeypatch.setenv("BIGEXEC_TEST_AGENT_ONLY", "agent")
    env = {k: v for k, v in os.environ.items() if k != "BIGEXEC_TEST_AGENT_ONLY"}
    env["BIGEXEC_TEST_MACHINE"] = "machine"
    ca = Authority()
    worker = workers.WorkerProcess("w1", WorkerSpec.decode(worker_spec(ca)), env=env)
    client = driver_client(ca)
    try:
        addr = worker.address(60.0)
        got = {name: client.call(addr, "Supervisor.getenv", (name,), timeout=10)
               for name in ("BIGEXEC_TEST_MACHINE", "BIGEXEC_TEST_AGENT_ONLY",
                            "BIGEXEC_SYSTEM")}
        assert got == {"BIGEXEC_TEST_MACHINE": "machine", "BIGEXEC_TEST_AGENT_ONLY": None,
                       "BIGEXEC_SYSTEM": "ec2"}
    finally:
        client.close()
        worker.kill()
        assert worker.wait(20) == -9
