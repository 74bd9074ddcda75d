"""The ``bigexec`` command: look at a running driver through its debug server, and at
bigexec's EC2 instances.

    bigexec status URL                                  the machines, as a table
    bigexec profile URL --seconds 10 -o out.prof [--format pstats|callgrind|collapsed|text|
                                                           flamegraph|speedscope]
    bigexec top URL --seconds 10                        the merged profile's top functions
    bigexec ec2 ls [--session S] [--region R] [--json]  bigexec's EC2 instances
    bigexec ec2 sweep [--region R] [--grace S] [--dry-run]
                                                        terminate lapsed sessions' instances

URL is the driver's debug server, e.g. ``http://127.0.0.1:3333`` (start it with
``b.serve_debug()`` or ``BIGEXEC_DEBUG_ADDR=127.0.0.1:3333``). Machines themselves are started
with ``python -m bigexec.worker`` by their driver, never by hand.

The server's token, which it wants from other hosts and for other users' profiles, comes from
the URL the driver printed (``...?token=...``), ``--token`` or ``BIGEXEC_DEBUG_TOKEN``, and is
sent as an ``Authorization: Bearer`` header.

The ``ec2`` commands (``bigexec.ec2_cli``) need boto3 (``pip install bigexec[ec2]``) and take
their options from ``BIGEXEC_EC2_*`` variables as the ``ec2`` system does.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import time
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from . import __version__
from .ec2_cli import add_ec2_commands
from .human import duration

__all__ = ["main"]

_PREFIX = "/debug/bigexec"
_TOKEN_ENV = "BIGEXEC_DEBUG_TOKEN"  # as bigexec.debug.TOKEN_ENV, without importing the library
# As bigexec.observe.PROFILE_FORMATS, without importing the library.
_PROFILE_FORMATS = ("pstats", "callgrind", "collapsed", "text", "flamegraph", "speedscope")
_BROKEN_PIPE_STATUS = 141  # what a shell reports for a command killed by SIGPIPE: 128 + 13

# The help is plain text: argparse prints it as is, so it cannot reuse the reST docstring.
_DESCRIPTION = ("Look at a running bigexec driver through its debug server, and at bigexec's "
                "EC2 instances.")
_EPILOG = """\
examples:
  bigexec status http://127.0.0.1:3333
  bigexec profile http://127.0.0.1:3333 --seconds 10 -o out.prof
  bigexec profile http://127.0.0.1:3333 --seconds 10 --format flamegraph -o flame.html
  bigexec profile http://127.0.0.1:3333 --format speedscope -o out.speedscope.json
  bigexec top http://127.0.0.1:3333 --seconds 10
  bigexec ec2 ls --region us-west-2
  bigexec ec2 sweep --dry-run

URL is the driver's debug server. A driver starts one with b.serve_debug(), or when it runs
with BIGEXEC_DEBUG_ADDR=127.0.0.1:3333 in its environment. The server's token comes from the
URL the driver printed (...?token=...), --token, or BIGEXEC_DEBUG_TOKEN.

The ec2 commands need boto3 (pip install bigexec[ec2]); their options also come from
BIGEXEC_EC2_* variables (BIGEXEC_EC2_REGION, ...), and AWS credentials from boto3's own
configuration."""
_URL_HELP = "the driver's debug server, e.g. http://127.0.0.1:3333"
_TOKEN_HELP = (f"the debug server's token (default: the URL's ?token=, else ${_TOKEN_ENV}); "
               "needed from other hosts, and for profiles as another user")


def _base(url: str) -> str:
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    url = f"{parts.scheme}://{parts.netloc}{parts.path}".rstrip("/")
    if url.endswith(_PREFIX):
        url = url[: -len(_PREFIX)]
    return url + _PREFIX


def _token(args: argparse.Namespace) -> str | None:
    if args.token:
        return str(args.token)
    url = args.url if "://" in args.url else "http://" + args.url
    in_url = parse_qs(urlsplit(url).query).get("token")
    if in_url:
        return in_url[-1]
    return os.environ.get(_TOKEN_ENV) or None


class _Reply:
    """A debug server's answer: its body, whole."""

    def __init__(self, content: bytes) -> None:
        self.content = content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)


_READ_SIZE = 1 << 16


def _get(url: str, timeout: float, token: str | None, **params: Any) -> _Reply:
    """GET ``url`` with ``params``; the whole body, within ``timeout`` seconds in all.

    The standard library's HTTP client, so that the command needs no HTTP package: the
    deadline covers connecting, the reply's head and every read of its body.
    """
    deadline = time.monotonic() + timeout
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SystemExit(f"bigexec: {url}: not an http:// or https:// URL")
    conn_class = (http.client.HTTPSConnection if parts.scheme == "https"
                  else http.client.HTTPConnection)
    conn = conn_class(parts.hostname, parts.port, timeout=timeout)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    target = (parts.path or "/") + ("?" + urlencode(params) if params else "")
    try:
        conn.request("GET", target, headers=headers)
        resp = conn.getresponse()
        chunks = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no whole reply within {timeout:g} s")
            if conn.sock is not None:
                conn.sock.settimeout(left)
            chunk = resp.read1(_READ_SIZE)
            if not chunk:
                break
            chunks.append(chunk)
    except (OSError, http.client.HTTPException) as exc:
        raise SystemExit(f"bigexec: cannot reach {url}: {exc}") from None
    finally:
        conn.close()
    reply = _Reply(b"".join(chunks))
    if resp.status != 200:
        raise SystemExit(f"bigexec: {url}: HTTP {resp.status}: {reply.text.strip()}")
    return reply


def _age(s: Any) -> str:
    return duration(s, compact=True) if isinstance(s, (int, float)) else "-"


def _status(args: argparse.Namespace) -> int:
    data = _get(_base(args.url) + "/status", args.timeout, _token(args), format="json").json()
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
    resp = _get(_base(args.url) + "/profile", args.seconds + 120, _token(args), **params)
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
    resp = _get(_base(args.url) + "/profile", args.seconds + 120, _token(args), **params)
    sys.stdout.write(resp.text)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bigexec", description=_DESCRIPTION, epilog=_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version",
                        version=f"bigexec {__version__} (Python {sys.version.split()[0]})")
    sub = parser.add_subparsers(dest="command", required=True)

    about = "List the machines of a running driver, one row each."
    p = sub.add_parser("status", help="list the machines of a running driver",
                       description=about)
    p.add_argument("url", help=_URL_HELP)
    p.add_argument("--token", help=_TOKEN_HELP)
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds to wait for the driver (default: 30)")
    p.set_defaults(fn=_status)

    about = ("Profile every machine (or one) for a while and fetch the profiles merged into "
             "one.")
    p = sub.add_parser("profile", help="fetch one CPU profile merged from all machines",
                       description=about)
    p.add_argument("url", help=_URL_HELP)
    p.add_argument("--token", help=_TOKEN_HELP)
    p.add_argument("--seconds", type=float, default=30.0,
                   help="how long to profile (default: 30)")
    p.add_argument("--format", choices=_PROFILE_FORMATS, default="pstats",
                   help="the profile's format (default: pstats): yappi's profile as pstats "
                        "(for pstats, snakeviz), callgrind (KCachegrind) or text; stack "
                        "samples as collapsed stacks (flamegraph.pl), flamegraph (an HTML "
                        "page) or speedscope (JSON for speedscope)")
    p.add_argument("-o", "--output", help="file to write (default: stdout for text formats)")
    p.add_argument("--machine", help="profile this machine only (its address)")
    p.add_argument("--driver", action="store_true", help="include the driver process")
    p.set_defaults(fn=_profile)

    about = "Profile the machines for a while and print the merged profile's top functions."
    p = sub.add_parser("top", help="the merged profile's top functions, as text",
                       description=about)
    p.add_argument("url", help=_URL_HELP)
    p.add_argument("--token", help=_TOKEN_HELP)
    p.add_argument("--seconds", type=float, default=10.0,
                   help="how long to profile (default: 10)")
    p.add_argument("--limit", type=int, default=25,
                   help="how many functions to print (default: 25)")
    p.add_argument("--machine", help="profile this machine only (its address)")
    p.set_defaults(fn=_top)

    add_ec2_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``bigexec`` command; its exit status.

    Output piped into a reader that stops early (``bigexec status URL | head``) ends the
    command quietly with status 141, as a tool killed by SIGPIPE would end.
    """
    args = _parser().parse_args(argv)
    try:
        code = int(args.fn(args))
        sys.stdout.flush()  # here, not at exit: a reader that went away is handled below
    except BrokenPipeError:
        # Python would report the same error once more, flushing stdout at exit: point it at
        # /dev/null first.
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)
        return _BROKEN_PIPE_STATUS
    return code


if __name__ == "__main__":
    sys.exit(main())
