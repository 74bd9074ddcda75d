"""The debug server's HTML pages: the cluster status table, and the page around it.

Rendering only: the rows come from ``observe.status``, and ``debug`` serves the bytes.
"""

from __future__ import annotations

import html
import time
from typing import Any

__all__ = ["page", "render"]

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


def page(title: str, body: str, refresh: int | None = None) -> bytes:
    """A whole HTML page: ``body`` (HTML) under ``title``, reloaded every ``refresh`` s."""
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


def render(system: str, rows: list[dict[str, Any]], prefix: str) -> bytes:
    """The status page of a session on ``system`` whose machines ``rows`` describe
    (``observe.status``); ``prefix`` is where the debug server's pages live."""
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
               f"5 s · <a href='?format=json'>JSON</a> · <a href='{prefix}/'>index</a></p>")
    table = f"<table id='machines'>{head}{''.join(body)}</table>"
    return page("bigexec cluster status", summary + table, refresh=5)
