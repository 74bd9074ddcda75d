"""Tasks and their batches: what goes into one call to a machine, what comes back, and what a
lost batch costs its tasks.

    queue ──> batch_size(): as many tasks as make about ``BATCH_SECONDS`` of work at the
              measured task time (TaskTimer), shared fairly among the slots; one alone
              until a time is measured, and a suspect always alone
          ──> one call; reply_records() reads its reply: (position, outcome, seconds, value)
              per task, as each finishes
          ──> the machine died before the batch ended: charge_loss() says what the
              unfinished tasks pay (see there)

Task states (a task's future follows the standard ``concurrent.futures`` states)::

    queued (future PENDING; Future.cancel() works) ──take──> dispatched (future RUNNING)
    dispatched ──result/exception──> done
    dispatched ──machine died──> queued again (future stays RUNNING), or, after
                                 ``max_crashes`` deaths while it ran, WorkerLostError
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from concurrent.futures import Future, InvalidStateError
from typing import Any, NamedTuple

from .direct import TaskFuture
from .errors import WorkerLostError
from .rpc import codec
from .tasks import FAILED, OK, decode_frame

__all__ = ["BATCH_SECONDS", "MAX_BATCH", "Record", "Task", "TaskTimer", "batch_size",
           "charge_loss", "lost_error", "reply_records", "settle"]

BATCH_SECONDS = 0.02  # aim a batch at this much work: small tasks share one round trip
MAX_BATCH = 512


class Task:
    """One function call and the future that receives its outcome."""

    __slots__ = ("fn", "args", "kwargs", "future", "crashes", "started", "suspect")

    def __init__(self, fn: Callable[..., Any], args: tuple, kwargs: dict,
                 future: Future | None = None) -> None:
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.future: Future = future if future is not None else TaskFuture()
        self.crashes: list[str] = []  # why each machine that died while it ran died
        self.started = False
        self.suspect = False  # was in a batch that killed its machine: runs alone from now on

    def describe(self) -> str:
        name = getattr(self.fn, "__qualname__", None) or repr(self.fn)
        if isinstance(self.fn, functools.partial):
            name = f"partial({getattr(self.fn.func, '__qualname__', self.fn.func)!s})"
        try:
            args = ", ".join([repr(a) for a in self.args]
                             + [f"{k}={v!r}" for k, v in self.kwargs.items()])
        except Exception:
            args = "..."
        if len(args) > 120:
            args = args[:117] + "..."
        return f"{name}({args})"


class TaskTimer:
    """The measured time of a task: a moving average of the times the machines report."""

    __slots__ = ("mean",)

    def __init__(self) -> None:
        self.mean: float | None = None  # None until a task has finished

    def add(self, seconds: float) -> None:
        a = self.mean
        self.mean = seconds if a is None else 0.8 * a + 0.2 * seconds


def batch_size(queued: int, first_is_suspect: bool, mean_seconds: float | None,
               slots: int) -> int:
    """How many of ``queued`` tasks one slot takes: about ``BATCH_SECONDS`` of work, no more
    than its share of the queue among ``slots``, and 1 until a task time is measured or when
    the first task is a suspect."""
    if mean_seconds is None or first_is_suspect:
        n = 1  # measure before batching; a suspect runs alone
    else:
        n = int(BATCH_SECONDS / max(mean_seconds, 1e-7))
    return max(1, min(n, MAX_BATCH, math.ceil(queued / max(slots, 1))))


class Record(NamedTuple):
    """One task's outcome in a reply."""

    position: int  # in its batch
    outcome: int  # tasks.OK, FAILED or UNPICKLABLE_RESULT
    seconds: float  # how long it ran
    value: Any  # its result (OK), the exception decoding that failed here, or its encoded error


def reply_records(frame: Any) -> Iterator[Record]:
    """The record of each task in a reply frame (``run``'s, or ``run_one``'s whole reply)."""
    if type(frame) is tuple:  # run_one's reply, decoded already
        yield Record(*frame)
        return
    for index, outcome, seconds, value in decode_frame(frame):
        if outcome == OK:
            try:
                value = codec.loads(value)
            except codec.DecodeError as exc:  # fails this task, not the batch
                yield Record(index, FAILED, seconds, exc)
                continue
        yield Record(index, outcome, seconds, value)


def settle(fut: Future, *, result: Any = None, error: BaseException | None = None) -> None:
    """Complete ``fut``, unless it is done already (cancelled, or failed by a shutdown: the
    first word stands)."""
    try:
        if error is None:
            fut.set_result(result)
        else:
            fut.set_exception(error)
    except InvalidStateError:
        pass


def charge_loss(tasks: list[Task], why: str, max_crashes: int) -> Task | None:
    """Charge a machine's death to the unfinished ``tasks`` of its call; return the task that
    has now crashed ``max_crashes`` machines and must fail with ``WorkerLostError`` (its
    ``lost_error``), or None.

    One unfinished task was running: it is charged. Several: any may have been running,
    since the machine sends the results of quick tasks together, so the last ones may have
    finished unseen; none is charged, and each runs alone from now on, so that the next
    death names its task.
    """
    if len(tasks) > 1:
        for t in tasks:
            t.suspect = True
        return None
    first = tasks[0]
    first.crashes.append(why)
    return first if len(first.crashes) >= max_crashes else None


def lost_error(task: Task) -> WorkerLostError:
    """The error of a task that crashed too many machines."""
    return WorkerLostError(task.describe(), task.crashes)
