"""``bigexec.Pool``: a ``multiprocessing.pool.Pool`` work-alike whose workers are machines.

    apply_async / map_async / imap ──> Tasks (one per call, or per chunk of items)
        ──> Scheduler (see scheduler.py) ──> machines
        ──> each task's future completes ──> the pool's result-handler thread
                ──> the job's callback runs there, in the driver, then the job is ready

The methods, arguments, defaults (``map``'s chunksize rule) and messages are the standard
library's. Differences, all on the side of not hanging: a dead machine's tasks run again on
another machine; ``terminate()`` stops running tasks and fails every job not done (the standard
library leaves them waiting forever); a callback that raises makes its job fail with that
exception (the fix of CPython gh-83371) instead of killing the result handler; ``imap`` and
``imap_unordered`` read their input as results are consumed, so endless inputs work.
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import multiprocessing
import os
import queue
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import Future

# (typeshed leaves these two out of multiprocessing.pool, where CPython has them)
from multiprocessing.pool import MaybeEncodingError  # type: ignore[attr-defined]
from multiprocessing.pool import RemoteTraceback as _PoolRemoteTraceback  # type: ignore[attr-defined]
from typing import Any

from .batching import Task
from .errors import RemoteTraceback
from .machine import Machine
from .map_tracking import MapProgress
from .observe import ClusterViews
from .scheduler import Scheduler
from .session import B
from .session_choice import session_for
from .tasks import run_chunk, run_star_chunk

__all__ = ["Pool", "AsyncResult", "ApplyResult", "MapResult", "IMapIterator"]

log = logging.getLogger("bigexec.pool")

RUN, CLOSE, TERMINATE = "RUN", "CLOSE", "TERMINATE"
# How an imap feeder reads its input: as results are consumed, all of it now, or no more.
_WINDOW, _ALL, _STOP = "window", "all", "stop"
_IMAP_WINDOW_PER_PROCESS = 8  # chunks in flight or unread per process, for imap


def _unpicklable_result(exc: BaseException) -> BaseException:
    return MaybeEncodingError(exc, "<the task's result>")


def _error_of(fut: Future) -> BaseException | None:
    if fut.cancelled():  # only terminate() cancels a pool's tasks
        return RuntimeError("the pool was terminated before the task ran")
    exc = fut.exception()
    if exc is not None and isinstance(exc.__cause__, RemoteTraceback):
        # the standard library's pool gives a task's exception its own class of cause
        exc.__cause__ = _PoolRemoteTraceback(exc.__cause__.tb)
    return exc


class ApplyResult:
    """The result of ``apply_async``; also the base of ``MapResult``."""

    def __init__(self, pool: Pool, callback: Callable[[Any], Any] | None,
                 error_callback: Callable[[BaseException], Any] | None) -> None:
        self._pool = pool
        self._event = threading.Event()
        self._callback = callback
        self._error_callback = error_callback
        self._success = False
        self._value: Any = None

    def ready(self) -> bool:
        return self._event.is_set()

    def successful(self) -> bool:
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return self._success

    def wait(self, timeout: float | None = None) -> None:
        self._event.wait(timeout)

    def get(self, timeout: float | None = None) -> Any:
        self.wait(timeout)
        if not self.ready():
            raise multiprocessing.TimeoutError
        if self._success:
            return self._value
        raise self._value

    def _finish(self, success: bool, value: Any) -> None:
        """Runs in the result-handler thread: callback first, then ready."""
        cb = self._callback if success else self._error_callback
        if cb is not None:
            try:
                cb(value)
            except BaseException as exc:  # gh-83371: the callback's error is the job's
                success, value = False, exc
        self._success, self._value = success, value
        self._event.set()
        self._pool = None  # type: ignore[assignment]

    def _task_done(self, fut: Future) -> None:
        exc = _error_of(fut)
        if exc is None:
            self._finish(True, fut.result())
        else:
            self._finish(False, exc)


AsyncResult = ApplyResult


class MapResult(ApplyResult):
    """The result of ``map_async``/``starmap_async``: ready once every chunk is done.

    Like the standard library it does not fail fast: the first error is kept, and reported
    (and ``error_callback`` called) only when all chunks have finished.
    """

    def __init__(self, pool: Pool, chunksize: int, length: int,
                 callback: Callable[[Any], Any] | None,
                 error_callback: Callable[[BaseException], Any] | None,
                 progress: MapProgress) -> None:
        super().__init__(pool, callback, error_callback)
        self._progress = progress
        self._chunksize = chunksize
        self._values: list[Any] = [None] * length
        self._left = 0 if chunksize == 0 else -(-length // chunksize)
        self._error: BaseException | None = None
        if self._left == 0:  # nothing to do: ready at once, and (as the stdlib) no callback
            self._success, self._value = True, self._values
            self._event.set()
            progress.finish()

    def _chunk_done(self, index: int, fut: Future) -> None:
        exc = _error_of(fut)
        if exc is None and self._error is None:
            start = index * self._chunksize
            self._values[start : start + self._chunksize] = fut.result()
        elif exc is not None and self._error is None:
            self._error = exc
        self._left -= 1
        self._progress.advance(min(self._chunksize, len(self._values) - index * self._chunksize)
                               if self._values else self._chunksize)
        if self._left == 0:
            self._progress.finish()
            if self._error is None:
                self._finish(True, self._values)
            else:
                self._values = []
                self._finish(False, self._error)


class IMapIterator:
    """The iterator ``imap`` returns (and ``imap_unordered``, with ``ordered=False``).

    ``next(timeout)`` raises ``multiprocessing.TimeoutError`` when no result comes in time.
    """

    def __init__(self, pool: Pool, ordered: bool, progress: MapProgress) -> None:
        self._pool = pool
        self._progress = progress
        weakref.finalize(self, progress.finish)
        self._ordered = ordered
        self._cond = threading.Condition()
        self._done: dict[int, tuple[bool, Any]] = {}
        self._arrivals: collections.deque[int] = collections.deque()
        self._next_index = 0
        self._length: int | None = None
        self._items: collections.deque[Any] = collections.deque()
        self._consumed = 0
        self._read = 0  # input items the feeder has read
        self._feed = _WINDOW  # how the feeder reads the input: see _wait_for_room

    def __iter__(self) -> IMapIterator:
        return self

    def next(self, timeout: float | None = None) -> Any:
        try:
            value = self._next(timeout)
        except StopIteration:
            self._progress.finish()
            raise
        except multiprocessing.TimeoutError:
            raise  # no item yet
        except BaseException:
            self._progress.advance()  # the item's error is its result
            raise
        self._progress.advance()
        return value

    def __length_hint__(self) -> int:
        """The items still to come, once the whole input has been read; else those read and
        not yet consumed."""
        total = self._progress.total
        return max(0, (total if total is not None else self._read) - self._progress.done)

    def _next(self, timeout: float | None = None) -> Any:
        if self._items:
            return self._items.popleft()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._ordered and self._next_index in self._done:
                    success, value = self._done.pop(self._next_index)
                    break
                if not self._ordered and self._arrivals:
                    success, value = self._done.pop(self._arrivals.popleft())
                    break
                if self._length is not None and self._consumed >= self._length:
                    raise StopIteration
                # one deadline for the whole call: a notify for another index must not
                # restart the wait
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise multiprocessing.TimeoutError
                self._cond.wait(left)
            self._next_index += 1
            self._consumed += 1
            self._cond.notify_all()  # the feeder may send more
        if not success:
            raise value
        if isinstance(value, _Chunk):
            self._items.extend(value.items)
            if not self._items:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                return self._next(left)
            return self._items.popleft()
        return value

    __next__ = next

    def _set(self, index: int, success: bool, value: Any) -> None:
        with self._cond:
            self._done[index] = (success, value)
            self._arrivals.append(index)
            self._cond.notify_all()

    def _set_length(self, length: int, items: int) -> None:
        with self._cond:
            self._length = length
            self._progress.set_total(items)
            self._cond.notify_all()

    def _count_read(self, items: int) -> None:
        self._read += items

    def _wait_for_room(self, submitted: int, window: int) -> bool:
        """Wait until the consumer has made room for one more task; False: stop feeding (the
        pool was terminated). Once the pool is closed and joined, there is always room: the
        rest of the input is submitted at once, as the standard library does, so that
        ``join()`` never waits for a consumer that may not come."""
        with self._cond:
            while True:
                if self._feed == _STOP:
                    return False
                if self._feed == _ALL or submitted - self._consumed < window:
                    return True
                self._cond.wait()

    def _set_feed(self, mode: str) -> None:
        with self._cond:
            if self._feed != _STOP:
                self._feed = mode
            self._cond.notify_all()


class _Chunk:
    __slots__ = ("items",)

    def __init__(self, items: list[Any]) -> None:
        self.items = items


class Pool(ClusterViews):
    """A process pool whose processes are bigexec machines; a drop-in
    ``multiprocessing.pool.Pool``.

    ``processes`` machines are started on ``system`` (default: the CPU count, on
    ``BIGEXEC_SYSTEM`` or ``local``). ``maxtasksperchild`` replaces a machine after that many
    tasks. ``b=``/``machines=`` and ``max_crashes`` are as for ``bigexec.Executor``.
    """

    def __init__(
        self,
        processes: int | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: Iterable[Any] = (),
        maxtasksperchild: int | None = None,
        *,
        system: str | None = None,
        b: B | None = None,
        machines: list[Machine] | None = None,
        max_crashes: int = 3,
        **system_options: Any,
    ) -> None:
        self._state = "INIT"  # first: __del__ looks at it even if we raise
        if processes is None:
            processes = len(machines) if machines else (os.cpu_count() or 1)
        if processes < 1:
            raise ValueError("Number of processes must be at least 1")
        if maxtasksperchild is not None and (
            not isinstance(maxtasksperchild, int) or maxtasksperchild <= 0
        ):
            raise ValueError("maxtasksperchild must be a positive int or None")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        b, own = session_for(b, machines, system, system_options)
        self._processes = processes
        self._results: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._handler = threading.Thread(target=self._handle_results, daemon=True,
                                         name="bigexec-pool-results")
        self._handler.start()
        self._scheduler = Scheduler(
            b=b, own_session=own, count=0 if machines else processes, machines=machines,
            initializer=initializer, initargs=tuple(initargs), max_crashes=max_crashes,
            maxtasksperchild=maxtasksperchild, unpicklable_result=_unpicklable_result,
        )
        # imap feeders still reading their input, by iterator (each removes itself when done)
        self._feeders: dict[IMapIterator, threading.Thread] = {}
        self._feeders_lock = threading.Lock()
        self._state = RUN

    # --- plumbing ------------------------------------------------------------------------

    def _handle_results(self) -> None:
        while True:
            job = self._results.get()
            if job is None:
                return
            try:
                job()
            except BaseException:  # the jobs catch their callbacks' errors; this is a bug
                log.exception("pool result handler failed")
            # the job holds its future and result: do not keep them alive while waiting
            job = None

    def _chunk_finished(self, result: MapResult, index: int, fut: Future) -> None:
        self._post(lambda: result._chunk_done(index, fut))

    def _post_done(self, done: Callable[[int, Future], None], index: int, fut: Future) -> None:
        self._post(lambda: done(index, fut))

    def _post(self, fn: Callable[[], None]) -> None:
        self._results.put(fn)

    def _check_running(self) -> None:
        if self._state != RUN:
            raise ValueError("Pool not running")

    def _submit(self, tasks: list[Task]) -> None:
        broken = self._scheduler.broken
        if broken is not None:
            raise broken
        self._scheduler.submit_many(tasks)

    @property
    def _pool(self) -> list[Machine]:
        """The machines working for the pool (``multiprocessing`` exposes its processes so)."""
        return self._scheduler.machines()

    # observe.ClusterViews declares ``session`` a plain attribute; read-only is what it means
    @property
    def session(self) -> B:
        return self._scheduler.b

    # --- apply ---------------------------------------------------------------------------

    def apply(self, func: Callable[..., Any], args: tuple = (), kwds: dict | None = None) -> Any:
        """``func(*args, **kwds)`` on a machine; wait for the result."""
        return self.apply_async(func, args, kwds).get()

    def apply_async(self, func: Callable[..., Any], args: tuple = (), kwds: dict | None = None,
                    callback: Callable[[Any], Any] | None = None,
                    error_callback: Callable[[BaseException], Any] | None = None) -> ApplyResult:
        self._check_running()
        result = ApplyResult(self, callback, error_callback)
        task = Task(func, tuple(args), dict(kwds or {}))
        task.future.add_done_callback(lambda f: self._post(lambda: result._task_done(f)))
        self._submit([task])
        return result

    # --- map -----------------------------------------------------------------------------

    def _map_async(self, func: Callable[..., Any], iterable: Iterable[Any], runner: Any,
                   chunksize: int | None, callback: Any, error_callback: Any) -> MapResult:
        self._check_running()
        if not hasattr(iterable, "__len__"):
            iterable = list(iterable)
        items = iterable if isinstance(iterable, list) else list(iterable)
        if chunksize is None:
            chunksize, extra = divmod(len(items), self._processes * 4)
            if extra:
                chunksize += 1
        if len(items) == 0:
            chunksize = 0
        progress = self._scheduler.maps.track(
            "Pool.starmap" if runner is run_chunk else "Pool.map", len(items))
        result = MapResult(self, chunksize, len(items), callback, error_callback, progress)
        if chunksize:
            tasks = []
            for i in range(0, len(items), chunksize):
                t = Task(runner, (func, items[i : i + chunksize]), {})
                t.future.add_done_callback(functools.partial(self._chunk_finished, result,
                                                             i // chunksize))
                tasks.append(t)
            self._submit(tasks)
        return result

    def map(self, func: Callable[..., Any], iterable: Iterable[Any],
            chunksize: int | None = None) -> list[Any]:
        """``[func(x) for x in iterable]``, computed on the machines in chunks."""
        return self._map_async(func, iterable, run_star_chunk, chunksize, None, None).get()

    def map_async(self, func: Callable[..., Any], iterable: Iterable[Any],
                  chunksize: int | None = None, callback: Any = None,
                  error_callback: Any = None) -> MapResult:
        return self._map_async(func, iterable, run_star_chunk, chunksize, callback,
                               error_callback)

    def starmap(self, func: Callable[..., Any], iterable: Iterable[Iterable[Any]],
                chunksize: int | None = None) -> list[Any]:
        """``[func(*args) for args in iterable]``."""
        return self._map_async(func, iterable, run_chunk, chunksize, None, None).get()

    def starmap_async(self, func: Callable[..., Any], iterable: Iterable[Iterable[Any]],
                      chunksize: int | None = None, callback: Any = None,
                      error_callback: Any = None) -> MapResult:
        return self._map_async(func, iterable, run_chunk, chunksize, callback, error_callback)

    # --- imap ----------------------------------------------------------------------------

    def _imap(self, func: Callable[..., Any], iterable: Iterable[Any], chunksize: int,
              ordered: bool) -> IMapIterator:
        self._check_running()
        if chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize:n}")
        it = IMapIterator(self, ordered, self._scheduler.maps.track(
            "Pool.imap" if ordered else "Pool.imap_unordered"))
        window = max(2, self._processes * _IMAP_WINDOW_PER_PROCESS)

        def done(index: int, fut: Future) -> None:
            exc = _error_of(fut)
            if exc is not None:
                it._set(index, False, exc)
            elif chunksize == 1:
                it._set(index, True, fut.result())
            else:
                it._set(index, True, _Chunk(fut.result()))

        def feed() -> None:
            source = iter(iterable)
            index = read = 0
            try:
                while True:
                    if not it._wait_for_room(index, window):  # terminated: say so, and end
                        it._set(index, False, RuntimeError("the pool was terminated"))
                        index += 1
                        break
                    try:
                        if chunksize == 1:
                            task = Task(func, (next(source),), {})
                            read += 1
                            it._count_read(1)
                        else:
                            chunk = list(itertools.islice(source, chunksize))
                            if not chunk:
                                break
                            task = Task(run_star_chunk, (func, chunk), {})
                            read += len(chunk)
                            it._count_read(len(chunk))
                    except StopIteration:
                        break
                    except BaseException as exc:  # the input failed: that is the result here
                        it._set(index, False, exc)
                        index += 1
                        break
                    task.future.add_done_callback(functools.partial(self._post_done, done, index))
                    try:
                        self._submit([task])
                    except BaseException as exc:
                        it._set(index, False, exc)
                        index += 1
                        break
                    del task
                    index += 1
                it._set_length(index, read)
            finally:
                with self._feeders_lock:
                    self._feeders.pop(it, None)

        feeder = threading.Thread(target=feed, daemon=True, name="bigexec-pool-feeder")
        with self._feeders_lock:
            self._feeders[it] = feeder
        feeder.start()
        return it

    def imap(self, func: Callable[..., Any], iterable: Iterable[Any],
             chunksize: int = 1) -> IMapIterator:
        """Like ``map``, lazily, in order; reads the input as results are consumed."""
        return self._imap(func, iterable, chunksize, ordered=True)

    def imap_unordered(self, func: Callable[..., Any], iterable: Iterable[Any],
                       chunksize: int = 1) -> IMapIterator:
        """Like ``imap``, yielding results as they finish."""
        return self._imap(func, iterable, chunksize, ordered=False)

    # --- life ----------------------------------------------------------------------------

    def close(self) -> None:
        """Accept no more work; the machines stop once the queued work is done (``join``)."""
        if self._state == RUN:
            self._state = CLOSE

    def terminate(self) -> None:
        """Stop now: running tasks are stopped, unfinished jobs fail, machines shut down.

        imap feeders stop reading their input; an imap iterator yields what finished, then
        raises ``RuntimeError("the pool was terminated")``.
        """
        self._state = TERMINATE
        for it in self._live_feeders():
            it._set_feed(_STOP)
        self._scheduler.stop_running(RuntimeError("the pool was terminated"))
        self._scheduler.shutdown(wait=True)
        self._stop_handler()

    def join(self) -> None:
        """Wait for the work to finish and the machines to stop (after close or terminate).

        After ``close()``, unread ``imap`` input is submitted at once (as the standard library
        reads it eagerly) and its results wait in the iterator; after ``terminate()`` nothing
        waits for the feeders, which may be blocked in the user's input iterator.
        """
        if self._state == RUN:
            raise ValueError("Pool is still running")
        if self._state == CLOSE:
            for it, feeder in self._live_feeders().items():
                it._set_feed(_ALL)
                feeder.join()
        self._scheduler.shutdown(wait=True)
        self._stop_handler()

    def _live_feeders(self) -> dict[IMapIterator, threading.Thread]:
        with self._feeders_lock:
            return dict(self._feeders)

    def _stop_handler(self) -> None:
        if self._handler.is_alive():
            self._results.put(None)
            if threading.current_thread() is not self._handler:
                self._handler.join()

    def __enter__(self) -> Pool:
        self._check_running()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.terminate()

    def __reduce__(self) -> Any:
        raise NotImplementedError(
            "pool objects cannot be passed between processes or pickled")

    def __del__(self, _warn: Any = warnings.warn) -> None:
        if getattr(self, "_state", None) == RUN:
            _warn(f"unclosed running multiprocessing pool {self!r}", ResourceWarning,
                  source=self)

    def __repr__(self) -> str:
        return (f"<bigexec.Pool state={getattr(self, '_state', None)} "
                f"processes={getattr(self, '_processes', None)}>")

