"""Bodies on the wire: ``Content-Length`` messages, chunked stream frames, and their limits.

A plain request or reply has a ``Content-Length`` body holding one codec message. A streamed
argument or reply uses ``Transfer-Encoding: chunked`` and each HTTP chunk is one frame,
tagged by its first byte::

    H <message>     the call's arguments (first frame of a streamed request only)
    D <bytes>       stream data
    E <message>     the stream failed; the message is an error tuple (see ``remote_errors``)
    Z               the stream ended normally

A receiver allocates memory as a body's bytes arrive, never from the length a peer declares
(see ``codec.read_buffer``), parses chunk sizes strictly (hex digits only), and refuses a
message or a frame over its limit with ``TooLargeError``.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any, cast

from ..errors import NetworkError, ProtocolError
from . import codec
from .heads import MAX_LINE, STATUS_TOO_LARGE
from .remote_errors import encode_error
from .stream_sources import iter_source

__all__ = ["END_FRAME", "MAX_CHUNK_BYTES", "MAX_MESSAGE_BYTES", "STREAM_FRAME_MAX",
           "TooLargeError", "body_length", "check_size", "parse_chunk_size", "read_chunk",
           "read_exact", "read_message", "send_frame", "send_message", "send_stream"]

#: Default limit on one message (a call's arguments or a reply), in bytes. A receiver's
#: memory follows the bytes that arrive, so the limit only has to stop what no honest caller
#: sends: 8 GiB is past the largest single value a worker of common size can hold twice (as
#: it arrives and as the method uses it), and far below the 2**63 a peer could declare.
MAX_MESSAGE_BYTES = 8 << 30
#: Default limit on one frame of a byte stream. Senders cut streams into frames of at most
#: ``STREAM_FRAME_MAX`` bytes, so this only refuses peers that are not bigexec.
MAX_CHUNK_BYTES = 64 << 20
#: The largest frame ``send_stream`` sends (its tag byte included): a larger chunk goes as
#: several frames.
STREAM_FRAME_MAX = 16 << 20
#: The frame that ends a stream normally (what ``send_frame(sock, b"Z")`` sends).
END_FRAME = b"1\r\nZ\r\n"
_LAST_CHUNK = b"0\r\n\r\n"
_SMALL = 64 * 1024  # up to this, a message or frame is joined and sent in one write


class TooLargeError(ProtocolError):
    """A message or stream frame was over the receiving server's limit (HTTP 413)."""

    status = STATUS_TOO_LARGE


def check_size(size: int, limit: int | None, what: str, how: str = "") -> None:
    """``TooLargeError`` if ``size`` bytes of ``what`` are over ``limit`` (None: no limit);
    ``how`` (appended to the message) says how to raise the limit."""
    if limit is not None and size > limit:
        raise TooLargeError(f"{what} of {size} bytes is over the limit of {limit} bytes{how}")


# --- Content-Length messages -----------------------------------------------------------------


def read_exact(rfile: Any, n: int) -> bytearray:
    """Read exactly ``n`` body bytes into a fresh buffer, which grows as they arrive."""
    try:
        return cast(bytearray, codec.read_buffer(rfile.readinto, n))
    except EOFError as exc:
        raise NetworkError(str(exc)) from None


def read_message(rfile: Any, length: int) -> bytearray | codec.Message:
    """Read a codec message of ``length`` body bytes, its large bytes straight into place."""
    try:
        return codec.read(rfile.readinto, length)
    except EOFError as exc:
        raise NetworkError(str(exc)) from None


def send_message(sock: socket.socket, head: bytes, pieces: list[Any], length: int) -> None:
    """Send a head and a codec message of ``length`` bytes (``body_length``, which the head
    already needed); one write when small, no joins when large."""
    if length <= _SMALL:
        sock.sendall(b"".join([head, *pieces]))
        return
    sock.sendall(head + bytes(pieces[0]))
    for p in pieces[1:]:
        sock.sendall(p)


def body_length(pieces: list[Any]) -> int:
    """The bytes in a codec message's pieces (``codec.dumps``), its ``Content-Length``."""
    return sum(memoryview(p).nbytes for p in pieces)


# --- chunked frames --------------------------------------------------------------------------


def parse_chunk_size(line: bytes) -> int:
    """The size on a chunk's size line (hex digits, then an optional ``;extension``, then
    CRLF); ``ProtocolError`` for anything else, a missing line end or a sign included."""
    if not line.endswith(b"\n"):
        raise ProtocolError(f"chunk size line truncated: {line[:40]!r}")
    digits = line.split(b";", 1)[0].rstrip(b"\r\n").strip(b" \t")
    if not digits or len(digits) > 16 or digits.strip(b"0123456789abcdefABCDEF"):
        raise ProtocolError(f"bad chunk size line {line[:40]!r}")
    return int(digits, 16)


def read_chunk(rfile: Any, limit: int | None = None, how: str = "") -> bytes:
    """Read one chunk of a chunked body: size line, data, CRLF; ``b""`` for the last chunk
    (size 0), whose trailer the caller reads. ``ProtocolError`` if malformed,
    ``TooLargeError`` over ``limit`` (see ``check_size``), ``NetworkError`` if cut short."""
    line = rfile.readline(MAX_LINE)
    if not line:
        raise NetworkError("connection closed in the middle of a chunked body")
    size = parse_chunk_size(line)
    if size == 0:
        return b""
    check_size(size, limit, "a chunk", how)
    if size <= codec.RECEIVE_STEP:  # small: one read, one allocation
        data = rfile.read(size)
        if len(data) != size:
            raise NetworkError("connection closed in the middle of a chunked body")
    else:
        try:
            data = codec.read_buffer(_readinto_of(rfile), size, as_bytes=True)
        except EOFError as exc:
            raise NetworkError(f"chunk cut short: {exc}") from None
    end = rfile.read(2)
    if end != b"\r\n":
        if len(end) < 2:
            raise NetworkError("connection closed in the middle of a chunked body")
        raise ProtocolError(f"chunk of {size} bytes not followed by CRLF")
    return cast(bytes, data)


def _readinto_of(f: Any) -> Callable[[memoryview], int]:
    """``f.readinto``, or one made of ``f.read`` (3.10's ``SpooledTemporaryFile`` has none)."""
    readinto: Callable[[memoryview], int] | None = getattr(f, "readinto", None)
    if readinto is not None:
        return readinto

    def via_read(view: memoryview) -> int:
        data = f.read(len(view))
        view[: len(data)] = data
        return len(data)

    return via_read


def send_frame(sock: socket.socket, tag: bytes, data: Any = b"") -> None:
    """Send one frame: ``tag`` (one byte) and ``data`` (bytes-like) as one chunk."""
    n = memoryview(data).nbytes
    head = b"%x\r\n" % (n + 1) + tag
    if n <= _SMALL:
        sock.sendall(b"".join((head, data, b"\r\n")))
    else:
        sock.sendall(head)
        sock.sendall(data)
        sock.sendall(b"\r\n")


def send_stream(sock: socket.socket, source: Any) -> BaseException | None:
    """Send ``source`` (binary file or iterator of bytes) as frames, ending with Z or E.

    Returns the exception the source raised, if any; transport errors propagate.
    """
    chunks = iter_source(source)
    while True:
        try:
            chunk = next(chunks)
        except StopIteration:
            break
        except Exception as exc:  # the source failed: tell the reader, then report it
            send_frame(sock, b"E", encode_error(exc))
            sock.sendall(_LAST_CHUNK)
            return exc
        n = memoryview(chunk).nbytes
        if n < STREAM_FRAME_MAX:
            if n:
                send_frame(sock, b"D", chunk)
        else:  # within every receiver's frame limit (MAX_CHUNK_BYTES); the tag counts too
            with memoryview(chunk).cast("B") as view:
                for at in range(0, n, STREAM_FRAME_MAX - 1):
                    send_frame(sock, b"D", view[at : at + STREAM_FRAME_MAX - 1])
    sock.sendall(END_FRAME)
    sock.sendall(_LAST_CHUNK)
    return None
