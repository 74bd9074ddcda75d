"""The RPC layer: codec, HTTP/1.1 server and client, streams, and calls through machines.

Most behaviour is checked three ways through the ``caller`` fixture: a bare ``Server`` +
``Client`` on 127.0.0.1 without TLS, the same with mutual TLS, and a machine of the ``threads``
system reached through a session (``m.call``).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import os
import socket
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest

import bigexec
from bigexec.errors import RemoteTraceback
from bigexec.rpc import codec
from bigexec.rpc.client import CallHandle, Client
from bigexec.rpc.server import Server
from bigexec.service import ServiceRegistry

pytestmark = pytest.mark.timeout(60)

MIB = 1 << 20
_BLOCK = os.urandom(MIB)


def _chunks(total: int, size: int = MIB):
    """Deterministic, pairwise distinct chunks of ``total`` bytes (reordering shows in a hash)."""
    i = sent = 0
    while sent < total:
        n = min(size, total - sent)
        chunk = i.to_bytes(8, "little") + _BLOCK * (n // MIB + 1)
        yield chunk[:n]
        i += 1
        sent += n


def _sha(total: int, size: int = MIB) -> str:
    h = hashlib.sha256()
    for c in _chunks(total, size):
        h.update(c)
    return h.hexdigest()


# --- exceptions and services (module level: they travel pickled) -------------------------


class CustomError(Exception):
    def __init__(self, code: int, detail: str) -> None:
        super().__init__(code, detail)
        self.code = code
        self.detail = detail


class NeedsTwo(Exception):
    """Pickles, but cannot be unpickled: its reduce only carries one of its two arguments."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(a)
        self.b = b


class HoldsLock(Exception):
    """Cannot even be pickled."""

    def __init__(self, msg: str) -> None:
        super().__init__(msg)
        self.lock = threading.Lock()


class SourceError(Exception):
    pass


class Echo:
    def echo(self, x):
        return x

    def nothing(self):
        pass

    def add(self, a, b):
        return a + b

    def type_of(self, x):
        return type(x).__name__

    def kw(self, *args, **kwargs):
        return args, kwargs

    def raise_value(self, msg):
        raise ValueError(msg)

    def raise_custom(self, code):
        raise CustomError(code, "custom detail")

    def raise_needs_two(self):
        raise NeedsTwo("only-one", "second")

    def raise_holds_lock(self):
        raise HoldsLock("has a lock")

    def return_lock(self):
        return threading.Lock()

    def sleep(self, seconds):
        time.sleep(seconds)
        return seconds

    def _private(self):
        return "private"

    def init(self, b):
        pass


_BARRIER: threading.Barrier | None = None
_SEEN: dict[str, object] = {}


class Streams:
    def digest(self, stream, how="iter"):
        """What the server received: (is a bigexec.Stream, byte count, sha256)."""
        is_stream = isinstance(stream, bigexec.Stream)
        h = hashlib.sha256()
        n = 0
        if how == "iter":
            for c in stream:
                h.update(c)
                n += len(c)
        elif how == "readinto":
            buf = bytearray(300_000)
            while True:
                k = stream.readinto(buf)
                if not k:
                    break
                h.update(memoryview(buf)[:k])
                n += k
        else:
            data = stream.read()
            h.update(data)
            n = len(data)
        return is_stream, n, h.hexdigest()

    def record(self, stream):
        """Read the stream, remembering what arrived and how it ended."""
        got = []
        try:
            for c in stream:
                got.append(bytes(c))
        except BaseException as exc:
            _SEEN["data"] = b"".join(got)
            _SEEN["error"] = exc
            raise
        _SEEN["data"] = b"".join(got)
        _SEEN["error"] = None
        return len(_SEEN["data"])

    def ignore(self, stream):
        return "ignored"

    def ignore_and_generate(self, stream, total):
        return _chunks(total)

    def generate(self, total, size=MIB):
        return _chunks(total, size)

    def empty(self):
        yield from ()

    def fail_after(self, n):
        yield b"a" * n
        yield b"b" * n
        raise ValueError("server source broke")

    def text(self):
        yield "not bytes"

    def upper(self, stream):
        return (bytes(c).upper() for c in stream)

    def at_barrier(self, i):
        _BARRIER.wait()
        return i * i


SERVICES = {"Echo": Echo(), "Streams": Streams()}


# --- fixtures ---------------------------------------------------------------------------


def _registry() -> ServiceRegistry:
    reg = ServiceRegistry()
    for name, svc in SERVICES.items():
        assert reg.add(name, svc)
    return reg


@contextlib.contextmanager
def serving(server_ssl=None, client_ssl=None):
    """A started ``Server`` of ``SERVICES`` and a ``Client`` for it; both closed after."""
    server = Server(_registry(), ssl_context=server_ssl)
    server.start()
    client = Client(client_ssl)
    try:
        yield server, client
    finally:
        client.close()
        server.close()


@pytest.fixture
def plain_server():
    with serving() as pair:
        yield pair


def _tls_pair():
    from bigexec import tls
    from bigexec.authority import Authority

    ca = Authority()
    server_creds = ca.issue("server", ips=["127.0.0.1"], dns=["localhost"])
    return tls.server_context(server_creds), tls.client_context(ca.issue("client"))


class DirectCaller:
    def __init__(self, kind: str, server: Server, client: Client) -> None:
        self.kind = kind
        self.server = server
        self.client = client
        self.addr = server.addr

    def call(self, method, *args, **kwargs):
        return self.client.call(self.addr, method, args, kwargs)


class MachineCaller:
    kind = "threads"

    def __init__(self, m: bigexec.Machine) -> None:
        self.m = m
        self.addr = m.addr

    def call(self, method, *args, **kwargs):
        return self.m.call(method, *args, **kwargs)


@pytest.fixture
def machine():
    with bigexec.start("threads") as b:
        (m,) = b.start(1, services=SERVICES)
        assert m.wait(bigexec.RUNNING, timeout=20)
        assert m.state == bigexec.RUNNING, m.err
        yield m


@pytest.fixture(params=["plain", "tls", "threads"])
def caller(request):
    if request.param == "threads":
        with bigexec.start("threads") as b:
            (m,) = b.start(1, services=SERVICES)
            assert m.wait(bigexec.RUNNING, timeout=20)
            assert m.state == bigexec.RUNNING, m.err
            yield MachineCaller(m)
        return
    server_ssl = client_ssl = None
    if request.param == "tls":
        server_ssl, client_ssl = _tls_pair()
    with serving(server_ssl, client_ssl) as (server, client):
        assert server.addr.startswith("https://" if server_ssl else "http://")
        yield DirectCaller(request.param, server, client)


# --- values ------------------------------------------------------------------------------


def test_none_reply(caller):
    assert caller.call("Echo.nothing") is None
    assert caller.call("Echo.echo", None) is None


def test_nested_values_round_trip(caller):
    value = {
        "ints": [0, -1, 2**100, True],
        "floats": (1.5, float("inf")),
        "text": "héllo \u2603",
        "bytes": b"\x00\xff" * 10,
        "set": {1, 2, 3},
        "frozen": frozenset({"a"}),
        "nested": {"deeper": [{"k": (1, [2, {"x": None}])}]},
        ("tuple", "key"): complex(1, 2),
    }
    got = caller.call("Echo.echo", value)
    assert got == value
    assert type(got["floats"]) is tuple
    assert type(got["set"]) is set and type(got["frozen"]) is frozenset


def test_args_and_kwargs(caller):
    assert caller.call("Echo.kw", 1, "two", three=3, four=[4]) == ((1, "two"), {"three": 3,
                                                                                "four": [4]})
    assert caller.call("Echo.add", a=40, b=2) == 42


def test_large_bytes_round_trip(caller):
    big = os.urandom(8 * MIB)
    got = caller.call("Echo.echo", big)
    assert type(got) is bytes
    assert len(got) == len(big) and got == big


def test_bytearray_keeps_its_type(caller):
    small = bytearray(b"abc")
    big = bytearray(os.urandom(8 * MIB))
    got_small, got_big = caller.call("Echo.echo", [small, big])
    assert type(got_small) is bytearray and got_small == small
    assert type(got_big) is bytearray and got_big == big
    assert caller.call("Echo.type_of", big) == "bytearray"


def test_several_large_buffers_in_one_message(caller):
    a = os.urandom(3 * MIB)
    b = bytearray(os.urandom(MIB + 7))
    c = memoryview(os.urandom(2 * MIB))
    got = caller.call("Echo.echo", {"a": a, "list": [b, "small", c], "tail": b"t" * 100})
    assert got["a"] == a
    assert type(got["list"][0]) is bytearray and got["list"][0] == b
    assert got["list"][1] == "small"
    assert type(got["list"][2]) is bytes and got["list"][2] == c.tobytes()
    assert got["tail"] == b"t" * 100


@pytest.mark.parametrize("value", [os.urandom(8 * MIB), bytearray(8 * MIB),
                                   memoryview(os.urandom(8 * MIB))],
                         ids=["bytes", "bytearray", "memoryview"])
def test_large_buffers_travel_out_of_band(value):
    """The codec promises that large bytes/bytearray/memoryview go as separate buffers."""
    pieces = codec.dumps(value)
    sizes = [memoryview(p).nbytes for p in pieces]
    # header, pickle, then one out-of-band buffer holding the payload uncopied
    assert len(pieces) == 3, f"no out-of-band buffer: piece sizes {sizes}"
    assert sizes[2] == 8 * MIB
    assert sizes[1] < 1024, "the payload was copied into the pickle stream"
    back = codec.loads(b"".join(bytes(p) for p in pieces))
    assert back == (value.tobytes() if isinstance(value, memoryview) else value)
    assert type(back) is (bytes if isinstance(value, memoryview) else type(value))


def test_read_places_large_bytes_without_a_copy():
    """``codec.read`` (what server and client use) puts a large ``bytes`` straight into the
    object it becomes; a bytearray stays a writable bytearray; a memoryview becomes bytes."""
    import io

    a, b, c = os.urandom(MIB), bytearray(os.urandom(MIB)), memoryview(os.urandom(MIB))
    wire_bytes = b"".join(bytes(p) for p in codec.dumps([a, b, c, "small"]))
    msg = codec.read(io.BufferedReader(io.BytesIO(wire_bytes)).readinto, len(wire_bytes))
    assert isinstance(msg, codec.Message) and len(msg) == len(wire_bytes)
    assert [type(x) for x in msg.buffers] == [bytes, bytearray, bytes]
    got = codec.loads(msg)
    assert got == [a, b, c.tobytes(), "small"]
    assert got[0] is msg.buffers[0], "the received bytes were copied once more"
    assert hash(got[0]) == hash(a)  # a real, immutable bytes object
    got[1][0] ^= 0xFF  # writable, as the sender's bytearray was
    assert got[1] != b


@pytest.mark.parametrize("damage", ["short", "lengths", "buffers"])
def test_read_rejects_a_header_that_does_not_add_up(damage):
    import io

    data = bytearray(b"".join(bytes(p) for p in codec.dumps([os.urandom(MIB)])))
    length = len(data)
    if damage == "short":
        data = data[: length // 2]  # the connection ends early
    elif damage == "lengths":
        data[12:20] = (1 << 40).to_bytes(8, "little")  # the buffer's length is a lie
    else:
        data[0:4] = (1 << 30).to_bytes(4, "little")  # more buffers than the message holds
    with pytest.raises(EOFError if damage == "short" else codec.DecodeError):
        codec.read(io.BytesIO(bytes(data)).readinto, length)


def test_a_large_malformed_body_gets_400_and_the_server_goes_on(plain_server):
    server, client = plain_server
    body = bytearray(b"".join(bytes(p) for p in codec.dumps(((os.urandom(128 * 1024),), {}))))
    body[12:20] = (1 << 40).to_bytes(8, "little")
    reply = _raw_exchange(server.port, _post("/bigrpc/Echo.echo", bytes(body)))
    assert _status(reply) == 400 and b"header" in reply
    assert client.call(server.addr, "Echo.add", (2, 3)) == 5


def test_shared_and_cyclic_references_survive(caller):
    """Pickle keeps object identity inside a message; large buffers must not change that."""
    for size in (10, 200_000):  # below and above the out-of-band threshold
        big = os.urandom(size)
        shared = [big]
        cyclic = [big]
        cyclic.append(cyclic)
        got_shared, got_pair, got_cyclic = caller.call("Echo.echo", ([shared, shared],
                                                                     [big, big], cyclic))
        assert got_shared[0] == [big] and got_pair[0] == big and got_cyclic[0] == big
        shared_kept = got_shared[0] is got_shared[1]
        pair_kept = got_pair[0] is got_pair[1]
        cycle_kept = got_cyclic[1] is got_cyclic
        assert shared_kept, f"size {size}: a shared list came back as 2 lists"
        assert pair_kept, f"size {size}: one bytes object came back as 2"
        assert cycle_kept, f"size {size}: a cycle came back broken"


def test_repeated_large_buffer_is_sent_once():
    big = os.urandom(MIB)
    size = sum(memoryview(p).nbytes for p in codec.dumps([big, big, (big,), {"k": big}]))
    assert size < 1.1 * MIB, f"{size} bytes on the wire for one 1 MiB buffer used 4 times"


_PIECES_IN_A_CYCLE = """
import gc, sys, threading
from bigexec.rpc import codec

seen = []
sys.unraisablehook = lambda u: seen.append(repr(u.exc_value))

def failed_call():
    pieces = codec.dumps({"fn": [threading.Lock] * 20, "n": object()})  # the cloudpickle path
    raise RuntimeError("the call failed")  # its traceback holds this frame, and so the pieces

for _ in range(50):
    try:
        failed_call()
    except RuntimeError as exc:
        exc.self = exc  # only the garbage collector can free it now
    gc.collect()
print(seen)
sys.exit(1 if seen else 0)
"""


def test_message_pieces_caught_in_a_reference_cycle_are_collected_cleanly():
    """A failed call's pieces end up in a cycle through its exception. A ``BytesIO.getbuffer``
    view among them crashed 3.12's garbage collector (CPython gh-111049) and made 3.13's raise
    an unraisable ``BufferError``; a child process, so that a crash fails only this test."""
    done = subprocess.run([sys.executable, "-c", _PIECES_IN_A_CYCLE], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stdout}{done.stderr[-2000:]}"


def test_message_pieces_hold_no_view_of_the_encoders_buffer():
    data = os.urandom(MIB)
    pieces = codec.dumps({"fn": threading.Lock, "data": data, "n": object()})
    for p in pieces:  # bytes, or a view of the caller's own data
        assert type(p) is bytes or (isinstance(p, memoryview) and p.obj is data), type(p)


def test_codec_rejects_a_truncated_or_padded_message():
    data = codec.dumps_bytes({"k": 1})
    assert codec.loads(data) == {"k": 1}
    with pytest.raises(codec.DecodeError):
        codec.loads(data[:-1])
    with pytest.raises(codec.DecodeError):
        codec.loads(data + b"x")
    with pytest.raises(codec.DecodeError):
        codec.loads(b"\x00")


# --- remote exceptions -------------------------------------------------------------------


def test_remote_value_error(caller):
    with pytest.raises(ValueError) as info:
        caller.call("Echo.raise_value", "x")
    exc = info.value
    assert type(exc) is ValueError
    assert str(exc) == "x" and exc.args == ("x",)
    cause = exc.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "raise_value" in str(cause)
    assert "ValueError: x" in str(cause)
    assert "raise_value" in exc.remote_traceback


def test_remote_custom_exception(caller):
    with pytest.raises(CustomError) as info:
        caller.call("Echo.raise_custom", 17)
    exc = info.value
    assert type(exc) is CustomError
    assert exc.code == 17 and exc.detail == "custom detail"
    assert "raise_custom" in str(exc.__cause__)


@pytest.mark.parametrize("method,cls,message", [
    ("Echo.raise_needs_two", "NeedsTwo", "only-one"),
    ("Echo.raise_holds_lock", "HoldsLock", "has a lock"),
])
def test_remote_exception_that_cannot_travel(caller, method, cls, message):
    with pytest.raises(bigexec.RemoteError) as info:
        caller.call(method)
    exc = info.value
    assert isinstance(exc, bigexec.BigexecError)
    assert exc.type_name.endswith("." + cls)
    assert exc.message == message
    assert cls in str(exc) and message in str(exc)
    assert method.split(".")[1] in exc.traceback
    assert isinstance(exc.__cause__, RemoteTraceback)
    assert method.split(".")[1] in str(exc.__cause__)
    # the machine or server is fine afterwards
    assert caller.call("Echo.add", 1, 2) == 3


def test_wrong_arguments_raise_the_remote_type_error(caller):
    with pytest.raises(TypeError, match="missing 1 required positional argument"):
        caller.call("Echo.add", 1)
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        caller.call("Echo.add", 1, 2, c=3)
    assert caller.call("Echo.add", 1, 2) == 3


def test_remote_error_pickles():
    import pickle

    err = bigexec.RemoteError("pkg.Err", "msg", "tb text")
    back = pickle.loads(pickle.dumps(err))
    assert (back.type_name, back.message, back.traceback) == ("pkg.Err", "msg", "tb text")


# --- unknown names ----------------------------------------------------------------------


def test_unknown_service(caller):
    with pytest.raises(bigexec.UnknownMethodError) as info:
        caller.call("Nope.echo", 1)
    msg = str(info.value)
    assert "Nope" in msg
    assert "Echo" in msg and "Streams" in msg
    if caller.kind == "threads":
        assert "Supervisor" in msg
    assert isinstance(info.value, LookupError)
    assert caller.call("Echo.add", 1, 1) == 2


@pytest.mark.parametrize("method", ["Echo.nope", "Echo._private", "Echo.init", "Echo.__init__"])
def test_unknown_method(caller, method):
    with pytest.raises(bigexec.UnknownMethodError) as info:
        caller.call(method)
    msg = str(info.value)
    assert repr(method.split(".")[1]) in msg
    listed = [m.strip() for m in msg.split("methods:")[1].split(",")]
    for name in ("echo", "add", "raise_value", "return_lock"):
        assert name in listed
    assert "_private" not in listed and "init" not in listed
    assert caller.call("Echo.add", 2, 2) == 4


def test_unknown_method_with_a_streamed_argument(caller):
    with pytest.raises(bigexec.UnknownMethodError):
        caller.call("Streams.nope", _chunks(3 * MIB))
    assert caller.call("Echo.add", 2, 2) == 4


# --- pickling failures -----------------------------------------------------------------


def test_unpicklable_argument_direct(caller):
    with pytest.raises(TypeError, match="lock"):
        caller.call("Echo.echo", threading.Lock())
    with pytest.raises(TypeError):
        caller.call("Echo.kw", x=[1, threading.Lock()])
    assert caller.call("Echo.echo", "still fine") == "still fine"


def test_unpicklable_argument_machine(machine):
    with pytest.raises(TypeError):
        machine.call("Echo.echo", threading.Lock())
    # submit raises at once, before returning a future
    with pytest.raises(TypeError):
        machine.submit("Echo.echo", {"lock": threading.Lock()})
    assert machine.state == bigexec.RUNNING
    assert machine.call("Echo.add", 20, 22) == 42
    assert machine.submit("Echo.add", 1, 2).result(timeout=10) == 3


def test_unpicklable_return_value(caller):
    with pytest.raises(TypeError) as info:
        caller.call("Echo.return_lock")
    assert "Echo.return_lock" in str(info.value)
    assert caller.call("Echo.add", 3, 4) == 7
    # and again: the failure does not poison anything
    with pytest.raises(TypeError):
        caller.call("Echo.return_lock")
    assert caller.call("Echo.echo", [1, 2]) == [1, 2]


def test_unpicklable_return_value_via_submit(machine):
    fut = machine.submit("Echo.return_lock")
    with pytest.raises(TypeError):
        fut.result(timeout=10)
    assert machine.submit("Echo.add", 5, 5).result(timeout=10) == 10
    assert machine.state == bigexec.RUNNING


# --- malformed requests on a raw socket -----------------------------------------------


def _raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data``, return everything the server sends back until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while True:
            try:
                got = s.recv(65536)
            except ConnectionResetError:
                break
            if not got:
                break
            out += got
        return out


def _status(reply: bytes) -> int | None:
    line = reply.split(b"\r\n", 1)[0].split(b" ")
    if len(line) < 2 or not line[0].startswith(b"HTTP/1."):
        return None
    return int(line[1])


_GOOD_BODY = codec.dumps_bytes(((5, 6), {}))


def _post(path: str, body: bytes, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\n{extra}Content-Length: {len(body)}\r\n\r\n"
            .encode() + body)


MALFORMED = {
    "garbage-line": (b"GARBAGE\r\n\r\n", 400),
    "garbage-two-words": (b"\x16\x03\x01 junk\r\n\r\n", 400),
    "not-http-version": (b"POST /bigrpc/Echo.add SPDY/9\r\nContent-Length: 0\r\n\r\n", 400),
    "get": (b"GET /bigrpc/Echo.add HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    "put-with-body": (b"PUT /bigrpc/Echo.add HTTP/1.1\r\nContent-Length: " +
                      str(len(_GOOD_BODY)).encode() + b"\r\n\r\n" + _GOOD_BODY, 405),
    "length-not-a-number": (b"POST /bigrpc/Echo.add HTTP/1.1\r\nContent-Length: abc\r\n\r\n", 400),
    "length-negative": (b"POST /bigrpc/Echo.add HTTP/1.1\r\nContent-Length: -5\r\n\r\n", 400),
    "no-body": (b"POST /bigrpc/Echo.add HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "undecodable-body": (_post("/bigrpc/Echo.add", b"hello"), 400),
    "garbage-pickle": (_post("/bigrpc/Echo.add", b"\x00\x00\x00\x00" + (5).to_bytes(8, "little")
                             + b"\x80\x05junk"), 400),
    "body-not-args-kwargs": (_post("/bigrpc/Echo.add", codec.dumps_bytes(("a", "b", "c"))), 400),
    "body-is-an-int": (_post("/bigrpc/Echo.add", codec.dumps_bytes(42)), 400),
    "body-is-none": (_post("/bigrpc/Echo.add", codec.dumps_bytes(None)), 400),
    "bad-timeout-header": (_post("/bigrpc/Echo.add", _GOOD_BODY, "X-Bigexec-Timeout: soon\r\n"),
                           400),
    "not-bigrpc-path": (_post("/index.html", b""), 404),
    "bigrpc-without-method": (_post("/bigrpc/Echo", _GOOD_BODY), 404),
    "chunked-without-call-frame": (
        b"POST /bigrpc/Echo.add HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nDx\r\n0\r\n\r\n", 400),
    "malformed-header-line": (b"POST /bigrpc/Echo.add HTTP/1.1\r\nthis header has no colon\r\n"
                              b"Content-Length: 0\r\n\r\n", 400),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_request_gets_4xx(plain_server, name):
    server, client = plain_server
    data, want = MALFORMED[name]
    # a connection that is open before the bad one must keep working too
    assert client.call(server.addr, "Echo.add", (1, 1)) == 2
    reply = _raw_exchange(server.port, data)
    assert _status(reply) == want, f"reply to {name}: {reply[:200]!r}"
    assert b"\r\n\r\n" in reply
    # the server goes on serving: on the pooled connection and on new ones
    assert client.call(server.addr, "Echo.add", (2, 3)) == 5
    fresh = Client()
    try:
        assert fresh.call(server.addr, "Echo.add", (4, 5)) == 9
    finally:
        fresh.close()
    assert not server.closed


def test_raw_request_and_keepalive(plain_server):
    """A well-formed request by hand; the connection carries a second one."""
    server, _ = plain_server
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        rfile = s.makefile("rb")
        for a, b in ((5, 6), (7, 8)):
            s.sendall(_post("/bigrpc/Echo.add", codec.dumps_bytes(((a, b), {}))))
            status = rfile.readline()
            assert status.startswith(b"HTTP/1.1 200")
            headers = {}
            while (line := rfile.readline()) not in (b"\r\n", b""):
                k, _, v = line.decode().partition(":")
                headers[k.strip().lower()] = v.strip()
            body = rfile.read(int(headers["content-length"]))
            assert codec.loads(body) == a + b
            assert headers.get("connection", "").lower() != "close"


def test_unknown_method_keeps_the_raw_connection(plain_server):
    server, _ = plain_server
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        rfile = s.makefile("rb")
        s.sendall(_post("/bigrpc/Echo.nope", _GOOD_BODY) + _post("/bigrpc/Echo.add", _GOOD_BODY))
        assert rfile.readline().startswith(b"HTTP/1.1 404")
        length = None
        while (line := rfile.readline()) != b"\r\n":
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        assert b"methods:" in rfile.read(length)
        assert rfile.readline().startswith(b"HTTP/1.1 200")


def test_many_bad_connections_then_good(plain_server):
    server, client = plain_server
    with ThreadPoolExecutor(8) as ex:
        replies = list(ex.map(lambda _: _raw_exchange(server.port, b"BOGUS\r\n\r\n"), range(32)))
    assert all(_status(r) == 400 for r in replies)
    # and a connection that sends nothing and goes away
    socket.create_connection(("127.0.0.1", server.port)).close()
    assert client.call(server.addr, "Echo.echo", ("ok",)) == "ok"


# --- streams -----------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["iter", "readinto", "read"])
def test_stream_argument_generator_32mib(caller, how):
    total = 32 * MIB
    is_stream, n, digest = caller.call("Streams.digest", _chunks(total, 3 * MIB // 2 + 1), how)
    assert is_stream is True
    assert n == total
    assert digest == _sha(total, 3 * MIB // 2 + 1)
    assert caller.call("Echo.add", 1, 2) == 3


def test_stream_argument_file_object_32mib(caller):
    data = b"".join(_chunks(32 * MIB))
    is_stream, n, digest = caller.call("Streams.digest", io.BytesIO(data), "readinto")
    assert (is_stream, n, digest) == (True, len(data), hashlib.sha256(data).hexdigest())
    assert caller.call("Echo.add", 1, 2) == 3


def test_stream_argument_as_keyword(caller):
    data = os.urandom(100_000)
    is_stream, n, digest = caller.call("Streams.digest", stream=iter([data[:10], data[10:]]),
                                       how="read")
    assert (is_stream, n, digest) == (True, len(data), hashlib.sha256(data).hexdigest())


def test_stream_argument_from_a_real_file(caller, tmp_path):
    p = tmp_path / "blob"
    p.write_bytes(b"".join(_chunks(5 * MIB + 3)))
    with open(p, "rb") as f:
        assert caller.call("Streams.digest", f) == (True, 5 * MIB + 3, _sha(5 * MIB + 3))


def test_stream_reply_32mib(caller):
    total = 32 * MIB
    s = caller.call("Streams.generate", total)
    assert isinstance(s, bigexec.Stream)
    h = hashlib.sha256()
    n = 0
    for chunk in s:
        h.update(chunk)
        n += len(chunk)
    assert n == total
    assert h.hexdigest() == _sha(total)
    assert s.complete
    assert caller.call("Echo.add", 1, 2) == 3


def test_stream_reply_read_in_pieces(caller):
    total = 3 * MIB + 5
    s = caller.call("Streams.generate", total, 100_000)
    h = hashlib.sha256()
    n = 0
    while True:
        piece = s.read(77_777)
        if not piece:
            break
        assert len(piece) <= 77_777
        h.update(piece)
        n += len(piece)
    assert n == total and h.hexdigest() == _sha(total, 100_000)
    assert s.read() == b""
    assert caller.call("Echo.add", 1, 2) == 3


def test_empty_stream_argument(caller):
    empty = hashlib.sha256(b"").hexdigest()
    assert caller.call("Streams.digest", iter([])) == (True, 0, empty)
    assert caller.call("Streams.digest", io.BytesIO(b""), "read") == (True, 0, empty)
    assert caller.call("Streams.digest", iter([b"", b""]), "readinto") == (True, 0, empty)
    assert caller.call("Echo.add", 1, 2) == 3


def test_empty_stream_reply(caller):
    for method, args in (("Streams.empty", ()), ("Streams.generate", (0,))):
        s = caller.call(method, *args)
        assert isinstance(s, bigexec.Stream)
        assert s.read() == b""
        assert s.complete
    s = caller.call("Streams.empty")
    assert list(s) == []
    assert caller.call("Echo.add", 1, 2) == 3


def test_server_generator_error_mid_stream(caller):
    s = caller.call("Streams.fail_after", 70_000)
    got = []
    with pytest.raises(ValueError, match="server source broke") as info:
        for chunk in s:
            got.append(bytes(chunk))
    assert b"".join(got) == b"a" * 70_000 + b"b" * 70_000
    assert "fail_after" in str(info.value.__cause__)
    # reading again reports the same failure, not a clean end
    with pytest.raises(ValueError):
        s.read()
    assert caller.call("Echo.add", 1, 2) == 3


def test_server_generator_error_mid_stream_readall(caller):
    s = caller.call("Streams.fail_after", 10)
    assert s.read(10) == b"a" * 10
    with pytest.raises(ValueError, match="server source broke"):
        s.read()
    assert caller.call("Echo.add", 1, 2) == 3


def test_server_generator_yielding_text(caller):
    s = caller.call("Streams.text")
    with pytest.raises(TypeError, match="bytes"):
        s.read()
    assert caller.call("Echo.add", 1, 2) == 3


def test_client_iterator_error_mid_stream(caller):
    def source():
        yield b"x" * 100_000
        yield b"y" * 10
        raise SourceError("client source broke")

    _SEEN.clear()
    with pytest.raises(SourceError, match="client source broke"):
        caller.call("Streams.record", source())
    # the server-side reader got the data, then the error
    assert _SEEN["data"] == b"x" * 100_000 + b"y" * 10
    assert isinstance(_SEEN["error"], SourceError)
    assert caller.call("Echo.add", 1, 2) == 3


def test_client_iterator_error_when_method_ignores_stream(caller):
    def source():
        yield b"x" * 10
        raise SourceError("broke early")

    with pytest.raises(SourceError, match="broke early"):
        caller.call("Streams.ignore", source())
    assert caller.call("Echo.add", 1, 2) == 3


def test_client_iterator_error_when_method_replies_with_a_stream(caller):
    """The caller's own source failed: the call must not look like a success."""
    def source():
        yield b"x" * 10
        raise SourceError("broke before a streamed reply")

    with pytest.raises(SourceError, match="broke before a streamed reply"):
        s = caller.call("Streams.ignore_and_generate", source(), 1000)
        s.read()  # not reached when the call raises, as it should
    assert caller.call("Echo.add", 1, 2) == 3


def test_client_iterator_yielding_text(caller):
    with pytest.raises(TypeError, match="bytes"):
        caller.call("Streams.digest", iter(["text"]))
    assert caller.call("Echo.add", 1, 2) == 3


def test_two_stream_arguments_rejected(caller):
    with pytest.raises(TypeError, match="at most one"):
        caller.call("Echo.kw", io.BytesIO(b"a"), iter([b"b"]))
    assert caller.call("Echo.add", 1, 2) == 3


def test_reply_stream_closed_early(caller):
    s = caller.call("Streams.generate", 16 * MIB)
    assert len(s.read(1000)) == 1000
    s.close()
    assert s.closed
    for i in range(3):
        assert caller.call("Echo.add", i, 1) == i + 1
    # and a full stream afterwards is intact
    assert hashlib.sha256(caller.call("Streams.generate", 2 * MIB).read()).hexdigest() == \
        _sha(2 * MIB)


def test_stream_transform_small(caller):
    s = caller.call("Streams.upper", iter([b"abc", b"def"]))
    assert s.read() == b"ABCDEF"
    assert caller.call("Echo.add", 1, 2) == 3


def test_stream_transform_large(machine):
    """A method that maps its streamed argument to a streamed reply, on a large stream."""
    total = 32 * MIB
    s = machine.call("Streams.upper", _chunks(total), timeout=10)
    h = hashlib.sha256()
    for chunk in s:
        h.update(chunk)
    want = hashlib.sha256()
    for c in _chunks(total):
        want.update(c.upper())
    assert h.hexdigest() == want.hexdigest()


@pytest.fixture(params=[True, False], ids=["tls", "plain"])
def upload_machine(request):
    with bigexec.start("threads", tls=request.param) as b:
        (m,) = b.start(1, services=SERVICES)
        assert m.wait(bigexec.RUNNING, timeout=20)
        assert m.state == bigexec.RUNNING, m.err
        yield m


def test_retry_call_does_not_resend_a_consumed_stream(upload_machine):
    """A transport failure in the middle of an upload must not lead to a silent retry that
    sends only what was left of the (one-shot) source."""
    machine = upload_machine
    server = machine.handle.runtime.server  # the threads machine's own server
    machine.retry_backoff = (0.05, 0.05, 1.0)
    total = 8 * MIB

    def source():
        for i, chunk in enumerate(_chunks(total)):
            if i == 4:  # the network drops every connection to the machine mid-upload
                server.drop_connections()
            yield chunk

    try:
        result = machine.retry_call("Streams.digest", source(), timeout=10)
    except (bigexec.NetworkError, TypeError, ValueError):
        result = None  # refusing to retry a half-sent stream is fine
    assert result is None or result == (True, total, _sha(total)), \
        f"the method ran on {result[1]} of {total} bytes and the call reported success"
    assert machine.call("Echo.add", 1, 2) == 3


def test_streams_over_submit(machine):
    fut = machine.submit("Streams.generate", 2 * MIB)
    s = fut.result(timeout=10)
    assert hashlib.sha256(s.read()).hexdigest() == _sha(2 * MIB)
    fut = machine.submit("Streams.digest", _chunks(2 * MIB))
    assert fut.result(timeout=10) == (True, 2 * MIB, _sha(2 * MIB))


# --- concurrency -----------------------------------------------------------------------


def test_50_concurrent_submits(machine):
    global _BARRIER
    # every call blocks until all 50 are running: passes only if none waits for another,
    # which takes a session that runs at least 50 calls at once (the default is fewer)
    machine.session.max_concurrent_calls = 50
    _BARRIER = threading.Barrier(50, timeout=20)
    try:
        futures = [machine.submit("Streams.at_barrier", i) for i in range(50)]
        results = [f.result(timeout=30) for f in futures]
    finally:
        _BARRIER = None
    assert results == [i * i for i in range(50)]
    assert machine.call("Echo.add", 1, 2) == 3


def test_50_concurrent_mixed_calls(machine):
    payloads = [os.urandom(i * 1000) for i in range(50)]
    futures = [machine.submit("Echo.echo", p) for p in payloads]
    futures += [machine.submit("Echo.add", i, i) for i in range(50)]
    results = [f.result(timeout=30) for f in futures]
    assert results[:50] == payloads
    assert results[50:] == [2 * i for i in range(50)]


def test_concurrent_calls_direct(caller):
    def one(i):
        if i % 5 == 0:
            try:
                caller.call("Echo.raise_value", str(i))
            except ValueError as exc:
                return str(exc)
        return caller.call("Echo.add", i, 1000)

    with ThreadPoolExecutor(50) as ex:
        results = list(ex.map(one, range(200)))
    assert results == [str(i) if i % 5 == 0 else i + 1000 for i in range(200)]


def test_server_stats_count_calls(plain_server):
    server, client = plain_server
    for i in range(3):
        client.call(server.addr, "Echo.add", (i, i))
    with pytest.raises(ValueError):
        client.call(server.addr, "Echo.raise_value", ("x",))
    # the server books a call just after sending its reply: give it a moment
    deadline = time.monotonic() + 5
    while server.stats.snapshot().get("Echo.raise_value", {}).get("count") != 1:
        assert time.monotonic() < deadline, server.stats.snapshot()
        time.sleep(0.001)
    stats = server.stats.snapshot()
    assert stats["Echo.add"]["count"] == 3 and stats["Echo.add"]["errors"] == 0
    assert stats["Echo.raise_value"]["count"] == 1 and stats["Echo.raise_value"]["errors"] == 1


def test_pooled_connection_dropped_by_the_server_is_replaced(plain_server):
    """A pooled connection the server dropped while idle: the call goes through on a new one."""
    server, client = plain_server
    assert client.call(server.addr, "Echo.add", (1, 1)) == 2  # leaves a pooled connection
    assert server.drop_connections() == 1
    time.sleep(0.05)  # let the FIN/RST reach the client side
    assert client.call(server.addr, "Echo.add", (2, 2)) == 4


def test_closed_server_stops_listening(plain_server):
    server, client = plain_server
    assert client.call(server.addr, "Echo.add", (1, 1)) == 2
    time.sleep(0.05)  # an idle server: its accept thread is back waiting in accept()
    server.close()
    assert server.closed
    # close() promises to stop accepting: the port must refuse connections now
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()
    # and it can be bound again
    again = Server(_registry(), port=server.port)
    again.close()


@pytest.mark.parametrize("kind", ["plain", "tls"])
def test_closed_server_drops_its_connections(kind):
    """``close`` drops every connection, TLS ones included (whose raw socket wrapping
    detached): no connection thread stays blocked on a client that keeps its connection."""
    server_ssl, client_ssl = _tls_pair() if kind == "tls" else (None, None)
    server = Server(_registry(), ssl_context=server_ssl)
    server.start()
    client = Client(client_ssl)
    try:
        before = set(threading.enumerate())
        assert client.call(server.addr, "Echo.add", (1, 1)) == 2  # its connection stays idle
        serving = [t for t in threading.enumerate()
                   if t.name == "bigexec-conn" and t not in before]
        assert len(serving) == 1
        time.sleep(0.2)  # let its thread go back to waiting for the next request
        server.close()
        serving[0].join(timeout=10)
        assert not serving[0].is_alive()
    finally:
        client.close()
        server.close()


def test_call_to_a_closed_server_is_a_network_error(plain_server):
    server, client = plain_server
    assert client.call(server.addr, "Echo.add", (1, 1)) == 2
    server.close()
    t0 = time.monotonic()
    with pytest.raises(bigexec.NetworkError):
        client.call(server.addr, "Echo.add", (1, 1))
    assert time.monotonic() - t0 < 5


# --- sockets -----------------------------------------------------------------------------


def _mixed_traffic(client: Client, addr: str) -> None:
    """Calls that end every way a connection can: reused, failed remotely, timed out, aborted
    by another thread, a stream abandoned half way, dropped from the pool."""
    assert [client.call(addr, "Echo.add", (i, 1)) for i in range(3)] == [1, 2, 3]
    with pytest.raises(ValueError):
        client.call(addr, "Echo.raise_value", ("no",))
    with pytest.raises(TimeoutError):
        client.call(addr, "Echo.sleep", (1.0,), timeout=0.1)
    handle = CallHandle()
    stopper = threading.Timer(0.1, handle.abort, (RuntimeError("aborted"),))
    stopper.start()
    with pytest.raises(RuntimeError, match="aborted"):
        client.call(addr, "Echo.sleep", (1.0,), handle=handle)
    stopper.join()
    stream = client.call(addr, "Streams.generate", (4 * MIB,))
    next(stream)
    stream.close()
    client.reset(addr)
    assert client.call(addr, "Echo.add", (2, 2)) == 4


@pytest.mark.parametrize("kind", ["plain", "tls"])
def test_rpc_traffic_leaves_no_socket_to_the_garbage_collector(kind, monkeypatch):
    """Every connection that ends is closed, its descriptor included: a socket only marked
    closed (a file made from it still open) would be closed by the garbage collector, with a
    ResourceWarning, which unittest and ``-W error`` report. Here the aborted call's
    exception, held by its handle, makes a cycle with the frames that used the connection."""
    unraisable: list[str] = []
    monkeypatch.setattr(sys, "unraisablehook",
                        lambda u: unraisable.append(f"{u.exc_type.__name__}: {u.exc_value}"))
    server_ssl, client_ssl = _tls_pair() if kind == "tls" else (None, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        server = Server(_registry(), ssl_context=server_ssl)
        server.start()
        client = Client(client_ssl)
        try:
            _mixed_traffic(client, server.addr)
        finally:
            client.close()
            server.close()
        gc.collect()
    assert unraisable == []
