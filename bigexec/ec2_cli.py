"""The ``bigexec ec2`` commands: bigexec's EC2 instances, seen and swept from a shell.

    bigexec ec2 ls [--session S] [--region R] [--json]   instances not yet terminated
    bigexec ec2 sweep [--region R] [--grace SECONDS] [--dry-run]
                                                          terminate lapsed sessions' instances

Options come from ``BIGEXEC_EC2_*`` variables and the config file's ``[ec2]`` table as for the
``ec2`` system (``Ec2Options.from_env``), the command line winning; credentials and the
default region are boto3's own. boto3 is imported only when a command runs, so ``bigexec
status`` never needs it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from .human import duration as _duration

__all__ = ["EXIT_AWS_ERROR", "EXIT_USAGE", "add_ec2_commands"]

EXIT_AWS_ERROR = 1  # AWS refused or could not be asked (credentials, access, throttling)
EXIT_USAGE = 2      # boto3 missing, or a bad BIGEXEC_EC2_* variable: as argparse's own status

_REGION_HELP = "the AWS region (default: $BIGEXEC_EC2_REGION, else boto3's configuration)"
_ENDPOINT_HELP = ("the EC2 API's URL (default: $BIGEXEC_EC2_ENDPOINT_URL, else AWS's); for "
                  "EC2-compatible APIs and tests")
_COLUMNS = ("INSTANCE", "SESSION", "STATE", "TYPE", "MARKET", "PRIVATE-IP", "AGE", "LEASE")


def _lease_left(lease_until: float | None, now: float) -> str:
    if lease_until is None:
        return "-"  # no readable lease tag: sweep counts it lapsed once it is an hour old
    left = lease_until - now
    return (_duration(left, compact=True) if left >= 0
            else f"lapsed {_duration(-left, compact=True)} ago")


def _fail(message: str, code: int) -> int:
    print(f"bigexec: {message}", file=sys.stderr)
    return code


def _aws_error(exc: BaseException) -> str:
    """One line for an AWS failure, naming its error code (or botocore's exception)."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and response.get("Error", {}).get("Code"):
        error = response["Error"]
        text = str(error.get("Message") or "").splitlines()
        return f"{error['Code']}: {text[0] if text else exc}"
    line = (str(exc).splitlines() or [""])[0]
    return f"{type(exc).__name__}: {line}"


def _run(args: argparse.Namespace) -> int:
    """Run an ``ec2`` subcommand, turning what the user can fix into one line on stderr."""
    try:
        import boto3  # noqa: F401  (only to know it is there)
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        return _fail("the ec2 commands need boto3: pip install bigexec[ec2]", EXIT_USAGE)
    from .systems.ec2 import Ec2Instances, Ec2Options, Ec2Throttled

    try:
        options = Ec2Options.from_env(region=args.region or None,
                                      endpoint_url=args.endpoint_url or None)
    except ValueError as exc:
        return _fail(str(exc), EXIT_USAGE)
    try:
        return int(args.ec2_fn(Ec2Instances(options), args))
    except (ClientError, BotoCoreError, Ec2Throttled) as exc:
        return _fail(f"ec2 {args.ec2_command}: AWS error {_aws_error(exc)}", EXIT_AWS_ERROR)


def _ls(api: Any, args: argparse.Namespace) -> int:
    records = sorted(api.list_instances(args.session),
                     key=lambda r: (r.session or "", r.launch_time or 0.0, r.instance_id))
    if args.json:
        print(json.dumps([r._asdict() for r in records], indent=2))
        return 0
    if not records:
        where = f" of session {args.session}" if args.session else ""
        print(f"no bigexec instances{where}")
        return 0
    now = time.time()
    rows = [_COLUMNS] + [(
        r.instance_id, r.session or "-", r.state, r.instance_type, r.market,
        r.private_ip or "-",
        (_duration(max(0.0, now - r.launch_time), compact=True)
         if r.launch_time is not None else "-"),
        _lease_left(r.lease_until, now)) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _sweep(api: Any, args: argparse.Namespace) -> int:
    if args.dry_run:
        ids = [r.instance_id for r in api.lapsed(grace=args.grace)]
        verb = "would terminate"
    else:
        ids = api.sweep(grace=args.grace)
        verb = "terminated"
    for instance_id in ids:
        print(f"{verb} {instance_id}")
    if not ids:
        print("no instance of a lapsed session")
    return 0


def add_ec2_commands(sub: Any) -> None:
    """Add ``ec2 ls`` and ``ec2 sweep`` to an argparse subparsers object (``bigexec.cli``)."""
    about = ("bigexec's EC2 instances: list them, and terminate those of sessions whose lease "
             "lapsed.")
    ec2 = sub.add_parser("ec2", help="list or sweep bigexec's EC2 instances", description=about)
    ec2.set_defaults(fn=_run)
    commands = ec2.add_subparsers(dest="ec2_command", required=True)

    about = ("List bigexec's instances that are not yet terminated, one row each: id, "
             "session, state, type, market, private IP, age and lease left.")
    p = commands.add_parser("ls", help="list bigexec's instances", description=about)
    p.add_argument("--session", help="only this session's instances")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list of the instances (times as epoch seconds)")
    p.add_argument("--region", help=_REGION_HELP)
    p.add_argument("--endpoint-url", help=_ENDPOINT_HELP)
    p.set_defaults(ec2_fn=_ls)

    about = ("Terminate every instance of a session whose newest lease tag ended more than "
             "the grace period ago (a driver that died without cleaning up).")
    p = commands.add_parser("sweep", help="terminate the instances of lapsed sessions",
                            description=about)
    p.add_argument("--grace", type=float, default=60.0,
                   help="seconds past the lease before a session counts as lapsed "
                        "(default: 60)")
    p.add_argument("--dry-run", action="store_true",
                   help="print what would be terminated, and terminate nothing")
    p.add_argument("--region", help=_REGION_HELP)
    p.add_argument("--endpoint-url", help=_ENDPOINT_HELP)
    p.set_defaults(ec2_fn=_sweep)
