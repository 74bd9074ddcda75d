"""Counters and gauges, per process, and how the driver adds them up across machines.

    each process:  MethodStats per RPC method (server side: calls served; client side: calls
                   made), plus what services report through ``_bigexec_metrics()``
    Supervisor.metrics ──> one machine's snapshot (nested dicts of numbers)
    B.metrics()        ──> {"driver": ..., "machines": {addr: snapshot}, "total": sums}

Snapshots are plain nested dicts so that they travel as pickles and render as JSON.
``aggregate`` sums every numeric leaf that has the same path in several snapshots; maxima
(keys starting with ``max``) take the maximum instead.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

__all__ = ["MethodStats", "StatsTable", "aggregate"]


class MethodStats:
    """Counters for one RPC method."""

    __slots__ = ("count", "errors", "seconds", "max_seconds", "request_bytes", "reply_bytes")

    def __init__(self) -> None:
        self.count = self.errors = 0
        self.seconds = self.max_seconds = 0.0
        self.request_bytes = self.reply_bytes = 0

    def snapshot(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in self.__slots__}


class StatsTable:
    """``MethodStats`` by method name, safe to update from many threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats: dict[str, MethodStats] = {}

    def record(self, method: str, seconds: float, error: bool, request_bytes: int = 0,
               reply_bytes: int = 0) -> None:
        with self._lock:
            s = self._stats.get(method)
            if s is None:
                s = self._stats[method] = MethodStats()
            s.count += 1
            s.errors += error
            s.seconds += seconds
            if seconds > s.max_seconds:
                s.max_seconds = seconds
            if request_bytes > 0:
                s.request_bytes += request_bytes
            if reply_bytes > 0:
                s.reply_bytes += reply_bytes

    def snapshot(self) -> dict[str, dict[str, float]]:
        with self._lock:
            return {m: s.snapshot() for m, s in self._stats.items()}

    def totals(self) -> dict[str, float]:
        """All methods together: calls, errors, seconds, bytes."""
        return aggregate(self.snapshot().values())


def aggregate(snapshots: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Sum the numeric leaves of ``snapshots`` path by path (``max*`` keys: maximum)."""
    out: dict[str, Any] = {}
    for snap in snapshots:
        _merge_into(out, snap)
    return out


def _merge_into(out: dict[str, Any], snap: dict[str, Any]) -> None:
    for k, v in snap.items():
        if isinstance(v, bool):
            continue
        if isinstance(v, dict):
            sub = out.setdefault(k, {})
            if isinstance(sub, dict):
                _merge_into(sub, v)
        elif isinstance(v, (int, float)):
            prev = out.get(k, 0)
            if not isinstance(prev, (int, float)):
                continue
            out[k] = max(prev, v) if str(k).startswith("max") else prev + v
