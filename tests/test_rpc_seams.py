"""The rpc package's public seams: the wire namespace its importers use, the registrations
other modules make (plain types, types that never stream), parsed heads, the connection pool
behind ``Client``."""

from __future__ import annotations

import io
import itertools
import socket
import time

import pytest
from test_rpc import _tls_pair, serving

from bigexec import tasks
from bigexec.errors import NetworkError
from bigexec.rpc import (
    codec,
    framing,
    heads,
    pool,
    remote_errors,
    sockets,
    stream,
    stream_sources,
    wire,
)
from bigexec.rpc.client import Client

#: Every public name of wire.py before it was split, each with the module that owns it now.
WIRE_NAMES = {
    framing: ["END_FRAME", "MAX_CHUNK_BYTES", "MAX_MESSAGE_BYTES", "STREAM_FRAME_MAX",
              "TooLargeError", "body_length", "check_size", "parse_chunk_size", "read_chunk",
              "read_exact", "read_message", "send_frame", "send_message", "send_stream"],
    heads: ["MAX_HEADERS", "MAX_LINE", "REASONS", "STATUS_APP_ERROR", "STATUS_TOO_LARGE",
            "parse_content_length", "parse_head", "read_head"],
    remote_errors: ["decode_error", "encode_error"],
    sockets: ["KEEPALIVE_COUNT", "KEEPALIVE_IDLE", "KEEPALIVE_INTERVAL", "tune_socket"],
    stream: ["Stream"],
    stream_sources: ["NEVER_STREAMS", "STREAM_CHUNK", "StreamPlaceholder", "is_stream_source",
                     "iter_source"],
}


@pytest.mark.parametrize("module,name", [(m, n) for m, names in WIRE_NAMES.items()
                                         for n in names])
def test_wire_still_names_everything_it_did(module, name):
    assert getattr(wire, name) is getattr(module, name)


def test_wire_all_lists_only_what_it_has():
    old = set(itertools.chain.from_iterable(WIRE_NAMES.values()))
    assert old <= set(wire.__all__)
    assert all(hasattr(wire, n) for n in wire.__all__)


def test_read_head_names_its_parts():
    head = wire.read_head(io.BufferedReader(io.BytesIO(
        b"POST /bigrpc/Echo.echo HTTP/1.1\r\nContent-Length: 3\r\nX-A: b\r\n\r\nabc")))
    assert head is not None
    assert head.start == ["POST", "/bigrpc/Echo.echo", "HTTP/1.1"]
    assert head.headers == {"content-length": "3", "x-a": "b"}
    start, headers = head  # what the server and the client do
    assert (start, headers) == (head.start, head.headers)


def test_read_head_by_lines_names_its_parts_too():
    class Unbuffered(io.BufferedReader):  # a head that is not whole in the buffer
        def peek(self, size=0):
            return b""

    head = wire.read_head(Unbuffered(io.BytesIO(b"HTTP/1.1 200 OK\r\nX-B: c\r\n\r\n")))
    assert head is not None and head.start == ["HTTP/1.1", "200", "OK"]
    assert head.headers == {"x-b": "c"}


def module_level_function():
    return 1


class ModuleLevelClass:
    pass


def test_named_tells_importable_functions_and_classes_from_the_rest():
    def local():
        pass

    assert codec.named(module_level_function) and codec.named(ModuleLevelClass)
    assert not codec.named(local)
    assert not codec.named(lambda: None)


def test_register_plain_type_refuses_a_class_that_pickles_by_value():
    class Local:
        pass

    before = set(codec.PLAIN_TYPES)
    with pytest.raises(TypeError, match="not importable"):
        codec.register_plain_type(Local)
    assert codec.PLAIN_TYPES == before


def test_register_plain_type_adds_an_importable_class():
    assert ModuleLevelClass not in codec.PLAIN_TYPES
    try:
        codec.register_plain_type(ModuleLevelClass)
        assert ModuleLevelClass in codec.PLAIN_TYPES
        value = ModuleLevelClass()
        assert type(codec.loads(b"".join(bytes(p) for p in codec.dumps([value])))[0]) is \
            ModuleLevelClass
    finally:
        codec.PLAIN_TYPES.discard(ModuleLevelClass)


class Chunks:
    def __iter__(self):
        return self

    def __next__(self):
        raise StopIteration


@pytest.mark.parametrize("cls", [Chunks, io.BytesIO])
def test_never_stream_refuses_types_whose_values_stream(cls):
    before = set(wire.NEVER_STREAMS)
    with pytest.raises(TypeError, match="streams"):
        wire.never_stream(cls)
    assert wire.NEVER_STREAMS == before
    assert wire.is_stream_source(cls())


def test_tasks_registers_its_pickled_functions_through_the_seams():
    assert tasks.PickledFunction in codec.PLAIN_TYPES
    assert tasks.PickledFunction in wire.NEVER_STREAMS
    assert not wire.is_stream_source(tasks.PickledFunction(b""))


def test_the_pool_reuses_a_connection_and_marks_it_reused():
    with serving() as (server, _):
        p = pool.ConnectionPool()
        try:
            ep = p.endpoint(server.addr)
            first = p.checkout(server.addr, ep, False, None)
            assert not first.reused
            p.checkin(server.addr, first)
            again = p.checkout(server.addr, ep, False, None)
            assert again is first and again.reused
            p.checkin(server.addr, again)
        finally:
            p.close()
        assert first.dead  # closed with the pool


def test_the_pool_drops_connections_idle_past_its_limit(monkeypatch):
    monkeypatch.setattr(pool, "POOL_IDLE_SECONDS", 0.0)
    with serving() as (server, _):
        p = pool.ConnectionPool()
        try:
            ep = p.endpoint(server.addr)
            first = p.checkout(server.addr, ep, False, None)
            p.checkin(server.addr, first)
            second = p.checkout(server.addr, ep, False, None)
            assert second is not first and not second.reused
            assert first.dead
            second.kill()
        finally:
            p.close()


def test_a_closed_pool_keeps_nothing():
    with serving() as (server, _):
        p = pool.ConnectionPool()
        conn = p.checkout(server.addr, p.endpoint(server.addr), False, None)
        p.close()
        p.checkin(server.addr, conn)
        assert conn.dead


def test_the_pool_refuses_a_bad_address():
    with pytest.raises(ValueError, match="bad machine address"):
        pool.ConnectionPool().endpoint("tcp://127.0.0.1")


def test_credentials_set_on_the_client_serve_its_next_dials():
    server_ssl, client_ssl = _tls_pair()
    with serving(server_ssl, None) as (server, client):
        with pytest.raises(NetworkError, match="no credentials"):
            client.call(server.addr, "Echo.echo", (1,))
        client.ssl_context = client_ssl
        assert client.ssl_context is client_ssl
        assert client.call(server.addr, "Echo.echo", (2,)) == 2


def test_the_client_closes_its_pool():
    with serving() as (server, _):
        client = Client(connect_timeout=3.0)
        assert client.connect_timeout == 3.0
        assert client.call(server.addr, "Echo.echo", (1,)) == 1
        client.close()
        # nothing pooled any more: the next call dials, and its connection is not kept
        assert client.call(server.addr, "Echo.echo", (2,)) == 2
        client.close()


def test_tune_socket_sets_nodelay_and_keepalive():
    with socket.socket() as s:
        wire.tune_socket(s)
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)


def test_drop_connections_ends_them_and_the_server_goes_on():
    with serving() as (server, client), serving() as (_, other):
        assert client.call(server.addr, "Echo.echo", (1,)) == 1  # each pools a connection
        assert other.call(server.addr, "Echo.echo", (2,)) == 2
        assert server.drop_connections() == 2
        deadline = time.monotonic() + 5
        while server.drop_connections():  # their threads see the reset and end
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert client.call(server.addr, "Echo.echo", (3,)) == 3  # still accepting
        assert server.drop_connections() == 1  # the client's new connection


def test_code_by_value_keeps_its_file_name_and_lines():
    """cloudpickle names the file of every code object it copies "<dynamic-code>"; the codec
    keeps the real one, for nested code too, so profiles and tracebacks point at the source."""
    namespace: dict = {"__name__": "bigexec_test_not_importable"}
    source = "\n\ndef outer(x):\n    def inner(y):\n        return y + 1\n    return inner(x)\n"
    exec(compile(source, "/somewhere/driver_script.py", "exec"), namespace)
    outer = namespace["outer"]
    assert not codec.named(outer)  # pickled by value
    copy = codec.loads(codec.dumps_bytes(outer))
    assert copy is not outer and copy(1) == 2
    assert copy.__code__.co_filename == "/somewhere/driver_script.py"
    assert copy.__code__.co_firstlineno == 3
    inner = next(c for c in copy.__code__.co_consts if hasattr(c, "co_filename"))
    assert inner.co_filename == "/somewhere/driver_script.py" and inner.co_firstlineno == 4
