"""``bigexec.Executor``: a ``concurrent.futures.Executor`` whose workers are machines.

    Executor.submit(fn, *args) ──> Task ──> Scheduler queue ──> machines (see scheduler.py)
    Executor.map(fn, *its)     ──> one Task per item, or per ``chunksize`` items
                                   (each chunk runs as one call and returns a list)

Drop-in for ``ProcessPoolExecutor``: the same arguments, messages and semantics, with these
additions: ``system`` and its options choose where machines run; ``b=`` or ``machines=`` run
over an existing session; a machine that dies loses no work (its tasks run again elsewhere and
a replacement starts); ``shutdown(cancel_futures=True)``, ``terminate_workers()`` and
``kill_workers()`` also stop the tasks that are running.
"""

from __future__ import annotations

import itertools
import os
import time
import weakref
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import CancelledError, Future
from concurrent.futures import Executor as _StdExecutor
from typing import Any

from .batching import Task
from .machine import Machine
from .map_tracking import TrackedIterator
from .observe import ClusterViews
from .scheduler import Scheduler
from .session import B
from .session_choice import session_for
from .tasks import run_chunk

__all__ = ["Executor"]


def _result_or_cancel(fut: Future, timeout: float | None = None) -> Any:
    try:
        try:
            return fut.result(timeout)
        finally:
            fut.cancel()
    finally:
        del fut  # do not keep the result alive in this frame


def _items_of_chunks(chunks: Generator[list[Any], None, None]) -> Iterator[Any]:
    """The items of each chunk, in order, holding none already yielded; closing it closes
    ``chunks`` (which cancels the calls not yet done)."""
    try:
        for chunk in chunks:
            chunk.reverse()
            while chunk:
                yield chunk.pop()
    finally:
        chunks.close()


def _batched(iterable: Iterable[Any], n: int) -> Iterator[tuple]:
    it = iter(iterable)
    while chunk := tuple(itertools.islice(it, n)):
        yield chunk


class Executor(ClusterViews, _StdExecutor):
    """Runs calls on a cluster of machines; a drop-in ``ProcessPoolExecutor``.

    ``max_workers`` machines are started on ``system`` (default: the CPU count, on
    ``BIGEXEC_SYSTEM`` or ``local``), with ``system_options`` passed to ``bigexec.start``.
    ``initializer(*initargs)`` runs once on each machine before its first task; if it raises,
    or does not finish within the system's ``boot_timeout``, the executor is broken. A machine
    that fails to boot while others run is retried with backoff until the executor has its
    size again; only when no machine at all can be had is the executor broken. ``b=`` starts
    the machines in an existing session instead (which the executor does not shut down);
    ``machines=`` runs on existing machines only.
    ``max_crashes`` is how many machine deaths one task may cause before it fails with
    ``WorkerLostError``.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        *,
        system: str | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple = (),
        b: B | None = None,
        machines: list[Machine] | None = None,
        max_crashes: int = 3,
        **system_options: Any,
    ) -> None:
        if max_workers is None:
            max_workers = len(machines) if machines else (os.cpu_count() or 1)
        elif max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if max_crashes < 1:
            raise ValueError("max_crashes must be at least 1")
        b, own = session_for(b, machines, system, system_options)
        self._max_workers = max_workers
        self._shutdown = False
        self._scheduler = Scheduler(
            b=b, own_session=own, count=0 if machines else max_workers, machines=machines,
            initializer=initializer, initargs=initargs, max_crashes=max_crashes, lazy=True,
        )

    # --- the standard contract -----------------------------------------------------------

    @property
    def _broken(self) -> str | bool:  # what CPython's own tests look at
        err = self._scheduler.broken
        return str(err) if err is not None else False

    # observe.ClusterViews declares ``session`` a plain attribute; read-only is what it means
    @property
    def session(self) -> B:
        """The session whose machines run the tasks."""
        return self._scheduler.b

    def machines(self) -> list[Machine]:
        """The machines running tasks now."""
        return self._scheduler.machines()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Schedule ``fn(*args, **kwargs)``; return its ``Future``."""
        if self._scheduler.broken is not None:
            raise self._scheduler.broken
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        return self._scheduler.submit(Task(fn, args, kwargs))

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1, buffersize: int | None = None) -> Iterator[Any]:
        """``fn`` over the items of ``iterables``, in order, as ``ProcessPoolExecutor.map``.

        ``chunksize`` items travel and run as one call. Without ``buffersize`` every call is
        submitted now; with it, at most ``buffersize`` (chunks) are in flight and the input is
        read as results are consumed, so endless inputs work.
        """
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if buffersize is not None and not isinstance(buffersize, int):
            raise TypeError("buffersize must be an integer or None")
        if buffersize is not None and buffersize < 1:
            raise ValueError("buffersize must be None or > 0")
        end_time = None if timeout is None else timeout + time.monotonic()
        if chunksize == 1:
            calls: Iterator[Any] = zip(*iterables)  # noqa: B905 - zip semantics, as the stdlib
            make = lambda args: Task(fn, args, {})  # noqa: E731
        else:
            calls = _batched(zip(*iterables), chunksize)  # noqa: B905
            make = lambda chunk: Task(run_chunk, (fn, chunk), {})  # noqa: E731

        if self._scheduler.broken is not None:
            raise self._scheduler.broken
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if buffersize is None:
            tasks = [make(c) for c in calls]
            items = len(tasks) if chunksize == 1 else sum(len(t.args[1]) for t in tasks)
            self._scheduler.submit_many(tasks)
            fs: deque[Future] = deque(t.future for t in tasks)
            del tasks
            more = None
        else:
            fs = deque(self.submit_task(make(c)) for c in itertools.islice(calls, buffersize))
            more = (weakref.ref(self), calls, make)
            items = 0
        results = self._results(fs, end_time, more)
        # items, as the status page counts them: known now unless the input is read lazily
        total = None if more is not None else (len(fs) if chunksize == 1 else items)
        progress = self._scheduler.maps.track("Executor.map", total)
        return TrackedIterator(results if chunksize == 1 else _items_of_chunks(results),
                               progress)

    @staticmethod
    def _results(fs: deque[Future], end_time: float | None,
                 more: tuple[Any, Iterator[Any], Callable[[Any], Task]] | None,
                 ) -> Generator[Any, None, None]:
        # While paused at a yield, this generator holds no future, result or input item of
        # its own: each is yielded straight from the expression that made it (as the
        # standard library's map does).
        try:
            while fs:
                if more is not None:
                    ref, calls, make = more
                    executor = ref()
                    nxt = next(calls, None) if executor is not None else None
                    if nxt is not None:
                        fs.append(executor.submit_task(make(nxt)))
                    del executor, nxt
                if end_time is None:
                    yield _result_or_cancel(fs.popleft())
                else:
                    yield _result_or_cancel(fs.popleft(), end_time - time.monotonic())
        finally:
            for fut in fs:
                fut.cancel()

    def submit_task(self, task: Task) -> Future:
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        return self._scheduler.submit(task)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking tasks; with ``wait``, finish the queued ones and stop the machines.

        ``cancel_futures=True`` cancels the queued tasks and, unlike the standard library,
        also stops the running ones: their futures fail with ``CancelledError``.
        """
        self._shutdown = True
        if cancel_futures:
            self._scheduler.cancel_pending()
            self._scheduler.stop_running(
                CancelledError("stopped by shutdown(cancel_futures=True)"))
        self._scheduler.shutdown(wait)

    def terminate_workers(self) -> None:
        """Stop everything now: cancel queued tasks, stop running ones, stop the machines."""
        self.shutdown(wait=False, cancel_futures=True)

    kill_workers = terminate_workers

    def __repr__(self) -> str:
        state = "shut down" if self._shutdown else "running"
        return f"<bigexec.Executor {state} machines={len(self.machines())}>"
