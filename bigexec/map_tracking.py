"""How far each ``map`` has come: the driver's record of maps in flight, for the status page.

    Executor.map / Pool.imap* ──> TrackedIterator.__next__ ──> MapProgress.advance()
    Pool.map / starmap         ── a chunk done ──────────────> MapProgress.advance(len)
    MapBoard.snapshot()  <── b.metrics_sources()["maps:..."] <── status page, /vars

A ``MapBoard`` belongs to one executor or pool and is one of its session's metrics sources
(named ``maps:<id>``): every map it starts is a ``MapProgress`` on it until the map ends, its
iterator is closed or garbage-collected. Counting costs one integer addition per item, under
no lock: the counters are read by the page, which shows a rate, and a read that misses the
latest increment shows one item less for one refresh.
"""

from __future__ import annotations

import itertools
import operator
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

__all__ = ["MapBoard", "MapProgress", "TrackedIterator", "METRICS_PREFIX"]

#: The prefix of the metrics sources that are map boards.
METRICS_PREFIX = "maps:"

_ids = itertools.count(1)


class MapProgress:
    """One map in flight: ``done`` of ``total`` items (``total`` is None until known, as for
    ``imap`` over a lazy iterable), since ``started``."""

    def __init__(self, board: MapBoard, kind: str, total: int | None) -> None:
        self.id = next(_ids)
        self.kind = kind
        self.total = total
        self.done = 0
        self.started = time.monotonic()
        self._board = board

    def advance(self, n: int = 1) -> None:
        self.done += n

    def set_total(self, total: int) -> None:
        self.total = total

    def finish(self) -> None:
        """The map ended (or its caller gave it up): it leaves the board. Idempotent."""
        self._board.remove(self)

    def snapshot(self) -> dict[str, Any]:
        seconds = time.monotonic() - self.started
        return {"id": self.id, "kind": self.kind, "done": self.done, "total": self.total,
                "seconds": seconds, "rate": self.done / seconds if seconds > 0 else 0.0}


class MapBoard:
    """The maps in flight of one executor or pool."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._maps: dict[int, MapProgress] = {}

    def track(self, kind: str, total: int | None = None) -> MapProgress:
        progress = MapProgress(self, kind, total)
        with self._lock:
            self._maps[progress.id] = progress
        return progress

    def remove(self, progress: MapProgress) -> None:
        with self._lock:
            self._maps.pop(progress.id, None)

    def snapshot(self) -> dict[str, Any]:
        """``{"maps": [...]}``, oldest first: what the status page and ``/vars`` show."""
        with self._lock:
            maps = list(self._maps.values())
        return {"maps": [m.snapshot() for m in maps]}


class TrackedIterator(Iterator[Any]):
    """``source``'s items, unchanged, each counted on ``progress``; ``len()``-less but with a
    length hint (the items still to come, when the total is known).

    Closing it, exhausting it, or dropping it ends the map's record; ``close()`` also closes
    ``source`` (a generator's ``finally`` then runs, as it would for the generator itself).
    """

    def __init__(self, source: Iterator[Any], progress: MapProgress) -> None:
        self._source = source
        self._progress = progress
        #: The source is over: it ran out, or it was a generator and raised.
        self.finished = False
        weakref.finalize(self, progress.finish)

    def __iter__(self) -> TrackedIterator:
        return self

    def __next__(self) -> Any:
        try:
            item = next(self._source)
        except StopIteration:
            self.finished = True
            self._progress.finish()
            raise
        except BaseException:
            self._progress.advance()  # the item's error is its result
            if getattr(self._source, "gi_frame", True) is None:  # a generator that raised
                self.finished = True
                self._progress.finish()
            raise
        self._progress.advance()
        return item

    def __length_hint__(self) -> int:
        total = self._progress.total
        if total is not None:
            return max(0, total - self._progress.done)
        return operator.length_hint(self._source)

    def close(self) -> None:
        self._progress.finish()
        close = getattr(self._source, "close", None)
        if close is not None:
            close()
