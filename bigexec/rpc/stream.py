"""``Stream``: a byte stream arriving over a connection, read as a binary file.

    sender ── D D D … Z (or E) frames ──> connection ──> Stream, read in the reader's thread
                                                           │ D: data for read/readinto/iter
                                                           │ Z: the end; on_done(True)
                                                           │ E: the sender's error, raised
                                                           │    to the reader; on_done(True)
                                                           └ cut off or malformed: the error
                                                             raised; on_done(False)
    another thread (CallHandle.abort) shuts the connection down: the blocked read fails,
    and the reason ``aborted()`` gives is raised instead of the transport error

``on_done(clean)`` hands the connection back, in the reader's thread: a clean end lets it
carry the next call (the client's pool, or the server's next request), any other end closes
it. A Stream is read by one thread at a time; only ``aborted`` is called across threads.

States, as the fields say them: open (``_eof`` and ``_error`` unset), then exactly one of
ended (``_eof``), failed (``_error``: the sender's error or the transport's) or closed early
(``closed``, the connection dropped). ``spool`` keeps a stream open but moves what is left of
it off the connection into a temporary file, handing the connection back at once.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import NetworkError, ProtocolError
from .framing import MAX_CHUNK_BYTES, read_chunk
from .heads import MAX_LINE
from .remote_errors import decode_error

__all__ = ["Stream"]


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
                raise self._fail(ProtocolError("stream end is malformed"))
            if tag == b"E":
                err = decode_error(memoryview(frame)[1:])
                self._error = err
                self._finish(True)
                raise err
            self._eof = True
            self._finish(True)
            return False
        raise self._fail(ProtocolError(f"unknown stream frame tag {tag!r}"))

    @property
    def failure(self) -> BaseException | None:
        """What the stream failed with (its sender's error, or a bad or cut-off frame)."""
        return self._error

    def _fail(self, err: BaseException) -> BaseException:
        """Fail the stream with ``err``, which it returns for the caller to raise."""
        self._error = err
        self._finish(False)
        return err

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

    # RawIOBase iterates by lines; a Stream by the chunks as they arrived
    def __iter__(self) -> Iterator[bytes]:
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
