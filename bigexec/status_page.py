"""The debug server's HTML pages: the cluster's status, and the page around every view.

Rendering only: the rows come from ``observe.status``, the driver's view from
``observe.driver``, the plots' points from ``status_history``; ``debug`` serves the bytes.
The page is plain HTML with inline SVG plots and no script or asset from anywhere: it works
offline, in any browser, and reloads itself every ``REFRESH_SECONDS``.
"""

from __future__ import annotations

import html
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from .human import duration, size

__all__ = ["page", "render", "sparkline", "REFRESH_SECONDS"]

REFRESH_SECONDS = 5

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 1.4em; } .meta { color: #666; }
table { border-collapse: collapse; width: 100%; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } th .meta { font-weight: normal; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.RUNNING { color: #1a7f37; font-weight: 600; } .STOPPED { color: #b42318; font-weight: 600; }
.STARTING, .UNSTARTED { color: #9a6700; font-weight: 600; } .err { color: #b42318; }
svg.spark { display: block; background: #fafafa; border: 1px solid #eee; }
svg.spark polyline { fill: none; stroke: #0969da; stroke-width: 1.5; }
svg.spark circle { fill: #0969da; }
.bar { background: #eee; width: 12em; height: .8em; display: inline-block; }
.bar > span { background: #1a7f37; height: 100%; display: block; }
.plots { display: flex; gap: 2em; flex-wrap: wrap; } .plots figure { margin: 0; }
figcaption { font-size: .85em; color: #666; }
"""


def page(title: str, body: str, refresh: int | None = None) -> bytes:
    """A whole HTML page: ``body`` (HTML) under ``title``, reloaded every ``refresh`` s."""
    meta = f'<meta http-equiv="refresh" content="{refresh}">' if refresh else ""
    return (f"<!doctype html><html><head><meta charset='utf-8'>{meta}"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>"
            f"<body><h1>{html.escape(title)}</h1>{body}</body></html>").encode()


def _seconds(s: Any) -> str:
    return duration(s) if isinstance(s, (int, float)) else ""


def _bytes(n: Any) -> str:
    return size(n) if isinstance(n, (int, float)) else ""


def _number(x: Any, unit: str = "", digits: int = 1) -> str:
    return f"{x:.{digits}f}{unit}" if isinstance(x, (int, float)) else ""


def _clock(t: Any) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) if isinstance(t, (int, float)) else ""


def sparkline(points: Sequence[dict[str, Any]], key: str, fmt: Any = None,
              width: int = 140, height: int = 30) -> str:
    """A small SVG plot of ``key`` over ``points`` (each with ``t``): a polyline of one
    vertex per point that has the value, scaled from 0 to the largest value; its tooltip
    says the last and the largest value (``fmt`` formats them)."""
    values = [(p["t"], p[key]) for p in points
              if isinstance(p.get(key), (int, float)) and isinstance(p.get("t"), (int, float))]
    label = key.replace("_", " ")
    if not values:
        return (f"<svg class='spark' data-key='{key}' width='{width}' height='{height}'>"
                f"<title>{html.escape(label)}: no data yet</title></svg>")
    fmt = fmt or (lambda v: f"{v:.3g}")
    t0, t1 = values[0][0], values[-1][0]
    top = max(v for _, v in values) or 1.0
    span = (t1 - t0) or 1.0
    pad = 2

    def xy(t: float, v: float) -> str:
        x = pad + (t - t0) / span * (width - 2 * pad)
        y = height - pad - v / top * (height - 2 * pad)
        return f"{x:.1f},{y:.1f}"

    title = (f"{label}: {fmt(values[-1][1])} now, {fmt(top)} at most, over "
             f"{duration(t1 - t0)}")
    if len(values) == 1:
        x, y = xy(t0, values[0][1]).split(",")
        shape = f"<circle cx='{width / 2:.1f}' cy='{y}' r='2'/>"
    else:
        shape = f"<polyline points='{' '.join(xy(t, v) for t, v in values)}'/>"
    return (f"<svg class='spark' data-key='{key}' data-points='{len(values)}' "
            f"width='{width}' height='{height}' viewBox='0 0 {width} {height}'>"
            f"<title>{html.escape(title)}</title>{shape}</svg>")


def _machine_link(prefix: str, path: str, addr: str, extra: str = "") -> str:
    return f"{prefix}/{path}?machine={quote(addr, safe='')}{extra}"


def _state_history(r: dict[str, Any]) -> str:
    parts = []
    if isinstance(r.get("booted"), (int, float)):
        parts.append(f"booted {_clock(r['booted'])}")
    for change in r.get("state_history") or ():
        if change["state"] == "STOPPED":
            why = f": {change['why']}" if change.get("why") else ""
            parts.append(f"stopped {_clock(change['time'])}{why}")
    return html.escape("; ".join(parts))


def _machine_rows(rows: list[dict[str, Any]], history: dict[str, Any], prefix: str) -> str:
    head = ("<tr><th>machine</th><th>state</th><th>history</th><th>uptime</th>"
            "<th>CPU <span class='meta'>(its process)</span></th>"
            "<th>RSS <span class='meta'>(its process)</span></th>"
            "<th>tasks run</th><th>tasks/s</th><th>calls</th><th>calls/s</th><th>errors</th>"
            "<th>host memory</th><th>host load (1, 5, 15 min)</th><th>keepalive replies</th>"
            "<th>lease left</th><th>plots: tasks/s, CPU %, RSS</th><th>look inside</th></tr>")
    series = history.get("machines", {})
    body = []
    for r in rows:
        mem, load, proc = r.get("memory") or {}, r.get("load") or {}, r.get("process") or {}
        replies = ", ".join(_seconds(t) for t in r.get("keepalive_reply_times", [])[-3:])
        loads = ", ".join(f"{load[k]:.2f}" for k in ("load1", "load5", "load15") if k in load)
        shared = (" <span class='meta' title='threads machines live in the driver process: "
                  "these are its figures'>(driver process)</span>"
                  if r.get("in_driver_process") else "")
        state = r["state"]
        phase = r.get("boot_phase")
        state_cell = state + (f"<br><span class='meta'>{html.escape(phase)}</span>"
                              if phase else "")
        points = series.get(r.get("addr") or r.get("key"), [])
        plots = (sparkline(points, "tasks_per_second", lambda v: f"{v:.1f}/s")
                 + sparkline(points, "cpu_percent", lambda v: f"{v:.0f}%")
                 + sparkline(points, "rss", size))
        links = ""
        if r.get("addr") and state == "RUNNING":
            links = "<br>".join(
                f"<a href='{html.escape(_machine_link(prefix, path, r['addr'], extra))}'>"
                f"{text}</a>" for path, extra, text in (
                    ("profile", "&seconds=5&format=flamegraph", "flame graph (5 s)"),
                    ("profile", "&seconds=5&format=text", "profile, top functions"),
                    ("threads", "", "thread stacks")))
        errors = (r.get("call_errors") or 0) if "call_errors" in r else r.get("rpc_errors")
        cells = [
            f"<td><code>{html.escape(r['addr'] or '(booting)')}</code><br>"
            f"<span class='meta'>{html.escape(r.get('hostname') or '')}"
            f"{' pid ' + str(r['pid']) if r.get('pid') else ''}"
            f"{'' if r.get('owned') else ' (dialed)'}</span></td>",
            f"<td class='{state}'>{state_cell}</td>",
            f"<td>{_state_history(r)}</td>",
            f"<td class='num'>{_seconds(r.get('uptime'))}</td>",
            f"<td class='num cpu'>{_number(r.get('cpu_percent'), '%', 0)}{shared}</td>",
            f"<td class='num rss'>{_bytes(proc.get('rss'))}</td>",
            f"<td class='num'>{r.get('tasks_run', '')}</td>",
            f"<td class='num'>{_number(r.get('tasks_per_second'))}</td>",
            f"<td class='num'>{r.get('calls', '')}</td>",
            f"<td class='num'>{_number(r.get('calls_per_second'))}</td>",
            f"<td class='num'>{'' if errors is None else errors}</td>",
            f"<td class='num'>{_number(mem.get('percent'), '%')}</td>",
            f"<td class='num'>{loads}</td>",
            f"<td>{replies}</td>",
            f"<td class='num'>{_seconds(r.get('next_keepalive_in'))}</td>",
            f"<td><div class='plots'>{plots}</div></td>",
            f"<td>{links}</td>",
        ]
        why = r.get("err") or r.get("status_error")
        row = f"<tr class='machine'>{''.join(cells)}</tr>"
        if why:
            row += (f"<tr><td></td><td class='err' colspan='{len(cells) - 1}'>"
                    f"{html.escape(why)}</td></tr>")
        body.append(row)
    return f"<table id='machines'>{head}{''.join(body)}</table>"


def _driver_section(driver: dict[str, Any], history: dict[str, Any]) -> str:
    proc = driver.get("process") or {}
    head = ("<tr><th>queued tasks</th><th>running tasks</th><th>done</th><th>done/s</th>"
            "<th>machines running</th><th>booting</th><th>crashes</th><th>replacements</th>"
            "<th>CPU <span class='meta'>(driver process)</span></th><th>RSS</th>"
            "<th>RPC calls made</th></tr>")
    cells = [driver.get("queued", ""), driver.get("running", ""), driver.get("completed", ""),
             _number(driver.get("tasks_per_second")), driver.get("running_machines", ""),
             driver.get("booting", ""), driver.get("crashes", ""),
             driver.get("replacements", ""), _number(driver.get("cpu_percent"), "%", 0),
             _bytes(proc.get("rss")), driver.get("rpc_calls_made", "")]
    table = (f"<table id='driver'>{head}<tr class='driver'>"
             + "".join(f"<td class='num'>{html.escape(str(c))}</td>" for c in cells)
             + "</tr></table>")
    points = history.get("driver", [])
    plots = "".join(
        f"<figure>{sparkline(points, key, fmt, width=260, height=50)}"
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        for key, fmt, caption in (
            ("tasks_per_second", lambda v: f"{v:.1f}/s", "tasks done per second"),
            ("queued", lambda v: f"{v:.0f}", "tasks queued"),
            ("running", lambda v: f"{v:.0f}", "tasks running"),
            ("cpu_percent", lambda v: f"{v:.0f}%", "driver CPU %"),
        ))
    maps = driver.get("maps") or []
    if maps:
        rows = []
        for m in maps:
            total, done = m.get("total"), m.get("done", 0)
            rate = m.get("rate") or 0.0
            share = done / total if total else None
            left = (total - done) / rate if total and rate > 0 else None
            bar = (f"<span class='bar'><span style='width:{min(share, 1.0) * 100:.1f}%'></span>"
                   f"</span> {share * 100:.0f}%" if share is not None else "total not known yet")
            rows.append(
                f"<tr class='map'><td>{html.escape(str(m.get('kind', 'map')))}</td>"
                f"<td class='num done'>{done}/{'?' if total is None else total}</td>"
                f"<td>{bar}</td><td class='num'>{rate:.1f}/s</td>"
                f"<td class='num'>{_seconds(m.get('seconds'))}</td>"
                f"<td class='num'>{_seconds(left) if left is not None else ''}</td></tr>")
        map_table = ("<h2>Maps in progress</h2><table id='maps'><tr><th>map</th>"
                     "<th>done/total</th><th>progress</th><th>rate</th><th>running for</th>"
                     "<th>left (estimate)</th></tr>" + "".join(rows) + "</table>")
    else:
        map_table = "<h2>Maps in progress</h2><p class='meta'>none</p>"
    return f"<h2>Driver</h2>{table}<div class='plots'>{plots}</div>{map_table}"


def render(system: str, rows: list[dict[str, Any]], prefix: str,
           driver: dict[str, Any] | None = None, history: dict[str, Any] | None = None) -> bytes:
    """The status page of a session on ``system``: the driver's view (``observe.driver``), its
    maps in progress, and one row per machine (``observe.status``), with plots from
    ``history`` (``StatusHistory.series``); ``prefix`` is where the debug server's pages
    live."""
    history = history or {}
    running = sum(1 for r in rows if r["state"] == "RUNNING")
    summary = (f"<p class='meta'>system <b>{html.escape(system)}</b> · {len(rows)} machines, "
               f"{running} running · {time.strftime('%Y-%m-%d %H:%M:%S')} · refreshes every "
               f"{REFRESH_SECONDS} s · <a href='{prefix}/status?format=json'>JSON</a> · "
               f"<a href='{prefix}/profile?seconds=10&amp;format=flamegraph'>flame graph of "
               f"every machine (10 s)</a> · <a href='{prefix}/threads'>every thread</a> · "
               f"<a href='{prefix}/vars'>metrics</a> · <a href='{prefix}/'>index</a></p>")
    driver_html = _driver_section(driver, history) if driver is not None else ""
    machines = f"<h2>Machines</h2>{_machine_rows(rows, history, prefix)}"
    return page("bigexec cluster status", summary + driver_html + machines,
                refresh=REFRESH_SECONDS)
