"""The client's connection pool: persistent connections per address, dialled and reused.

    Client ── checkout(addr) ──> an idle Connection (the most recently used first), checked
        │                        with one poll for a close by its peer; or a new one
        │                        (TCP, then TLS when the address is https)
        │  the call runs on it, in the caller's thread
        └─ checkin(addr, conn) ──> back among the idle ones, unless it died or the pool is
                                   full or closed; then it is closed

A connection idle for longer than ``POOL_IDLE_SECONDS`` is closed instead of reused. A forked
child starts with an empty pool: its parent's pooled TLS connections are the parent's (their
TLS state lives in the parent), so the child closes its copies of their descriptors without a
word on the wire.
"""

from __future__ import annotations

import io
import os
import select
import socket
import ssl
import threading
import time
import weakref
from typing import cast
from urllib.parse import urlsplit

from ..errors import NetworkError
from .sockets import tune_socket

__all__ = ["Connection", "ConnectionPool", "Endpoint", "MAX_IDLE", "POOL_IDLE_SECONDS"]

#: Idle connections kept per address; past it, a connection checked in is closed.
MAX_IDLE = 64
#: A pooled connection idle for longer is closed instead of reused: servers close connections
#: silent for their idle timeout (300 s), and a call that streams cannot be sent again if it
#: meets such a closed connection. Read at every checkout.
POOL_IDLE_SECONDS = 240.0


class Connection:
    """One connection to a server, used by one call at a time.

    ``reused`` says it came out of the pool (so a failure on it may mean its peer had closed
    it), ``dead`` that it was interrupted or killed and must not go back into the pool.
    """

    __slots__ = ("sock", "rfile", "reused", "dead", "timeout", "idle_since", "_poller")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.rfile = cast(io.BufferedReader, sock.makefile("rb", buffering=256 * 1024))
        self.reused = False
        self.dead = False
        self.timeout = sock.gettimeout()
        self.idle_since = 0.0  # when it went back to the pool
        self._poller: select.poll | None = None  # made at the first reuse, kept for the next

    def closed_by_peer(self) -> bool:
        """Whether an idle connection has something to read: its peer closed it (or sent what
        nobody asked for), so it cannot carry a request. One poll, no waiting."""
        if self.dead:
            return True
        try:
            pending = getattr(self.sock, "pending", None)  # bytes TLS decrypted already
            if pending is not None and pending():
                return True
            poller = self._poller
            if poller is None:
                poller = self._poller = select.poll()
                poller.register(self.sock, select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError):  # closed under us
            return True

    def settimeout(self, timeout: float | None) -> None:
        if timeout != self.timeout:  # most calls have none: skip the system call
            self.sock.settimeout(timeout)
            self.timeout = timeout

    def interrupt(self) -> None:
        """Wake a thread blocked on this connection; safe from any thread. That thread, the
        connection's user, then ``kill``s it."""
        self.dead = True
        try:  # socket.socket's: SSLSocket.shutdown would tear TLS down under the reader
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
        except OSError:
            pass
        try:  # while the reader is open this only marks the socket closed: the reader, when
            self.sock.close()  # closed or freed, then closes the descriptor
        except OSError:
            pass

    def kill(self) -> None:
        """Close the connection for good; only by its user (or for an idle connection).

        The reader goes too: the descriptor lives as long as any file made from the socket,
        and one left open (the socket merely marked closed) would hold it until garbage
        collection, which warns about an unclosed socket. Closing the reader waits for a read
        in progress, hence ``interrupt`` for other threads.
        """
        self.interrupt()
        try:
            self.rfile.close()
        except OSError:
            pass

    def forget(self) -> None:
        """Close this process's descriptor only: no shutdown, no TLS close (in a forked
        child, the connection is the parent's)."""
        try:
            os.close(self.sock.detach())
        except OSError:
            pass


class Endpoint:
    """A machine address (``http(s)://host:port[/prefix]``), parsed once."""

    __slots__ = ("host", "port", "prefix", "host_header", "tls")

    def __init__(self, addr: str) -> None:
        u = urlsplit(addr)
        if u.scheme not in ("http", "https") or not u.hostname or not u.port:
            raise ValueError(f"bad machine address {addr!r}: want http(s)://host:port[/prefix]")
        self.host = u.hostname
        self.port = u.port
        self.prefix = u.path.rstrip("/")
        self.host_header = f"{u.hostname}:{u.port}"
        self.tls = u.scheme == "https"


_pools: weakref.WeakSet[ConnectionPool] = weakref.WeakSet()


class ConnectionPool:
    """Idle connections per address, and how new ones are dialled; thread-safe.

    ``ssl_context`` (client credentials) is read at every dial, so that replacing it makes
    the next new connections use new credentials.
    """

    def __init__(self, ssl_context: ssl.SSLContext | None = None, *,
                 connect_timeout: float = 10.0) -> None:
        self.ssl_context = ssl_context
        #: The longest a dial (TCP connect, then TLS handshake) may take, in seconds.
        self.connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._idle: dict[str, list[Connection]] = {}
        self._endpoints: dict[str, Endpoint] = {}
        self._closed = False
        _pools.add(self)

    def endpoint(self, addr: str) -> Endpoint:
        """The parsed ``addr``; ``ValueError`` if it is not a machine address."""
        ep = self._endpoints.get(addr)
        if ep is None:
            ep = self._endpoints[addr] = Endpoint(addr)
        return ep

    def checkout(self, addr: str, ep: Endpoint, fresh: bool,
                 timeout: float | None) -> Connection:
        """A connection to ``addr`` (whose ``endpoint`` is ``ep``): an idle one unless
        ``fresh``, else a new one dialled within ``timeout`` (and ``connect_timeout``).
        ``NetworkError`` if dialling fails."""
        while not fresh:
            stale: list[Connection] = []
            conn = None
            with self._lock:
                conns = self._idle.get(addr)
                if conns:
                    # the most recently used first; the others are older still
                    conn = conns.pop()
                    if time.monotonic() - conn.idle_since > POOL_IDLE_SECONDS:
                        stale, conns[:] = [conn, *conns], []
                        conn = None
            for c in stale:
                c.kill()
            if conn is None:
                break
            if conn.closed_by_peer():
                conn.kill()  # try the next pooled one: it may be fine (a server's own close)
                continue
            conn.reused = True
            return conn
        return self._dial(addr, ep, timeout)

    def _dial(self, addr: str, ep: Endpoint, timeout: float | None) -> Connection:
        t = self.connect_timeout if timeout is None else min(timeout, self.connect_timeout)
        try:
            sock = socket.create_connection((ep.host, ep.port), timeout=t)
        except TimeoutError:
            raise NetworkError(f"connecting to {addr} timed out") from None
        except OSError as exc:
            raise NetworkError(f"cannot connect to {addr}: {exc}") from exc
        try:
            tune_socket(sock)
            if ep.tls:
                if self.ssl_context is None:
                    raise NetworkError(f"{addr} needs TLS but this client has no credentials")
                sock = self.ssl_context.wrap_socket(sock, server_hostname=ep.host)
        except ssl.SSLError as exc:
            sock.close()
            raise NetworkError(f"TLS handshake with {addr} failed: {exc}") from exc
        except OSError as exc:
            sock.close()
            raise NetworkError(f"cannot connect to {addr}: {exc}") from exc
        return Connection(sock)

    def checkin(self, addr: str, conn: Connection) -> None:
        """Put ``conn`` (healthy, its reply read whole) back among the idle ones."""
        if conn.dead:  # interrupted by another thread, or killed already
            conn.kill()
            return
        conn.idle_since = time.monotonic()
        with self._lock:
            if not self._closed:
                conns = self._idle.setdefault(addr, [])
                if len(conns) < MAX_IDLE:
                    conns.append(conn)
                    return
        conn.kill()

    def reset(self, addr: str) -> None:
        """Drop the idle connections to ``addr``."""
        with self._lock:
            conns = self._idle.pop(addr, [])
        for c in conns:
            c.kill()

    def close(self) -> None:
        """Close every idle connection and keep none from now on; connections in use finish
        on their own."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for c in conns:
                c.kill()

    def forget_inherited(self) -> None:
        """In a forked child: drop the pooled connections, closing only our descriptors."""
        self._lock = threading.Lock()  # the parent may have held it as it forked
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for c in conns:
                c.forget()


def _forget_connections_in_child() -> None:
    for pool in list(_pools):
        pool.forget_inherited()


os.register_at_fork(after_in_child=_forget_connections_in_child)
