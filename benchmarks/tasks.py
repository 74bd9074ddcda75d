"""The functions and services the benchmarks run on workers.

They live in an importable module (not ``__main__``) so every peer can run them: spawn-based
pools and Dask workers import them by reference, bigexec ships them by reference too.
"""

from __future__ import annotations

import os
import random
import resource


def noop(*args):
    """The no-op task: the whole cost of a call is the executor's."""
    return None


def echo(data):
    """Returns its argument: a payload travels there and back."""
    return data


def bigpi(n: int, seed: int = 0) -> int:
    """Pure-Python π sampling (bigpi): how many of ``n`` points fall inside the circle."""
    r = random.Random(seed)
    inside = 0
    for _ in range(n):
        x, y = r.random(), r.random()
        inside += (x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.25
    return inside


def apply_chunk(fn, chunk):
    """``fn`` over the items of ``chunk`` (emulates ``chunksize`` for peers without one)."""
    return [fn(x) for x in chunk]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class BenchService:
    """A bigexec service: a no-op for the primitive round trip, and the 1 GiB streams."""

    def noop(self, x=None):
        return None

    def echo(self, data):
        return data

    def pid(self) -> int:
        return os.getpid()

    def memory(self) -> dict:
        """The machine's RSS now and its high-water mark (``ru_maxrss``), in bytes."""
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"rss": rss_bytes(), "maxrss": peak}

    def consume(self, stream) -> int:
        """Reads a streamed argument to its end; returns how many bytes it held."""
        n = 0
        for chunk in stream:
            n += len(chunk)
        return n

    def produce(self, total: int, chunk: int = 1 << 20):
        """Streams ``total`` bytes back, ``chunk`` at a time (one buffer, reused)."""
        buf = b"\x5a" * chunk

        def gen():
            left = total
            while left > 0:
                if left >= chunk:
                    yield buf
                    left -= chunk
                else:
                    yield buf[:left]
                    left = 0

        return gen()
