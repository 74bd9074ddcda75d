"""Running plain functions as tasks on machines: the service behind Executor and Pool.

    driver (Scheduler slot thread)                      machine (TaskRunner service)
    ──────────────────────────────                      ────────────────────────────
    call("<svc>.run", [(fn, args, kwargs), ...]) ────>  for each task, in order:
                                                            run it, time it
    read the streamed reply, one frame per task  <────      yield header + result or error
    (each result completes its future at once)

A batch of small tasks travels in one RPC, and their results come back as they finish, so a
machine that dies mid-batch loses only the tasks whose results have not left yet: the driver
knows which finished. The record of a task is ``_RECORD`` (index, outcome, seconds, payload
length) followed by the codec message of its result, or an error tuple.

On the machine, a batch's tasks run in a thread of their own and hand each record to the
connection's thread, which sends whatever records are waiting as one stream frame: a record
never waits for the next task, yet quick tasks share frames (one TLS record, one read on the
driver: a profile of 5,000 no-op tasks had shown a read per task)::

    task thread:  run task ─> record ─> queue ─> run task ─> record ─> queue ...
    connection thread:        queue ─> [records waiting, joined] ─> one frame ─> socket

A result that cannot be pickled fails its own task (outcome ``UNPICKLABLE_RESULT``) and the
batch goes on. A batch of one goes by ``run_one`` instead, whose plain reply is the tuple
(index, outcome, seconds, result or error) itself.
"""

from __future__ import annotations

import queue
import struct
import threading
import time
import types
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from . import logs, namespaces
from .rpc import codec, wire

__all__ = ["TaskRunner", "run_chunk", "OK", "FAILED", "UNPICKLABLE_RESULT", "decode_frame"]

OK, FAILED, UNPICKLABLE_RESULT = 0, 1, 2
_RECORD = struct.Struct("<IBdI")
_FRAME_BYTES = 256 * 1024  # records joined into one frame, at most (unless one is larger)


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
        self._functions: _LoadedFunctions | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_functions"] = None  # made fresh on the machine
        return state

    def init(self, b: Any) -> None:
        if self.initializer is not None:
            self.initializer(*self.initargs)

    def _bigexec_metrics(self) -> dict[str, float]:
        return {"tasks_run": self.tasks_run, "tasks_failed": self.tasks_failed,
                "task_seconds": self.task_seconds, "tasks_running": self.running}

    def run(self, batch: list[tuple[Callable[..., Any], tuple, dict]], ctx: Any) -> Iterator[bytes]:
        """Run the tasks in order; stream one reply frame per task as it finishes."""
        return self._results(batch, ctx)

    def run_one(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> codec.Encoded:
        """Run one task, as a plain reply: the message of ``(0, outcome, seconds, value)``.

        The result is encoded once, into the reply itself, so a large one is neither joined
        nor copied on its way (a stream's frames must be joined; a batch of one need not).
        """
        outcome, value, seconds = self._run_task(fn, args, kwargs)
        if outcome == OK:
            try:
                return codec.Encoded(codec.dumps((0, OK, seconds, value)))
            except codec.EncodeError as exc:
                outcome, value = UNPICKLABLE_RESULT, wire.encode_error(exc.raised)
        return codec.Encoded(codec.dumps((0, outcome, seconds, value)))

    def _run_task(self, fn: Callable[..., Any], args: tuple,
                  kwargs: dict) -> tuple[int, Any, float]:
        """(OK, value, seconds) or (FAILED, encoded error, seconds)."""
        t0 = time.perf_counter()
        self.running += 1
        try:
            if type(fn) is PickledFunction:
                if self._functions is None:
                    self._functions = _LoadedFunctions()
                fn = self._functions.get(fn.blob)
            outcome, value = OK, fn(*args, **kwargs)
        except BaseException as exc:  # a task's failure is its result
            outcome, value = FAILED, wire.encode_error(exc)
            self.tasks_failed += 1
        seconds = time.perf_counter() - t0
        self.running -= 1
        self.tasks_run += 1
        self.task_seconds += seconds
        return outcome, value, seconds

    def _records(self, batch: list[tuple[Callable[..., Any], tuple, dict]], ctx: Any,
                 stop: threading.Event) -> Iterator[bytes]:
        for index, (fn, args, kwargs) in enumerate(batch):
            if stop.is_set() or (ctx is not None and ctx.cancelled):
                return  # the driver gave up on the rest
            outcome, value, seconds = self._run_task(fn, args, kwargs)
            if outcome == OK:
                try:
                    payload = codec.dumps_bytes(value)
                except codec.EncodeError as exc:
                    outcome, payload = UNPICKLABLE_RESULT, wire.encode_error(exc.raised)
            else:
                payload = value
            value = None  # do not keep the task's result alive while the next one runs
            yield _RECORD.pack(index, outcome, seconds, len(payload)) + payload

    def _results(self, batch: list[tuple[Callable[..., Any], tuple, dict]],
                 ctx: Any) -> Iterator[bytes]:
        records: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        stop = threading.Event()
        label, place = logs.current_machine(), namespaces.current()

        def work() -> None:
            logs.set_machine(label)
            namespaces.set_current(place)
            try:
                for record in self._records(batch, ctx, stop):
                    records.put(record)
            finally:
                records.put(None)

        threading.Thread(target=work, name="bigexec-tasks", daemon=True).start()
        try:
            done = False
            while not done:
                record = records.get()
                if record is None:
                    return
                frame, size = [record], len(record)
                while size < _FRAME_BYTES:  # and whatever else is waiting already
                    try:
                        record = records.get_nowait()
                    except queue.Empty:
                        break
                    if record is None:
                        done = True
                        break
                    frame.append(record)
                    size += len(record)
                yield frame[0] if len(frame) == 1 else b"".join(frame)
        finally:
            stop.set()  # closed early (the driver went away): run no more tasks

    def count(self) -> int:
        """How many tasks this machine has run."""
        return self.tasks_run


def decode_frame(frame: bytes) -> Iterator[tuple[int, int, float, memoryview]]:
    """The records of a stream frame, as (index, outcome, seconds, payload)."""
    view = memoryview(frame)
    pos, end = 0, len(view)
    while pos < end:
        index, outcome, seconds, n = _RECORD.unpack_from(view, pos)
        pos += _RECORD.size
        if pos + n > end:
            raise codec.DecodeError(f"a task record of {n} bytes overruns its frame")
        yield index, outcome, seconds, view[pos : pos + n]
        pos += n


class PickledFunction:
    """A function already pickled by value, so that a task sends the same bytes again instead
    of pickling the function anew (see ``FunctionCache``)."""

    __slots__ = ("blob",)

    def __init__(self, blob: bytes) -> None:
        self.blob = blob

    def __reduce__(self) -> Any:
        return (PickledFunction, (self.blob,))


codec.register_plain_type(PickledFunction)  # the fast path for the calls that carry one
wire.never_stream(PickledFunction)
_SCALAR_TYPES = (type(None), bool, int, float, complex, str, bytes)


def _stable(value: Any, depth: int = 2) -> Any:
    """A token that changes whenever ``value`` could pickle differently, or None when we
    cannot tell (mutable data): then the function is pickled every time."""
    if isinstance(value, _SCALAR_TYPES):
        return ("v", type(value), value)
    if isinstance(value, types.ModuleType) or isinstance(value, types.BuiltinFunctionType):
        return ("id", id(value))
    if isinstance(value, tuple) and depth:
        parts = [_stable(v, depth - 1) for v in value]
        return None if any(p is None for p in parts) else ("t", tuple(parts))
    if isinstance(value, types.FunctionType):
        if codec.named(value):
            return ("id", id(value))
        return _snapshot(value, depth - 1) if depth else None
    if isinstance(value, type) and codec.named(value):
        return ("id", id(value))
    return None


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _snapshot(fn: types.FunctionType, depth: int = 2) -> Any:
    """Everything that a by-value pickle of ``fn`` captures, as comparable tokens."""
    parts: list[Any] = [("code", id(fn.__code__)), fn.__code__]
    for cell in fn.__closure__ or ():
        try:
            token = _stable(cell.cell_contents, depth)
        except ValueError:  # an empty cell
            token = ("empty",)
        if token is None:
            return None
        parts.append(token)
    for value in (fn.__defaults__, tuple((fn.__kwdefaults__ or {}).items())):
        token = _stable(value, depth)
        if value is not None and token is None:
            return None
        parts.append(token)
    g = fn.__globals__
    for name in sorted(_code_names(fn.__code__)):
        if name in g:
            token = _stable(g[name], depth)
            if token is None:
                return None
            parts.append((name, token))
    return ("fn", tuple(parts))


class _CachedPickle(NamedTuple):
    """A function's pickle in ``FunctionCache``, and the snapshot it is good for."""

    #: What ``_snapshot`` said of the function when it was pickled.
    snapshot: Any
    pickled: PickledFunction


class FunctionCache:
    """Pickles each function shipped by value once, for as long as what it captures stays the
    same.

    A profile of ``submit(f).result()`` with ``f`` defined in ``__main__`` showed cloudpickle
    rebuilding ``f`` from its code object on every call. A function is reused from the cache
    only when everything its pickle would capture (code, closure cells, defaults, referenced
    globals) is immutable or pickled by reference and still the same object; a function that
    reads mutable data (a global dict, a closure over a list) is pickled every time. A cached
    pickle carries the binding tokens of its first pickling: still right, since the globals it
    captures are the same objects (``bigexec.namespaces``).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cache: weakref.WeakKeyDictionary[Any, _CachedPickle] = weakref.WeakKeyDictionary()

    def encode(self, fn: Any) -> Any:
        if not isinstance(fn, types.FunctionType) or codec.named(fn):
            return fn
        snap = _snapshot(fn)
        if snap is None:
            return fn
        with self._lock:
            hit = self._cache.get(fn)
        if hit is not None and hit.snapshot == snap:
            return hit.pickled
        ref = PickledFunction(codec.dumps_bytes(fn))
        with self._lock:
            self._cache[fn] = _CachedPickle(snap, ref)
        return ref


class _LoadedFunctions:
    """The machine's side: unpickle each distinct ``PickledFunction`` once (bounded)."""

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._fns: OrderedDict[bytes, Callable[..., Any]] = OrderedDict()

    def get(self, blob: bytes) -> Callable[..., Any]:
        with self._lock:
            fn = self._fns.get(blob)
            if fn is not None:
                self._fns.move_to_end(blob)
                return fn
        fn = codec.loads(blob)
        with self._lock:
            self._fns[blob] = fn
            if len(self._fns) > self._size:
                self._fns.popitem(last=False)
        return fn
