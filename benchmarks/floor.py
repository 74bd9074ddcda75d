"""The floor: what one small request costs here, over ever richer stacks.

Every floor is a server in a child process and a client in this one, exchanging the same small
request (a pickled ``("Bench.noop", (0,), {})`` call, answered with a pickled ``None``), one
call after another over one persistent connection, TCP_NODELAY on both ends:

    raw-tcp       length-prefixed pickle over a bare socket
    http-plain    minimal HTTP/1.1: headers parsed by hand, one ``sendall`` per message
    http-mtls     the same over mutual TLS (certificates from bigexec's Authority and tls)
    rpc-plain     bigexec's own ``rpc.server.Server`` and ``rpc.client.Client``, no TLS
    rpc-mtls      the same with bigexec's mutual TLS contexts

``measure(kind, n, warmup)`` returns the ``n`` latencies in seconds; ``Floor(kind)`` is the
connected pair itself, for measurements that alternate it with other callers.

The payload floors echo a buffer over one socket, read with ``recv_into`` into one
preallocated buffer on each side (no framing beyond a length, no pickling, no copies):

    echo-plain    a bare socket
    echo-mtls     the same over mutual TLS
"""

from __future__ import annotations

import multiprocessing
import pickle
import socket
import struct
import time
from typing import Any

KINDS = ["raw-tcp", "http-plain", "http-mtls", "rpc-plain", "rpc-mtls"]

LABELS = {
    "raw-tcp": "floor: raw TCP, length-prefixed pickle",
    "http-plain": "floor: minimal HTTP/1.1, plain",
    "http-mtls": "floor: minimal HTTP/1.1, mutual TLS",
    "rpc-plain": "floor: bigexec rpc Server/Client, plain",
    "rpc-mtls": "floor: bigexec rpc Server/Client, mTLS",
}

ECHO_KINDS = ["echo-plain", "echo-mtls"]

REQUEST = ("Bench.noop", (0,), {})
_LEN = struct.Struct("!I")
_SIZE = struct.Struct("!Q")
_MAX_HEAD_LINES = 100


def _recv_exact(sock: socket.socket, n: int) -> bytearray | None:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            return None
        got += k
    return buf


# --- servers (run in a child process) ----------------------------------------------------

def _serve_forever(listener: socket.socket, handle: Any) -> None:
    while True:
        sock, _ = listener.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            handle(sock)
        except (OSError, ValueError):
            pass
        finally:
            sock.close()


def _recv_framed(sock: socket.socket, size: struct.Struct) -> tuple[bytes, bytearray] | None:
    """A length (packed as ``size``) and that many bytes; None at the end of the connection."""
    head = _recv_exact(sock, size.size)
    if head is None:
        return None
    body = _recv_exact(sock, size.unpack(head)[0])
    return None if body is None else (bytes(head), body)


def _raw_handle(sock: socket.socket) -> None:
    while True:
        got = _recv_framed(sock, _LEN)
        if got is None:
            return
        name, args, kwargs = pickle.loads(got[1])
        reply = pickle.dumps(None, protocol=5)
        sock.sendall(_LEN.pack(len(reply)) + reply)


def _echo_handle_factory(ssl_ctx: Any) -> Any:
    def handle(sock: socket.socket) -> None:
        if ssl_ctx is not None:
            sock = ssl_ctx.wrap_socket(sock, server_side=True)
        while True:
            got = _recv_framed(sock, _SIZE)
            if got is None:
                return
            sock.sendall(got[0])
            sock.sendall(got[1])
    return handle


def _read_http_head(rfile: Any) -> tuple[bytes, int] | None:
    """The start line and Content-Length of one HTTP/1.1 message, parsed by hand."""
    start = rfile.readline(65537)
    if not start:
        return None
    length = 0
    for _ in range(_MAX_HEAD_LINES):
        line = rfile.readline(65537)
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    return start, length


def _http_handle_factory(ssl_ctx: Any) -> Any:
    def handle(sock: socket.socket) -> None:
        if ssl_ctx is not None:
            sock = ssl_ctx.wrap_socket(sock, server_side=True)
        rfile = sock.makefile("rb", buffering=65536)
        while True:
            head = _read_http_head(rfile)
            if head is None:
                return
            body = rfile.read(head[1])
            name, args, kwargs = pickle.loads(body)
            reply = pickle.dumps(None, protocol=5)
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(reply) + reply)
    return handle


def _server_main(kind: str, creds: Any, conn: Any) -> None:
    server_ctx = None
    if creds is not None:
        from bigexec import tls

        server_ctx = tls.server_context(creds)
    if kind.startswith("rpc-"):
        from bigexec.rpc.server import Server
        from bigexec.service import ServiceRegistry

        from .tasks import BenchService

        registry = ServiceRegistry()
        registry.add("Bench", BenchService())
        server = Server(registry, ssl_context=server_ctx)
        server.start()
        conn.send(server.port)
        conn.recv()  # until the parent closes the pipe or terminates us
        return
    listener = socket.create_server(("127.0.0.1", 0))
    conn.send(listener.getsockname()[1])
    if kind == "raw-tcp":
        handle = _raw_handle
    elif kind.startswith("echo-"):
        handle = _echo_handle_factory(server_ctx)
    else:
        handle = _http_handle_factory(server_ctx)
    _serve_forever(listener, handle)


# --- clients ---------------------------------------------------------------------------

def _connect(port: int, ssl_ctx: Any) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if ssl_ctx is not None:
        sock = ssl_ctx.wrap_socket(sock, server_hostname="127.0.0.1")
    return sock


class _RawClient:
    def __init__(self, port: int) -> None:
        self.sock = _connect(port, None)

    def call(self) -> Any:
        body = pickle.dumps(REQUEST, protocol=5)
        self.sock.sendall(_LEN.pack(len(body)) + body)
        got = _recv_framed(self.sock, _LEN)
        if got is None:
            raise ConnectionError("the raw floor server closed the connection")
        return pickle.loads(got[1])

    def close(self) -> None:
        self.sock.close()


class _EchoClient:
    def __init__(self, port: int, ssl_ctx: Any) -> None:
        self.sock = _connect(port, ssl_ctx)

    def call(self, data: bytes) -> bytearray:
        self.sock.sendall(_SIZE.pack(len(data)))
        self.sock.sendall(data)
        got = _recv_framed(self.sock, _SIZE)
        if got is None:
            raise ConnectionError("the echo floor server closed the connection")
        return got[1]

    def close(self) -> None:
        self.sock.close()


class _HttpClient:
    def __init__(self, port: int, ssl_ctx: Any) -> None:
        self.sock = _connect(port, ssl_ctx)
        self.rfile = self.sock.makefile("rb", buffering=65536)

    def call(self) -> Any:
        body = pickle.dumps(REQUEST, protocol=5)
        self.sock.sendall(b"POST /bigrpc/Bench.noop HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                          b"Content-Type: application/octet-stream\r\n"
                          b"Content-Length: %d\r\n\r\n" % len(body) + body)
        head = _read_http_head(self.rfile)
        if head is None or b" 200 " not in head[0]:
            raise ConnectionError(f"bad reply {head!r}")
        return pickle.loads(self.rfile.read(head[1]))

    def close(self) -> None:
        self.rfile.close()
        self.sock.close()


class _RpcClient:
    def __init__(self, port: int, ssl_ctx: Any) -> None:
        from bigexec.rpc.client import Client

        self.client = Client(ssl_ctx)
        self.addr = f"{'https' if ssl_ctx is not None else 'http'}://127.0.0.1:{port}"

    def call(self) -> Any:
        return self.client.call(self.addr, "Bench.noop", (0,))

    def close(self) -> None:
        self.client.close()


class Floor:
    """A floor's server (a child process) and a connected client: ``call()`` one request."""

    def __init__(self, kind: str, timeout: float = 60.0) -> None:
        if kind not in KINDS and kind not in ECHO_KINDS:
            raise ValueError(f"unknown floor {kind!r}; known: {', '.join(KINDS + ECHO_KINDS)}")
        server_creds = client_ctx = None
        if kind.endswith("-mtls"):
            from bigexec import tls
            from bigexec.authority import Authority

            ca = Authority()
            server_creds = ca.issue("machine", ips=["127.0.0.1"], dns=["localhost"])
            client_ctx = tls.client_context(ca.issue("driver"))
        mp = multiprocessing.get_context("fork")
        self._conn, child_conn = mp.Pipe()
        self._proc = mp.Process(target=_server_main, args=(kind, server_creds, child_conn),
                                daemon=True)
        self._proc.start()
        self._client: Any = None
        try:
            if not self._conn.poll(timeout):
                raise TimeoutError(f"the {kind} floor server did not start within {timeout}s")
            port = self._conn.recv()
            if kind == "raw-tcp":
                self._client = _RawClient(port)
            elif kind.startswith("echo-"):
                self._client = _EchoClient(port, client_ctx)
            elif kind.startswith("http-"):
                self._client = _HttpClient(port, client_ctx)
            else:
                self._client = _RpcClient(port, client_ctx)
            sock = getattr(self._client, "sock", None)
            if sock is not None:  # a hang fails the floor instead of blocking the run
                sock.settimeout(timeout)
        except BaseException:
            self.close()
            raise
        self.call = self._client.call

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        self._conn.close()
        self._proc.terminate()
        self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)

    def __enter__(self) -> Floor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def measure(kind: str, n: int, warmup: int = 200, timeout: float = 60.0) -> list[float]:
    """``n`` sequential small calls over the ``kind`` floor; their latencies in seconds."""
    with Floor(kind, timeout) as f:
        call = f.call
        for _ in range(warmup):
            call()
        out = []
        clock = time.perf_counter
        for _ in range(n):
            t0 = clock()
            call()
            out.append(clock() - t0)
        return out
