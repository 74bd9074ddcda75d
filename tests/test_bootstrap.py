"""The bootstrap protocol: the spec a worker is told, the versions it checks, and a system
written against the protocol alone (``protocol_system``) running real work."""

from __future__ import annotations

import os

import pytest
from protocol_system import PipeSystem
from test_debug_security import needs_ipv6

import bigexec
from bigexec.authority import Authority
from bigexec.systems import bootstrap
from bigexec.systems.bootstrap import MachineOutput, Versions, WorkerSpec

pytestmark = pytest.mark.timeout(120)


class Echo:
    def init(self, b) -> None:
        self.pid = os.getpid()

    def hello(self, who: str) -> str:
        print(f"hello line for {who}", flush=True)
        return f"hello {who} from {self.pid}"


def _square(x: int) -> int:
    return x * x


# --- the spec --------------------------------------------------------------------------------


def test_a_spec_travels_whole_and_keeps_its_key_out_of_its_repr():
    authority = Authority()
    creds = authority.issue_machine(ips=("10.1.2.3",), dns=(), name="machine 7")
    spec = WorkerSpec(system="pipe", lease=42.5, maxprocs=3, listen_host="0.0.0.0",
                      advertise_host="10.1.2.3", listen_port=7101, credentials=creds,
                      announce_fd=9)
    back = WorkerSpec.decode(spec.encode())
    assert (back.system, back.lease, back.maxprocs, back.listen_host, back.advertise_host,
            back.listen_port, back.announce_fd, back.versions) == (
        "pipe", 42.5, 3, "0.0.0.0", "10.1.2.3", 7101, 9, Versions.here())
    assert back.credentials is not None
    assert [c.key_pem for c in back.credentials] == [c.key_pem for c in creds]
    assert back.address(4433) == "https://10.1.2.3:4433"
    assert WorkerSpec(system="s", lease=1, listen_host="::1").address(80) == "https://[::1]:80"
    assert b"PRIVATE KEY" not in repr(back).encode()
    plain = WorkerSpec.decode(WorkerSpec(system="threads", lease=5).encode())
    assert plain.credentials is None and plain.host == "127.0.0.1"


@pytest.mark.parametrize("data, words", [
    (b"", "not a bigexec worker spec"),
    (b"hello\n", "not a bigexec worker spec"),
    (b"bigexec-worker-spec 1\n{not json\n" + bootstrap.SPEC_END, "bad settings"),
    (b'bigexec-worker-spec 1\n{"system": "x", "lease": 1}\n', "bad settings"),
])
def test_a_bad_spec_is_refused_with_a_clear_error(data, words):
    with pytest.raises(ValueError, match=words):
        WorkerSpec.decode(data)


def test_bad_settings_are_refused_before_anything_starts():
    with pytest.raises(ValueError, match="lease must be positive"):
        WorkerSpec(system="x", lease=0)
    with pytest.raises(ValueError, match="maxprocs must be a positive int"):
        WorkerSpec(system="x", lease=1, maxprocs=0)
    for port in (-1, 65536, True, "7100"):
        with pytest.raises(ValueError, match="listen_port must be an int in 0..65535"):
            WorkerSpec(system="x", lease=1, listen_port=port)


def test_read_spec_stops_at_its_end_and_leaves_the_channel_open():
    r, w = os.pipe()
    try:
        spec = WorkerSpec(system="local", lease=3)
        os.write(w, spec.encode() + b"whatever follows")
        assert bootstrap.read_spec(r) == spec
        os.write(w, b"still open")
        assert os.read(r, 100) == b"still open"  # the channel lives on: the lifeline
    finally:
        os.close(r)
        os.close(w)


# --- versions --------------------------------------------------------------------------------


def test_a_version_mismatch_names_both_sides():
    here = Versions("3.11", "0.1.0", "3.1.1")
    assert here.mismatch(here) is None
    msg = here.mismatch(Versions("3.11", "0.2.0", "2.2.1"), "machine m1")
    assert msg is not None
    assert "machine m1 runs Python 3.11, bigexec 0.2.0, cloudpickle 2.2.1" in msg
    assert "the driver runs Python 3.11, bigexec 0.1.0, cloudpickle 3.1.1" in msg
    assert "the same bigexec, cloudpickle" in msg


def test_the_driver_checks_what_a_machine_reports():
    info = {"version_info": (3, 0, 1), "bigexec_version": bigexec.__version__,
            "cloudpickle_version": Versions.here().cloudpickle}
    with pytest.raises(bigexec.BootError, match=r"machine x runs Python 3\.0.*the same python"):
        bootstrap.check_versions(info, "machine x")
    same = {"version_info": tuple(int(p) for p in Versions.here().python.split(".")),
            "bigexec_version": bigexec.__version__,
            "cloudpickle_version": Versions.here().cloudpickle}
    bootstrap.check_versions(same, "machine x")


def test_a_threads_machine_reports_every_version_the_driver_checks():
    with bigexec.start("threads") as b:
        (m,) = b.start(1)
        assert m.wait(bigexec.RUNNING, 30) and m.err is None
        info = m.call("Supervisor.info")
    assert info["bigexec_version"] == bigexec.__version__
    assert info["cloudpickle_version"] == Versions.here().cloudpickle


# --- output ----------------------------------------------------------------------------------


def test_output_holds_back_boot_noise_takes_the_announcement_and_quotes_the_last_lines(capfd):
    out = MachineOutput("pid 1", keep=3)
    for line in ["noise 1", "noise 2", "noise 3", "Traceback: it broke"]:
        out.line(line)
    err = out.boot_error("pid 1", "exited with status 1 before it listened")
    assert str(err).splitlines()[0] == (
        "worker pid 1 exited with status 1 before it listened: Traceback: it broke")
    assert "noise 1" not in str(err) and "noise 2" in str(err)  # the last 3 only
    out.line("bigexec-worker-listening https://127.0.0.1:5000\n")
    assert out.announced(0) == "https://127.0.0.1:5000"
    out.mark_listening("127.0.0.1:5000")
    out.line("a real line")
    out.flush(5)
    printed = capfd.readouterr().err
    assert "127.0.0.1:5000: a real line\n" in printed
    assert "noise" not in printed and "bigexec-worker-listening" not in printed


def test_an_output_that_ends_without_an_announcement_wakes_its_waiter():
    out = MachineOutput("pid 2")
    out.pump(iter([b"just noise\n"]))
    assert out.announced(30) is None and out.wait_ended(0)


# --- a system written against the protocol alone ---------------------------------------------


def test_a_system_on_the_protocol_alone_runs_services_executors_and_sees_deaths(capfd):
    with bigexec.start(PipeSystem()) as b:
        m1, m2 = b.start(2, services={"Echo": Echo()})
        for m in (m1, m2):
            assert m.wait(bigexec.RUNNING, 60) and m.err is None, m.err
        # the address is the one the worker announced in its output
        assert m1.addr.startswith("https://127.0.0.1:") and m1.addr != m2.addr
        assert m1.call("Echo.hello", "you") == f"hello you from {m1.info['pid']}"
        assert m1.info["system"] == "pipe"
        with bigexec.Executor(b=b) as ex:
            assert list(ex.map(_square, range(20))) == [x * x for x in range(20)]
        b.system.handles[1].kill()
        assert m2.wait(bigexec.STOPPED, 30)
        assert isinstance(m2.err, bigexec.MachineLost) and "SIGKILL" in str(m2.err), m2.err
        with pytest.raises(bigexec.MachineStopped):
            m2.call("Echo.hello", "ghost", timeout=10)
        assert m1.call("Echo.hello", "again").startswith("hello again")
    printed = capfd.readouterr().err
    netloc = m1.addr.split("://", 1)[1]
    assert f"{netloc}: hello line for you\n" in printed  # its output reached us, prefixed


def test_a_worker_refuses_a_driver_of_other_versions_and_says_why():
    claimed = Versions(Versions.here().python, "0.0.1-other", Versions.here().cloudpickle)
    with bigexec.start(PipeSystem(versions=claimed, boot_timeout=60)) as b:
        (m,) = b.start(1)
        assert m.wait(bigexec.STOPPED, 60)
    assert isinstance(m.err, bigexec.BootError), repr(m.err)
    first = str(m.err).splitlines()[0]
    assert "status 5" in first, first
    assert "bigexec 0.0.1-other" in first and f"bigexec {bigexec.__version__}" in first, first


@needs_ipv6
@pytest.mark.parametrize("system", ["local", "threads-server"])
def test_an_ipv6_machine_announces_a_bracketed_address_and_answers(system):
    if system == "local":
        with bigexec.start("local", host="::1") as b:
            (m,) = b.start(1, services={"Echo": Echo()})
            assert m.wait(bigexec.RUNNING, 60) and m.err is None, m.err
            assert m.addr.startswith("https://[::1]:")
            assert m.call("Echo.hello", "v6").startswith("hello v6")
        return
    from bigexec.rpc.server import Server
    from bigexec.service import ServiceRegistry

    server = Server(ServiceRegistry(), host="::1", port=0)
    try:
        assert server.addr == f"http://[::1]:{server.port}"
    finally:
        server.close()


@pytest.mark.timeout(60)
def test_a_live_threads_machine_is_not_waited_for_on_a_transport_error():
    # a threads machine's death is known the moment it happens: died(grace) must not sit out
    # the grace (it did once, and every dropped call on threads then cost a second)
    with bigexec.start("threads") as b:
        (m,) = b.start(1)
        assert m.wait(bigexec.RUNNING, 30) and m.err is None
        assert m.died(600) is None  # would outlast this test's timeout if it waited
        b.system.kill(m)
        assert m.wait(bigexec.STOPPED, 10)
        assert isinstance(m.died(), bigexec.MachineLost)
