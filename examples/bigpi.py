"""bigpi: estimate π by sampling random points on a cluster of bigexec machines.

The port of Bigmachine's bigpi. Each machine runs a ``CirclePI`` service; the driver spreads
the samples over every machine's ``maxprocs`` and adds up the counts.

    python examples/bigpi.py -n 2000000 --nmach 2                    # local processes
    python examples/bigpi.py -n 2000000 --nmach 2 --system threads   # in-process machines
    python examples/bigpi.py -n 10000000000 --nmach 64 --system ec2  # on EC2 (BIGEXEC_EC2_*)
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import as_completed

import bigexec
from bigexec.debug import parse_addr
from bigexec.systems import system_names

log = logging.getLogger("bigpi")


class GlobalRandPI:
    """The first, slow version: every call draws from one generator behind one lock, as Go's
    global ``rand.Float64`` did in Bigmachine's bigpi. The merged profile shows the lock."""

    def init(self, b: bigexec.B) -> None:  # on the machine: one lock shared by all calls
        self.lock = threading.Lock()
        self.shared = random.Random()

    def sample(self, n: int, ctx: bigexec.Context) -> int:
        lock, shared = self.lock, self.shared
        inside = 0
        for i in range(n):
            if i % 65536 == 0 and ctx.cancelled:
                raise TimeoutError("sampling cancelled by the driver")
            with lock:
                x = shared.random()
            with lock:
                y = shared.random()
            inside += (x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.25
        return inside


class CirclePI:
    """Samples points in the unit square and counts those inside the unit circle."""

    def sample(self, n: int, ctx: bigexec.Context) -> int:
        r = random.Random()  # a generator per call: the global one is lock-protected
        inside = 0
        report = max(1, n // 4)
        for i in range(n):
            if i % report == 0:
                print(f"{i}/{n}", flush=True)  # reaches the driver's stderr, prefixed
                if ctx.cancelled:
                    raise TimeoutError("sampling cancelled by the driver")
            x, y = r.random(), r.random()
            inside += (x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.25
        return inside


def split(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` near-equal positive shares."""
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts) if base + (i < extra) > 0]


def _int_at_least(least: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, not {value}")
        return value

    parse.__name__ = "number"  # argparse names the type in some messages
    return parse


def _host_port(text: str) -> tuple[str, int]:
    try:
        return parse_addr(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=_int_at_least(1), default=10_000_000,
                        help="number of samples")
    parser.add_argument("--nmach", type=_int_at_least(1), default=2, help="number of machines")
    parser.add_argument("--system", default=None, choices=system_names(),
                        help="where machines run (default: $BIGEXEC_SYSTEM, else local)")
    parser.add_argument("--debug-addr", type=_host_port, default=None, metavar="HOST:PORT",
                        help="serve the debug pages (status, profiles) there while running")
    parser.add_argument("--calls-per-machine", type=_int_at_least(0), default=0, metavar="K",
                        help="concurrent calls per machine (default, or 0: its maxprocs)")
    parser.add_argument("--global-rand", action="store_true",
                        help="the slow first version: one lock-protected generator per machine")
    args = parser.parse_args(argv)
    from_env = os.environ.get("BIGEXEC_SYSTEM")
    if args.system is None and from_env and from_env not in system_names():
        parser.error(f"$BIGEXEC_SYSTEM names an unknown system {from_env!r} "
                     f"(choose from {', '.join(system_names())})")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)

    start = time.monotonic()
    with bigexec.start(args.system) as b:
        if args.debug_addr:
            host, port = args.debug_addr
            try:
                server = b.serve_debug(port, host)
            except OSError as exc:
                parser.error(f"--debug-addr {host}:{port}: {exc.strerror or exc}")
            log.info("debug server at %s", server.url)
        log.info("starting %d machines on the %s system", args.nmach, b.system.name)
        service = GlobalRandPI() if args.global_rand else CirclePI()
        machines = b.start(args.nmach, services={"PI": service})
        log.info("waiting for machines to come online")
        # a bar (tqdm on a terminal, else log lines) while they boot; within boot_timeout
        # every machine is up or stopped, so this wait ends
        bigexec.progress(machines, desc="machines up").wait()
        for m in machines:
            m.wait(bigexec.RUNNING)
            log.info("machine %s %s", m.addr, m.state.name)
            if m.err is not None:
                log.error("machine %s failed: %s", m.addr, m.err)
                return 1
        log.info("all machines are ready")
        slots = [m for m in machines for _ in range(args.calls_per_machine or m.maxprocs)]
        shares = split(args.n, len(slots))
        log.info("distributing work among %d cores", len(slots))
        futures = [m.submit("PI.sample", k) for m, k in zip(slots, shares, strict=False)]
        done = bigexec.progress(as_completed(futures), total=len(futures), desc="samples")
        total = sum(f.result() for f in done)
    pi = 4 * total / args.n
    # The estimate's standard error is about 4*sqrt(p(1-p)/n) with p = π/4: print the digits
    # it supports, plus one.
    stderr = 4 * math.sqrt((math.pi / 4) * (1 - math.pi / 4) / args.n)
    digits = max(1, min(15, 1 - int(math.floor(math.log10(stderr)))))
    log.info("total=%d nsamples=%d (%.2fs)", total, args.n, time.monotonic() - start)
    print(f"π = {pi:.{digits}f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
