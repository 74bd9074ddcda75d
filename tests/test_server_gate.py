"""The RPC server's entry gate: a flood of silent peers, a silent client, an oversized head or
a failure to start a thread never stops the server from serving an honest client."""

from __future__ import annotations

import hashlib
import socket
import threading
import time

import pytest
from test_rpc import _tls_pair, serving

from bigexec.rpc import codec
from bigexec.rpc import server as server_mod

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def plain_server():
    with serving() as pair:
        yield pair


@pytest.fixture
def tls_server():
    with serving(*_tls_pair()) as pair:
        yield pair


def _closed_by_peer(sock: socket.socket, within: float) -> bool:
    """Whether the server closes ``sock`` within ``within`` seconds."""
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:  # reset: closed too
        return True


def test_a_flood_of_silent_peers_neither_holds_threads_nor_keeps_a_client_out(tls_server):
    server, client = tls_server
    host, port = "127.0.0.1", server.port
    before = threading.active_count()
    idle = []
    try:
        for _ in range(400):  # connect, never start the handshake
            idle.append(socket.create_connection((host, port)))
        time.sleep(0.5)
        start = time.monotonic()
        assert [client.call(server.addr, "Echo.echo", (i,), {}, timeout=10)
                for i in range(5)] == list(range(5))
        assert time.monotonic() - start < 5.0  # not after the handshake deadline
        # the silent peers hold at most the handshake cap of threads
        assert threading.active_count() - before <= server_mod.MAX_HANDSHAKES + 8
    finally:
        for s in idle:
            s.close()


def test_a_silent_connection_is_closed_after_the_idle_timeout(plain_server):
    server, client = plain_server
    server.idle_timeout = 0.5
    silent = socket.create_connection(("127.0.0.1", server.port))
    try:
        assert _closed_by_peer(silent, within=5.0)
    finally:
        silent.close()
    # a connection that made a call, then went quiet, is let go too; the client dials anew
    assert client.call(server.addr, "Echo.echo", (1,), {}, timeout=10) == 1
    time.sleep(1.0)
    assert client.call(server.addr, "Echo.echo", (2,), {}, timeout=10) == 2


def test_a_head_with_too_many_headers_is_refused_and_the_server_goes_on(plain_server):
    server, client = plain_server
    body = codec.dumps_bytes(((3,), {}))  # a valid call: only the head is wrong
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        head = "POST /bigrpc/Echo.echo HTTP/1.1\r\n" + "".join(
            f"X-Filler-{i}: {i}\r\n" for i in range(5000)) + f"Content-Length: {len(body)}\r\n\r\n"
        s.sendall(head.encode() + body)
        s.settimeout(10)
        reply = b""
        while True:
            try:
                chunk = s.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 400")
    assert client.call(server.addr, "Echo.echo", (3,), {}, timeout=10) == 3


def test_the_accept_loop_survives_a_thread_that_cannot_start(plain_server, monkeypatch):
    server, client = plain_server
    real = server_mod.threading.Thread
    failures = []

    class FailingOnce(real):  # type: ignore[misc, valid-type]
        def start(self):
            if not failures:
                failures.append(1)
                raise RuntimeError("can't start new thread")
            return super().start()

    monkeypatch.setattr(server_mod.threading, "Thread", FailingOnce)
    victim = socket.create_connection(("127.0.0.1", server.port))
    try:
        assert _closed_by_peer(victim, within=5.0)  # dropped, not left hanging
    finally:
        victim.close()
    assert failures == [1]
    assert client.call(server.addr, "Echo.echo", (4,), {}, timeout=10) == 4  # still accepting


def test_a_streamed_call_after_the_server_closed_an_idle_pooled_connection(plain_server,
                                                                           monkeypatch):
    # a stream cannot be sent twice, so the client must not pick a connection the server has
    # closed for idleness: it drops pooled connections before the server's idle timeout
    from bigexec.rpc import pool as pool_mod

    server, client = plain_server
    server.idle_timeout = 0.3
    monkeypatch.setattr(pool_mod, "POOL_IDLE_SECONDS", 0.2)
    assert client.call(server.addr, "Echo.echo", (1,), {}, timeout=10) == 1  # pooled now
    time.sleep(1.0)  # the server has closed it
    chunks = iter([b"x" * 1000] * 50)
    assert client.call(server.addr, "Streams.digest", (chunks,), {}, timeout=10) == (
        True, 50_000, hashlib.sha256(b"x" * 50_000).hexdigest())
