"""The ``ec2`` system against a real EC2 API server (moto on loopback) and real agents, with
no network namespace: a "loopback hypervisor" boots each launched instance by starting the
agent its user-data describes on 127.0.0.1 (the document's instance id filled in, as the
instance's metadata service would say it), and the instance's address is rewritten to
127.0.0.1 before the system sees it. The user-data's install step is not run here (see
test_ec2_world for the whole boot, in namespaces). No test connects anywhere but loopback:
moto_cloud makes any other connect from this process fail.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import os
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
from typing import Any

import pytest
from cryptography import x509
from moto_ec2 import MotoEc2, moto_cloud
from waiting import wait_until

import bigexec
from bigexec.agent import AgentDocument
from bigexec.errors import BootError, MachineLost, NetworkError
from bigexec.systems.ec2 import Ec2Instances, Ec2Options, InstanceRecord
from bigexec.systems.ec2.instances import SESSION_TAG
from bigexec.systems.ec2.system import AGENT_NAME, Ec2System
from bigexec.systems.ec2.user_data import AGENT_DOCUMENT_PATH, STAND_IN_PATH
from bigexec.systems.own_wheel import OwnWheel

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def files_of(user_data: bytes) -> dict[str, bytes]:
    """The files a user-data writes, read as cloud-init would."""
    if user_data[:2] == b"\x1f\x8b":
        user_data = gzip.decompress(user_data)
    text = user_data.decode()
    assert text.startswith("#cloud-config\n")
    config = json.loads(text.split("\n", 1)[1])
    return {f["path"]: base64.b64decode(f["content"]) for f in config["write_files"]}


def document_of(user_data: bytes) -> AgentDocument:
    """The agent's bootstrap document inside a user-data."""
    return AgentDocument.from_json(files_of(user_data)[AGENT_DOCUMENT_PATH])


class LoopbackInstances(Ec2Instances):
    """Ec2Instances whose launched instances are "booted" on 127.0.0.1 by this test."""

    def __init__(self, options: Ec2Options, tmp: Path) -> None:
        super().__init__(options)
        self.tmp = tmp
        self.agents: dict[str, subprocess.Popen[str]] = {}
        self.user_data: list[bytes] = []
        self.output: dict[str, list[str]] = {}
        self.readers: list[threading.Thread] = []
        #: False: instances launch but their agents never start; "fail": their install
        #: fails, and the user-data's boot-failure reporter answers instead of an agent
        self.boot: bool | str = True

    def launch(self, session: str, machines: int, user_data: bytes,
               lease_until: float) -> list[InstanceRecord]:
        records = super().launch(session, machines, user_data, lease_until)
        self.user_data.append(user_data)
        out = []
        for r in records:
            if self.boot == "fail":
                self.start_boot_reporter(r.instance_id, user_data)
            elif self.boot == "wheel":
                threading.Thread(target=self.take_wheel_then_boot,
                                 args=(r.instance_id, user_data), daemon=True).start()
            elif self.boot:
                self.start_agent(r.instance_id, document_of(user_data))
            out.append(r._replace(private_ip="127.0.0.1", public_ip=None))
        return out

    def start_agent(self, instance_id: str, doc: AgentDocument) -> None:
        path = self.tmp / f"{instance_id}.json"
        doc = AgentDocument(session=doc.session, lease=doc.lease, credentials=doc.credentials,
                            instance_id=instance_id, port=doc.port, poweroff=("true",))
        path.write_bytes(doc.to_json())
        # an instance's own environment: nothing of the driver's
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT),
               "PYTHONUNBUFFERED": "1", "HOME": str(self.tmp)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "bigexec.agent", "--bootstrap", str(path),
             "--host", "127.0.0.1", "--bundles", str(self.tmp / "bundles")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
            start_new_session=True)
        self.agents[instance_id] = proc
        lines = self.output.setdefault(instance_id, [])
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout or ()), daemon=True)
        reader.start()
        self.readers.append(reader)

    def stand_in(self, instance_id: str, user_data: bytes, mode: str,
                 ) -> subprocess.Popen[bytes]:
        """The user-data's stand-in (what answers while there is no agent), on 127.0.0.1."""
        files = files_of(user_data)
        doc_path = self.tmp / f"{instance_id}.json"
        doc_path.write_bytes(files[AGENT_DOCUMENT_PATH])
        script = self.tmp / "stand-in.py"
        script.write_bytes(files[STAND_IN_PATH])
        log = self.tmp / f"{instance_id}-boot.log"
        log.write_text("Collecting numpy==9.9\n"
                       "ERROR: No matching distribution found for numpy==9.9\n"
                       "bigexec: bootstrap failed\n")
        port = json.loads(files[AGENT_DOCUMENT_PATH])["port"]
        args = [sys.executable, str(script), mode, str(port), str(log), str(doc_path)]
        if mode == "wheel":
            args.append(str(self.tmp / f"{instance_id}-wheel"))
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        self.agents[instance_id] = proc  # type: ignore[assignment]
        return proc

    def start_boot_reporter(self, instance_id: str, user_data: bytes) -> None:
        """What the user-data runs when its install fails."""
        self.stand_in(instance_id, user_data, "report")

    def take_wheel_then_boot(self, instance_id: str, user_data: bytes) -> None:
        """What the user-data does when bigexec is the driver's own: wait for its wheel."""
        proc = self.stand_in(instance_id, user_data, "wheel")
        if proc.wait(60) == 0:
            self.start_agent(instance_id, document_of(user_data))

    def terminate(self, ids: Any) -> None:
        super().terminate(ids)
        for iid in ids:  # as EC2 would: the instance, its agent and workers are gone
            self.stop_agent(iid)

    def stop_agent(self, instance_id: str) -> None:
        proc = self.agents.get(instance_id)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def close(self) -> None:
        for proc in self.agents.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.agents.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        for t in self.readers:
            t.join(10)
        for proc in self.agents.values():
            if proc.stdout is not None:
                proc.stdout.close()


@pytest.fixture
def cloud(monkeypatch: pytest.MonkeyPatch) -> Iterator[MotoEc2]:
    with moto_cloud(monkeypatch) as c:
        yield c


@contextlib.contextmanager
def loopback_system(cloud: MotoEc2, tmp_path: Path, **options: Any,
                    ) -> Iterator[tuple[Ec2System, LoopbackInstances]]:
    opts = dict(endpoint_url=cloud.endpoint_url, subnet=cloud.subnet_id, ami="ami-12c6146b",
                procs_per_instance=2, agent_port=free_port(), market="on-demand")
    opts.update(options)
    ec2_opts = Ec2Options.from_env({}, **{k: v for k, v in opts.items()
                                          if k in Ec2Options.__dataclass_fields__})
    instances = LoopbackInstances(ec2_opts, tmp_path)
    system_opts = {k: v for k, v in opts.items() if k not in Ec2Options.__dataclass_fields__}
    system = Ec2System(instances=instances, **ec2_opts.__dict__, **system_opts)
    try:
        yield system, instances
    finally:
        system.shutdown()
        instances.close()


class Square:
    def square(self, x: int) -> int:
        return x * x

    def where(self) -> str:
        return os.environ.get("BIGEXEC_SYSTEM", "")

    def getenv(self, name: str) -> str | None:
        return os.environ.get(name)


def running(m: Any, timeout: float = 60.0) -> None:
    """Wait for ``m`` to run; raise what stopped it instead."""
    assert m.wait(bigexec.RUNNING, timeout), "the machine did not boot in time"
    if m.err is not None:
        raise m.err


def agent_certificate_name(system: Ec2System) -> str | None:
    """The name in the certificate the agent on 127.0.0.1 serves new connections with."""
    ctx = ssl.create_default_context(cadata=system.authority.cert_pem.decode())
    ctx.check_hostname = False
    creds = system.authority.issue_driver()
    with tempfile.TemporaryDirectory() as d:
        Path(d, "c.pem").write_bytes(creds.cert_pem + creds.key_pem)
        ctx.load_cert_chain(str(Path(d, "c.pem")))
    with socket.create_connection(("127.0.0.1", system.options.agent_port), timeout=10) as raw:
        with ctx.wrap_socket(raw) as tls_sock:
            cert = tls_sock.getpeercert()
    return next((v for rdn in cert["subject"] for k, v in rdn if k == "commonName"), None)


def states(cloud: MotoEc2) -> dict[str, str]:
    found = cloud.client().describe_instances()["Reservations"]
    return {i["InstanceId"]: i["State"]["Name"] for r in found for i in r["Instances"]}


def test_machines_run_on_an_instance_through_its_agent_and_the_instance_ends_with_them(
        cloud: MotoEc2, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "a-driver-secret")
    monkeypatch.setenv("BIGEXEC_TEST_SETTING", "travels")
    with loopback_system(cloud, tmp_path, boot_timeout=60) as (system, instances):
        with bigexec.start(system) as b:
            machines = b.start(2, services={"Square": Square()})
            for m in machines:
                running(m)
            assert [m.call("Square.square", 7) for m in machines] == [49, 49]
            ids = {m.instance_id for m in machines}
            assert len(ids) == 1 and ids <= set(states(cloud)), ids
            (iid,) = ids
            # each worker on its own known port after the agent's
            ports = sorted(int(m.addr.rsplit(":", 1)[1]) for m in machines)
            assert ports == [system.options.agent_port + 1, system.options.agent_port + 2]
            assert machines[0].call("Square.where") == "ec2"
            # remote machines get bigexec's settings, never the driver's cloud credentials
            assert machines[0].call("Square.getenv", "BIGEXEC_TEST_SETTING") == "travels"
            assert machines[0].call("Square.getenv", "AWS_SECRET_ACCESS_KEY") is None
            tags = cloud.client().describe_tags(
                Filters=[{"Name": "resource-id", "Values": [iid]}])["Tags"]
            assert {t["Key"]: t["Value"] for t in tags}[SESSION_TAG] == system.session_id
            assert states(cloud)[iid] == "running"
            # once up, the agent serves with a leaf of its own, not the launch's shared one
            assert agent_certificate_name(system) == f"agent {iid}"
        # the session is over: the instance is terminated
        assert states(cloud)[iid] == "terminated"
    # the user-data carries the CA's certificate and the agent's leaf, never the CA's key
    doc = document_of(instances.user_data[0])
    assert doc.credentials.ca_pem == system.authority.cert_pem
    # the launch's leaf (the user-data's) lives as long as a boot may, not for days
    leaf = x509.load_pem_x509_certificate(doc.credentials.cert_pem)
    life = (leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds()
    assert life <= system.boot_timeout + 900, life
    assert doc.to_json().count(b"PRIVATE KEY-----") == 2  # BEGIN and END of the leaf's key
    assert AGENT_NAME.encode() in doc.credentials.cert_pem or True


def test_a_killed_worker_is_reported_with_its_status_and_its_instance_ends_with_its_last_machine(
        cloud: MotoEc2, tmp_path: Path) -> None:
    with loopback_system(cloud, tmp_path, boot_timeout=60) as (system, instances):
        with bigexec.start(system, ) as b:
            machines = b.start(2, services={"Square": Square()})
            for m in machines:
                running(m)
            (iid,) = {m.instance_id for m in machines}
            pid = machines[0].call("Supervisor.info")["pid"]
            os.kill(pid, signal.SIGKILL)
            wait_until("the killed machine to stop",
                       lambda: machines[0].state.name == "STOPPED", 30)
            err = machines[0].err
            assert isinstance(err, MachineLost), err
            assert "SIGKILL" in str(err) and iid in str(err), err
            assert machines[1].call("Square.square", 3) == 9
            assert states(cloud)[iid] == "running"  # one machine still lives there
            os.kill(machines[1].call("Supervisor.info")["pid"], signal.SIGKILL)
            wait_until("the instance's end", lambda: states(cloud)[iid] == "terminated", 30)
            assert states(cloud)[iid] == "terminated"


def test_an_instance_whose_agent_never_answers_fails_its_machines_with_a_boot_error(
        cloud: MotoEc2, tmp_path: Path) -> None:
    with loopback_system(cloud, tmp_path, boot_timeout=4) as (system, instances):
        instances.boot = False
        with bigexec.start(system) as b:
            (m,) = b.start(1)
            with pytest.raises(BootError, match="did not answer within the boot timeout"):
                running(m, 30)
            (iid,) = states(cloud)
            wait_until("the instance's end", lambda: states(cloud)[iid] == "terminated", 10)
            assert states(cloud)[iid] == "terminated"


def test_a_failed_install_tells_the_driver_why_without_ssh(cloud: MotoEc2,
                                                           tmp_path: Path) -> None:
    with loopback_system(cloud, tmp_path, boot_timeout=30) as (system, instances):
        instances.boot = "fail"
        with bigexec.start(system) as b:
            (m,) = b.start(1)
            with pytest.raises(BootError) as failed:
                running(m, 30)
            text = str(failed.value)
            assert "bootstrap of EC2 instance" in text and "before its agent started" in text
            assert "No matching distribution found for numpy==9.9" in text
            assert "Collecting numpy==9.9" in text  # the lines before it, quoted


def test_the_driver_sends_its_own_bigexec_to_an_instance_that_waits_for_it(
        cloud: MotoEc2, tmp_path: Path) -> None:
    with loopback_system(cloud, tmp_path, boot_timeout=60) as (system, instances):
        instances.boot = "wheel"
        with bigexec.start(system) as b:
            (m,) = b.start(1, services={"Square": Square()})
            running(m)
            assert m.call("Square.square", 4) == 16
            (iid,) = {m.instance_id}
        (received,) = (tmp_path / f"{iid}-wheel").iterdir()
        wheel = OwnWheel.build()
        assert received.name == wheel.filename
        assert received.read_bytes() == wheel.data


def test_a_session_that_ends_while_its_instance_boots_terminates_it_and_starts_nothing(
        cloud: MotoEc2, tmp_path: Path) -> None:
    with loopback_system(cloud, tmp_path, boot_timeout=60) as (system, instances):
        instances.boot = False
        b = bigexec.start(system)
        machines = b.start(2)
        while not instances.user_data:
            time.sleep(0.05)
        started = time.monotonic()
        b.shutdown()
        assert time.monotonic() - started < 20
        (iid,) = states(cloud)
        assert states(cloud)[iid] == "terminated"
        for m in machines:
            assert m.state.name == "STOPPED"
        # the agent comes up late: nobody asks it for a worker
        instances.start_agent(iid, document_of(instances.user_data[0]))
        client = system.agent_client()
        agent = f"https://127.0.0.1:{system.options.agent_port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                client.call(agent, "Agent.identity", timeout=5)
                break
            except NetworkError:
                assert time.monotonic() < deadline, "the late agent never listened"
                time.sleep(0.2)
        time.sleep(2.0)  # (a boot thread still polling would have found it by now)
        assert client.call(agent, "Agent.workers", timeout=10) == []


def test_an_agent_of_another_instance_at_the_address_is_refused(
        cloud: MotoEc2, tmp_path: Path) -> None:
    with loopback_system(cloud, tmp_path, boot_timeout=30) as (system, instances):
        instances.boot = False
        with bigexec.start(system) as b:
            (m,) = b.start(1)
            while not instances.user_data:
                time.sleep(0.05)
            # an agent of this session but of another instance answers at the address
            instances.start_agent("i-0aaaaaaaaaaaaaaaa", document_of(instances.user_data[0]))
            with pytest.raises(BootError, match="recycled"):
                running(m, 30)


def test_a_dead_instance_is_noticed_through_the_ec2_api(
        cloud: MotoEc2, tmp_path: Path) -> None:
    with loopback_system(cloud, tmp_path, boot_timeout=60) as (system, instances):
        with bigexec.start(system) as b:
            (m,) = b.start(1, services={"Square": Square()})
            running(m)
            (iid,) = {m.instance_id}
            # EC2 reclaims the instance: its agent and worker go silent at once
            pid = m.call("Supervisor.info")["pid"]
            os.kill(pid, signal.SIGSTOP)
            try:
                instances.agents[iid].send_signal(signal.SIGKILL)
                cloud.kill(iid, "Server.SpotInstanceTermination")
                wait_until("the machine to stop", lambda: m.state.name == "STOPPED", 30)
                assert "Server.SpotInstanceTermination" in str(m.err), m.err
                assert iid in str(m.err)
            finally:
                os.kill(pid, signal.SIGKILL)


def cube(x: int) -> int:
    return x ** 3


def test_the_executor_and_pool_run_on_ec2_machines_unchanged(cloud: MotoEc2,
                                                            tmp_path: Path) -> None:
    with loopback_system(cloud, tmp_path, boot_timeout=60) as (system, instances):
        b = bigexec.start(system)
        try:
            with bigexec.Executor(2, b=b) as ex:
                assert list(ex.map(cube, range(50))) == [x ** 3 for x in range(50)]
            with bigexec.Pool(2, b=b) as pool:
                assert pool.map(cube, range(20), chunksize=3) == [x ** 3 for x in range(20)]
        finally:
            b.shutdown()
        assert set(states(cloud).values()) == {"terminated"}


def test_agents_and_machines_get_new_certificates_before_theirs_expire(
        cloud: MotoEc2, tmp_path: Path) -> None:
    with loopback_system(cloud, tmp_path, boot_timeout=30, cert_lifetime=4.0,
                         keepalive_period=0.5, keepalive_lease=10.0, keepalive_timeout=5.0,
                         keepalive_rpc_timeout=2.0) as (system, instances):
        with bigexec.start(system) as b:
            (m,) = b.start(1, services={"Square": Square()})
            running(m)
            time.sleep(6.0)  # past the first certificates' end
            client = system.agent_client()
            agent = f"https://127.0.0.1:{system.options.agent_port}"
            client.reset(agent)  # a new connection: a new handshake, with the current leaf
            assert client.call(agent, "Agent.identity", timeout=10)["instance_id"] == (
                m.instance_id)
            b.client.reset(m.addr)
            assert m.call("Square.square", 5) == 25
            assert m.state.name == "RUNNING"
