"""Threads that run a session's blocking calls (``Machine.submit``), bounded, with a backlog.

    Machine.submit ──> CallPool.submit(run)
                         ├─ an idle thread waits: it takes ``run``
                         ├─ fewer than ``max_threads`` threads: a new one runs it
                         └─ else: ``run`` waits in the backlog (FIFO) for the next thread
                              that finishes a call
    internal control calls (a remote cancel) pass ``bounded=False``: never behind the backlog

Each call in flight holds a thread and a connection (and a thread of the machine's server)
until its reply, so a pool without a bound made 1,000 pending submits cost about 1,930
threads and as many descriptors. With the bound, 10,000 pending submits cost ``max_threads``
threads; the price is that calls beyond the bound wait their turn, so more than
``max_threads`` calls that wait for one another (a barrier across calls) would deadlock:
raise the bound for such a program (``B.max_concurrent_calls``).

A forked child gets a fresh pool state (its parent's threads do not exist in it).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import weakref
from collections import deque
from collections.abc import Callable

__all__ = ["CallPool", "DEFAULT_MAX_THREADS"]

log = logging.getLogger("bigexec")

DEFAULT_MAX_THREADS = 32
_IDLE_THREAD_SECONDS = 30.0

_pools: weakref.WeakSet[CallPool] = weakref.WeakSet()


class CallPool:
    """Runs blocking calls on at most ``max_threads`` threads (see the module docstring)."""

    def __init__(self, max_threads: int = DEFAULT_MAX_THREADS) -> None:
        self.max_threads = max_threads
        self._reset()
        _pools.add(self)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._backlog: deque[Callable[[], None]] = deque()
        self._threads = 0  # alive, busy or idle
        self._idle = 0  # waiting on _queue
        self._closed = False

    @property
    def max_threads(self) -> int:
        return self._max_threads

    @max_threads.setter
    def max_threads(self, n: int) -> None:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"max_threads must be a positive int, not {n!r}")
        self._max_threads = n

    def submit(self, fn: Callable[[], None], *, bounded: bool = True) -> None:
        """Run ``fn`` on a pool thread; past the bound (when ``bounded``) in turn."""
        with self._lock:
            if self._idle:
                self._idle -= 1
                self._queue.put(fn)
                return
            if bounded and self._threads >= self._max_threads:
                self._backlog.append(fn)
                return
            self._threads += 1
        try:
            threading.Thread(target=self._work, args=(fn,), name="bigexec-call",
                             daemon=True).start()
        except BaseException:
            with self._lock:
                self._threads -= 1
            raise

    def _work(self, fn: Callable[[], None] | None) -> None:
        while fn is not None:
            try:
                fn()
            except BaseException:  # the callers' futures carry their errors
                log.exception("unexpected error in a bigexec call thread")
            fn = None  # holds nothing of the last call while idle
            with self._lock:
                if self._backlog:
                    fn = self._backlog.popleft()
                    continue
                if self._closed:
                    self._threads -= 1
                    return
                self._idle += 1
            try:
                fn = self._queue.get(timeout=_IDLE_THREAD_SECONDS)
            except queue.Empty:
                with self._lock:
                    try:
                        fn = self._queue.get_nowait()  # handed to us as we timed out
                    except queue.Empty:
                        self._idle -= 1
                        self._threads -= 1
                        return
        with self._lock:  # woken by close()
            self._threads -= 1

    @property
    def threads(self) -> int:
        """How many threads the pool has now (busy or idle)."""
        with self._lock:
            return self._threads

    @property
    def backlog(self) -> int:
        """How many calls wait for a thread."""
        with self._lock:
            return len(self._backlog)

    def close(self) -> None:
        """Let idle threads go; calls in flight and in the backlog still run (a backlog
        exists only while every thread is busy, and those threads drain it)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, 0
        for _ in range(idle):
            self._queue.put(None)


def _reset_in_child() -> None:
    for pool in list(_pools):
        pool._reset()


os.register_at_fork(after_in_child=_reset_in_child)
