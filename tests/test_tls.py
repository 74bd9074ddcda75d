"""The certificate authority and bigexec's mutual TLS."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import socket
import ssl
import stat
import time

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import bigexec
from bigexec import tls
from bigexec.authority import Authority, Credentials
from bigexec.rpc import codec
from bigexec.rpc.client import Client
from bigexec.rpc.server import Server
from bigexec.service import ServiceRegistry

pytestmark = pytest.mark.timeout(60)


class Hello:
    def hi(self, name):
        return f"hi {name}"

    def blob(self, n):
        return (bytes([i % 251]) * 65536 for i in range(n))

    def digest(self, stream):
        return hashlib.sha256(stream.read()).hexdigest()


class Relay:
    def relay(self, addr, name, ctx):
        """Call another machine from this one, with this machine's own certificate."""
        m = ctx.b.dial(addr)
        assert m.wait(bigexec.RUNNING, 20)
        if m.err is not None:
            raise m.err
        return m.call("Hello.hi", name)


# --- the authority ---------------------------------------------------------------------


def _cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def test_issued_certificates_verify_against_their_authority_only():
    ca, other = Authority(), Authority()
    creds = ca.issue("worker", ips=["127.0.0.1"], dns=["localhost"])
    assert ca.verify(creds.cert_pem)
    assert not other.verify(creds.cert_pem)
    assert other.verify(other.issue().cert_pem)
    assert not ca.verify(other.issue().cert_pem)
    assert creds.ca_pem == ca.cert_pem != other.cert_pem
    # each issue makes a fresh key and serial
    again = ca.issue("worker")
    assert again.key_pem != creds.key_pem
    assert _cert(again.cert_pem).serial_number != _cert(creds.cert_pem).serial_number


def test_leaf_certificate_contents():
    ca = Authority()
    creds = ca.issue("machine-7", ttl=dt.timedelta(hours=2), ips=["127.0.0.1", "::1"],
                     dns=["localhost", "m7.example"])
    cert = _cert(creds.cert_pem)
    ca_cert = _cert(ca.cert_pem)
    assert cert.issuer == ca_cert.subject
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "machine-7"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "m7.example"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("127.0.0.1"),
                                                            ipaddress.ip_address("::1")}
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku and ExtendedKeyUsageOID.CLIENT_AUTH in eku
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    life = cert.not_valid_after_utc - dt.datetime.now(dt.timezone.utc)
    assert dt.timedelta(hours=1, minutes=58) < life <= dt.timedelta(hours=2)
    assert b"PRIVATE KEY" in creds.key_pem and b"PRIVATE KEY" not in creds.cert_pem


def test_expired_certificate_does_not_verify():
    ca = Authority()
    expired = ca.issue("old", ttl=dt.timedelta(seconds=-30))
    assert not ca.verify(expired.cert_pem)


def test_persistent_authority(tmp_path):
    path = tmp_path / "ca.pem"
    first = Authority(path)
    assert path.exists()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    content = path.read_bytes()
    assert first.cert_pem in content and b"PRIVATE KEY" in content

    second = Authority(str(path))
    assert second.cert_pem == first.cert_pem
    assert path.read_bytes() == content  # loading does not rewrite it
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    # same key too: each one's certificates verify with the other
    assert first.verify(second.issue("a").cert_pem)
    assert second.verify(first.issue("b").cert_pem)
    assert not Authority().verify(second.issue("c").cert_pem)
    assert Authority(tmp_path / "other.pem").cert_pem != first.cert_pem


def test_persistent_authority_rejects_a_bad_file(tmp_path):
    path = tmp_path / "ca.pem"
    path.write_bytes(Authority().issue().cert_pem)  # a certificate but no key
    with pytest.raises(ValueError):
        Authority(path)


def test_credentials_pem_bundle_round_trip():
    creds = Authority().issue("x")
    back = Credentials.from_pem(creds.to_pem())
    assert (back.ca_pem, back.cert_pem, back.key_pem) == (creds.ca_pem, creds.cert_pem,
                                                          creds.key_pem)
    with pytest.raises(ValueError):
        Credentials.from_pem(creds.cert_pem + creds.key_pem)


def test_machine_credentials_bundle_round_trip():
    ca = Authority()
    served, calling = ca.issue_machine(ips=["127.0.0.1"])
    back_served, back_calling = tls.machine_credentials_from_pem(
        tls.machine_credentials_to_pem(served, calling))
    assert (back_served.cert_pem, back_served.key_pem) == (served.cert_pem, served.key_pem)
    assert (back_calling.cert_pem, back_calling.key_pem) == (calling.cert_pem, calling.key_pem)
    # a single bundle (from a driver that issued one leaf for both) serves as both
    legacy = ca.issue("both", ips=["127.0.0.1"])
    one, two = tls.machine_credentials_from_pem(legacy.to_pem())
    assert one.cert_pem == two.cert_pem == legacy.cert_pem
    with pytest.raises(ValueError):
        tls.machine_credentials_from_pem(served.cert_pem)


# --- mutual TLS on a bare server ---------------------------------------------------------


def _registry() -> ServiceRegistry:
    reg = ServiceRegistry()
    reg.add("Hello", Hello())
    return reg


@pytest.fixture
def servers():
    made: list[Server] = []

    def make(creds: Credentials | None) -> Server:
        s = Server(_registry(), ssl_context=tls.server_context(creds) if creds else None)
        s.start()
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


@pytest.fixture
def clients():
    made: list[Client] = []

    def make(ctx: ssl.SSLContext | None, **kw) -> Client:
        c = Client(ctx, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture
def ca():
    return Authority()


def _server_creds(ca: Authority) -> Credentials:
    return ca.issue("server", ips=["127.0.0.1"])


def test_mutual_tls_call(ca, servers, clients):
    server = servers(_server_creds(ca))
    assert server.addr.startswith("https://127.0.0.1:")
    client = clients(tls.client_context(ca.issue("client")))
    assert client.call(server.addr, "Hello.hi", ("tls",)) == "hi tls"
    s = client.call(server.addr, "Hello.blob", (40,))
    assert s.read() == b"".join(bytes([i % 251]) * 65536 for i in range(40))
    data = os.urandom(3 << 20)
    assert client.call(server.addr, "Hello.digest", (iter([data]),)) == \
        hashlib.sha256(data).hexdigest()


def test_the_connection_is_really_tls(ca, servers):
    server = servers(_server_creds(ca))
    ctx = tls.client_context(ca.issue("client"))
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            assert s.version() in ("TLSv1.2", "TLSv1.3")
            peer = s.getpeercert()
            assert ((("commonName", "server"),)) in peer["subject"]
            body = codec.dumps_bytes((("raw",), {}))
            s.sendall(b"POST /bigrpc/Hello.hi HTTP/1.1\r\nContent-Length: %d\r\n\r\n"
                      % len(body) + body)
            reply = b""
            while b"hi raw" not in reply:
                got = s.recv(65536)
                assert got, reply
                reply += got
            assert reply.startswith(b"HTTP/1.1 200")


def test_client_with_certificate_from_foreign_ca_is_rejected(ca, servers, clients):
    server = servers(_server_creds(ca))
    foreign = Authority().issue("intruder")
    # trusts the right CA (so the server passes), but presents a foreign certificate
    ctx = tls.client_context(Credentials(ca.cert_pem, foreign.cert_pem, foreign.key_pem))
    with pytest.raises(bigexec.NetworkError):
        clients(ctx).call(server.addr, "Hello.hi", ("intruder",))
    assert "Hello.hi" not in server.stats.snapshot()
    good = clients(tls.client_context(ca.issue("client")))
    assert good.call(server.addr, "Hello.hi", ("friend",)) == "hi friend"


def test_client_without_certificate_is_rejected(ca, servers, clients):
    server = servers(_server_creds(ca))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=ca.cert_pem.decode())
    with pytest.raises(bigexec.NetworkError):
        clients(ctx).call(server.addr, "Hello.hi", ("anonymous",))
    assert "Hello.hi" not in server.stats.snapshot()
    good = clients(tls.client_context(ca.issue("client")))
    assert good.call(server.addr, "Hello.hi", ("friend",)) == "hi friend"


def test_expired_client_certificate_is_rejected(ca, servers, clients):
    server = servers(_server_creds(ca))
    old = ca.issue("old", ttl=dt.timedelta(seconds=-30))
    with pytest.raises(bigexec.NetworkError):
        clients(tls.client_context(old)).call(server.addr, "Hello.hi", ("old",))
    assert "Hello.hi" not in server.stats.snapshot()


def test_client_refuses_server_from_foreign_ca(ca, servers, clients):
    server = servers(Authority().issue("impostor", ips=["127.0.0.1"]))
    client = clients(tls.client_context(ca.issue("client")))
    with pytest.raises(bigexec.NetworkError) as info:
        client.call(server.addr, "Hello.hi", ("x",))
    assert "certificate" in str(info.value).lower()
    assert "Hello.hi" not in server.stats.snapshot()


def test_client_refuses_server_with_wrong_name(ca, servers, clients):
    server = servers(ca.issue("server", dns=["elsewhere.invalid"]))
    client = clients(tls.client_context(ca.issue("client")))
    with pytest.raises(bigexec.NetworkError):
        client.call(server.addr, "Hello.hi", ("x",))
    assert "Hello.hi" not in server.stats.snapshot()


def test_client_refuses_expired_server_certificate(ca, servers, clients):
    server = servers(ca.issue("server", ips=["127.0.0.1"], ttl=dt.timedelta(seconds=-30)))
    client = clients(tls.client_context(ca.issue("client")))
    with pytest.raises(bigexec.NetworkError):
        client.call(server.addr, "Hello.hi", ("x",))


def test_plain_http_client_to_tls_server_fails(ca, servers, clients):
    server = servers(_server_creds(ca))
    plain_addr = server.addr.replace("https://", "http://")
    t0 = time.monotonic()
    with pytest.raises(bigexec.NetworkError):
        clients(None).call(plain_addr, "Hello.hi", ("plain",))
    # an https address with a client that has no TLS context fails as well
    with pytest.raises(bigexec.NetworkError):
        clients(None).call(server.addr, "Hello.hi", ("plain",))
    assert time.monotonic() - t0 < 5
    assert "Hello.hi" not in server.stats.snapshot()
    good = clients(tls.client_context(ca.issue("client")))
    assert good.call(server.addr, "Hello.hi", ("friend",)) == "hi friend"


def test_tls_client_to_plain_server_fails(ca, servers, clients):
    server = servers(None)
    assert server.addr.startswith("http://")
    client = clients(tls.client_context(ca.issue("client")), connect_timeout=2)
    t0 = time.monotonic()
    with pytest.raises(bigexec.NetworkError):
        client.call(server.addr.replace("http://", "https://"), "Hello.hi", ("x",))
    assert time.monotonic() - t0 < 5
    assert clients(None).call(server.addr, "Hello.hi", ("plain",)) == "hi plain"


def test_contexts_require_verification(ca):
    creds = ca.issue("x")
    sctx = tls.server_context(creds)
    cctx = tls.client_context(creds)
    assert sctx.verify_mode == ssl.CERT_REQUIRED
    assert cctx.verify_mode == ssl.CERT_REQUIRED and cctx.check_hostname
    assert sctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert cctx.minimum_version >= ssl.TLSVersion.TLSv1_2


# --- the threads system with TLS ---------------------------------------------------------


def test_threads_system_with_tls_end_to_end():
    with bigexec.start("threads", tls=True) as b:
        m1, m2 = b.start(2, services={"Hello": Hello(), "Relay": Relay()})
        for m in (m1, m2):
            assert m.wait(bigexec.RUNNING, timeout=20)
            assert m.state == bigexec.RUNNING, m.err
            assert m.addr.startswith("https://")
        assert m1.addr != m2.addr
        assert m1.call("Hello.hi", "one") == "hi one"
        assert m2.submit("Hello.hi", "two").result(timeout=10) == "hi two"
        assert m1.call("Supervisor.info")["system"] == "threads"
        # streams both ways over TLS
        data = os.urandom(2 << 20)
        assert m1.call("Hello.digest", iter([data[:1000], data[1000:]])) == \
            hashlib.sha256(data).hexdigest()
        assert len(m2.call("Hello.blob", 16).read()) == 16 * 65536
        # a machine calls another with its own certificate
        assert m1.call("Relay.relay", m2.addr, "peer") == "hi peer"
        # concurrency over TLS
        futs = [m1.submit("Hello.hi", i) for i in range(20)]
        assert [f.result(timeout=20) for f in futs] == [f"hi {i}" for i in range(20)]

        # outsiders are turned away
        plain = Client(None)
        foreign = Client(tls.client_context(Authority().issue("intruder")))
        try:
            with pytest.raises(bigexec.NetworkError):
                plain.call(m1.addr, "Hello.hi", ("x",))
            with pytest.raises(bigexec.NetworkError):
                plain.call(m1.addr.replace("https://", "http://"), "Hello.hi", ("x",))
            with pytest.raises(bigexec.NetworkError):
                foreign.call(m1.addr, "Hello.hi", ("x",))
        finally:
            plain.close()
            foreign.close()
        assert m1.call("Hello.hi", "still") == "hi still"
    assert m1.state == bigexec.STOPPED and m1.err is None
    assert m2.state == bigexec.STOPPED and m2.err is None


def test_threads_system_is_tls_by_default():
    with bigexec.start("threads") as b:
        (m,) = b.start(1, services={"Hello": Hello()})
        assert m.wait(bigexec.RUNNING, timeout=20) and m.err is None
        assert m.addr.startswith("https://")
        assert m.call("Hello.hi", "closed") == "hi closed"


def test_threads_system_with_tls_off_is_plain_http():
    with bigexec.start("threads", tls=False) as b:
        (m,) = b.start(1, services={"Hello": Hello()})
        assert m.wait(bigexec.RUNNING, timeout=20) and m.err is None
        assert m.addr.startswith("http://")
        assert m.call("Hello.hi", "plain") == "hi plain"
