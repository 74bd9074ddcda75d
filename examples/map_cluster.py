"""A ProcessPoolExecutor program, moved to a bigexec cluster by changing two lines.

The original:

    from concurrent.futures import ProcessPoolExecutor
    ...
    with ProcessPoolExecutor(max_workers=4) as ex:

The port (below): import ``bigexec.Executor`` and name a system. Everything else, including a
lambda that ``ProcessPoolExecutor`` could not pickle, runs unchanged.

    python examples/map_cluster.py                    # local processes
    python examples/map_cluster.py --system threads   # in-process machines
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from concurrent.futures import as_completed

from bigexec import Executor


def digest(n: int) -> str:
    """Some CPU work: hash a counter's bytes many times."""
    h = hashlib.sha256(str(n).encode())
    for _ in range(2000):
        h = hashlib.sha256(h.digest())
    return h.hexdigest()[:12]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="map over a cluster")
    parser.add_argument("--system", default=None)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("-n", type=int, default=200)
    args = parser.parse_args(argv)

    with Executor(max_workers=args.workers, system=args.system) as ex:
        digests = list(ex.map(digest, range(args.n), chunksize=10))
        squares = sum(ex.map(lambda x: x * x, range(args.n)))
        futures = {ex.submit(digest, i): i for i in range(5)}
        firsts = {futures[f]: f.result() for f in as_completed(futures)}
    assert digests[:5] == [firsts[i] for i in range(5)]
    print(f"{len(digests)} digests, first {digests[0]}, last {digests[-1]}")
    print(f"sum of squares below {args.n}: {squares}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
