"""The last minutes of the cluster, as the status page plots them.

    DebugServer's sampler thread, every SAMPLE_SECONDS ──> observe.status(b), observe.driver(b)
        ──> StatusHistory.record(rows, driver) ──> per machine and for the driver: a bounded
            ring of points (CPU %, RSS, tasks/s, calls/s; queue, running, done/s) and each
            machine's state changes
    a status page request ──> StatusHistory.record(...) too, then annotate() and series()

Rates and CPU % are differences between two readings of counters the machines already keep
(tasks run, calls served, CPU seconds of their process), so nothing is counted twice and a
reading that comes late only widens one interval. Readings closer together than
``MIN_INTERVAL`` are not turned into rates: a page request just after the sampler would make
them noise.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

__all__ = ["StatusHistory", "SAMPLE_SECONDS", "KEEP_SECONDS"]

#: How often the debug server reads the cluster's status for the plots.
SAMPLE_SECONDS = 2.0
#: How much history the plots show.
KEEP_SECONDS = 600.0
MIN_INTERVAL = 0.5


class _Track:
    """One machine's (or the driver's) last reading and its points."""

    def __init__(self, maxlen: int) -> None:
        self.points: deque[dict[str, float]] = deque(maxlen=maxlen)
        self.last: dict[str, float] | None = None  # counters at the last rate-worthy reading
        self.latest: dict[str, float] = {}  # the newest rates, for the table
        self.states: list[dict[str, Any]] = []  # state changes: time, state, why


class StatusHistory:
    """Points of every machine and of the driver over the last ``keep_seconds``."""

    def __init__(self, keep_seconds: float = KEEP_SECONDS,
                 sample_seconds: float = SAMPLE_SECONDS) -> None:
        self._maxlen = max(2, int(keep_seconds / sample_seconds) + 1)
        self._lock = threading.Lock()
        self._machines: dict[str, _Track] = {}
        self._driver = _Track(self._maxlen)

    def record(self, rows: list[dict[str, Any]], driver: dict[str, Any],
               now: float | None = None) -> None:
        """Add one reading: ``rows`` from ``observe.status``, ``driver`` from
        ``observe.driver``."""
        now = time.time() if now is None else now
        with self._lock:
            for row in rows:
                key = row_key(row)
                track = self._machines.get(key)
                if track is None:
                    track = self._machines[key] = _Track(self._maxlen)
                if not track.states or track.states[-1]["state"] != row["state"]:
                    track.states.append({"time": now, "state": row["state"],
                                         "why": row.get("err")})
                process = row.get("process") or {}
                counters = {"time": process.get("time", now),
                            "cpu_seconds": process.get("cpu_seconds"),
                            "tasks": row.get("tasks_run"), "calls": row.get("calls")}
                point = self._advance(track, counters, now)
                if point is not None:
                    point["rss"] = process.get("rss")
                    track.points.append(_present(point))
            process = driver.get("process") or {}
            counters = {"time": now, "cpu_seconds": process.get("cpu_seconds"),
                        "tasks": driver.get("completed")}
            point = self._advance(self._driver, counters, now)
            if point is not None:
                point.update(rss=process.get("rss"), queued=driver.get("queued"),
                             running=driver.get("running"))
                self._driver.points.append(_present(point))

    @staticmethod
    def _advance(track: _Track, counters: dict[str, Any], now: float
                 ) -> dict[str, Any] | None:
        """The rates since the track's last reading (None if it is too recent to tell)."""
        last = track.last
        if last is not None and counters["time"] - last["time"] < MIN_INTERVAL:
            return None
        point: dict[str, Any] = {"t": now}
        if last is not None:
            dt = counters["time"] - last["time"]
            for name, rate in (("cpu_seconds", "cpu_percent"), ("tasks", "tasks_per_second"),
                               ("calls", "calls_per_second")):
                before, after = last.get(name), counters.get(name)
                if isinstance(before, (int, float)) and isinstance(after, (int, float)):
                    value = max(0.0, (after - before) / dt)
                    point[rate] = value * 100.0 if name == "cpu_seconds" else value
        track.last = counters
        track.latest = {k: v for k, v in point.items() if k != "t"}
        return point

    def annotate(self, rows: list[dict[str, Any]], driver: dict[str, Any]) -> None:
        """Put the newest rates and each machine's state changes into ``rows`` and
        ``driver`` (in place)."""
        with self._lock:
            for row in rows:
                track = self._machines.get(row_key(row))
                if track is not None:
                    row.update(track.latest)
                    row["state_history"] = list(track.states)
            driver.update(self._driver.latest)

    def series(self) -> dict[str, Any]:
        """Every point kept: ``{"machines": {key: [point, ...]}, "driver": [point, ...]}``,
        oldest first; a point has ``t`` (Unix time) and what was known then."""
        with self._lock:
            return {"machines": {k: list(t.points) for k, t in self._machines.items()},
                    "driver": list(self._driver.points)}


def row_key(row: dict[str, Any]) -> str:
    """The name a machine's points are kept under: its address, or its place in the session
    while it boots without one."""
    return str(row.get("addr") or row.get("key"))


def _present(point: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in point.items() if v is not None}
