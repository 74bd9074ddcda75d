"""bigexec's benchmark suite: the same workloads on bigexec and its peers, in one run.

    .venv/bin/python -m benchmarks.run                 # full run (about 6 minutes)
    .venv/bin/python -m benchmarks.run --quick         # smoke run (about 2 minutes)
    .venv/bin/python -m benchmarks.run --only roundtrip,floor --peers bigexec-local,mp-pool

Every (workload, peer) cell runs in a child process of this one, with a deadline: a peer that
hangs loses its cell, not the run, and its whole process tree is killed. This process is a
child subreaper (Linux), so a worker orphaned by a cell is re-parented here, noticed, reported
and killed. Prints a table (see benchmarks/README.md for how to read it) and writes every raw
figure to JSON (default benchmarks/results/latest.json), the table next to it (.txt).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

if __package__ in (None, ""):  # run as a script: python benchmarks/run.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "benchmarks"

import psutil  # noqa: E402

from benchmarks import floor  # noqa: E402
from benchmarks.peers import LABELS, PEERS, REFERENCE, installed  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_JSON = os.path.join(ROOT, "benchmarks", "results", "latest.json")

WORKLOADS = ["floor", "startup", "submit", "map", "roundtrip", "paired", "echo", "cpu", "stream",
             "scale", "idle"]
EXECUTOR_WORKLOADS = ["startup", "submit", "map", "roundtrip", "echo", "cpu"]


# --- sizes -------------------------------------------------------------------------------

def params(quick: bool) -> dict[str, dict[str, Any]]:
    """Per workload: its parameters and the cell's deadline in seconds."""
    if quick:
        return {
            "floor": {"n": 500, "warmup": 50, "deadline": 90},
            "startup": {"deadline": 120},
            "submit": {"n": 500, "deadline": 120},
            "map": {"n1": 500, "n100": 20000, "deadline": 120},
            "roundtrip": {"n": 200, "warmup": 50, "deadline": 120},
            "paired": {"block": 25, "blocks": 8, "warmup": 50, "deadline": 120},
            "echo": {"sizes": [["1m", 1, 5], ["64m", 64, 1]], "deadline": 150},
            "cpu": {"n": 1_000_000, "deadline": 120},
            "stream": {"mib": 256, "deadline": 150},
            "scale-local": {"machines": 16, "tasks": 500, "deadline": 180},
            "scale-threads": {"machines": 64, "tasks": 1000, "deadline": 180},
            "idle": {"machines": 8, "seconds": 3, "deadline": 120},
        }
    return {
        "floor": {"n": 2000, "warmup": 200, "deadline": 120},
        "startup": {"deadline": 180},
        "submit": {"n": 5000, "deadline": 240},
        "map": {"n1": 5000, "n100": 100_000, "deadline": 240},
        "roundtrip": {"n": 1000, "warmup": 100, "deadline": 180},
        "paired": {"block": 50, "blocks": 20, "warmup": 100, "deadline": 240},
        "echo": {"sizes": [["1m", 1, 20], ["64m", 64, 2]], "deadline": 300},
        "cpu": {"n": 8_000_000, "deadline": 300},
        "stream": {"mib": 1024, "deadline": 300},
        "scale-local": {"machines": 64, "tasks": 2000, "deadline": 600},
        "scale-threads": {"machines": 256, "tasks": 5000, "deadline": 600},
        "idle": {"machines": 8, "seconds": 10, "deadline": 180},
    }


def build_cells(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The cells to run, in order: workload by workload, and within a workload ``repeat``
    rounds that each visit every peer once. Interleaving the repetitions spreads each peer's
    over the run, so a burst of load from elsewhere on a shared machine skews one repetition of
    several peers rather than every repetition of one peer."""
    sizes = params(args.quick)
    only = set(args.only) if args.only else set(WORKLOADS)
    peers = args.peers or PEERS
    order: list[tuple[str, str, str]] = []  # (workload, peer, sizes key)
    for w in EXECUTOR_WORKLOADS:
        if w == "roundtrip" and "floor" in only:  # floors run in the round trips' rounds,
            order += [("floor", kind, "floor") for kind in floor.KINDS]  # as close in time
        if w in only:
            order += [(w, peer, w) for peer in peers]
        if w == "roundtrip" and "paired" in only and "bigexec-local" in peers:
            order.append(("paired", "bigexec-local", "paired"))
    if "stream" in only and "bigexec-local" in peers:
        order.append(("stream", "bigexec-local", "stream"))
    if "scale" in only:
        if "bigexec-local" in peers:
            order.append(("scale", "bigexec-local", "scale-local"))
        if "bigexec-threads" in peers:
            order.append(("scale", "bigexec-threads", "scale-threads"))
    if "idle" in only and "bigexec-local" in peers:
        order.append(("idle", "bigexec-local", "idle"))

    cells: list[dict[str, Any]] = []
    def group(workload: str) -> str:
        return "roundtrip" if workload in ("floor", "paired") else workload

    for g in dict.fromkeys(group(w) for w, _, _ in order):
        for r in range(args.repeat):
            for workload, peer, key in order:
                if group(workload) != g:
                    continue
                p = dict(sizes[key])
                deadline = p.pop("deadline")
                p["repeat"] = 1  # one repetition per round; rounds give the spread
                p.setdefault("timeout", min(120.0, deadline / 2))
                cells.append({"id": f"{workload}:{peer}", "workload": workload, "peer": peer,
                              "round": r + 1, "rounds": args.repeat, "deadline": deadline,
                              "params": p})
    return cells


def merge_round(base: dict[str, Any] | None, data: dict[str, Any]) -> dict[str, Any]:
    """Fold one round's results into the (workload, peer) cell."""
    spec = data["spec"]
    if base is None:
        base = {"spec": {k: v for k, v in spec.items() if k != "round"}, "status": "ok",
                "metrics": {}, "extra": {}, "wall_s": 0.0, "rounds": []}
        base["spec"]["params"] = dict(spec["params"], repeat=spec.get("rounds", 1))
    for metric, m in data.get("metrics", {}).items():
        into = base["metrics"].setdefault(metric, {"unit": m["unit"], "better": m["better"],
                                                   "values": []})
        into["values"].extend(m["values"])
    for k, v in data.get("extra", {}).items():
        base["extra"].setdefault(k, v)
    if data.get("status") != "ok" and base["status"] == "ok":
        base["status"] = data.get("status")
        base["error"] = f"round {spec.get('round')}: {data.get('error')}"
    for k in ("orphans", "leftover_children", "nondaemon_threads_left"):
        if data.get(k):
            base.setdefault(k, []).extend(data[k])
    base["wall_s"] += data.get("wall_s", 0.0)
    base["rounds"].append({k: data[k] for k in ("status", "error", "traceback", "wall_s",
                                                 "log_tail", "seconds") if k in data}
                          | {"round": spec.get("round")})
    return base


# --- running cells -----------------------------------------------------------------------

def _become_subreaper() -> bool:
    """Orphans of our descendants get re-parented to us, so none escapes unnoticed."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def _kill_tree(pid: int) -> int:
    try:
        root = psutil.Process(pid)
        procs = root.children(recursive=True) + [root]
    except psutil.Error:
        return 0
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)
    return len(procs)


def _orphans(grace: float) -> list[dict[str, Any]]:
    """Our children now: processes a finished cell left behind. Reported, then killed."""
    kids = psutil.Process().children()
    if not kids:
        return []
    gone, alive = psutil.wait_procs(kids, timeout=grace)
    out = []
    for p in alive:
        try:
            cmd = " ".join(p.cmdline())[:200]
        except psutil.Error:
            cmd = "?"
        out.append({"pid": p.pid, "cmdline": cmd})
        _kill_tree(p.pid)
    return out


def _tail(path: str, n: int = 1500) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def run_cell(spec: dict[str, Any], workdir: str) -> dict[str, Any]:
    name = spec["id"].replace(":", "_")
    out = os.path.join(workdir, f"{name}.json")
    log = os.path.join(workdir, f"{name}.log")
    if spec["workload"] not in ("floor",) and not installed(spec["peer"]):
        return {"spec": spec, "status": "not installed", "metrics": {}, "extra": {},
                "error": f"{spec['peer']} is not installed (pip install loky 'dask[distributed]')"}
    env = dict(os.environ)
    env.pop("BIGEXEC_SYSTEM", None)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + ([env["PYTHONPATH"]] if env.get(
        "PYTHONPATH") else []))
    t0 = time.monotonic()
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.cell", json.dumps(spec), out],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        timed_out = False
        try:
            proc.wait(spec["deadline"])
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_tree(proc.pid)
            proc.wait()
        except BaseException:  # ^C: take the cell's tree down with us
            _kill_tree(proc.pid)
            raise
    elapsed = time.monotonic() - t0
    try:
        with open(out) as f:
            data = json.load(f)
    except (OSError, ValueError):
        data = {"spec": spec, "status": "error", "metrics": {}, "extra": {},
                "error": f"the cell died without results (exit status {proc.returncode})"}
    if timed_out:
        data["status"] = "timeout"
        data["error"] = f"killed after its {spec['deadline']}s deadline"
    elif data.get("status") == "running":
        data["status"] = "error"
        data["error"] = f"the cell died mid-way (exit status {proc.returncode})"
    data["wall_s"] = elapsed
    tail = _tail(log)
    if tail.strip():
        data["log_tail"] = tail
    orphans = _orphans(3.0)
    if orphans:
        data["orphans"] = orphans
    return data


# --- summarising -------------------------------------------------------------------------

def summarize(cells: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for cid, data in cells.items():
        s = out[cid] = {}
        for metric, m in data.get("metrics", {}).items():
            vals = m["values"]
            if not vals:
                continue
            s[metric] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals),
                         "n": len(vals), "unit": m["unit"], "better": m["better"]}
    return out


def _get(summary: dict, cid: str, metric: str, stat: str = "median") -> float | None:
    m = summary.get(cid, {}).get(metric)
    return None if m is None else m[stat]


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    if a >= 0.01:
        return f"{v:.3f}"
    return f"{v:.2g}"


def _cell_text(summary: dict, cid: str, metric: str) -> str:
    m = summary.get(cid, {}).get(metric)
    if m is None:
        return "-"
    if m["n"] == 1 or m["min"] == m["max"]:
        return fmt(m["median"])
    return f"{fmt(m['median'])} [{fmt(m['min'])}..{fmt(m['max'])}]"


def _ratio(summary: dict, cid: str, metric: str, ref_cid: str, ref_metric: str | None = None
           ) -> float | None:
    a = _get(summary, cid, metric)
    b = _get(summary, ref_cid, ref_metric or metric)
    if a is None or b is None or b == 0:
        return None
    return a / b


# Table layout: (title, columns, rows). A column is (header, metric key, show "x PPE"?).
# A row is (label, cell id, {column metric key: metric in that cell}) or "executor peers".

def groups(cells: dict[str, Any]) -> list[dict[str, Any]]:
    peers_in_run = [c["spec"]["peer"] for c in cells.values() if c["spec"]["workload"]
                    in EXECUTOR_WORKLOADS]
    peers = [p for p in PEERS if p in peers_in_run]

    def P(workload: str, key: str) -> str:
        for c in cells.values():
            if c["spec"]["workload"] == workload and key in c["spec"]["params"]:
                v = c["spec"]["params"][key]
                if key == "sizes":
                    return ", ".join(f"{mib} MiB x {k}" for _, mib, k in v)
                return f"{v:,}" if isinstance(v, int) else str(v)
        return "?"

    def executor_rows(workload: str, mapping: dict[str, str] | None = None) -> list[tuple]:
        return [(LABELS[p], f"{workload}:{p}", mapping or {}) for p in peers]

    rt_rows = [(floor.LABELS[k], f"floor:{k}", {"med": "rt_median_us", "p99": "rt_p99_us"})
               for k in floor.KINDS]
    for p in ("bigexec-local", "bigexec-threads"):
        if p in peers:
            rt_rows.append((f"{LABELS[p]}: Machine.call", f"roundtrip:{p}",
                            {"med": "call_median_us", "p99": "call_p99_us"}))
    rt_rows += [(f"{LABELS[p]}: submit().result()", f"roundtrip:{p}",
                 {"med": "rt_median_us", "p99": "rt_p99_us"}) for p in peers]
    return [
        {"title": "1. Start-up: constructor to the first finished no-op task [s] "
                  "(lower is better; x PPE < 1 is faster)",
         "cols": [("start-up", "startup_s", True), ("shutdown", "shutdown_s", False)],
         "rows": executor_rows("startup")},
        {"title": f"2. submit throughput: {P('submit', 'n')} no-op tasks submitted, then all "
                  "results [tasks/s] (higher is better; mp.Pool = apply_async, Dask = "
                  "client.submit)",
         "cols": [("tasks/s", "submit_per_s", True)],
         "rows": executor_rows("submit")},
        {"title": f"3. map throughput over {P('map', 'n1')} (chunksize=1) and "
                  f"{P('map', 'n100')} (chunksize=100) no-op tasks [items/s] (higher is "
                  "better; Dask emulates chunksize by submitting chunks)",
         "cols": [("chunksize=1", "map1_per_s", True), ("chunksize=100", "map100_per_s", True)],
         "rows": executor_rows("map")},
        {"title": f"4. Sequential round trip of a no-op, {P('roundtrip', 'n')} calls one "
                  f"after another ({P('floor', 'n')} for the floors) [us] "
                  "(lower is better; x floor = median / minimal HTTP/1.1 mTLS floor)",
         "cols": [("median", "med", True), ("p99", "p99", True)],
         "rows": rt_rows, "floor_ratio": ("med", "floor:http-mtls", "rt_median_us")},
        {"title": f"4b. Paired round trip: the callers below alternate in blocks of "
                  f"{P('paired', 'block')} calls ({P('paired', 'blocks')} blocks per repeat, "
                  "in one process), so they meet the same load; ratios are per block, then "
                  "the median [us] (lower is better)",
         "cols": [("median", "med", False), ("p99", "p99", False),
                  ("x floor", "xf", False), ("x mp.Pool", "xm", False),
                  ("x PPE", "xp", False)],
         "rows": [("floor: minimal HTTP/1.1, mutual TLS", "paired:bigexec-local",
                   {"med": "floor_median_us", "p99": "floor_p99_us"}),
                  ("bigexec local (mTLS): Machine.call", "paired:bigexec-local",
                   {"med": "call_median_us", "p99": "call_p99_us", "xf": "call_over_floor",
                    "xp": "call_over_ppe-fork"}),
                  ("bigexec local (mTLS): submit().result()", "paired:bigexec-local",
                   {"med": "submit_median_us", "p99": "submit_p99_us",
                    "xf": "submit_over_floor", "xm": "submit_over_mp-pool",
                    "xp": "submit_over_ppe-fork"}),
                  ("multiprocessing.Pool (fork): apply_async().get()", "paired:bigexec-local",
                   {"med": "mp-pool_median_us", "p99": "mp-pool_p99_us"}),
                  ("ProcessPoolExecutor fork: submit().result()", "paired:bigexec-local",
                   {"med": "ppe-fork_median_us", "p99": "ppe-fork_p99_us"})]},
        {"title": "5a. Payload echo: submit(echo, bytes).result(), and Machine.call of an echo "
                  "method for bigexec [MB/s = 2 x size / time] "
                  f"(higher is better; calls per repeat: {P('echo', 'sizes')})",
         "cols": [("1 MiB", "e1", True), ("64 MiB", "e64", True)],
         "rows": [(label, "echo:bigexec-local", {"e1": f"floor_{k}_echo1m_MBps",
                                                  "e64": f"floor_{k}_echo64m_MBps"})
                  for label, k in (("floor: one bare socket, recv_into", "plain"),
                                   ("floor: one mutual-TLS socket, recv_into", "mtls"))
                  if "bigexec-local" in peers]
         + [(f"{LABELS[p]}: Machine.call", f"echo:{p}",
             {"e1": "call_echo1m_MBps", "e64": "call_echo64m_MBps"})
            for p in ("bigexec-local", "bigexec-threads") if p in peers]
         + executor_rows("echo", {"e1": "echo1m_MBps", "e64": "echo64m_MBps"})},
        {"title": f"5b. {P('stream', 'mib')} MiB streamed on bigexec local, one way [MB/s]; "
                  "peak RSS increase [MiB] sampled every 5 ms, and bounded by ru_maxrss (hwm)",
         "cols": [("MB/s", "MBps", False), ("driver peak", "dpeak", False),
                  ("worker peak", "wpeak", False), ("driver hwm", "dhwm", False),
                  ("worker hwm", "whwm", False)],
         "rows": [(f"{d} (iterator argument -> Stream)" if d == "upload" else
                   f"{d} (generator reply -> Stream)", "stream:bigexec-local",
                   {"MBps": f"{k}_MBps", "dpeak": f"{k}_driver_peak_MiB",
                    "wpeak": f"{k}_worker_peak_MiB", "dhwm": f"{k}_driver_hwm_MiB",
                    "whwm": f"{k}_worker_hwm_MiB"})
                  for d, k in (("upload", "up"), ("download", "down"))]},
        {"title": f"6. CPU scaling: pure-Python bigpi, {P('cpu', 'n')} samples in 2 tasks vs "
                  "the same work serially (speedup = serial / parallel; higher is better)",
         "cols": [("serial s", "serial_s", False), ("parallel s", "parallel_s", False),
                  ("speedup", "speedup", True),
                  ("x PPE paired", "speedup_over_ppe_paired", False)],
         "rows": executor_rows("cpu")},
        {"title": "7. Scale: start N machines (all RUNNING), map no-ops, shut down [s]; "
                  "processes/threads left after shutdown",
         "cols": [("start", "start_s", False), ("map", "map_s", False),
                  ("shutdown", "shutdown_s", False), ("procs left", "left_processes", False),
                  ("threads left", "left_threads", False),
                  ("machine errs", "machine_errors", False)],
         "rows": [(f"bigexec local x {_machines(cells, 'scale:bigexec-local')}",
                   "scale:bigexec-local", {}),
                  (f"bigexec threads x {_machines(cells, 'scale:bigexec-threads')}",
                   "scale:bigexec-threads", {})]},
        {"title": f"8. Idle cluster: {P('idle', 'machines')} local machines, default "
                  f"keepalives; CPU over {P('idle', 'seconds')} s of idleness [% of one core] "
                  "(lower is better)",
         "cols": [("driver", "driver_pct_core", False), ("workers (sum)", "workers_pct_core",
                                                         False)],
         "rows": [(f"bigexec local x {P('idle', 'machines')}", "idle:bigexec-local", {})]},
    ]


def _machines(cells: dict, cid: str) -> str:
    c = cells.get(cid)
    return str(c["spec"]["params"].get("machines", "?")) if c else "?"


def _status_note(data: dict | None) -> str:
    if data is None:
        return "not run"
    st = data.get("status")
    if st == "ok":
        notes = []
        if data.get("orphans") or data.get("leftover_children"):
            notes.append("left processes behind")
        if data.get("nondaemon_threads_left"):
            notes.append("non-daemon threads left")
        return "; ".join(notes)
    err = (data.get("error") or "").splitlines()[0][:70] if data.get("error") else ""
    partial = " (partial figures)" if data.get("metrics") else ""
    return f"{st}{partial}: {err}" if err else f"{st}{partial}"


def render_table(cells: dict[str, Any], summary: dict) -> str:
    lines: list[str] = []
    for g in groups(cells):
        rows = [r for r in g["rows"] if r[1] in cells]
        if not rows:
            continue
        header = ["", *[c[0] for c in g["cols"]]]
        ratio_cols = [c for c in g["cols"] if c[2]]
        header += [f"x PPE {c[0]}" if len(ratio_cols) > 1 else "x PPE" for c in ratio_cols]
        if "floor_ratio" in g:
            header.append("x floor")
        header.append("note")
        table = [header]
        for label, cid, mapping in rows:
            data = cells.get(cid)
            workload, peer = cid.split(":", 1)
            row = [label]
            for _, key, _ in g["cols"]:
                row.append(_cell_text(summary, cid, mapping.get(key, key)))
            for _, key, _ in ratio_cols:
                metric = mapping.get(key, key)
                if peer.startswith("bigexec-") and workload in EXECUTOR_WORKLOADS:
                    ref_metric = metric.removeprefix("call_")
                    ref_metric = {"median_us": "rt_median_us",
                                  "p99_us": "rt_p99_us"}.get(ref_metric, ref_metric)
                    r = _ratio(summary, cid, metric, f"{workload}:{REFERENCE}", ref_metric)
                    row.append("-" if r is None else f"{r:.2f}x")
                elif peer == REFERENCE:
                    row.append("1.00x" if _get(summary, cid, metric) is not None else "-")
                else:
                    row.append("")
            if "floor_ratio" in g:
                key, ref_cid, ref_metric = g["floor_ratio"]
                r = _ratio(summary, cid, mapping.get(key, key), ref_cid, ref_metric)
                row.append("-" if r is None else f"{r:.2f}x")
            row.append(_status_note(data))
            table.append(row)
        widths = [max(len(r[i]) for r in table) for i in range(len(header))]
        lines.append("")
        lines.append(g["title"])
        for i, r in enumerate(table):
            cells_txt = [r[0].ljust(widths[0])]
            cells_txt += [r[j].rjust(widths[j]) for j in range(1, len(r) - 1)]
            cells_txt.append(r[-1])
            lines.append("  " + "  ".join(cells_txt).rstrip())
            if i == 0:
                lines.append("  " + "-" * (sum(widths[:-1]) + 2 * (len(widths) - 1)))
    return "\n".join(lines)


# --- targets -----------------------------------------------------------------------------

def _overlap(summary: dict, a: tuple[str, str], b: tuple[str, str], scale: float = 1.0) -> bool:
    ma, mb = summary.get(a[0], {}).get(a[1]), summary.get(b[0], {}).get(b[1])
    if not ma or not mb:
        return False
    return ma["min"] <= mb["max"] * scale and mb["min"] * scale <= ma["max"]


def evaluate_targets(cells: dict[str, Any], summary: dict) -> list[dict[str, Any]]:
    L = "bigexec-local"
    out: list[dict[str, Any]] = []

    def compare(name: str, row: str, a: tuple[str, str], b: tuple[str, str], op: str,
                factor: float = 1.0) -> None:
        va, vb = _get(summary, *a), _get(summary, *b)
        if va is None or vb is None:
            out.append({"target": name, "row": row, "result": "n/a",
                        "measured": "missing figures"})
            return
        ratio = va / vb
        ok = {"<=": ratio <= factor, "<": ratio < factor, ">=": ratio >= factor}[op]
        noisy = _overlap(summary, a, b, factor)
        out.append({"target": name, "row": row, "result": "PASS" if ok else "FAIL",
                    "measured": f"{fmt(va)} vs {fmt(vb)} -> {ratio:.2f}x (need {op} "
                                f"{factor:g}x)", "ratio": ratio,
                    "within_noise": noisy})

    def paired(name: str, row: str, cid: str, metric: str, op: str, factor: float,
               fallback: tuple[tuple[str, str], tuple[str, str]] | None = None) -> None:
        """A target on a ratio measured paired (per block or per repeat, then the median)."""
        m = summary.get(cid, {}).get(metric)
        if m is None:
            if fallback is not None:
                compare(name + " (unpaired)", row, *fallback, op, factor)
            else:
                out.append({"target": name, "row": row, "result": "n/a",
                            "measured": "missing figures"})
            return
        test = {"<=": lambda x: x <= factor, "<": lambda x: x < factor,
                ">=": lambda x: x >= factor}[op]
        ok = test(m["median"])
        regimes = []
        for regime in ("fast", "slow"):
            r = summary.get(cid, {}).get(f"{metric}_{regime}")
            if r is not None:
                regimes.append(f"{regime} {r['median']:.2f}x")
        share = _get(summary, cid, "fast_block_share")
        extra = (f"; by host regime: {', '.join(regimes)} ({share:.0%} of blocks fast)"
                 if regimes and share is not None else "")
        out.append({"target": name, "row": row, "result": "PASS" if ok else "FAIL",
                    "measured": f"{m['median']:.2f}x [{m['min']:.2f}..{m['max']:.2f}] "
                                f"(need {op} {factor:g}x){extra}", "ratio": m["median"],
                    "within_noise": test(m["min"]) != test(m["max"])})

    paired("round trip, local Executor.submit().result() median <= 1.5x lean mTLS floor",
           "4b: bigexec local submit().result(), x floor", f"paired:{L}", "submit_over_floor",
           "<=", 1.5, ((f"roundtrip:{L}", "rt_median_us"), ("floor:http-mtls", "rt_median_us")))
    paired("(same, for the primitive Machine.call)",
           "4b: bigexec local Machine.call, x floor", f"paired:{L}", "call_over_floor",
           "<=", 1.5, ((f"roundtrip:{L}", "call_median_us"), ("floor:http-mtls", "rt_median_us")))
    paired("round trip, local median below multiprocessing.Pool's",
           "4b: bigexec local submit().result(), x mp.Pool", f"paired:{L}",
           "submit_over_mp-pool", "<", 1.0,
           ((f"roundtrip:{L}", "rt_median_us"), ("roundtrip:mp-pool", "rt_median_us")))
    compare("submit throughput of tiny tasks >= mp.Pool.apply_async's", "2",
            (f"submit:{L}", "submit_per_s"), ("submit:mp-pool", "submit_per_s"), ">=")
    compare("map chunksize=100 >= ProcessPoolExecutor's", "3: chunksize=100",
            (f"map:{L}", "map100_per_s"), (f"map:{REFERENCE}", "map100_per_s"), ">=")
    compare("64 MiB echo >= 2x ProcessPoolExecutor's MB/s", "5a: 64 MiB",
            (f"echo:{L}", "echo64m_MBps"), (f"echo:{REFERENCE}", "echo64m_MBps"), ">=", 2.0)

    st = summary.get(f"stream:{L}", {})
    peaks = [st[k]["max"] for k in st if k.endswith("_MiB")]
    size = cells.get(f"stream:{L}", {}).get("spec", {}).get("params", {}).get("mib")
    if peaks:
        worst = max(peaks)
        out.append({"target": f"a {size} MiB stream never holds more than 64 MiB in either "
                              "process", "row": "5b (max of every peak and hwm column)",
                    "result": "PASS" if worst <= 64 else "FAIL",
                    "measured": f"worst {fmt(worst)} MiB over reps, directions, processes"})
    else:
        out.append({"target": "stream holds <= 64 MiB", "row": "5b", "result": "n/a",
                    "measured": "missing figures"})
    paired("bigpi speedup on 2 machines >= 0.95x ProcessPoolExecutor's",
           "6: x PPE paired", f"cpu:{L}", "speedup_over_ppe_paired", ">=", 0.95,
           ((f"cpu:{L}", "speedup"), (f"cpu:{REFERENCE}", "speedup")))

    su = _get(summary, f"startup:{L}", "startup_s")
    out.append({"target": "start-up of 2 local machines to first result < 1 s", "row": "1",
                "result": "n/a" if su is None else ("PASS" if su < 1.0 else "FAIL"),
                "measured": "missing figures" if su is None else
                f"{fmt(su)} s (max {fmt(_get(summary, f'startup:{L}', 'startup_s', 'max'))} s)"})
    compare("start-up >= 3x faster than Dask LocalCluster (dask / bigexec)", "1: dask vs local",
            ("startup:dask", "startup_s"), (f"startup:{L}", "startup_s"), ">=", 3.0)

    for cid, what in ((f"scale:{L}", "local"), ("scale:bigexec-threads", "threads")):
        data = cells.get(cid)
        n = data["spec"]["params"]["machines"] if data else "?"
        name = f"scale: {n} {what} machines start, run a map, shut down cleanly"
        if data is None:
            out.append({"target": name, "row": "7", "result": "n/a", "measured": "not run"})
            continue
        s = summary.get(cid, {})
        bad = {k: s[k]["max"] for k in ("left_processes", "left_threads", "machine_errors")
               if k in s and s[k]["max"] > 0}
        ok = data.get("status") == "ok" and not bad and not data.get("orphans")
        total = s.get("total_s", {}).get("median")
        out.append({"target": name, "row": "7", "result": "PASS" if ok else "FAIL",
                    "measured": f"status {data.get('status')}, total {fmt(total)} s"
                                + (f", problems {bad}" if bad else "")
                                + (", orphans" if data.get("orphans") else "")})
    idle = summary.get(f"idle:{L}", {}).get("driver_pct_core")
    out.append({"target": "an idle cluster's keepalives cost the driver < 2% of a core",
                "row": "8", "result": "n/a" if idle is None else
                ("PASS" if idle["median"] < 2.0 else "FAIL"),
                "measured": "missing figures" if idle is None else
                f"{fmt(idle['median'])}% (max {fmt(idle['max'])}%)"})
    return out


def render_targets(targets: list[dict[str, Any]]) -> str:
    lines = ["", "Targets (ratios from this run; '~' = within this run's noise: the two "
                 "min..max ranges overlap, or for a paired ratio its min..max straddles the "
                 "bar)"]
    w = max(len(t["target"]) for t in targets)
    for t in targets:
        mark = "~" if t.get("within_noise") else " "
        lines.append(f"  {t['result']:4} {mark} {t['target'].ljust(w)}  {t['measured']}"
                     f"   [row {t['row']}]")
    return "\n".join(lines)


# --- the machine ---------------------------------------------------------------------------

def _source_fingerprint() -> dict[str, Any]:
    """Which bigexec was measured: the commit, the files changed since, a hash of the code."""
    import hashlib

    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True,
                                  timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    h = hashlib.sha256()
    pkg = os.path.join(ROOT, "bigexec")
    for dirpath, dirnames, filenames in sorted(os.walk(pkg)):
        dirnames.sort()
        for name in sorted(filenames):
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                h.update(os.path.relpath(path, ROOT).encode())
                with open(path, "rb") as f:
                    h.update(f.read())
    return {"commit": git("rev-parse", "--short", "HEAD").strip(),
            "changed": [ln[3:] for ln in git("status", "--porcelain", "--", "bigexec")
                        .splitlines() if ln.strip()],
            "sha256": h.hexdigest()[:16]}


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {}
    for mod in ("bigexec", "loky", "distributed", "dask", "cloudpickle", "psutil"):
        try:
            from importlib.metadata import version

            versions[mod] = version(mod)
        except Exception:
            versions[mod] = "not installed"
    return {
        "bigexec_source": _source_fingerprint(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "os": platform.platform(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_start": os.getloadavg(),
        "versions": versions,
    }


def render_header(info: dict[str, Any], args: argparse.Namespace) -> str:
    v = info["versions"]
    return "\n".join([
        f"bigexec benchmark suite ({'quick' if args.quick else 'full'} run, repeat "
        f"{args.repeat}, 2 workers everywhere); figures are median [min..max] of the repeats",
        f"  machine: {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), "
        f"{info['memory_gib']} GiB; {info['os']}",
        f"  Python {info['python']} ({info['implementation']}); bigexec {v['bigexec']}, loky "
        f"{v['loky']}, distributed {v['distributed']}; {info['date']}",
        f"  load average at start {', '.join(f'{x:.2f}' for x in info['loadavg_start'])}"
        + (f", at end {', '.join(f'{x:.2f}' for x in info['loadavg_end'])}"
           if "loadavg_end" in info else ""),
        f"  bigexec source: commit {info['bigexec_source']['commit']}"
        + (f" + changes to {', '.join(info['bigexec_source']['changed'])}"
           if info["bigexec_source"]["changed"] else "")
        + f" (sha256 {info['bigexec_source']['sha256']})",
        f"  x PPE = bigexec figure / {LABELS[REFERENCE]} figure in this run",
    ])


# --- main ----------------------------------------------------------------------------------

def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split(
        "\n", 1)[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run (~2 min)")
    ap.add_argument("--only", type=_csv, default=None,
                    help=f"workloads to run, comma-separated: {','.join(WORKLOADS)}")
    ap.add_argument("--peers", type=_csv, default=None,
                    help=f"peers to run, comma-separated: {','.join(PEERS)}")
    ap.add_argument("--json", default=DEFAULT_JSON, help="where to write every raw figure")
    ap.add_argument("--repeat", type=int, default=3, help="repetitions of every figure")
    args = ap.parse_args(argv)
    for w in args.only or []:
        if w not in WORKLOADS:
            ap.error(f"unknown workload {w!r}; known: {', '.join(WORKLOADS)}")
    for p in args.peers or []:
        if p not in PEERS:
            ap.error(f"unknown peer {p!r}; known: {', '.join(PEERS)}")
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")

    subreaper = _become_subreaper()
    info = machine_info()
    specs = build_cells(args)
    t_start = time.monotonic()
    print(render_header(info, args), flush=True)
    print(f"  {len(specs)} cell runs ({args.repeat} interleaved rounds); progress on stderr",
          flush=True)
    cells: dict[str, dict[str, Any]] = {}
    interrupted = False
    with tempfile.TemporaryDirectory(prefix="bigexec-bench-") as workdir:
        for i, spec in enumerate(specs, 1):
            before = cells.get(spec["id"])
            if before is not None and before["status"] in ("timeout", "not installed"):
                continue  # a peer that hung once would only hang again: keep the run short
            print(f"[{i}/{len(specs)}] {spec['workload']} on {spec['peer']} (round "
                  f"{spec['round']}/{spec['rounds']}) ...", end="", file=sys.stderr, flush=True)
            try:
                data = run_cell(spec, workdir)
            except KeyboardInterrupt:
                interrupted = True
                print(" interrupted", file=sys.stderr)
                break
            cells[spec["id"]] = merge_round(before, data)
            print(f" {data['status']} ({data.get('wall_s', 0):.1f} s)"
                  + (f": {data.get('error')}" if data.get("error") else ""), file=sys.stderr,
                  flush=True)
    info["loadavg_end"] = os.getloadavg()
    duration = time.monotonic() - t_start
    summary = summarize(cells)
    targets = evaluate_targets(cells, summary)
    table, goals = render_table(cells, summary), render_targets(targets)
    took = f"\nrun took {duration:.0f} s" + (" (interrupted)" if interrupted else "")
    text = "\n".join([render_header(info, args), table, goals, took])
    print(table)
    print(goals)
    print(took)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    result = {
        "suite": "bigexec benchmarks",
        "argv": sys.argv,
        "mode": "quick" if args.quick else "full",
        "repeat": args.repeat,
        "reference": REFERENCE,
        "subreaper": subreaper,
        "interrupted": interrupted,
        "duration_s": duration,
        "machine": info,
        "cells": cells,
        "summary": summary,
        "targets": targets,
        "table": text,
    }
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    txt = os.path.splitext(args.json)[0] + ".txt"
    with open(txt, "w") as f:
        f.write(text + "\n")
    print(f"raw figures: {args.json}; table: {txt}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
