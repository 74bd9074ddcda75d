"""The RPC server every machine runs.

    client ──TLS──> accept thread ──> one thread per connection
                                        │  read request (headers by hand, body by readinto)
                                        │  resolve "Service.method" in the ServiceRegistry
                                        │  run the method in this thread, with a Context
                                        │  registered under the call id (Supervisor.cancel
                                        │  finds it there)
                                        └─ reply: codec message, error tuple, or a stream

Why this shape: measured on the 2-core machines this was built on, the stdlib's
``http.server`` costs 0.27 ms per call (0.35 ms with mutual TLS) and most of that is its
per-request machinery; a minimal HTTP/1.1 exchange with hand-parsed headers and one write per
message costs 0.07 ms (0.10 ms with mutual TLS). Connections are persistent and few (the
client pools them), so a thread per connection is cheap and lets a method block for as long
as it likes without starving other calls. The TLS handshake runs in the connection's thread,
so a slow or hostile client cannot stall ``accept``.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import ssl
import threading
import time
from typing import Any

from .. import logs, namespaces, tls
from ..context import Context
from ..errors import ProtocolError, UnknownMethodError
from ..metrics import StatsTable
from ..service import ServiceRegistry
from . import codec, faults, sockets, wire

__all__ = ["Server"]

log = logging.getLogger("bigexec.rpc")

#: A TLS handshake must be done within this (it takes milliseconds between honest peers).
HANDSHAKE_TIMEOUT = 10.0
#: Connections at most in their TLS handshake at once; past it, the oldest is dropped to make
#: room, so that a flood of silent unauthenticated peers cannot hold threads for long, nor keep
#: an honest client (whose handshake is over in milliseconds) out.
MAX_HANDSHAKES = 64
#: An authenticated connection that sends nothing for this long is closed (the client's pool
#: opens another when it needs one): a silent client does not hold a thread for ever.
IDLE_TIMEOUT = 300.0
#: After refusing a request, the server reads (and drops) what the client still sends for up
#: to this long before it closes, so that the client, which sends its whole request before it
#: reads the reply, gets the refusal rather than a reset connection.
LINGER_SECONDS = 2.0
#: Environment variables that set a server's limits when the constructor does not; a machine
#: started by a bigexec session inherits the driver's environment.
MAX_MESSAGE_BYTES_ENV = "BIGEXEC_MAX_MESSAGE_BYTES"
MAX_CHUNK_BYTES_ENV = "BIGEXEC_MAX_CHUNK_BYTES"


def _limit(value: int | None, env: str, default: int) -> int:
    if value is None:
        text = os.environ.get(env)
        try:
            value = int(text) if text else default
        except ValueError:
            raise ValueError(f"{env} must be a number of bytes, not {text!r}") from None
    if value < 1:
        raise ValueError(f"a size limit must be a positive number of bytes, not {value}")
    return value


class Server:
    """Serves the services of a ``ServiceRegistry`` over HTTP/1.1, with TLS when given.

    ``max_message_bytes`` caps a call's arguments (default: ``BIGEXEC_MAX_MESSAGE_BYTES``
    from the environment, else ``wire.MAX_MESSAGE_BYTES``, 8 GiB); ``max_chunk_bytes`` caps
    one frame of a streamed argument (``BIGEXEC_MAX_CHUNK_BYTES``, else
    ``wire.MAX_CHUNK_BYTES``, 64 MiB). A request over either is answered 413 and its
    connection closed; the caller gets ``wire.TooLargeError`` naming the limit. A malformed
    request is answered 400. Either is logged as one warning naming the peer.
    """

    def __init__(
        self,
        registry: ServiceRegistry,
        *,
        ssl_context: ssl.SSLContext | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        advertise_host: str | None = None,
        log_label: str | None = None,
        max_message_bytes: int | None = None,
        max_chunk_bytes: int | None = None,
    ) -> None:
        self.registry = registry
        #: The largest call message (``Content-Length``, or a stream's call frame) accepted.
        self.max_message_bytes = _limit(max_message_bytes, MAX_MESSAGE_BYTES_ENV,
                                        wire.MAX_MESSAGE_BYTES)
        #: The largest frame of a streamed argument accepted.
        self.max_chunk_bytes = _limit(max_chunk_bytes, MAX_CHUNK_BYTES_ENV,
                                      wire.MAX_CHUNK_BYTES)
        #: If set, log records made while serving are marked with it (see ``bigexec.logs``).
        self.log_label = log_label
        self.ssl_context = ssl_context
        #: The session handed to methods through ``ctx.b``; set by the machine runtime.
        self.session: Any = None
        #: Where the calls' functions from the driver's modules unpickle; set by the runtime.
        self.namespaces: namespaces.Namespaces | None = None
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host, port), family=family, backlog=128)
        self.port = self._listener.getsockname()[1]
        scheme = "https" if ssl_context is not None else "http"
        reached_at = advertise_host or host
        netloc = f"[{reached_at}]:{self.port}" if ":" in reached_at else f"{reached_at}:{self.port}"
        self.addr = f"{scheme}://{netloc}"
        if log_label == "":
            self.log_label = netloc
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._calls: dict[str, Context] = {}  # the running calls that can be cancelled
        self._running: dict[str, int] = {}
        #: Per-method counters of the calls this server ran.
        self.stats = StatsTable()
        self._closed = threading.Event()
        self._frozen = threading.Event()
        self._thread: threading.Thread | None = None
        #: Breaks replies on purpose, for chaos tests (see ``bigexec.rpc.faults``); off if None.
        self.faults: faults.FaultInjector | None = None
        #: Seconds a connection may stay silent (see ``IDLE_TIMEOUT``).
        self.idle_timeout = IDLE_TIMEOUT
        #: Connections in their TLS handshake, oldest first (see ``MAX_HANDSHAKES``).
        self._handshaking: dict[socket.socket, None] = {}
        self._accept_failures = 0

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> str:
        self._thread = threading.Thread(
            target=self._accept_loop, name=f"bigexec-accept-{self.port}", daemon=True
        )
        self._thread.start()
        return self.addr

    def close(self) -> None:
        """Stop accepting and drop every connection; running methods finish unobserved."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._frozen.set()
        try:  # shutdown wakes the thread blocked in accept(); close alone does not
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self._listener.close()
        except OSError:
            pass
        self.drop_connections()
        with self._lock:
            calls = list(self._calls.values())
        for ctx in calls:
            ctx.cancel()

    def drop_connections(self) -> int:
        """Reset every open connection, as a network drop would, and say how many there were;
        new ones are still accepted. Their methods run on, unobserved."""
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            sockets.hard_close(c)
        return len(conns)

    def freeze(self) -> None:
        """Stop answering anything while keeping connections open, as a hung machine would."""
        self._frozen.set()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    # --- what the supervisor asks of the server -----------------------------------------

    def cancel(self, call_id: str) -> bool:
        """Cancel the context of a running call; False if no such call is running."""
        with self._lock:
            ctx = self._calls.get(call_id)
        if ctx is None:
            return False
        ctx.cancel()
        return True

    def running_calls(self) -> list[str]:
        """The methods running now, once per call."""
        with self._lock:
            return [m for m, n in self._running.items() for _ in range(n)]

    # --- serving -------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                if self._closed.is_set():
                    return
                time.sleep(0.01)  # e.g. EMFILE: back off instead of spinning
                continue
            if self.ssl_context is not None:
                self._make_room_for_a_handshake()
            try:
                threading.Thread(
                    target=self._serve_connection, args=(sock,), name="bigexec-conn",
                    daemon=True).start()
            except BaseException as exc:  # e.g. "can't start new thread": drop this one only
                sockets.hard_close(sock)
                self._accept_failures += 1
                if self._accept_failures in (1, 10, 100) or self._accept_failures % 1000 == 0:
                    log.warning("cannot serve a new connection (%d so far): %s",
                                self._accept_failures, exc)
                time.sleep(0.01)  # let threads end before the next try

    def _make_room_for_a_handshake(self) -> None:
        """Before a new connection: if too many are in their handshake, end the oldest (its
        thread's handshake fails at once, and the thread ends)."""
        with self._lock:
            if len(self._handshaking) < MAX_HANDSHAKES:
                return
            oldest = next(iter(self._handshaking))
            del self._handshaking[oldest]
            try:  # under the lock: its thread cannot close it meanwhile
                socket.socket.shutdown(oldest, socket.SHUT_RDWR)
            except OSError:
                pass

    def _serve_connection(self, raw: socket.socket) -> None:
        sock: socket.socket = raw
        rfile = None
        if self.log_label is not None:
            logs.set_machine(self.log_label)
        if self.namespaces is not None:
            namespaces.set_current(self.namespaces)
        with self._lock:
            self._conns.add(raw)
        caller = "an unauthenticated peer"
        ended_cleanly = False  # a reply was sent whole, or the peer closed: close with a FIN
        try:
            caller = f"{sockets.peer_name(raw)} (unauthenticated)"
            sockets.tune_socket(raw)
            if self.ssl_context is not None:
                raw.settimeout(HANDSHAKE_TIMEOUT)
                sock = self.ssl_context.wrap_socket(raw, server_side=True,
                                                    do_handshake_on_connect=False)
                with self._lock:  # wrapping detached raw: close() must find the TLS socket
                    self._conns.discard(raw)
                    self._conns.add(sock)
                    self._handshaking[sock] = None
                try:
                    sock.do_handshake()
                finally:
                    with self._lock:
                        self._handshaking.pop(sock, None)
                # Whom the session's CA vouched for: named in what this server refuses them.
                caller = tls.peer_name(sock) or caller
            sock.settimeout(self.idle_timeout)  # per read: a silent peer is let go
            rfile = sock.makefile("rb", buffering=256 * 1024)
            while not self._closed.is_set():
                try:
                    head = wire.read_head(rfile)
                except ProtocolError as exc:
                    refusal = _Refusal(400, f"malformed request: {exc}")
                else:
                    try:
                        if head is not None and self._handle(sock, rfile, head, caller):
                            continue
                        break
                    except _Refusal as exc:  # raised before any reply was sent
                        refusal = exc
                self._refuse(sock, rfile, caller, refusal)
                break
            ended_cleanly = True
        except ssl.SSLError as exc:
            log.debug("TLS handshake or read with %s failed: %s", caller, exc)
        except (OSError, ProtocolError) as exc:
            log.debug("connection with %s dropped: %s", caller, exc)
        except Exception:  # never let a bad connection take the thread down silently
            log.exception("unexpected error serving a connection with %s", caller)
        finally:
            with self._lock:
                self._conns.discard(raw)
                self._conns.discard(sock)
            if rfile is not None:
                try:
                    rfile.close()
                except OSError:
                    pass
            sockets.hard_close(sock, abort=not ended_cleanly)

    def _refuse(self, sock: socket.socket, rfile: Any, caller: str, refusal: _Refusal) -> None:
        """Answer a bad request of ``caller``, telling it and the log who was refused, then
        let it finish sending before closing."""
        log.warning("refused a request from %s: %d %s", caller, refusal.status, refusal.text)
        body = f"{refusal.text} (caller: {caller})".encode("utf-8", "replace")
        self._respond(sock, refusal.status, body, close=True)
        sockets.linger(sock, rfile, LINGER_SECONDS)

    def _respond(self, sock: socket.socket, status: int, body: bytes,
                 ctype: str = "text/plain; charset=utf-8", close: bool = False) -> None:
        head = (
            f"HTTP/1.1 {status} {wire.REASONS.get(status, 'Unknown')}\r\n"
            f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            + ("Connection: close\r\n" if close else "")
            + "\r\n"
        ).encode("latin-1")
        sock.sendall(head + body)

    def _handle(self, sock: socket.socket, rfile: Any,
                head: wire.Head, caller: str) -> bool:
        """Serve one request; return whether the connection may carry another."""
        if self._frozen.is_set():
            self._frozen_wait()
            return False
        start, headers = head
        if len(start) != 3 or not start[2].startswith("HTTP/1."):
            raise _Refusal(400, "malformed request line")
        verb, target = start[0], start[1]
        encoding = headers.get("transfer-encoding")
        if encoding is not None and encoding.lower() != "chunked":
            raise _Refusal(400, f"unsupported Transfer-Encoding {encoding[:40]!r}")
        chunked = encoding is not None
        try:
            length = wire.parse_content_length(headers.get("content-length"))
        except ProtocolError as exc:
            raise _Refusal(400, str(exc)) from None
        if chunked and length is not None:
            raise _Refusal(400, "both Content-Length and Transfer-Encoding")
        if verb != "POST":
            raise _Refusal(405, "bigrpc takes POST only")
        path = target.split("?", 1)[0]
        at = path.rfind("/bigrpc/")
        name = path[at + 8 :] if at >= 0 else ""
        if at < 0 or "." not in name:
            raise _Refusal(404, f"no such path {path[:200]!r}; use /bigrpc/Service.method")
        call_id = headers.get("x-bigexec-call") or os.urandom(8).hex()
        t = headers.get("x-bigexec-timeout")
        try:
            timeout = float(t) if t is not None else None
        except ValueError:
            timeout = math.nan
        if timeout is not None and not math.isfinite(timeout):
            raise _Refusal(400, "bad X-Bigexec-Timeout")

        stream: wire.Stream | None = None
        message: memoryview | bytearray | codec.Message
        try:
            if chunked:
                message = _read_head_frame(rfile, self.max_message_bytes)
                stream = wire.Stream(rfile, max_frame=self.max_chunk_bytes,
                                     how=_how(MAX_CHUNK_BYTES_ENV, "max_chunk_bytes"))
            elif length is not None:
                wire.check_size(length, self.max_message_bytes, f"the call to {name}",
                                _how(MAX_MESSAGE_BYTES_ENV, "max_message_bytes"))
                message = wire.read_message(rfile, length)
            else:
                raise _Refusal(400, "a body with Content-Length or chunked is required")
            call = codec.loads(message)
            if not (isinstance(call, tuple) and len(call) == 2 and isinstance(call[0], tuple)
                    and isinstance(call[1], dict)):
                raise codec.DecodeError("the call message must be (args tuple, kwargs dict)")
            args, kwargs = call
        except wire.TooLargeError as exc:
            raise _Refusal(exc.status, str(exc)) from None
        except (codec.DecodeError, ProtocolError, ValueError) as exc:
            raise _Refusal(400, f"cannot decode the call to {name}: {exc}") from None
        if stream is not None:
            args, kwargs = _put_stream(args, kwargs, stream)

        try:
            fn, wants_ctx = self.registry.resolve(name)
        except UnknownMethodError as exc:
            keep = stream is None or stream.drain(1 << 62)
            log.info("refused a request from %s: HTTP 404: %s", caller, exc)
            self._respond(sock, 404, f"{exc} (caller: {caller})".encode(), close=not keep)
            return keep

        # Only a method that takes ctx can notice a cancel: only those are registered for one.
        ctx = Context(call_id, name, timeout, self.session) if wants_ctx else None
        with self._lock:
            self._running[name] = self._running.get(name, 0) + 1
            if ctx is not None:
                kwargs["ctx"] = ctx
                self._calls[call_id] = ctx
        t0 = time.perf_counter()
        error: BaseException | None = None
        result: Any = None
        try:  # the call stays cancellable until its reply, streamed or not, is sent
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:  # everything a method raises goes back to the caller
                error = exc
            keep = True
            if stream is not None and not stream.complete:
                # The client sends all of its stream before it reads the reply. A streamed
                # reply may still read the argument as it goes (a transform): park the rest
                # of the argument in a spool file first; else skip it.
                if error is None and wire.is_stream_source(result):
                    keep = stream.spool()
                else:
                    keep = stream.drain(1 << 62)
                if isinstance(stream.failure, wire.TooLargeError):
                    raise _Refusal(stream.failure.status, str(stream.failure))
            if self._frozen.is_set():
                self._frozen_wait()
                return False

            reply_bytes = 0
            injector = self.faults
            fault = None if injector is None else injector.choose(name)
            if error is None and wire.is_stream_source(result):
                if injector is not None and fault is not None:
                    sock = injector.apply(fault, sock, None)
                reply_head = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                              b"X-Bigexec-Stream: 1\r\n")
                sock.sendall(reply_head + (b"" if keep else b"Connection: close\r\n") + b"\r\n")
                failed = wire.send_stream(sock, result)
                reply_bytes = -1
                if failed is not None:
                    error = failed
            else:
                status = 200
                if type(result) is codec.Encoded:
                    pieces = result.pieces
                elif error is None:
                    try:
                        pieces = codec.dumps(result)
                    except codec.EncodeError as exc:
                        error = codec.EncodeError(f"the reply of {name} cannot be pickled: {exc}")
                if error is not None:
                    status = wire.STATUS_APP_ERROR
                    pieces = [wire.encode_error(error)]
                reply_bytes = wire.body_length(pieces)
                reply_head = (
                    f"HTTP/1.1 {status} {wire.REASONS[status]}\r\n"
                    f"Content-Type: application/x-bigexec\r\nContent-Length: {reply_bytes}\r\n"
                    + ("" if keep else "Connection: close\r\n")
                    + "\r\n"
                ).encode("latin-1")
                if injector is not None and fault is not None:
                    sock = injector.apply(fault, sock, len(reply_head) + reply_bytes)
                wire.send_message(sock, reply_head, pieces, reply_bytes)
        finally:
            with self._lock:
                left = self._running[name] - 1
                if left:
                    self._running[name] = left
                else:
                    del self._running[name]
                if ctx is not None:
                    self._calls.pop(call_id, None)
        self.stats.record(name, time.perf_counter() - t0, error is not None, len(message),
                          reply_bytes)
        return keep

    def _frozen_wait(self) -> None:
        self._closed.wait()


class _Refusal(Exception):
    """A request the server answers with ``status`` and ``text``, then closes."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(status, text)
        self.status = status
        self.text = text


def _how(env: str, keyword: str) -> str:
    return f" (set {env} in the machine's environment, or Server({keyword}=...))"


def _read_head_frame(rfile: Any, limit: int) -> memoryview:
    frame = wire.read_chunk(rfile, limit, _how(MAX_MESSAGE_BYTES_ENV, "max_message_bytes"))
    if frame[:1] != b"H":
        raise ProtocolError("a streamed request must start with its call frame")
    return memoryview(frame)[1:]


def _put_stream(args: tuple, kwargs: dict, stream: wire.Stream) -> tuple[tuple, dict]:
    args = tuple(stream if isinstance(a, wire.StreamPlaceholder) else a for a in args)
    for k, v in kwargs.items():
        if isinstance(v, wire.StreamPlaceholder):
            kwargs[k] = stream
    return args, kwargs
