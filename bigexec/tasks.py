"""Running plain functions as tasks on machines: the service behind Executor and Pool.

    driver (Scheduler slot thread)                      machine (TaskRunner service)
    ──────────────────────────────                      ────────────────────────────
    call("<svc>.run", [(fn, args, kwargs), ...]) ────>  for each task, in order:
                                                            run it, time it
    read the streamed reply, one frame per task  <────      yield header + result or error
    (each result completes its future at once)

A batch of small tasks travels in one RPC, and their results come back as they finish, so a
machine that dies mid-batch loses only the task it was running: the driver knows which
finished. The reply frame of a task is ``_HEADER`` (index, outcome, seconds) followed by the
codec message of its result, or an error tuple. A result that cannot be pickled fails its own
task (outcome ``UNPICKLABLE_RESULT``) and the batch goes on.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

from .rpc import codec, wire

__all__ = ["TaskRunner", "run_chunk", "OK", "FAILED", "UNPICKLABLE_RESULT", "decode_frame"]

OK, FAILED, UNPICKLABLE_RESULT = 0, 1, 2
_HEADER = struct.Struct("<IBd")


def run_chunk(fn: Callable[..., Any], chunk: list[tuple]) -> list[Any]:
    """Apply ``fn`` to each argument tuple of ``chunk`` (``map`` with ``chunksize > 1``)."""
    return [fn(*args) for args in chunk]


def run_star_chunk(fn: Callable[..., Any], chunk: list[Any]) -> list[Any]:
    """Apply ``fn`` to each item of ``chunk`` (``Pool.map``'s chunks hold single items)."""
    return [fn(x) for x in chunk]


class TaskRunner:
    """Runs batches of ``(fn, args, kwargs)`` and streams back each result as it finishes.

    ``initializer(*initargs)`` runs once, when the service arrives on the machine; if it
    raises, the machine fails to boot and the executor learns why.
    """

    def __init__(self, initializer: Callable[..., Any] | None = None,
                 initargs: tuple = ()) -> None:
        self.initializer = initializer
        self.initargs = initargs
        self.tasks_run = 0
        self.tasks_failed = 0
        self.task_seconds = 0.0
        self.running = 0

    def init(self, b: Any) -> None:
        if self.initializer is not None:
            self.initializer(*self.initargs)

    def _bigexec_metrics(self) -> dict[str, float]:
        return {"tasks_run": self.tasks_run, "tasks_failed": self.tasks_failed,
                "task_seconds": self.task_seconds, "tasks_running": self.running}

    def run(self, batch: list[tuple[Callable[..., Any], tuple, dict]], ctx: Any) -> Iterator[bytes]:
        """Run the tasks in order; stream one reply frame per task as it finishes."""
        return self._results(batch, ctx)

    def run_one(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> bytes:
        """Run one task; its reply frame, as a plain reply."""
        return next(self._results([(fn, args, kwargs)], None))

    def _results(self, batch: list[tuple[Callable[..., Any], tuple, dict]],
                 ctx: Any) -> Iterator[bytes]:
        for index, (fn, args, kwargs) in enumerate(batch):
            if ctx is not None and ctx.cancelled:  # the driver gave up on the rest
                return
            t0 = time.perf_counter()
            self.running += 1
            try:
                value = fn(*args, **kwargs)
            except BaseException as exc:  # a task's failure is its result
                outcome, payload = FAILED, wire.encode_error(exc)
                self.tasks_failed += 1
            else:
                try:
                    outcome, payload = OK, codec.dumps_bytes(value)
                except codec.EncodeError as exc:
                    outcome, payload = UNPICKLABLE_RESULT, wire.encode_error(exc)
            value = None  # do not keep the task's result alive while the next one runs
            seconds = time.perf_counter() - t0
            self.running -= 1
            self.tasks_run += 1
            self.task_seconds += seconds
            yield _HEADER.pack(index, outcome, seconds) + payload

    def count(self) -> int:
        """How many tasks this machine has run."""
        return self.tasks_run


def decode_frame(frame: bytes) -> tuple[int, int, float, memoryview]:
    """Split a reply frame into (index, outcome, seconds, payload)."""
    index, outcome, seconds = _HEADER.unpack_from(frame, 0)
    return index, outcome, seconds, memoryview(frame)[_HEADER.size :]
