"""When the client sends a call twice, and TCP keepalive on both ends of every connection.

A call is resent only when it is certain that it did not run, or when it is idempotent. The
server here is a few lines over a raw socket, so that each test decides exactly when a
connection ends: after a reply, while idle, or after reading a request and before replying
(what a network device that drops a long call looks like).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import Counter

import pytest
from test_rpc import serving

from bigexec.errors import NetworkError
from bigexec.rpc import codec, wire
from bigexec.rpc.client import Client

pytestmark = pytest.mark.timeout(60)


class ScriptedServer:
    """Answers ``POST /bigrpc/<method>`` requests with ``"ok"``; counts the requests it read
    whole per method. ``drop_after_reading(n)`` makes the n-th request on any connection
    (1-based) be read and then met with a close instead of a reply; ``close_idle_after``
    closes each connection that many seconds after its last reply."""

    def __init__(self, drop_nth: int | None = None, close_idle_after: float | None = None):
        self.drop_nth = drop_nth
        self.close_idle_after = close_idle_after
        self.requests: Counter[str] = Counter()
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.addr = f"http://127.0.0.1:{self.port}"
        self._threads: list[threading.Thread] = []
        self._closing = False
        self._socks: list[socket.socket] = []
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        while not self._closing:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            self._socks.append(sock)
            t = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, sock: socket.socket) -> None:
        rfile = sock.makefile("rb")
        n = 0
        try:
            while True:
                if self.close_idle_after is not None and n:
                    sock.settimeout(self.close_idle_after)
                try:
                    head = wire.read_head(rfile)
                except (TimeoutError, OSError):
                    return  # idle for too long: close, as a server's idle timeout does
                sock.settimeout(None)
                if head is None:
                    return
                start, headers = head
                rfile.read(int(headers["content-length"]))
                method = start[1].rsplit("/", 1)[-1]
                n += 1
                self.requests[method] += 1
                if self.drop_nth is not None and n == self.drop_nth:
                    return  # read whole, maybe run, and never answered
                body = codec.dumps_bytes("ok")
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        finally:
            rfile.close()
            sock.close()

    def close(self) -> None:
        self._closing = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept (close alone does not)
        self._listener.close()
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(5)


@pytest.fixture
def scripted():
    servers: list[ScriptedServer] = []

    def make(**kwargs) -> ScriptedServer:
        servers.append(ScriptedServer(**kwargs))
        return servers[-1]

    client = Client()
    try:
        yield make, client
    finally:
        client.close()
        for s in servers:
            s.close()


def test_an_eof_after_the_whole_request_does_not_resend_the_call(scripted):
    # The second request on the connection is read and then met with a close: the method may
    # have run. Resending it on a fresh connection would run it twice.
    make, client = scripted
    server = make(drop_nth=2)
    assert client.call(server.addr, "Bank.transfer", (1,)) == "ok"
    with pytest.raises(NetworkError, match="Bank.transfer"):
        client.call(server.addr, "Bank.transfer", (2,))
    assert server.requests["Bank.transfer"] == 2  # each call reached the server once
    assert server.connections == 1


def test_an_idempotent_call_is_resent_after_an_eof(scripted):
    make, client = scripted
    server = make(drop_nth=2)
    assert client.call(server.addr, "Catalog.read", ()) == "ok"
    assert client.call(server.addr, "Catalog.read", (), idempotent=True) == "ok"
    assert server.requests["Catalog.read"] == 3  # the dropped one, then once more
    assert server.connections == 2
    # the Supervisor's read-only methods are idempotent by default
    assert client.call(server.addr, "Supervisor.ping", (0,)) == "ok"


def test_a_connection_the_server_closed_while_idle_is_not_used(scripted):
    # A pooled connection that the server closed is seen at checkout, before the request is
    # written: the call goes on a fresh connection and runs once.
    make, client = scripted
    server = make(close_idle_after=0.2)
    assert client.call(server.addr, "Bank.transfer", (1,)) == "ok"
    deadline = time.monotonic() + 10
    while server.connections == 1 and time.monotonic() < deadline:
        time.sleep(0.3)  # the server closes the connection about 0.2 s after its reply
        assert client.call(server.addr, "Bank.transfer", (2,)) == "ok"
    assert server.connections >= 2
    assert server.requests["Bank.transfer"] >= 2
    assert sum(server.requests.values()) == server.requests["Bank.transfer"]


def _keepalive_timer(local_port: int, remote_port: int) -> bool:
    """Whether the kernel runs the keepalive timer on the TCP connection between the two
    loopback ports (``/proc/net/tcp``'s ``tr`` field is 2 for keepalive)."""
    with open("/proc/net/tcp") as f:
        lines = f.read().splitlines()[1:]
    for line in lines:
        fields = line.split()
        local, remote, timer = fields[1], fields[2], fields[5]
        if (int(local.split(":")[1], 16) == local_port
                and int(remote.split(":")[1], 16) == remote_port):
            return timer.split(":")[0] == "02"
    raise AssertionError(f"no connection {local_port} -> {remote_port} in /proc/net/tcp")


@pytest.mark.skipif(not __import__("os").path.exists("/proc/net/tcp"), reason="Linux only")
def test_both_ends_of_an_rpc_connection_probe_with_tcp_keepalive(scripted):
    make, client = scripted
    server = make()
    assert client.call(server.addr, "Catalog.read", ()) == "ok"  # the client's own socket
    (sock,) = server._socks
    client_port = sock.getpeername()[1]
    assert _keepalive_timer(client_port, server.port)
    with serving() as (rpc_server, _):
        with socket.create_connection(("127.0.0.1", rpc_server.port), timeout=5) as raw:
            raw.sendall(b"POST /bigrpc/Echo.add HTTP/1.1\r\nContent-Length: 0\r\n")
            deadline = time.monotonic() + 5
            while True:  # the server tunes the connection when its thread takes it up
                try:
                    if _keepalive_timer(rpc_server.port, raw.getsockname()[1]):
                        break
                except AssertionError:
                    pass
                assert time.monotonic() < deadline, "the server's end has no keepalive"
                time.sleep(0.02)
