"""The trust model: who may call a machine, as whom, and what a machine is given."""

from __future__ import annotations

import logging
import os
import socket
import ssl
import stat
import subprocess
import sys
import tempfile

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import bigexec
from bigexec import tls
from bigexec.authority import Authority
from bigexec.rpc import codec
from bigexec.rpc.client import Client
from bigexec.rpc.server import Server
from bigexec.service import ServiceRegistry
from bigexec.systems.base import MachineHandle, System
from bigexec.systems.local import LocalSystem

pytestmark = pytest.mark.timeout(60)

DRIVER_NAME = "bigexec driver"  # the CN of the driver's client certificate


class Hello:
    def hi(self, name):
        return f"hi {name}"


class Relay:
    def missing(self, addr, ctx):
        """Call a method that does not exist on another machine; return what it raised."""
        m = ctx.b.dial(addr)
        assert m.wait(bigexec.RUNNING, 20)
        try:
            m.call("Hello.nope")
        except bigexec.UnknownMethodError as exc:
            return str(exc)
        return "no error"


class _Touch:
    """Unpickling this creates ``path``: the proof that a payload was unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _post_plain(port: int, body: bytes) -> bytes:
    """POST ``body`` to ``Hello.hi`` over plain HTTP, with no certificate; what came back."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"POST /bigrpc/Hello.hi HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body)
                  + body)
        s.settimeout(5)
        reply = b""
        try:
            while True:
                got = s.recv(65536)
                if not got:
                    break
                reply += got
                if b"\r\n\r\n" in reply:
                    break
        except OSError:  # reset by a server that wanted a TLS handshake
            pass
        return reply


def _cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def _cn(pem: bytes) -> str:
    return str(_cert(pem).subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def _usages(pem: bytes) -> set:
    return set(_cert(pem).extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


# --- 1. threads is closed by default ---------------------------------------------------


def test_default_threads_machine_refuses_a_plain_pickle_before_unpickling(tmp_path):
    touched = tmp_path / "unpickled"
    payload = codec.dumps_bytes(((_Touch(str(touched)),), {}))
    # The payload works: a machine that opted out of TLS unpickles it.
    with bigexec.start("threads", tls=False) as b:
        (m,) = b.start(1, services={"Hello": Hello()})
        assert m.wait(bigexec.RUNNING, timeout=20) and m.err is None
        assert m.addr.startswith("http://")
        _post_plain(int(m.addr.rsplit(":", 1)[1]), payload)
        assert touched.exists()
    touched.unlink()

    with bigexec.start("threads") as b:
        (m,) = b.start(1, services={"Hello": Hello()})
        assert m.wait(bigexec.RUNNING, timeout=20) and m.err is None
        reply = _post_plain(int(m.addr.rsplit(":", 1)[1]), payload)
        assert not touched.exists()
        assert not reply.startswith(b"HTTP/1.1 200")
        assert m.addr.startswith("https://")
        assert m.call("Hello.hi", "driver") == "hi driver"  # the session itself gets in
    assert not touched.exists()


def test_another_session_cannot_dial_a_threads_machine():
    with bigexec.start("threads") as owner, bigexec.start("threads") as other:
        (m,) = owner.start(1, services={"Hello": Hello()})
        assert m.wait(bigexec.RUNNING, timeout=20) and m.err is None
        d = other.dial(m.addr)
        d.wait(bigexec.STOPPED, timeout=20)
        assert isinstance(d.err, bigexec.MachineLost) and "certificate" in str(d.err)
        assert m.call("Hello.hi", "owner") == "hi owner"


# --- 2. separate usages, one identity per party -----------------------------------------


def test_server_client_and_driver_certificates_have_one_usage_and_own_names():
    ca = Authority()
    driver = ca.issue_driver()
    assert _cn(driver.cert_pem) == DRIVER_NAME
    assert _usages(driver.cert_pem) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    server1, client1 = ca.issue_machine(ips=["127.0.0.1"], dns=["localhost"])
    server2, client2 = ca.issue_machine(ips=["127.0.0.1"], dns=["localhost"])
    assert _usages(server1.cert_pem) == {ExtendedKeyUsageOID.SERVER_AUTH}
    assert _usages(client1.cert_pem) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    san = _cert(server1.cert_pem).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    with pytest.raises(x509.ExtensionNotFound):
        _cert(client1.cert_pem).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert _cn(server1.cert_pem) == _cn(client1.cert_pem) == "machine 1"
    assert _cn(server2.cert_pem) == _cn(client2.cert_pem) == "machine 2"
    assert client1.key_pem != server1.key_pem
    assert _usages(ca.issue("legacy").cert_pem) == {ExtendedKeyUsageOID.SERVER_AUTH,
                                                    ExtendedKeyUsageOID.CLIENT_AUTH}
    with pytest.raises(ValueError, match="usage"):
        ca.issue("x", usage="admin")  # type: ignore[arg-type]


@pytest.fixture
def serve():
    made: list = []

    def make(server_creds, client_creds):
        reg = ServiceRegistry()
        reg.add("Hello", Hello())
        s = Server(reg, ssl_context=tls.server_context(server_creds))
        s.start()
        c = Client(tls.client_context(client_creds))
        made.append((s, c))
        return s, c

    yield make
    for s, c in made:
        c.close()
        s.close()


def test_a_server_certificate_cannot_act_as_a_client(serve):
    ca = Authority()
    server_creds, _ = ca.issue_machine(ips=["127.0.0.1"])
    other_server, _ = ca.issue_machine(ips=["127.0.0.1"])
    server, client = serve(server_creds, other_server)
    with pytest.raises(bigexec.NetworkError):
        client.call(server.addr, "Hello.hi", ("impostor",))
    assert "Hello.hi" not in server.stats.snapshot()
    good = Client(tls.client_context(ca.issue_driver()))
    try:
        assert good.call(server.addr, "Hello.hi", ("driver",)) == "hi driver"
    finally:
        good.close()


def test_a_client_certificate_cannot_act_as_a_server(serve):
    ca = Authority()
    # A client certificate with the right names: only its usage is wrong.
    as_server = ca.issue("machine 9", ips=["127.0.0.1"], usage="client")
    server, client = serve(as_server, ca.issue_driver())
    with pytest.raises(bigexec.NetworkError, match="(?i)certificate"):
        client.call(server.addr, "Hello.hi", ("x",))
    assert "Hello.hi" not in server.stats.snapshot()


def test_the_server_names_its_caller_in_refusals(caplog):
    with bigexec.start("threads") as b:
        m1, m2 = b.start(2, services={"Hello": Hello(), "Relay": Relay()})
        for m in (m1, m2):
            assert m.wait(bigexec.RUNNING, timeout=20) and m.err is None
        with caplog.at_level(logging.INFO, logger="bigexec.rpc"):
            with pytest.raises(bigexec.UnknownMethodError, match=DRIVER_NAME):
                m1.call("Hello.nope")
            said = m1.call("Relay.missing", m2.addr)
        # m1's services called m2 with m1's own client certificate, not as the driver
        assert "(caller: machine " in said and DRIVER_NAME not in said, said
        refused = [r.getMessage() for r in caplog.records if "refused a request" in r.message]
        assert any(DRIVER_NAME in r for r in refused), refused
        assert any("from machine " in r for r in refused), refused


# --- 3. a persistent CA file must be private ---------------------------------------------


def test_a_ca_file_others_can_read_is_refused(tmp_path):
    path = tmp_path / "ca.pem"
    Authority(path)
    os.chmod(path, 0o640)
    with pytest.raises(ValueError) as info:
        Authority(path)
    msg = str(info.value)
    assert str(path) in msg and "0640" in msg and f"chmod 600 {path}" in msg
    os.chmod(path, 0o604)
    with pytest.raises(ValueError, match="0604"):
        Authority(path)
    os.chmod(path, 0o600)
    assert Authority(path).cert_pem


def test_a_ca_file_of_another_user_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "ca.pem"
    Authority(path)
    owner = os.stat(path).st_uid
    monkeypatch.setattr(os, "geteuid", lambda: owner + 1)
    with pytest.raises(ValueError) as info:
        Authority(path)
    msg = str(info.value)
    assert str(path) in msg and f"uid {owner}" in msg and "owned" in msg


# --- 4. keys do not touch the disk -------------------------------------------------------


@pytest.fixture
def watched_tmp(tmp_path, monkeypatch):
    """A fresh temporary directory, and what was in it each time ssl loaded a key."""
    d = tmp_path / "tmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    seen: list[tuple[str, list[str]]] = []
    real = ssl.SSLContext.load_cert_chain

    def spy(self, certfile, *args, **kwargs):
        seen.append((str(certfile), sorted(os.listdir(d))))
        return real(self, certfile, *args, **kwargs)

    monkeypatch.setattr(ssl.SSLContext, "load_cert_chain", spy)
    return d, seen


@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="no memfd_create on this OS")
def test_no_key_file_appears_while_contexts_are_built(watched_tmp):
    d, seen = watched_tmp
    ca = Authority()
    tls.server_context(ca.issue("server", ips=["127.0.0.1"]))
    tls.client_context(ca.issue("machine"))
    tls.client_context(ca.issue("driver"))
    assert len(seen) == 3
    for certfile, listing in seen:
        assert listing == []
        assert certfile.startswith("/proc/self/fd/")
    assert os.listdir(d) == []


def test_without_memfd_a_private_file_named_by_pid_is_used_and_removed(watched_tmp, monkeypatch,
                                                                          serve):
    d, seen = watched_tmp
    monkeypatch.delattr(os, "memfd_create", raising=False)
    ca = Authority()
    server, client = serve(ca.issue("server", ips=["127.0.0.1"]), ca.issue("driver"))
    assert client.call(server.addr, "Hello.hi", ("file",)) == "hi file"
    assert len(seen) == 2
    for certfile, listing in seen:
        name = os.path.basename(certfile)
        assert listing == [name]
        assert name.startswith(f"bigexec-{os.getpid()}-") and name.endswith(".pem")
    assert os.listdir(d) == []


def test_leftover_key_files_of_dead_processes_are_removed(tmp_path, monkeypatch):
    d = tmp_path / "tmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    dead = int(child.stdout)
    files = {
        "dead": d / f"bigexec-{dead}-k3y.pem",
        "live": d / f"bigexec-{os.getpid()}-k3y.pem",
        "unnamed": d / "bigexec-nopid.pem",
        "other": d / f"other-{dead}-k3y.pem",
    }
    for p in files.values():
        p.write_bytes(b"-----BEGIN PRIVATE KEY-----\n")
        os.chmod(p, stat.S_IRUSR | stat.S_IWUSR)
    Authority()  # a session starts
    assert not files["dead"].exists()
    assert files["live"].exists() and files["unnamed"].exists() and files["other"].exists()
    # another user's leftovers are theirs to clear
    os.rename(files["live"], files["dead"])
    monkeypatch.setattr(os, "geteuid", lambda: os.stat(files["dead"]).st_uid + 1)
    assert tls.remove_stale_key_files() == []
    assert files["dead"].exists()


# --- 5. what environment a machine gets -------------------------------------------------


class _RemoteHandle(MachineHandle):
    def address(self, timeout):
        return "https://127.0.0.1:1"

    def died(self, grace=0.0):
        return None

    def kill(self):
        pass

    def wait_stopped(self, timeout):
        return True


class _RemoteSystem(System):
    """A system whose machines would run elsewhere."""

    name = "remote-test"

    def start(self, count, env):
        return [_RemoteHandle() for _ in range(count)]


_DRIVER_ENV = {
    "HOME": "/home/me",
    "PATH": "/usr/bin",
    "MYAPP_MODE": "fast",
    "MYAPP_DB_PASSWORD": "hunter2",
    "BIGEXEC_LOG_LEVEL": "INFO",
    "AWS_SECRET_ACCESS_KEY": "s3cr3t",
    "AWS_REGION": "eu-west-1",
    "GOOGLE_APPLICATION_CREDENTIALS": "/home/me/gcp.json",
    "AZURE_CLIENT_SECRET": "az",
    "GITHUB_TOKEN": "ghp",
    "TOKENIZERS_PARALLELISM": "false",
}


def test_a_remote_system_sends_only_what_it_is_allowed():
    assert _RemoteSystem.inherits_environment is False
    system = _RemoteSystem(env_allow=("MYAPP_*", "AWS_REGION"))
    got = system.machine_environment({"EXTRA": "1", "AWS_PROFILE": "given"}, _DRIVER_ENV)
    assert got == {"MYAPP_MODE": "fast", "BIGEXEC_LOG_LEVEL": "INFO", "AWS_REGION": "eu-west-1",
                   "EXTRA": "1", "AWS_PROFILE": "given"}
    # nothing is sent unless asked for, but bigexec's own settings
    assert _RemoteSystem().machine_environment({}, _DRIVER_ENV) == {"BIGEXEC_LOG_LEVEL": "INFO"}


def test_a_remote_system_never_sends_credentials_through_a_wildcard():
    got = _RemoteSystem(env_allow=("*",)).machine_environment({}, _DRIVER_ENV)
    assert {"HOME", "PATH", "MYAPP_MODE", "BIGEXEC_LOG_LEVEL", "TOKENIZERS_PARALLELISM"} <= set(got)
    for secret in ("AWS_SECRET_ACCESS_KEY", "AWS_REGION", "GOOGLE_APPLICATION_CREDENTIALS",
                   "AZURE_CLIENT_SECRET", "GITHUB_TOKEN", "MYAPP_DB_PASSWORD"):
        assert secret not in got
    named = _RemoteSystem(env_allow=["AWS_SECRET_ACCESS_KEY", "MYAPP_*"]).machine_environment(
        {}, _DRIVER_ENV)
    assert named["AWS_SECRET_ACCESS_KEY"] == "s3cr3t"
    assert "MYAPP_DB_PASSWORD" not in named and named["MYAPP_MODE"] == "fast"
    assert "AWS_REGION" not in named


def test_env_allow_reaches_the_system_through_start_options():
    with bigexec.start("threads", env_allow=("MYAPP_*",)) as b:
        assert b.system.env_allow == ("MYAPP_*",)


def test_local_machines_inherit_the_whole_environment(monkeypatch):
    assert LocalSystem.inherits_environment is True
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "local-is-the-same-user")
    system = LocalSystem.__new__(LocalSystem)
    System.__init__(system)
    got = system.machine_environment({"EXTRA": "1"})
    assert got["AWS_SECRET_ACCESS_KEY"] == "local-is-the-same-user" and got["EXTRA"] == "1"
    assert got["PATH"] == os.environ["PATH"]
