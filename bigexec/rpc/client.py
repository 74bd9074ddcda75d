"""The call protocol: a call's request and reply over a pooled connection, and when a call
is sent twice.

    caller thread ── call(addr, "Svc.method", args) ──> pool.checkout (idle or new connection)
        │  encode (an unpicklable argument fails here, before any I/O)
        │  send request, block reading the reply (socket timeout = the call's deadline)
        │  ◄── CallHandle.abort(exc) from another thread shuts the socket down, which wakes
        │      the blocked read; the call then raises exc (MachineStopped, CancelledError)
        └─ pool.checkin the connection, unless the transport failed

A connection that failed is dropped, and so are the idle ones to the same address; a
connection that carried an application error is healthy and goes back to the pool (see
``pool`` for the pool itself).

When is a call sent twice? Only when it is certain that the first one did not run:
- a pooled connection that the peer closed while it was idle (readable before we wrote
  anything) is dropped at checkout, before the request is sent;
- a request whose sending failed on a reused connection never reached the server whole, and
  a server runs nothing before the whole request is in: it is sent once more, freshly;
- an EOF after the whole request was sent, before any reply byte, is ambiguous (the server
  may have closed an idle connection just then, or a network device dropped a long call that
  ran): the call fails with ``NetworkError``, unless it is marked idempotent (``begin(...,
  idempotent=True)``, and the Supervisor's read-only methods in ``IDEMPOTENT_METHODS``).
"""

from __future__ import annotations

import itertools
import os
import select
import ssl
import threading
import time
from typing import Any, NamedTuple

from ..errors import NetworkError, ProtocolError, UnknownMethodError
from ..metrics import StatsTable
from . import codec, wire
from .pool import Connection, ConnectionPool, Endpoint

__all__ = ["Client", "CallHandle", "IDEMPOTENT_METHODS", "PendingCall", "PreparedCall"]

#: Methods that are safe to run twice, so that a call of one is resent after an ambiguous EOF.
IDEMPOTENT_METHODS = frozenset({
    "Supervisor.ping", "Supervisor.info", "Supervisor.getenv", "Supervisor.keepalive",
    "Supervisor.memory", "Supervisor.cancel", "Supervisor.renew_credentials",
})


def _fresh_prefix() -> None:
    global _call_prefix
    _call_prefix = os.urandom(6).hex() + "-"


_call_prefix = ""
_fresh_prefix()
os.register_at_fork(after_in_child=_fresh_prefix)  # a forked child must not reuse our ids
_call_numbers = itertools.count(1)


def new_call_id() -> str:
    """An id for one call, unique on any server: a random per-process prefix and a counter
    (a profile showed ``os.urandom`` per call costing more than the counter)."""
    return f"{_call_prefix}{next(_call_numbers):x}"


class CallHandle:
    """Lets another thread abort a call in flight (machine stopped, caller cancelled).

    The calling thread attaches each connection it sends on and detaches it when the reply
    (or its stream) is done; ``aborted`` is set once, by any thread. Abort while a connection
    is attached: that connection is interrupted, waking the caller. Abort before: the next
    attach kills its connection and raises ``aborted``. Abort after the reply: nothing.
    """

    __slots__ = ("_lock", "_conn", "aborted")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        self.aborted: BaseException | None = None

    def abort(self, exc: BaseException) -> None:
        with self._lock:
            if self.aborted is not None:
                return
            self.aborted = exc
            conn = self._conn
        if conn is not None:
            conn.interrupt()  # the calling thread, woken, closes the connection

    def _attach(self, conn: Connection) -> None:
        with self._lock:
            if self.aborted is not None:
                conn.kill()
                raise self.aborted
            self._conn = conn

    def _detach(self) -> None:
        with self._lock:
            self._conn = None


class Client:
    """Calls methods on machines by address, pooling connections per address.

    A forked child starts with an empty pool and dials its own connections (see ``pool``).
    """

    def __init__(self, ssl_context: ssl.SSLContext | None = None, *,
                 connect_timeout: float = 10.0) -> None:
        self._pool = ConnectionPool(ssl_context, connect_timeout=connect_timeout)
        #: Per-method counters of the calls this client made.
        self.stats = StatsTable()

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        """The client's credentials; a new one serves the connections dialled from then on."""
        return self._pool.ssl_context

    @ssl_context.setter
    def ssl_context(self, context: ssl.SSLContext | None) -> None:
        self._pool.ssl_context = context

    @property
    def connect_timeout(self) -> float:
        """The longest a dial (TCP connect, then TLS handshake) may take, in seconds."""
        return self._pool.connect_timeout

    def close(self) -> None:
        """Close every idle connection; calls in flight finish on their own connections."""
        self._pool.close()

    def reset(self, addr: str) -> None:
        """Drop the idle connections to ``addr``."""
        self._pool.reset(addr)

    # --- calls ---------------------------------------------------------------------------

    @staticmethod
    def prepare(args: tuple, kwargs: dict) -> PreparedCall:
        """Encode a call's arguments now (an unpicklable one raises ``EncodeError`` here)."""
        source, args, kwargs = _split_stream(args, kwargs)
        # tuple.__new__: a NamedTuple's own constructor costs a Python call, on every call
        return tuple.__new__(PreparedCall, (source, codec.dumps((args, kwargs))))

    def call(
        self,
        addr: str,
        method: str,
        args: tuple = (),
        kwargs: dict | None = None,
        *,
        timeout: float | None = None,
        call_id: str | None = None,
        handle: CallHandle | None = None,
        idempotent: bool | None = None,
    ) -> Any:
        """Call ``method`` ("Service.method") on the machine at ``addr`` and return its reply.

        Raises the remote exception, ``NetworkError`` on transport failure, ``TimeoutError``
        past ``timeout`` seconds, ``codec.EncodeError`` (a ``TypeError``) for arguments that
        cannot be pickled, or ``handle.aborted`` when another thread aborted the call.
        """
        prepared = self.prepare(args, kwargs or {})
        return self.finish(self.begin(addr, method, prepared, timeout=timeout, call_id=call_id,
                                      handle=handle, idempotent=idempotent))

    def begin(self, addr: str, method: str, prepared: PreparedCall, *,
              timeout: float | None = None, call_id: str | None = None,
              handle: CallHandle | None = None, deadline: float | None = None,
              idempotent: bool | None = None) -> PendingCall:
        """Send the request of a call (``prepare``'d arguments); ``finish`` reads its reply.

        The two halves may run in different threads: the executor sends from the thread that
        submits, and whichever thread waits first reads the reply. ``deadline`` (a
        ``time.monotonic()`` value) is when the call's ``timeout``, counted by the caller from
        an earlier start, runs out; by default ``timeout`` seconds from now. ``idempotent``
        says the method is safe to run twice (by default: whether it is one of
        ``IDEMPOTENT_METHODS``), so that an EOF before its reply resends it.
        """
        p = PendingCall(self._pool.endpoint(addr), addr, method, prepared, timeout,
                        call_id or new_call_id(), handle, deadline)
        p.idempotent = method in IDEMPOTENT_METHODS if idempotent is None else idempotent
        try:
            self._send(p)
        except BaseException:
            self.stats.record(method, time.perf_counter() - p.t0, True, p.length)
            raise
        return p

    def reply_buffered(self, p: PendingCall, timeout: float) -> bool:
        """Whether the whole reply of ``p`` is here, so that ``finish`` cannot block reading
        it: waits up to ``timeout`` seconds for the reply to start, then looks at what one
        read brought, consuming nothing. True also when ``p`` has no live connection
        (``finish`` then fails at once); False for a reply that is not whole yet or streams.
        """
        conn = p.conn
        if conn is None or conn.dead:
            return True
        deadline = time.monotonic() + timeout
        previous = conn.timeout
        try:
            pending = getattr(conn.sock, "pending", None)  # bytes TLS decrypted already
            if not (pending is not None and pending()):
                poller = select.poll()  # not select(): descriptors past 1024 are common
                poller.register(conn.sock, select.POLLIN)
                if not poller.poll(max(0.0, timeout) * 1000):
                    return False
            conn.settimeout(max(0.001, deadline - time.monotonic()))
            head = conn.rfile.peek(1)  # one read at most: a small reply comes in one piece
        except (OSError, ValueError):  # timed out, or closed under us: finish tells which
            return conn.dead
        finally:
            if not conn.dead:
                conn.settimeout(previous)  # the reader's own deadline, or none
        end = head.find(b"\r\n\r\n")
        if end < 0:
            return False
        try:
            headers = wire.parse_head(head[: end + 4]).headers
        except ProtocolError:
            return True  # malformed: finish says so, at once
        if "x-bigexec-stream" in headers:
            return False  # a stream is never whole
        try:
            length = int(headers["content-length"])
        except (KeyError, ValueError):
            return True  # malformed: finish says so, at once
        return len(head) >= end + 4 + length

    def finish(self, p: PendingCall) -> Any:
        """Read the reply of a call that ``begin`` sent: see ``call`` for what it raises."""
        failed = True
        try:
            result = self._receive(p)
            failed = False
            return result
        finally:
            self.stats.record(p.method, time.perf_counter() - p.t0, failed, p.length,
                              p.reply_length)

    def _send(self, p: PendingCall) -> None:
        ep, addr, method, handle = p.ep, p.addr, p.method, p.handle
        source, pieces = p.prepared
        while True:
            conn = self._pool.checkout(addr, ep, p.fresh, _remaining(p.deadline, method, addr))
            if handle is not None:
                handle._attach(conn)
            try:
                remaining = _remaining(p.deadline, method, addr)
                head = (
                    f"POST {ep.prefix}/bigrpc/{method} HTTP/1.1\r\nHost: {ep.host_header}\r\n"
                    f"Content-Type: application/x-bigexec\r\nX-Bigexec-Call: {p.call_id}\r\n"
                    + ("" if remaining is None else f"X-Bigexec-Timeout: {remaining:.6f}\r\n")
                )
                conn.settimeout(remaining)
                p.source_error = None
                if source is None:
                    wire.send_message(
                        conn.sock,
                        f"{head}Content-Length: {p.length}\r\n\r\n".encode("latin-1"),
                        pieces, p.length,
                    )
                else:
                    conn.sock.sendall(f"{head}Transfer-Encoding: chunked\r\n\r\n".encode("latin-1"))
                    wire.send_frame(conn.sock, b"H", b"".join(bytes(x) for x in pieces))
                    p.source_error = wire.send_stream(conn.sock, source)
                p.conn = conn
                return
            except TimeoutError:
                _abandon(conn, handle, detach=True)
                raise TimeoutError(f"{method} on {addr} timed out after {p.timeout}s") from None
            except (OSError, ProtocolError) as exc:
                _abandon(conn, handle, detach=True)
                if not self._retry_fresh(p, conn, sent=False):
                    raise NetworkError(f"{method} on {addr}: {exc}") from exc

    def _retry_fresh(self, p: PendingCall, conn: Connection, sent: bool) -> bool:
        """Whether ``p`` may be sent again on a fresh connection after the reused ``conn``
        failed before any reply byte: certainly when its request was not wholly ``sent``
        (no server runs a request it has not read whole), and otherwise only when ``p`` is
        idempotent. Never twice, never a stream (it is read once). Resets the pool for
        ``p``'s address when so."""
        if not conn.reused or p.fresh or p.prepared.stream is not None:
            return False
        if sent and not p.idempotent:
            return False
        self.reset(p.addr)  # its siblings are likely stale too
        p.fresh = True
        return True

    def _receive(self, p: PendingCall) -> Any:
        addr, method, handle = p.addr, p.method, p.handle
        while True:
            conn = p.conn
            assert conn is not None
            got_reply = streaming = False
            try:
                if p.deadline is not None:  # a socket timeout counts per operation, not overall
                    conn.settimeout(_remaining(p.deadline, method, addr))
                reply = wire.read_head(conn.rfile)
                if reply is None:
                    raise ConnectionResetError("connection closed before the reply")
                got_reply = True
                p.reply_length = _reply_length(reply.headers)
                # a reply that arrives after the deadline is a timeout all the same: the
                # method saw its ctx expire at about the moment the caller gave up
                late = p.deadline is not None and time.monotonic() > p.deadline
                result = self._finish(addr, method, conn, reply, handle, p.source_error,
                                      p.deadline)
                streaming = isinstance(result, wire.Stream)
                if late and not streaming:
                    raise _LateReply
                if type(result) is _RemoteFailure:
                    remote = result.error
                    break  # raised below, past the handlers of this connection's own failures
                return result
            except _LateReply:
                raise TimeoutError(f"{method} on {addr} timed out after {p.timeout}s") from None
            except TimeoutError:
                _abandon(conn, handle, detach=False)
                raise TimeoutError(f"{method} on {addr} timed out after {p.timeout}s") from None
            except (OSError, ProtocolError) as exc:
                _abandon(conn, handle, detach=False)
                if isinstance(exc, ProtocolError) and got_reply:
                    raise
                if got_reply or not self._retry_fresh(p, conn, sent=True):
                    raise NetworkError(f"{method} on {addr}: {exc}") from exc
            finally:
                if handle is not None and not streaming:  # a stream detaches when it ends
                    handle._detach()
            self._send(p)
        # What the remote method raised: a remote TimeoutError or OSError is the method's
        # outcome, not a failure of this call's connection.
        raise remote

    def _finish(self, addr: str, method: str, conn: Connection,
                reply: wire.Head, handle: CallHandle | None,
                source_error: BaseException | None, deadline: float | None = None) -> Any:
        start, headers = reply
        try:
            status = int(start[1])
        except (IndexError, ValueError):
            conn.kill()
            raise ProtocolError(f"malformed status line from {addr}: {' '.join(start)!r}") from None
        close = headers.get("connection", "").lower() == "close"
        if status == 200 and headers.get("x-bigexec-stream") and source_error is not None:
            conn.kill()  # the caller's own stream broke: that is the call's outcome
            raise source_error
        if status == 200 and headers.get("x-bigexec-stream"):
            def done(clean: bool, conn: Connection = conn) -> None:
                if handle is not None:
                    handle._detach()
                if clean and not close:
                    self._pool.checkin(addr, conn)
                else:
                    conn.kill()
            aborted = (lambda: handle.aborted) if handle is not None else None
            return wire.Stream(conn.rfile, done, aborted)
        length = headers.get("content-length")
        if length is None:
            conn.kill()
            raise ProtocolError(f"reply from {addr} without Content-Length (status {status})")
        # With a deadline, a body that trickles in must not stretch the call past it
        rfile: Any = conn.rfile if deadline is None else _DeadlineReader(conn, deadline, method,
                                                                          addr)
        try:
            if status == 200:
                body: Any = wire.read_message(rfile, int(length))
            else:
                body = wire.read_exact(rfile, int(length))
        except codec.DecodeError:
            conn.kill()  # out of step with the stream: the connection is no good
            raise
        if close:
            conn.kill()
        else:
            self._pool.checkin(addr, conn)
        if source_error is not None:
            raise source_error
        if status == 200:
            return codec.loads(body)
        if status == wire.STATUS_APP_ERROR:
            return _RemoteFailure(wire.decode_error(body))
        text = bytes(body).decode("utf-8", "replace")
        if status == 404:
            raise UnknownMethodError(text)
        if status == wire.STATUS_TOO_LARGE:  # the text names the limit and how to raise it
            raise wire.TooLargeError(f"{method} on {addr} refused: {text}")
        raise ProtocolError(f"{method} on {addr}: HTTP {status}: {text}")


class PreparedCall(NamedTuple):
    """A call's arguments, encoded (``Client.prepare``): ready to send, maybe several times."""

    #: The ``Stream`` or iterable sent after the arguments, if the call streams (it can be
    #: read once only, so such a call is never sent again).
    stream: Any
    #: The pickled ``(args, kwargs)``, as buffers.
    body: list[Any]


class PendingCall:
    """A call whose request is sent and whose reply is yet to be read (``Client.begin``)."""

    __slots__ = ("addr", "method", "prepared", "length", "timeout", "deadline", "call_id",
                 "handle", "ep", "conn", "fresh", "source_error", "t0", "idempotent",
                 "reply_length")

    def __init__(self, ep: Endpoint, addr: str, method: str,
                 prepared: PreparedCall, timeout: float | None, call_id: str,
                 handle: CallHandle | None, deadline: float | None = None) -> None:
        self.addr = addr
        self.method = method
        self.prepared = prepared
        self.length = wire.body_length(prepared.body)
        self.timeout = timeout
        self.t0 = time.perf_counter()
        if deadline is None and timeout is not None:
            deadline = time.monotonic() + timeout
        self.deadline = deadline
        self.call_id = call_id
        self.handle = handle
        self.ep = ep
        self.conn: Connection | None = None
        self.fresh = False
        self.source_error: BaseException | None = None
        self.idempotent = False
        #: The body length of the reply that came (0 until one did, and for a stream).
        self.reply_length = 0


def _reply_length(headers: dict[str, str]) -> int:
    """A reply's body length as its head declares it; 0 for a stream or a malformed head
    (which ``_finish`` refuses)."""
    try:
        return max(0, int(headers.get("content-length", "0")))
    except ValueError:
        return 0


def _abandon(conn: Connection, handle: CallHandle | None, detach: bool) -> None:
    """Kill a failed call's connection; raise why another thread aborted it, if one did."""
    conn.kill()
    if handle is not None:
        if detach:
            handle._detach()
        if handle.aborted is not None:
            raise handle.aborted from None


class _LateReply(Exception):
    pass


class _RemoteFailure:
    """What the remote method raised, carried past ``_receive``'s transport handlers."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class _DeadlineReader:
    """Reads a reply's body before an absolute deadline: a socket timeout counts per read,
    so each read gets what is left of the deadline, and reads at most what one ``recv``
    brings (``readinto1``) before the clock is looked at again."""

    __slots__ = ("conn", "deadline", "method", "addr")

    def __init__(self, conn: Connection, deadline: float, method: str, addr: str) -> None:
        self.conn, self.deadline, self.method, self.addr = conn, deadline, method, addr

    def readinto(self, view: memoryview) -> int:
        self.conn.settimeout(_remaining(self.deadline, self.method, self.addr))
        return self.conn.rfile.readinto1(view)


def _remaining(deadline: float | None, method: str, addr: str) -> float | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(f"{method} on {addr}: deadline passed")
    return left


def _split_stream(args: tuple, kwargs: dict) -> tuple[Any, tuple, dict]:
    """Take out the one argument that travels as a byte stream, if any."""
    source = None
    found = 0
    new_args = []
    for a in args:
        if wire.is_stream_source(a):
            found += 1
            source = a
            a = wire.StreamPlaceholder()
        new_args.append(a)
    new_kwargs = {}
    for k, v in kwargs.items():
        if wire.is_stream_source(v):
            found += 1
            source = v
            v = wire.StreamPlaceholder()
        new_kwargs[k] = v
    if found > 1:
        raise TypeError("a call can stream at most one argument (file object or iterator)")
    if not found:
        return None, args, kwargs
    return source, tuple(new_args), new_kwargs
