"""The ``bigexec`` command: look at a running driver through its debug server.

    bigexec status URL                                  the machines, as a table
    bigexec profile URL --seconds 10 -o out.prof [--format pstats|callgrind|collapsed|text]
    bigexec top URL --seconds 10                        the merged profile's top functions

URL is the driver's debug server, e.g. ``http://127.0.0.1:3333`` (start it with
``b.serve_debug()`` or ``BIGEXEC_DEBUG_ADDR=127.0.0.1:3333``). Machines themselves are started
with ``python -m bigexec.worker`` by their driver, never by hand.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import requests

__all__ = ["main"]

_PREFIX = "/debug/bigexec"


def _base(url: str) -> str:
    if "://" not in url:
        url = "http://" + url
    url = url.rstrip("/")
    if url.endswith(_PREFIX):
        url = url[: -len(_PREFIX)]
    return url + _PREFIX


def _get(url: str, timeout: float, **params: Any) -> requests.Response:
    try:
        resp = requests.get(url, params=params, timeout=timeout)
    except requests.RequestException as exc:
        raise SystemExit(f"bigexec: cannot reach {url}: {exc}") from None
    if resp.status_code != 200:
        raise SystemExit(f"bigexec: {url}: HTTP {resp.status_code}: {resp.text.strip()}")
    return resp


def _age(s: Any) -> str:
    if not isinstance(s, (int, float)):
        return "-"
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.0f}m" if s < 7200 else f"{s / 3600:.1f}h"


def _status(args: argparse.Namespace) -> int:
    data = _get(_base(args.url) + "/status", args.timeout, format="json").json()
    rows = [("MACHINE", "STATE", "UPTIME", "MEM%", "LOAD1", "TASKS", "RPC", "ERRORS", "WHY")]
    for m in data["machines"]:
        mem, load = m.get("memory") or {}, m.get("load") or {}
        rows.append((
            m["addr"] or "(booting)", m["state"], _age(m.get("uptime")),
            str(mem.get("percent", "-")), f"{load['load1']:.2f}" if "load1" in load else "-",
            str(m.get("tasks_run", "-")), str(m.get("rpc_calls", "-")),
            str(m.get("rpc_errors", "-")), m.get("err") or "",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
    return 0


def _profile(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"seconds": args.seconds, "format": args.format}
    if args.machine:
        params["machine"] = args.machine
    if args.driver:
        params["driver"] = "1"
    resp = _get(_base(args.url) + "/profile", args.seconds + 120, **params)
    if args.output in (None, "-"):
        if args.format == "pstats":
            raise SystemExit("bigexec: a pstats profile is binary: give -o FILE")
        sys.stdout.write(resp.text)
    else:
        with open(args.output, "wb") as f:
            f.write(resp.content)
        print(f"wrote {len(resp.content)} bytes of {args.format} profile to {args.output}",
              file=sys.stderr)
    return 0


def _top(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"seconds": args.seconds, "format": "text", "limit": args.limit}
    if args.machine:
        params["machine"] = args.machine
    sys.stdout.write(_get(_base(args.url) + "/profile", args.seconds + 120, **params).text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bigexec", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("status", help="list the machines of a running driver")
    p.add_argument("url", help="the driver's debug server, e.g. http://127.0.0.1:3333")
    p.add_argument("--timeout", type=float, default=30.0)
    p.set_defaults(fn=_status)

    p = sub.add_parser("profile", help="fetch one CPU profile merged from all machines")
    p.add_argument("url")
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--format", choices=("pstats", "callgrind", "collapsed", "text"),
                   default="pstats")
    p.add_argument("-o", "--output", help="file to write (default: stdout for text formats)")
    p.add_argument("--machine", help="profile this machine only (its address)")
    p.add_argument("--driver", action="store_true", help="include the driver process")
    p.set_defaults(fn=_profile)

    p = sub.add_parser("top", help="the merged profile's top functions, as text")
    p.add_argument("url")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--limit", type=int, default=25)
    p.add_argument("--machine")
    p.set_defaults(fn=_top)

    args = parser.parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
