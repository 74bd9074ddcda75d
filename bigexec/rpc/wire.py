"""The HTTP/1.1 subset bigexec speaks, and its stream framing.

Requests are ``POST /bigrpc/<Service>.<method>`` on persistent connections with TCP_NODELAY.
Headers are parsed by hand (the stdlib's ``email``-based parser costs more than the rest of a
call). A plain request or reply has a ``Content-Length`` body holding one codec message. A
streamed argument or reply uses ``Transfer-Encoding: chunked`` and each HTTP chunk is one
frame, tagged by its first byte::

    H <message>     the call's arguments (first frame of a streamed request only)
    D <bytes>       stream data
    E <message>     the stream failed; the message is an error tuple (see ``encode_error``)
    Z               the stream ended normally

Status codes: 200 success, 590 the method raised (body: an error tuple), 400 malformed
request, 404 unknown service or method, 405 not POST, 413 a message or a frame over the
receiver's limit (``MAX_MESSAGE_BYTES``, ``MAX_CHUNK_BYTES``).

A receiver allocates memory as a body's bytes arrive, never from the length a peer declares
(see ``codec.read_buffer``), and parses sizes strictly: decimal digits for ``Content-Length``,
hex digits for a chunk, each header that frames the body at most once.
"""

from __future__ import annotations

import io
import socket
import traceback
import types
from collections.abc import Callable, Iterator
from typing import Any, cast

from ..errors import NetworkError, ProtocolError, RemoteError, RemoteTraceback
from . import codec

STATUS_APP_ERROR = 590
STATUS_TOO_LARGE = 413
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           413: "Content Too Large", 500: "Internal Server Error", 590: "Application Error"}
MAX_LINE = 65536  # bytes in a line, and in a whole head
MAX_HEADERS = 64  # header lines in a head: bigexec sends fewer than ten
#: Default limit on one message (a call's arguments or a reply), in bytes. A receiver's
#: memory follows the bytes that arrive, so the limit only has to stop what no honest caller
#: sends: 8 GiB is past the largest single value a worker of common size can hold twice (as
#: it arrives and as the method uses it), and far below the 2**63 a peer could declare.
MAX_MESSAGE_BYTES = 8 << 30
#: Default limit on one frame of a byte stream. Senders cut streams into frames of at most
#: ``STREAM_FRAME_MAX`` bytes, so this only refuses peers that are not bigexec.
MAX_CHUNK_BYTES = 64 << 20
STREAM_CHUNK = 1 << 20
#: The largest frame ``send_stream`` sends (its tag byte included): a larger chunk goes as
#: several frames.
STREAM_FRAME_MAX = 16 << 20
_SMALL = 64 * 1024
#: Headers that say where a body ends: a second copy of one is refused (request smuggling).
_FRAMING_HEADERS = ("content-length", "transfer-encoding")


class TooLargeError(ProtocolError):
    """A message or stream frame was over the receiving server's limit (HTTP 413)."""

    status = STATUS_TOO_LARGE


def parse_content_length(text: str | None) -> int | None:
    """The value of a ``Content-Length`` header (None when absent); ``ProtocolError`` unless
    it is decimal digits only (``int`` would take signs, spaces and underscores)."""
    if text is None:
        return None
    if not (text.isascii() and text.isdigit()) or len(text) > 19:
        raise ProtocolError(f"bad Content-Length {text[:40]!r}")
    return int(text)


def parse_chunk_size(line: bytes) -> int:
    """The size on a chunk's size line (hex digits, then an optional ``;extension``, then
    CRLF); ``ProtocolError`` for anything else, a missing line end or a sign included."""
    if not line.endswith(b"\n"):
        raise ProtocolError(f"chunk size line truncated: {line[:40]!r}")
    digits = line.split(b";", 1)[0].rstrip(b"\r\n").strip(b" \t")
    if not digits or len(digits) > 16 or digits.strip(b"0123456789abcdefABCDEF"):
        raise ProtocolError(f"bad chunk size line {line[:40]!r}")
    return int(digits, 16)


def check_size(size: int, limit: int | None, what: str, how: str = "") -> None:
    """``TooLargeError`` if ``size`` bytes of ``what`` are over ``limit`` (None: no limit);
    ``how`` (appended to the message) says how to raise the limit."""
    if limit is not None and size > limit:
        raise TooLargeError(f"{what} of {size} bytes is over the limit of {limit} bytes{how}")


def parse_head(head: bytes) -> tuple[list[str], dict[str, str]]:
    """The start line's words and the headers (names in lower case) of a whole head, its
    blank line included; ``ProtocolError`` if it is malformed or over the limits."""
    if len(head) > MAX_LINE:
        raise ProtocolError(f"request head over {MAX_LINE} bytes")
    lines = head.decode("latin-1").split("\r\n")
    if len(lines) - 3 > MAX_HEADERS:  # the start line, the headers, then two empty strings
        raise ProtocolError(f"request head over {MAX_HEADERS} headers")
    headers: dict[str, str] = {}
    for line in lines[1:-2]:
        name, sep, value = line.partition(":")
        if not sep:
            raise ProtocolError(f"malformed header line {line[:80]!r}")
        _add_header(headers, name.strip().lower(), value.strip())
    return lines[0].split(" ", 2), headers


def _add_header(headers: dict[str, str], name: str, value: str) -> None:
    if name in headers and name in _FRAMING_HEADERS:
        raise ProtocolError(f"more than one {name} header")
    headers[name] = value


def read_head(rfile: Any) -> tuple[list[str], dict[str, str]] | None:
    """Read a start line and headers; None at a clean end of connection."""
    # Fast path: the whole head is usually in the buffer already; split it in one go.
    buffered = rfile.peek(MAX_LINE)
    end = buffered.find(b"\r\n\r\n")
    if end > MAX_LINE:
        raise ProtocolError(f"request head over {MAX_LINE} bytes")
    if end > 0 and not buffered.startswith(b"\r\n"):
        return parse_head(rfile.read(end + 4))
    line = rfile.readline(MAX_LINE)
    if not line:
        return None
    while line in (b"\r\n", b"\n"):  # tolerate stray blank lines between messages
        line = rfile.readline(MAX_LINE)
        if not line:
            return None
    if not line.endswith(b"\n"):
        raise ProtocolError("start line too long or truncated")
    start = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
    headers: dict[str, str] = {}
    size = len(line)
    while True:
        line = rfile.readline(MAX_LINE)
        if not line.endswith(b"\n"):
            raise ProtocolError("header line too long or truncated")
        if line in (b"\r\n", b"\n"):
            return start, headers
        size += len(line)
        if len(headers) >= MAX_HEADERS or size > MAX_LINE:
            raise ProtocolError(f"request head over {MAX_HEADERS} headers or {MAX_LINE} bytes")
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep:
            raise ProtocolError(f"malformed header line {line[:80]!r}")
        _add_header(headers, name.strip().lower(), value.strip())


def read_exact(rfile: Any, n: int) -> bytearray:
    """Read exactly ``n`` body bytes into a fresh buffer, which grows as they arrive."""
    try:
        return cast(bytearray, codec.read_buffer(rfile.readinto, n))
    except EOFError as exc:
        raise NetworkError(str(exc)) from None


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
    readinto = getattr(f, "readinto", None)
    if readinto is not None:
        return readinto  # type: ignore[no-any-return]

    def via_read(view: memoryview) -> int:
        data = f.read(len(view))
        view[: len(data)] = data
        return len(data)

    return via_read


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
    return sum(memoryview(p).nbytes for p in pieces)


# --- errors on the wire ---------------------------------------------------------------------


def encode_error(exc: BaseException) -> bytes:
    """An error tuple: (type name, message, remote traceback, pickled exception or None)."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    t = type(exc)
    type_name = f"{t.__module__}.{t.__qualname__}"
    try:
        blob: bytes | None = codec.dumps_bytes(exc)
    except Exception:
        blob = None
    try:
        message = str(exc)
    except Exception:
        message = f"<unprintable {type_name}>"
    return codec.dumps_bytes((type_name, message, tb, blob))


def decode_error(data: Any, *, base_exceptions: bool = False) -> BaseException:
    """Rebuild the exception of an error tuple, with the remote traceback as its cause.

    Unless ``base_exceptions``, a ``BaseException`` that is not an ``Exception`` (SystemExit,
    KeyboardInterrupt) comes back as ``RemoteError``: it ended a remote method, not the caller.
    """
    try:
        type_name, message, tb, blob = codec.loads(data)
    except Exception as exc:
        return ProtocolError(f"undecodable remote error: {exc}")
    exc: BaseException | None = None
    if blob is not None:
        try:
            exc = codec.loads(blob)
        except Exception:
            exc = None
    if not isinstance(exc, Exception if not base_exceptions else BaseException):
        exc = RemoteError(type_name, message, tb)
    exc.__cause__ = RemoteTraceback(f'\n"""\n{tb}"""')
    try:
        exc.remote_traceback = tb  # type: ignore[attr-defined]
    except Exception:
        pass
    return exc


# --- chunked stream frames ------------------------------------------------------------------


def send_frame(sock: socket.socket, tag: bytes, data: Any = b"") -> None:
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
            sock.sendall(b"0\r\n\r\n")
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
    sock.sendall(b"0\r\n\r\n")
    return None


#: The frame that ends a stream normally (what ``send_frame(sock, b"Z")`` sends).
END_FRAME = b"1\r\nZ\r\n"


#: Types whose values are never sent as a stream (a set lookup spares two ABC checks).
NEVER_STREAMS: set[type] = {type(None), bool, int, float, str, bytes, bytearray, memoryview,
                            tuple, list, dict, set, types.FunctionType,
                            types.BuiltinFunctionType, types.MethodType, type}


def is_stream_source(value: Any) -> bool:
    """Whether a call argument or reply is to be sent as a byte stream."""
    if type(value) in NEVER_STREAMS:
        return False
    if isinstance(value, io.IOBase):
        return True
    return isinstance(value, Iterator)


def iter_source(source: Any) -> Iterator[Any]:
    if isinstance(source, io.IOBase) or (
        hasattr(source, "read") and not isinstance(source, Iterator)
    ):
        read = source.read
        while True:
            chunk = read(STREAM_CHUNK)
            if not chunk:
                return
            if isinstance(chunk, str):
                raise TypeError("stream sources must be binary: a text file object was given")
            yield chunk
    else:
        for chunk in source:
            if not isinstance(chunk, (bytes, bytearray, memoryview)):
                raise TypeError(
                    f"a streamed iterator must yield bytes, not {type(chunk).__name__}"
                )
            yield chunk


class Stream(io.RawIOBase):
    """A byte stream arriving over a connection: a streamed argument or a streamed reply.

    Read it like a binary file (``read``, ``readinto``, ``readline``) or iterate over it to get
    its chunks as they arrived. An error on the sending side surfaces here as an exception
    when the reader reaches it. Close a reply stream you stop reading early: its connection is
    then dropped instead of being reused.
    """

    def __init__(self, rfile: Any, on_done: Callable[[bool], None] | None = None,
                 aborted: Callable[[], BaseException | None] | None = None, *,
                 max_frame: int | None = MAX_CHUNK_BYTES, how: str = "") -> None:
        super().__init__()
        self._rfile = rfile
        #: Frames over this many bytes fail the stream with ``TooLargeError``; ``how`` (in
        #: its message) says how to raise the limit.
        self.max_frame = max_frame
        self._how = how
        self._done_callbacks = [on_done] if on_done is not None else []
        self._aborted = aborted
        self._frame: bytes = b""
        self._pos = 0
        self._eof = False
        self._error: BaseException | None = None

    def readable(self) -> bool:
        return True

    @property
    def complete(self) -> bool:
        """True once the end of the stream was read."""
        return self._eof

    def _next_frame(self) -> bool:
        """Load the next data frame; False at the end of the stream."""
        if self._error is not None:
            raise self._error
        if self._eof:
            return False
        try:
            frame = read_chunk(self._rfile, self.max_frame, self._how)
            if not frame:
                raise ProtocolError("stream ended without an end frame")
        except (OSError, ValueError, ProtocolError) as exc:
            err: BaseException = exc if isinstance(exc, (NetworkError, ProtocolError)) \
                else NetworkError(f"stream transport failed: {exc}")
            why = self._aborted() if self._aborted is not None else None
            if why is not None:  # another thread cut the stream off on purpose
                err = why
            self._fail(err)
            raise err from (None if err is exc else exc)
        tag = frame[:1]
        if tag == b"D":
            self._frame, self._pos = frame, 1
            return True
        if tag == b"Z" or tag == b"E":
            if self._rfile.readline(MAX_LINE).strip() != b"0" or self._rfile.readline(MAX_LINE) \
                    not in (b"\r\n", b"\n"):
                self._fail(ProtocolError("stream end is malformed"))
                raise self._error  # type: ignore[misc]
            if tag == b"E":
                err = decode_error(memoryview(frame)[1:])
                self._error = err
                self._finish(True)
                raise err
            self._eof = True
            self._finish(True)
            return False
        self._fail(ProtocolError(f"unknown stream frame tag {tag!r}"))
        raise self._error  # type: ignore[misc]

    @property
    def failure(self) -> BaseException | None:
        """What the stream failed with (its sender's error, or a bad or cut-off frame)."""
        return self._error

    def _fail(self, err: BaseException) -> None:
        self._error = err
        self._finish(False)

    def _finish(self, clean: bool) -> None:
        callbacks, self._done_callbacks = self._done_callbacks, []
        for cb in callbacks:
            cb(clean)

    def add_done_callback(self, fn: Callable[[bool], None]) -> None:
        """Call ``fn(clean)`` when the stream ends, is abandoned or fails."""
        if self._eof or self._error is not None or self.closed:
            fn(self._eof)
        else:
            self._done_callbacks.append(fn)

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        if not view.nbytes:
            return 0
        while self._pos >= len(self._frame):
            if not self._next_frame():
                return 0
        n = min(view.nbytes, len(self._frame) - self._pos)
        view[:n] = memoryview(self._frame)[self._pos : self._pos + n]
        self._pos += n
        return n

    def readall(self) -> bytes:
        parts = [memoryview(self._frame)[self._pos :].tobytes()]
        self._pos = len(self._frame)
        while self._next_frame():
            parts.append(self._frame[1:])
            self._pos = len(self._frame)
        return b"".join(parts)

    def __iter__(self) -> Iterator[bytes]:  # type: ignore[override]
        return self

    def __next__(self) -> bytes:
        if self._pos < len(self._frame):
            out = self._frame[self._pos :]
            self._pos = len(self._frame)
            return out
        if not self._next_frame():
            raise StopIteration
        self._pos = len(self._frame)
        return self._frame[1:]

    def drain(self, limit: int) -> bool:
        """Skip up to ``limit`` unread bytes; True if the stream then ended cleanly."""
        seen = 0
        try:
            while seen <= limit:
                seen += len(self._frame) - self._pos
                self._pos = len(self._frame)
                if not self._next_frame():
                    return True
        except Exception:
            return False
        return False

    def spool(self, memory: int = 16 << 20) -> bool:
        """Read the rest of the stream off the connection into a temporary file (in memory up
        to ``memory`` bytes), and serve later reads from there. True if that went cleanly."""
        import tempfile

        if self._eof or self._error is not None:
            return self._error is None
        spool = tempfile.SpooledTemporaryFile(max_size=memory)
        try:
            while True:  # re-framed as it arrives: the spool is read back as a stream
                frame = read_chunk(self._rfile, self.max_frame, self._how)
                if not frame:
                    spool.write(b"0\r\n" + self._rfile.readline(MAX_LINE))
                    break
                spool.write(b"%x\r\n" % len(frame))
                spool.write(frame)
                spool.write(b"\r\n")
        except (OSError, ValueError, ProtocolError) as exc:
            spool.close()
            self._fail(exc if isinstance(exc, (NetworkError, ProtocolError))
                       else NetworkError(str(exc)))
            return False
        spool.seek(0)
        self._rfile = spool
        callbacks, self._done_callbacks = self._done_callbacks, []
        for cb in callbacks:  # the connection is free again; the spool goes with the stream
            cb(True)
        self._done_callbacks = [lambda clean: spool.close()]
        return True

    def close(self) -> None:
        if not self.closed and not self._eof and self._error is None:
            self._finish(False)
        super().close()


class StreamPlaceholder:
    """Stands in the pickled arguments for the argument that travels as a stream."""

    __slots__ = ()


# TCP keepalive on every RPC connection: a peer whose host vanished (powered off, partitioned)
# sends no FIN, and a connection waiting on it would otherwise wait for ever. Probes start
# after KEEPALIVE_IDLE silent seconds and give up after KEEPALIVE_COUNT unanswered ones.
KEEPALIVE_IDLE = 30
KEEPALIVE_INTERVAL = 10
KEEPALIVE_COUNT = 3


def tune_socket(sock: socket.socket) -> None:
    """TCP_NODELAY (calls are small and latency-bound) and keepalive probes on ``sock``."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
                        ("TCP_KEEPCNT", KEEPALIVE_COUNT)):
        option = getattr(socket, name, None)  # Linux names; macOS lacks some of them
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
