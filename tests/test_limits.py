"""The RPC server's sizes: memory follows the bytes that arrive, not the lengths a peer
declares, and a message or stream frame over the server's limit gets a 413 that the caller
sees as ``TooLargeError`` naming the limit, with no traceback in the server's log."""

from __future__ import annotations

import io
import logging
import os
import socket
import time
import tracemalloc

import pytest
from test_rpc import _raw_exchange, _registry, _status, serving

from bigexec.errors import ProtocolError
from bigexec.rpc import codec, wire
from bigexec.rpc import server as server_mod

pytestmark = pytest.mark.timeout(120)
MIB = 1 << 20


@pytest.fixture
def plain_server():
    with serving() as pair:
        yield pair


@pytest.fixture
def traced():
    """tracemalloc on for the test; yields a function giving the peak since it started."""
    tracemalloc.start()
    try:
        yield lambda: tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _assert_quiet(caplog, warnings_at_most: int = 1) -> None:
    """No record at ERROR or above, none with a traceback, at most so many warnings."""
    records = [r for r in caplog.records if r.name.startswith("bigexec")]
    assert not [r for r in records if r.levelno >= logging.ERROR or r.exc_info], records
    assert len([r for r in records if r.levelno == logging.WARNING]) <= warnings_at_most


# --- memory follows the data ------------------------------------------------------------


def test_a_lying_message_header_costs_memory_as_data_arrives(traced):
    # 4 bytes that claim ~256 MiB of buffer lengths, then the data ends
    length = 256 * MIB
    n = (length - 4) // 8 - 1
    with pytest.raises(EOFError):
        codec.read(io.BytesIO(n.to_bytes(4, "little")).readinto, length)
    assert traced() < 4 * MIB


@pytest.mark.parametrize("as_bytes", [True, False])
def test_a_lying_buffer_length_costs_memory_as_data_arrives(traced, as_bytes):
    # a header that adds up, for a 1 GiB buffer of which 10 bytes arrive
    big = (1 << 30) | (1 << 63 if as_bytes else 0)
    header = (1).to_bytes(4, "little") + (3).to_bytes(8, "little") + big.to_bytes(8, "little")
    length = len(header) + 3 + (1 << 30)
    with pytest.raises(EOFError):
        codec.read(io.BytesIO(header + b"abc" + b"x" * 10).readinto, length)
    assert traced() < 4 * MIB


@pytest.mark.parametrize("n", [0, 1, MIB - 1, MIB, MIB + 1, 5 * MIB + 3])
@pytest.mark.parametrize("as_bytes", [True, False])
def test_read_buffer_returns_what_arrived_in_the_type_asked(n, as_bytes):
    data = os.urandom(n)
    got = codec.read_buffer(io.BufferedReader(io.BytesIO(data)).readinto, n, as_bytes=as_bytes)
    assert got == data
    assert type(got) is (bytes if as_bytes else bytearray)
    if as_bytes and n:
        assert hash(got) == hash(data)
    with pytest.raises(EOFError, match=f"after {n} of {n + 1} bytes"):
        codec.read_buffer(io.BytesIO(data).readinto, n + 1, as_bytes=as_bytes)


def test_a_lying_content_length_costs_the_server_memory_as_data_arrives(plain_server, traced):
    server, client = plain_server
    length = 256 * MIB
    n = (length - 4) // 8 - 1
    head = (f"POST /bigrpc/Echo.echo HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n"
            .encode())
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(head + n.to_bytes(4, "little"))
        time.sleep(1.0)  # the server is waiting for the rest by now
        assert traced() < 16 * MIB
    assert client.call(server.addr, "Echo.echo", (b"still here",), {}, timeout=10) == b"still here"


def test_honest_large_values_still_arrive_whole_and_typed(plain_server):
    server, client = plain_server
    a, b = os.urandom(3 * MIB + 7), bytearray(os.urandom(2 * MIB + 1))
    got = client.call(server.addr, "Echo.echo", ([a, b],), {}, timeout=30)
    assert got == [a, b] and [type(x) for x in got] == [bytes, bytearray]


# --- limits ---------------------------------------------------------------------------


def test_limits_come_from_the_constructor_the_environment_or_the_defaults(monkeypatch):
    monkeypatch.delenv(server_mod.MAX_MESSAGE_BYTES_ENV, raising=False)
    monkeypatch.setenv(server_mod.MAX_CHUNK_BYTES_ENV, "12345")
    s = server_mod.Server(_registry(), max_message_bytes=777)
    try:
        assert (s.max_message_bytes, s.max_chunk_bytes) == (777, 12345)
    finally:
        s.close()
    monkeypatch.delenv(server_mod.MAX_CHUNK_BYTES_ENV)
    s = server_mod.Server(_registry())
    try:
        assert s.max_message_bytes == wire.MAX_MESSAGE_BYTES == 8 << 30
        assert s.max_chunk_bytes == wire.MAX_CHUNK_BYTES == 64 * MIB
    finally:
        s.close()
    monkeypatch.setenv(server_mod.MAX_MESSAGE_BYTES_ENV, "lots")
    with pytest.raises(ValueError, match=server_mod.MAX_MESSAGE_BYTES_ENV):
        server_mod.Server(_registry())


def test_a_call_over_the_message_limit_gets_a_clear_error(plain_server, caplog):
    server, client = plain_server
    server.max_message_bytes = MIB
    with pytest.raises(wire.TooLargeError) as info:
        client.call(server.addr, "Echo.echo", (os.urandom(2 * MIB),), {}, timeout=30)
    text = str(info.value)
    assert f"over the limit of {MIB} bytes" in text
    assert "max_message_bytes" in text and server_mod.MAX_MESSAGE_BYTES_ENV in text
    assert isinstance(info.value, ProtocolError)
    assert client.call(server.addr, "Echo.echo", (b"small",), {}, timeout=10) == b"small"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "127.0.0.1:" in warnings[0].getMessage()
    _assert_quiet(caplog)


def test_a_streamed_frame_over_the_chunk_limit_gets_a_clear_error(plain_server, caplog):
    server, client = plain_server
    server.max_chunk_bytes = MIB
    chunks = iter([b"a" * 1000, os.urandom(2 * MIB)])
    with pytest.raises(wire.TooLargeError) as info:
        client.call(server.addr, "Streams.digest", (chunks,), {}, timeout=30)
    assert "max_chunk_bytes" in str(info.value) and server_mod.MAX_CHUNK_BYTES_ENV in str(
        info.value)
    assert client.call(server.addr, "Echo.echo", (1,), {}, timeout=10) == 1
    _assert_quiet(caplog)


def test_a_chunk_larger_than_a_frame_is_sent_as_several_frames(plain_server):
    import hashlib

    server, client = plain_server
    server.max_chunk_bytes = wire.STREAM_FRAME_MAX
    data = os.urandom(2 * wire.STREAM_FRAME_MAX + 5)
    got = client.call(server.addr, "Streams.digest", (iter([data]),), {}, timeout=60)
    assert got == (True, len(data), hashlib.sha256(data).hexdigest())


_CALL_FRAME = b"H" + codec.dumps_bytes(((wire.StreamPlaceholder(),), {}))
_CHUNKED_HEAD = (b"POST /bigrpc/Streams.digest HTTP/1.1\r\nHost: x\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")


@pytest.mark.parametrize("where", ["call-frame", "data-frame"])
def test_an_absurd_chunk_size_gets_413_without_a_traceback(plain_server, caplog, where):
    server, client = plain_server
    if where == "call-frame":
        body = b"ffffffffff\r\nH"
    else:
        body = b"%x\r\n%s\r\nffffffffff\r\nD" % (len(_CALL_FRAME), _CALL_FRAME)
    reply = _raw_exchange(server.port, _CHUNKED_HEAD + body, timeout=10)
    assert _status(reply) == 413, reply[:200]
    assert b"over the limit" in reply
    assert client.call(server.addr, "Echo.echo", (2,), {}, timeout=10) == 2
    _assert_quiet(caplog)


@pytest.mark.parametrize("size_line", [b"-1", b"+5", b"0x5", b"5_0", b" ", b"zz"])
def test_a_bad_chunk_size_is_refused_not_read_to_the_end(plain_server, size_line):
    # int(x, 16) takes "-1" (and read(-1) reads until the peer closes: the server hung)
    server, client = plain_server
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(_CHUNKED_HEAD + size_line + b"\r\nHxx\r\n")
        reply = s.recv(65536)  # without closing our side first
    assert _status(reply) == 400, reply[:200]
    assert client.call(server.addr, "Echo.echo", (3,), {}, timeout=10) == 3


@pytest.mark.parametrize("value", ["-5", "+5", " 5_0", "1e3", "٣", "99999999999999999999999"])
def test_a_content_length_that_is_not_plain_digits_is_refused(plain_server, value):
    server, _ = plain_server
    head = f"POST /bigrpc/Echo.echo HTTP/1.1\r\nContent-Length: {value}\r\n\r\n"
    assert _status(_raw_exchange(server.port, head.encode("utf-8"))) == 400


@pytest.mark.parametrize("extra", [
    "Content-Length: 5\r\nContent-Length: 5\r\n",
    "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
    "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
    "Transfer-Encoding: gzip\r\nContent-Length: 5\r\n",
])
def test_ambiguous_body_framing_is_refused(plain_server, extra):
    server, _ = plain_server
    head = f"POST /bigrpc/Echo.echo HTTP/1.1\r\n{extra}\r\n"
    assert _status(_raw_exchange(server.port, head.encode() + b"12345")) == 400
