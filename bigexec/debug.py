"""The driver's debug server: the cluster's status page, merged profiles, metrics and stacks.

    browser / `bigexec` command ── HTTP ──> DebugServer (a thread in the driver)
        /debug/bigexec/status   ──> observe.status(b)    ──> HTML, or JSON with ?format=json
        /debug/bigexec/profile  ──> observe.render_profile ──> pstats, callgrind, collapsed, text,
                                                               flamegraph (HTML), speedscope
        /debug/bigexec/vars     ──> observe.metrics(b)   ──> JSON
        /debug/bigexec/threads  ──> observe.thread_dumps ──> text

It is opt-in (``b.serve_debug()`` or ``BIGEXEC_DEBUG_ADDR``) and listens on loopback by
default: what it serves (stacks, profiles) is for the person running the driver. So that a web
page cannot reach it instead (DNS rebinding, a cross-site image), it

- answers 403 to clients that are not on loopback unless ``allow_remote=True``;
- answers 403 to a ``Host`` header that does not name the server itself;
- has a token (``DebugServer.token``, printed as part of ``login_url``), taken from
  ``?token=`` (then kept in a cookie, so the page's links work), ``Authorization: Bearer`` or
  that cookie. A server that can be reached from other hosts wants it for every page. On
  loopback the read-only pages are open, and ``/profile`` wants it from every client that is
  not known to run as the driver's own user: a profile slows every machine down, and other
  users of the host can reach loopback too. The driver's user (the ``bigexec`` command, a
  browser) could read the driver's memory anyway, so a token would keep nobody out.

One profile runs at a time (yappi has one session per process): a second request gets 409.
A profile of no running machine gets 503 (none started yet, or every one stopped), or 409 when
``machine=`` names one that is not running; each says why in plain text.
A profile ends early, on every machine at once, when its client goes away. Requests are
served by the standard library's threading HTTP server: this is a page for people, not a hot
path.
"""

from __future__ import annotations

import errno
import html
import ipaddress
import json
import logging
import os
import secrets
import select
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterable
from concurrent.futures import CancelledError
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qs, urlsplit

from . import observe, status_page
from .machine import RUNNING
from .profiling import ProfileBusy
from .status_history import SAMPLE_SECONDS, StatusHistory

if TYPE_CHECKING:
    from collections.abc import Callable


class ServedSession(observe.ObservedSession, Protocol):
    """What a debug server needs of its session: the views' needs, and to end with it."""

    def on_shutdown(self, callback: Callable[[], Any]) -> None: ...


__all__ = ["DebugServer", "ServedSession", "new_token", "serve", "parse_addr",
           "server_of", "serve_on_free_port", "MAX_PROFILE_SECONDS", "TOKEN_ENV"]

log = logging.getLogger("bigexec.debug")

PREFIX = "/debug/bigexec"
_CONTENT_TYPES = {
    "pstats": "application/octet-stream",
    "callgrind": "text/plain; charset=utf-8",
    "collapsed": "text/plain; charset=utf-8",
    "text": "text/plain; charset=utf-8",
    "flamegraph": "text/html; charset=utf-8",
    "speedscope": "application/json",
}
# Formats saved as files rather than shown: the browser offers to save them under this name.
_ATTACHMENTS = {"pstats": "bigexec.prof", "speedscope": "bigexec.speedscope.json"}
# Every machine runs many times slower under the profiler (32x for code that calls functions
# a lot): a profile is a short look, and several short ones are as good as a long one.
MAX_PROFILE_SECONDS = 120.0
# The variable the `bigexec` command reads a debug server's token from.
TOKEN_ENV = "BIGEXEC_DEBUG_TOKEN"
_PORT_TRIES = 100  # ports tried from the one asked for, when it is taken
# A request's head has this long to arrive, and each later read or write of the connection
# too: a client that sends half a request does not hold a thread for ever.
REQUEST_TIMEOUT = 10.0
#: Connections served at once; a page and its requests need a handful.
MAX_CONNECTIONS = 32
_DISCONNECT_POLL = 0.25  # how often a profile in flight looks whether its client left
_WILDCARDS = ("0.0.0.0", "::", "")


def new_token() -> str:
    """A fresh debug-server token: 256 random bits in hex, which never starts with "-" (a
    command line would take such a token for an option: ``--token -x...``)."""
    return secrets.token_hex(32)


def parse_addr(addr: str) -> tuple[str, int]:
    """``"host:port"``, ``"[v6 address]:port"``, ``":port"`` or ``"port"`` to (host, port);
    the host defaults to loopback."""
    host, sep, port = addr.rpartition(":")
    if not sep:
        host, port = "", addr
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"bad debug address {addr!r}: write an IPv6 address in brackets, "
                         f"as [::1]:3333")
    host = host or "127.0.0.1"
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"bad debug address {addr!r}: want host:port") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"bad debug address {addr!r}: the port must be 0 to 65535")
    return host, number


_servers: dict[int, DebugServer] = {}  # by id() of the session they serve, while it lives
_servers_lock = threading.Lock()


def serve(b: ServedSession, port: int = 3333, host: str = "127.0.0.1",
          allow_remote: bool = False) -> DebugServer:
    """The debug server of session ``b``: started at the first call (on ``host:port``), the
    same one after that; it closes when ``b`` shuts down (``B.on_shutdown``)."""
    key = id(b)
    with _servers_lock:
        server = _servers.get(key)
        if server is not None:
            return server
        server = _servers[key] = DebugServer(b, host, port, allow_remote)

    def close() -> None:
        with _servers_lock:
            if _servers.get(key) is server:
                del _servers[key]
        server.close()

    b.on_shutdown(close)
    return server


def server_of(b: ServedSession) -> DebugServer | None:
    """The debug server of session ``b``, if it has one (``serve``)."""
    with _servers_lock:
        return _servers.get(id(b))


def serve_on_free_port(b: ServedSession, host: str, port: int,
                       tries: int = _PORT_TRIES) -> DebugServer | None:
    """Serve ``b``'s debug server on ``port``, or on the next free port above it.

    Several sessions in one process (an ``Executor`` inside ``with bigexec.start()``) each
    get a debug server this way: the first takes ``port``, the next ``port + 1``, and so on.
    Where it ended up (its ``login_url``, token included) is printed on stderr (the person who
    asked for it needs the URL, and the library's logger may go nowhere) and logged. A debug
    server that cannot be had is not worth failing the session for: that is logged and
    printed too, and None returned.
    """
    ports = [0] if port == 0 else range(port, min(port + tries, 65536))
    for p in ports:
        try:
            server = serve(b, p, host)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                continue
            _tell(f"no bigexec debug server on {host}:{p}: {exc}")
            return None
        if p == port or port == 0:
            _tell(f"bigexec debug server at {server.login_url}")
        else:
            _tell(f"bigexec debug server at {server.login_url} (port {port} was taken, "
                  f"by another session perhaps)")
        return server
    _tell(f"no bigexec debug server: ports {port} to {ports[-1]} on {host} are all taken")
    return None


def _tell(message: str) -> None:
    log.info("%s", message)
    try:
        print(message, file=sys.stderr, flush=True)
    except (OSError, ValueError):  # no stderr to speak of
        pass


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # an IPv4 client of a dual-stack server
    return ip


def _is_loopback(host: str) -> bool:
    ip = _ip(host)
    return ip is not None and ip.is_loopback


def _host_name(host: str) -> str:
    """``host`` as a URL or a Host header writes it: IPv6 addresses in brackets."""
    return f"[{host}]" if ":" in host else host


# --- who is on the other end of a loopback connection ---------------------------------------


def _proc_net_address(field: str) -> tuple[Any, int]:
    # /proc/net/tcp{,6} write an address as 32-bit words in host byte order, then ":port".
    hexaddr, hexport = field.split(":")
    raw = b"".join(struct.pack("=I", int(hexaddr[i:i + 8], 16))
                   for i in range(0, len(hexaddr), 8))
    return _ip(str(ipaddress.ip_address(raw))), int(hexport, 16)


def peer_uid(client: tuple[Any, ...], server: tuple[Any, ...]) -> int | None:
    """The user id owning the client end of a local TCP connection from ``client`` to
    ``server`` (socket addresses), or None where that cannot be told (not Linux, not found).

    Linux lists every TCP socket of the network namespace, with its owner, in /proc/net/tcp
    and /proc/net/tcp6, whoever owns it.
    """
    want = ((_ip(str(client[0])), int(client[1])), (_ip(str(server[0])), int(server[1])))
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            try:
                if (_proc_net_address(fields[1]), _proc_net_address(fields[2])) == want:
                    return int(fields[7])
            except (ValueError, IndexError):
                continue
    return None


# --- the server ------------------------------------------------------------------------------


class _HTTPServer(ThreadingHTTPServer):
    """A thread per connection, at most ``MAX_CONNECTIONS`` of them: connections past that are
    closed at once, so that a flood of idle ones cannot pile up threads in the driver."""

    daemon_threads = True
    request_queue_size = 128  # the listen backlog: socketserver's 5 makes a busy page wait

    def __init__(self, host: str, port: int, handler: type[BaseHTTPRequestHandler]) -> None:
        # The address family follows the host: "::1" needs an IPv6 socket.
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        self.address_family = infos[0][0]
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__((host, port), handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            log.debug("debug client %s refused: %d connections open", client_address,
                      MAX_CONNECTIONS)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread: the slot is not taken after all
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The standard library prints a traceback on stderr for any error; a client that went
        # away (a closed browser tab, a ^C'd command) is no error of the driver's.
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            log.debug("debug client %s went away: %s", client_address, exc)
        else:
            log.warning("debug request from %s failed", client_address, exc_info=True)


class DebugServer:
    """Serves ``/debug/bigexec/...`` for one session; ``url`` says where, ``login_url`` says
    where with the token.

    ``hosts`` are further names that clients may write in their ``Host`` header (a DNS name
    of this host that is not its hostname); ``token`` replaces the generated one;
    ``request_timeout`` is how long a request's head, and each later read or write of its
    connection, may take.
    """

    def __init__(self, b: ServedSession, host: str = "127.0.0.1", port: int = 3333,
                 allow_remote: bool = False, *, hosts: Iterable[str] = (),
                 token: str | None = None,
                 request_timeout: float = REQUEST_TIMEOUT) -> None:
        self.b = b
        self.allow_remote = allow_remote
        self.token = token or new_token()
        handler = type("Handler", (_Handler,), {"debug": self, "timeout": request_timeout})
        self._httpd = _HTTPServer(host, port, handler)
        h, p = self._httpd.server_address[:2]
        bound = str(h)
        self.url = f"http://{_host_name(bound)}:{p}{PREFIX}/"
        self.login_url = f"{self.url}?token={self.token}"
        # Anything but a loopback bind can be reached from other hosts: it wants the token.
        self.reachable_remotely = allow_remote or not _is_loopback(bound)
        self._hosts = _allowed_hosts(bound, int(p), hosts)
        self.cookie = f"bigexec-debug-{p}"  # cookies are per host, not per port
        self._profiling = threading.Lock()
        self._profile_ends = 0.0
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True,
                                        name="bigexec-debug")
        self._thread.start()
        #: The last minutes of the cluster, read every ``SAMPLE_SECONDS`` for the page's plots.
        self.history = StatusHistory()
        self._closed = threading.Event()
        self._sampler = threading.Thread(target=self._sample_until_closed, daemon=True,
                                         name="bigexec-debug-sampler")
        self._sampler.start()

    def sample(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Read the cluster's status now, add it to ``history``, and return the machines'
        rows and the driver's view with their newest rates."""
        rows, driver = observe.status(self.b), observe.driver(self.b)
        self.history.record(rows, driver)
        self.history.annotate(rows, driver)
        return rows, driver

    def _sample_until_closed(self) -> None:
        while not self._closed.wait(SAMPLE_SECONDS):
            try:
                self.sample()
            except Exception as exc:  # a session shutting down; the next reading may work
                log.debug("status sample failed: %s", exc)

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def close(self) -> None:
        self._closed.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def host_allowed(self, host_header: str | None) -> bool:
        """Whether a request's ``Host`` header names this server."""
        return host_header is not None and host_header.strip().lower() in self._hosts

    def token_matches(self, candidate: str | None) -> bool:
        return candidate is not None and secrets.compare_digest(
            candidate.encode(), self.token.encode())

    def client_is_owner(self, client: tuple[Any, ...]) -> bool:
        """Whether a loopback client runs as the user running the driver."""
        if not hasattr(os, "getuid"):  # no user ids to compare (Windows)
            return False
        return peer_uid(client, self._httpd.server_address) == os.getuid()

    def start_profile(self, seconds: float) -> bool:
        """Take the one profile slot for ``seconds``; False if a profile is running."""
        if not self._profiling.acquire(blocking=False):
            return False
        self._profile_ends = time.monotonic() + seconds
        return True

    def end_profile(self) -> None:
        self._profiling.release()

    def profile_seconds_left(self) -> float:
        return max(0.0, self._profile_ends - time.monotonic())


def _allowed_hosts(bound: str, port: int, extra: Iterable[str]) -> frozenset[str]:
    names = {"localhost", "127.0.0.1", "::1", bound, *extra}
    if not _is_loopback(bound):
        # Reached from other hosts: by this host's names, and, bound to every interface, by
        # any of its addresses.
        names.update({socket.gethostname(), socket.getfqdn()})
        if bound in _WILDCARDS:
            import psutil

            for addrs in psutil.net_if_addrs().values():
                names.update(a.address.split("%", 1)[0] for a in addrs
                             if a.family in (socket.AF_INET, socket.AF_INET6))
    # "0.0.0.0" is no name of a server: a browser sends it, to reach loopback, from any page.
    names.difference_update(_WILDCARDS)
    allowed = {f"{_host_name(n.lower())}:{port}" for n in names}
    if port == 80:  # the default port goes unwritten
        allowed.update(_host_name(n.lower()) for n in names)
    return frozenset(allowed)


def _client_left(sock: socket.socket) -> bool:
    """Whether the client closed or reset the connection (it has nothing more to send)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0)) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _watch_client(sock: socket.socket, gone: threading.Event, done: threading.Event) -> None:
    """Set ``gone`` when the client leaves before ``done``."""
    while not done.is_set():
        try:
            readable, _, _ = select.select([sock], [], [], _DISCONNECT_POLL)
        except (OSError, ValueError):  # closed under us
            gone.set()
            return
        if readable:
            if _client_left(sock):
                gone.set()
            # Otherwise the client sent more (a pipelined request): it is still there, and
            # the socket would stay readable, so there is nothing more to watch for.
            return


class _Handler(BaseHTTPRequestHandler):
    debug: DebugServer
    server_version = "bigexec-debug"
    timeout = REQUEST_TIMEOUT
    _set_cookie = False  # set per request, once its token is seen in the query

    def log_message(self, format: str, *args: Any) -> None:  # quiet: no access log on stderr
        pass

    def handle(self) -> None:
        try:
            super().handle()
        except (ConnectionError, TimeoutError) as exc:
            # A client that went away mid-request: nothing to answer, nothing to print.
            log.debug("debug client %s went away: %s", self.client_address, exc)
            self.close_connection = True

    def _send(self, status: int, body: bytes, ctype: str = "text/plain; charset=utf-8",
              extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        if self._set_cookie:
            self.send_header("Set-Cookie", f"{self.debug.cookie}={self.debug.token}; Path=/; "
                                           f"HttpOnly; SameSite=Strict")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        self._set_cookie = False
        if not self.debug.allow_remote and not _is_loopback(self.client_address[0]):
            self._send(403, b"the bigexec debug server answers loopback clients only\n")
            return
        if not self.debug.host_allowed(self.headers.get("Host")):
            # A page from elsewhere, through DNS rebinding or a cross-site request.
            self._send(403, b"the Host header does not name this bigexec debug server\n")
            return
        url = urlsplit(self.path)
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        path = url.path.rstrip("/")
        routes = {
            PREFIX: self._index,
            PREFIX + "/status": self._status,
            PREFIX + "/profile": self._profile,
            PREFIX + "/vars": self._vars,
            PREFIX + "/threads": self._threads,
            "": self._index,
        }
        route = routes.get(path)
        if route is None:
            self._send(404, f"no page {url.path}; see {PREFIX}/\n".encode())
            return
        if not self._authorized(route == self._profile, q.pop("token", None)):
            self._send(401, b"this bigexec debug server wants its token: open the URL it "
                            b"printed (ending ?token=...), send 'Authorization: Bearer TOKEN', "
                            b"or give the bigexec command --token or " + TOKEN_ENV.encode()
                            + b"\n", extra={"WWW-Authenticate": "Bearer"})
            return
        try:
            route(q)
        except (ConnectionError, TimeoutError):
            raise  # the client went away: handle() ends the connection quietly
        except ValueError as exc:
            self._send(400, f"{exc}\n".encode())
        except Exception as exc:  # a failing page says why instead of dropping the client
            self._send(500, f"{type(exc).__name__}: {exc}\n".encode())

    def _authorized(self, profile: bool, query_token: str | None) -> bool:
        needed = self.debug.reachable_remotely or (profile and not self.debug.client_is_owner(
            self.client_address))
        if self.debug.token_matches(query_token):
            self._set_cookie = True  # so that the page's links, without the token, work
            return True
        if not needed:
            return True
        scheme, _, bearer = (self.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() == "bearer" and self.debug.token_matches(bearer.strip()):
            return True
        return self.debug.token_matches(self._cookie())

    def _cookie(self) -> str | None:
        for header in self.headers.get_all("Cookie") or ():
            for part in header.split(";"):
                name, _, value = part.strip().partition("=")
                if name == self.debug.cookie:
                    return value
        return None

    # --- pages ---------------------------------------------------------------------------

    def _index(self, q: dict[str, str]) -> None:
        links = [("status", "machines, their state, resources and work"),
                 ("status?format=json", "the same as JSON"),
                 ("vars", "metrics of the driver and every machine (JSON)"),
                 ("threads", "stacks of every thread on every machine"),
                 ("profile?seconds=10&format=text", "a merged CPU profile, top functions"),
                 ("profile?seconds=10&format=flamegraph", "a flame graph of every machine"),
                 ("profile?seconds=10&format=speedscope",
                  "the same samples for speedscope (JSON)"),
                 ("profile?seconds=10", "a merged CPU profile for pstats and snakeviz")]
        items = "".join(f'<li><a href="{PREFIX}/{html.escape(h)}">{html.escape(h)}</a>: '
                        f"{html.escape(d)}</li>" for h, d in links)
        self._send(200, status_page.page("bigexec debug", f"<ul>{items}</ul>"),
                   "text/html; charset=utf-8")

    def _status(self, q: dict[str, str]) -> None:
        rows, driver = self.debug.sample()
        history = self.debug.history.series()
        if q.get("format") == "json":
            body = json.dumps({"time": time.time(), "system": self.debug.b.system.name,
                               "machines": rows, "driver": driver, "history": history},
                              indent=1, default=str)
            self._send(200, body.encode(), "application/json")
            return
        self._send(200, status_page.render(self.debug.b.system.name, rows, PREFIX,
                                           driver=driver, history=history),
                   "text/html; charset=utf-8")

    def _profile(self, q: dict[str, str]) -> None:
        seconds = float(q.get("seconds", "30"))
        if not 0 < seconds <= MAX_PROFILE_SECONDS:
            raise ValueError(f"seconds must be in (0, {MAX_PROFILE_SECONDS:g}]: every machine "
                             f"runs many times slower under the profiler; take several "
                             f"shorter profiles instead")
        fmt = q.get("format", "pstats")
        if fmt not in observe.PROFILE_FORMATS:
            raise ValueError(f"unknown format {fmt!r}; formats: "
                             f"{', '.join(observe.PROFILE_FORMATS)}")
        machines = self._named_machines(q)
        include_driver = q.get("driver", "0") in ("1", "true", "yes")
        limit = int(q.get("limit", "40"))
        if not self.debug.start_profile(seconds):
            left = self.debug.profile_seconds_left()
            self._busy(f"another profile is running, for {left:.0f} s more; one profile runs "
                       f"at a time: try again then", left)
            return
        gone, done = threading.Event(), threading.Event()
        watcher = threading.Thread(target=_watch_client, args=(self.connection, gone, done),
                                   name="bigexec-debug-watch", daemon=True)
        watcher.start()
        try:
            body = observe.render_profile(self.debug.b, fmt, seconds, machines,
                                          include_driver, limit=limit, stop=gone)
        except CancelledError:
            log.info("a %g s profile stopped early: its client went away", seconds)
            self.close_connection = True
            return
        except ProfileBusy as exc:  # someone profiles the machines other than through here
            self._busy(f"{exc}; try again once it ends", None)
            return
        except observe.NothingToProfile as exc:
            # The session's state, not a failure of the server: a named machine that is not
            # running conflicts with the request (409); no machine at all may come (503).
            self._send(409 if machines is not None else 503, f"{exc}\n".encode())
            return
        finally:
            done.set()
            watcher.join()
            self.debug.end_profile()
        extra = {}
        if fmt in _ATTACHMENTS:
            extra["Content-Disposition"] = f'attachment; filename="{_ATTACHMENTS[fmt]}"'
        self._send(200, body, _CONTENT_TYPES[fmt], extra)

    def _busy(self, message: str, seconds_left: float | None) -> None:
        extra = {} if seconds_left is None else {"Retry-After": str(max(1, round(seconds_left)))}
        self._send(409, f"{message}\n".encode(), extra=extra)

    def _vars(self, q: dict[str, str]) -> None:
        body = json.dumps(observe.metrics(self.debug.b), indent=1, default=str)
        self._send(200, body.encode(), "application/json")

    def _threads(self, q: dict[str, str]) -> None:
        machines = self._named_machines(q)
        if machines is not None and not any(m.state == RUNNING for m in machines):
            self._send(409, f"machine {q['machine']} is not running: it has no threads to "
                            f"show\n".encode())
            return
        self._send(200, observe.thread_dumps(self.debug.b, machines).encode())

    def _named_machines(self, q: dict[str, str]) -> list[Any] | None:
        """The machines ``machine=`` names (None: no such parameter); ValueError if none."""
        if "machine" not in q:
            return None
        wanted = q["machine"]
        machines = [m for m in self.debug.b.known_machines()
                    if m.addr == wanted or (m.addr or "").split("://", 1)[-1] == wanted]
        if not machines:
            raise ValueError(f"no machine {wanted!r} in this session")
        return machines
