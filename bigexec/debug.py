"""The driver's debug server: the cluster's status page, merged profiles, metrics and stacks.

    browser / `bigexec` command ── HTTP ──> DebugServer (a thread in the driver)
        /debug/bigexec/status   ──> observe.status(b)    ──> HTML, or JSON with ?format=json
        /debug/bigexec/profile  ──> observe.render_profile ──> pstats, callgrind, collapsed, text
        /debug/bigexec/vars     ──> observe.metrics(b)   ──> JSON
        /debug/bigexec/threads  ──> observe.thread_dumps ──> text

It is opt-in (``b.serve_debug()`` or ``BIGEXEC_DEBUG_ADDR``), listens on loopback by default,
and answers 403 to clients that are not on loopback unless ``allow_remote=True``: what it
serves (stacks, profiles) is for the person running the driver. Requests are served by the
standard library's threading HTTP server: this is a page for people, not a hot path.
"""

from __future__ import annotations

import errno
import html
import ipaddress
import json
import logging
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from . import observe

if TYPE_CHECKING:
    from .session import B

__all__ = ["DebugServer", "parse_addr", "serve_on_free_port"]

log = logging.getLogger("bigexec.debug")

PREFIX = "/debug/bigexec"
_CONTENT_TYPES = {
    "pstats": "application/octet-stream",
    "callgrind": "text/plain; charset=utf-8",
    "collapsed": "text/plain; charset=utf-8",
    "text": "text/plain; charset=utf-8",
}
_MAX_PROFILE_SECONDS = 600.0
_PORT_TRIES = 100  # ports tried from the one asked for, when it is taken


def parse_addr(addr: str) -> tuple[str, int]:
    """``"host:port"``, ``":port"`` or ``"port"`` to (host, port); the host defaults to
    loopback."""
    host, sep, port = addr.rpartition(":")
    if not sep:
        host, port = "", addr
    host = host.strip("[]") or "127.0.0.1"
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"bad debug address {addr!r}: want host:port") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"bad debug address {addr!r}: the port must be 0 to 65535")
    return host, number


def serve_on_free_port(b: B, host: str, port: int,
                       tries: int = _PORT_TRIES) -> DebugServer | None:
    """Serve ``b``'s debug server on ``port``, or on the next free port above it.

    Several sessions in one process (an ``Executor`` inside ``with bigexec.start()``) each
    get a debug server this way: the first takes ``port``, the next ``port + 1``, and so on.
    Where it ended up is printed on stderr (the person who asked for it needs the URL, and
    the library's logger may go nowhere) and logged. A debug server that cannot be had is
    not worth failing the session for: that is logged and printed too, and None returned.
    """
    ports = [0] if port == 0 else range(port, min(port + tries, 65536))
    for p in ports:
        try:
            server = b.serve_debug(p, host)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                continue
            _tell(f"no bigexec debug server on {host}:{p}: {exc}")
            return None
        if p == port or port == 0:
            _tell(f"bigexec debug server at {server.url}")
        else:
            _tell(f"bigexec debug server at {server.url} (port {port} was taken, "
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


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


class DebugServer:
    """Serves ``/debug/bigexec/...`` for one session; ``url`` says where."""

    def __init__(self, b: B, host: str = "127.0.0.1", port: int = 3333,
                 allow_remote: bool = False) -> None:
        self.b = b
        self.allow_remote = allow_remote
        handler = type("Handler", (_Handler,), {"debug": self})
        self._httpd = ThreadingHTTPServer((host, port), handler)
        self._httpd.daemon_threads = True
        h, p = self._httpd.server_address[:2]
        self.url = f"http://{'[' + h + ']' if ':' in str(h) else h}:{p}{PREFIX}/"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True,
                                        name="bigexec-debug")
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    debug: DebugServer
    server_version = "bigexec-debug"

    def log_message(self, format: str, *args: Any) -> None:  # quiet: no access log on stderr
        pass

    def _send(self, status: int, body: bytes, ctype: str = "text/plain; charset=utf-8",
              extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        if not self.debug.allow_remote and not _is_loopback(self.client_address[0]):
            self._send(403, b"the bigexec debug server answers loopback clients only\n")
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
        try:
            route(q)
        except ValueError as exc:
            self._send(400, f"{exc}\n".encode())
        except Exception as exc:  # a failing page says why instead of dropping the client
            self._send(500, f"{type(exc).__name__}: {exc}\n".encode())

    # --- pages ---------------------------------------------------------------------------

    def _index(self, q: dict[str, str]) -> None:
        links = [("status", "machines, their state, resources and work"),
                 ("status?format=json", "the same as JSON"),
                 ("vars", "metrics of the driver and every machine (JSON)"),
                 ("threads", "stacks of every thread on every machine"),
                 ("profile?seconds=10&format=text", "a merged CPU profile, top functions"),
                 ("profile?seconds=10", "a merged CPU profile for pstats and snakeviz")]
        items = "".join(f'<li><a href="{PREFIX}/{html.escape(h)}">{html.escape(h)}</a>: '
                        f"{html.escape(d)}</li>" for h, d in links)
        self._send(200, _page("bigexec debug", f"<ul>{items}</ul>"), "text/html; charset=utf-8")

    def _status(self, q: dict[str, str]) -> None:
        rows = observe.status(self.debug.b)
        if q.get("format") == "json":
            body = json.dumps({"time": time.time(), "machines": rows}, indent=1, default=str)
            self._send(200, body.encode(), "application/json")
            return
        self._send(200, _status_html(self.debug.b, rows), "text/html; charset=utf-8")

    def _profile(self, q: dict[str, str]) -> None:
        seconds = float(q.get("seconds", "30"))
        if not 0 < seconds <= _MAX_PROFILE_SECONDS:
            raise ValueError(f"seconds must be in (0, {_MAX_PROFILE_SECONDS:g}]")
        fmt = q.get("format", "pstats")
        if fmt not in observe.PROFILE_FORMATS:
            raise ValueError(f"unknown format {fmt!r}; formats: "
                             f"{', '.join(observe.PROFILE_FORMATS)}")
        machines = None
        if "machine" in q:
            wanted = q["machine"]
            machines = [m for m in observe._all_machines(self.debug.b)
                        if m.addr == wanted or m.addr.split("://", 1)[-1] == wanted]
            if not machines:
                raise ValueError(f"no machine {wanted!r} in this session")
        include_driver = q.get("driver", "0") in ("1", "true", "yes")
        body = observe.render_profile(self.debug.b, fmt, seconds, machines, include_driver,
                                      limit=int(q.get("limit", "40")))
        extra = {}
        if fmt == "pstats":
            extra["Content-Disposition"] = 'attachment; filename="bigexec.prof"'
        self._send(200, body, _CONTENT_TYPES[fmt], extra)

    def _vars(self, q: dict[str, str]) -> None:
        body = json.dumps(observe.metrics(self.debug.b), indent=1, default=str)
        self._send(200, body.encode(), "application/json")

    def _threads(self, q: dict[str, str]) -> None:
        self._send(200, observe.thread_dumps(self.debug.b).encode())


_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; } .meta { color: #666; }
table { border-collapse: collapse; width: 100%; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.RUNNING { color: #1a7f37; font-weight: 600; } .STOPPED { color: #b42318; font-weight: 600; }
.STARTING, .UNSTARTED { color: #9a6700; font-weight: 600; } .err { color: #b42318; }
"""


def _page(title: str, body: str, refresh: int | None = None) -> bytes:
    meta = f'<meta http-equiv="refresh" content="{refresh}">' if refresh else ""
    return (f"<!doctype html><html><head><meta charset='utf-8'>{meta}"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>"
            f"<body><h1>{html.escape(title)}</h1>{body}</body></html>").encode()


def _fmt_bytes(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return ""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _fmt_seconds(s: Any) -> str:
    if not isinstance(s, (int, float)):
        return ""
    if s < 1:
        return f"{s * 1000:.1f} ms"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _status_html(b: B, rows: list[dict[str, Any]]) -> bytes:
    system = b.system.name if b.system is not None else "machine-side"
    head = ("<tr><th>machine</th><th>state</th><th>uptime</th><th>keepalive replies</th>"
            "<th>lease left</th><th>memory used</th><th>process RSS</th><th>disk used</th>"
            "<th>load (1, 5, 15 min)</th><th>tasks run</th><th>running</th>"
            "<th>RPC calls</th><th>RPC errors</th><th>why stopped</th></tr>")
    body = []
    for r in rows:
        mem, disk, load = r.get("memory") or {}, r.get("disk") or {}, r.get("load") or {}
        replies = ", ".join(_fmt_seconds(t) for t in r.get("keepalive_reply_times", [])[-3:])
        loads = ", ".join(f"{load[k]:.2f}" for k in ("load1", "load5", "load15") if k in load)
        cells = [
            f"<td><code>{html.escape(r['addr'] or '(booting)')}</code><br>"
            f"<span class='meta'>{html.escape(r.get('hostname') or '')}"
            f"{' pid ' + str(r['pid']) if r.get('pid') else ''}"
            f"{'' if r.get('owned') else ' (dialed)'}</span></td>",
            f"<td class='{r['state']}'>{r['state']}</td>",
            f"<td class='num'>{_fmt_seconds(r.get('uptime'))}</td>",
            f"<td>{replies}</td>",
            f"<td class='num'>{_fmt_seconds(r.get('next_keepalive_in'))}</td>",
            f"<td class='num'>{mem.get('percent', '')}{'%' if 'percent' in mem else ''}</td>",
            f"<td class='num'>{_fmt_bytes(mem.get('process_rss'))}</td>",
            f"<td class='num'>{disk.get('percent', '')}{'%' if 'percent' in disk else ''}</td>",
            f"<td class='num'>{loads}</td>",
            f"<td class='num'>{r.get('tasks_run', '')}</td>",
            f"<td class='num'>{r.get('tasks_running', '')}</td>",
            f"<td class='num'>{r.get('rpc_calls', '')}</td>",
            f"<td class='num'>{r.get('rpc_errors', '')}</td>",
            f"<td class='err'>{html.escape(r.get('err') or r.get('status_error') or '')}</td>",
        ]
        body.append(f"<tr>{''.join(cells)}</tr>")
    running = sum(1 for r in rows if r["state"] == "RUNNING")
    summary = (f"<p class='meta'>system <b>{html.escape(system)}</b> · {len(rows)} machines, "
               f"{running} running · {time.strftime('%Y-%m-%d %H:%M:%S')} · refreshes every "
               f"5 s · <a href='?format=json'>JSON</a> · <a href='{PREFIX}/'>index</a></p>")
    table = f"<table id='machines'>{head}{''.join(body)}</table>"
    return _page("bigexec cluster status", summary + table, refresh=5)
