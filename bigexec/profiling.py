"""The CPU profile of the current process: yappi, with the frames it cannot see booked anyway.

:func:`cpu_profile` runs yappi (CPU or wall clock, every thread) for a while and returns the
profile in the ``pstats`` file format; the Supervisor calls it on each machine and the driver
merges the results (:func:`bigexec.profile_formats.merge_pstats`).

This module also re-exports, so that ``bigexec.profiling.<name>`` keeps working for every
name it has always had: the merging and rendering of profiles (:func:`merge_pstats`,
:func:`pstats_bytes`, :func:`to_text`, :func:`to_callgrind`, :func:`merge_collapsed`,
:func:`collapsed_text`, ``FuncKey``) from :mod:`bigexec.profile_formats`, and the stack
sampler and thread dump (:func:`sample_stacks`, :func:`thread_stacks`) from
:mod:`bigexec.stacks`.

yappi alone gets two things wrong for the main use case, code that is *already running* when
the profile starts (a service method in a server thread): it never hears of frames entered
before ``yappi.start()``, and it only books a function's time when the function returns, so
a frame still running at ``yappi.stop()`` gets nothing. :func:`cpu_profile` therefore

1. seeds yappi's call stack of every thread with the frames that thread is running, at the
   thread's first call event after the start (through yappi's tag callback, the only hook
   that runs *in* the profiled thread);
2. at the end, makes every running thread report a return for each of its live frames, at its
   next call event, so that frames still running are booked like finished calls;
3. books whatever yappi could not see (a loop that makes no call at all, a thread blocked at
   the end) from per-thread clocks: the time a thread used in the window minus what yappi
   booked for it goes to the frames that thread was running.

One profile's data crosses threads through its :class:`_Session`::

    profiling thread (cpu_profile)              every profiled thread (yappi's tag callback)
    begin: clocks, who is alive
    yappi.start ───────────────────────────────> first call event: _seed (seeded[ident])
      ... the window ...
    flush: flushing = True ────────────────────> next call event: _flush (flushed[ident]),
      waits for the busy threads                  then drops its profile hook
    yappi.stop, end: clocks, stop frames
    collect: yappi's stats + seeded/flushed/clocks -> one pstats table
"""

from __future__ import annotations

import dis
import marshal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import CodeType, FrameType
from typing import NamedTuple

# yappi ships no type hints and has no stub package: its objects are Any here.
import yappi

from .profile_formats import (
    FuncKey,
    StatsTable,
    collapsed_text,
    merge_collapsed,
    merge_pstats,
    pstats_bytes,
    to_callgrind,
    to_text,
)
from .profile_graph import CallGraph, StackFrame
from .stacks import sample_stacks, thread_stacks
from .thread_clocks import ThreadClock, thread_cpu_times

__all__ = [
    "FuncKey",
    "ProfileBusy",
    "collapsed_text",
    "cpu_profile",
    "merge_collapsed",
    "merge_pstats",
    "pstats_bytes",
    "sample_stacks",
    "thread_stacks",
    "to_callgrind",
    "to_text",
]

_BUSY = "a CPU profile is already running in this process"


class ProfileBusy(RuntimeError):
    """A CPU profile is already running in the process asked to profile: yappi has one session
    per process, so a second profile has to wait until the first ends."""

_CLOCKS = ("cpu", "wall")

# yappi has one global session per process.
_session_lock = threading.Lock()

# How long cpu_profile waits, after the window, for running threads to report their live
# frames. Busy threads answer within a GIL switch interval or two; the wait stops early once
# the threads still to answer are all blocked (their CPU clocks stand still).
_FLUSH_MAX_WAIT = 0.25
_FLUSH_POLL = 0.005
_FLUSH_IDLE_POLLS = 4

# Unbooked time below this is clock noise, not a frame yappi missed.
_GAP_MIN = 0.001

# yappi's C hook, which takes (frame, event, arg) like a sys.setprofile function: calling it
# by hand is how frames yappi never saw enter or leave are pushed and popped.
_ProfileEvent = Callable[[FrameType, str, object], None]
_yappi_c = getattr(yappi, "_yappi", None)
_profile_event: _ProfileEvent | None = getattr(_yappi_c, "_profile_event", None)
_YAPPI_FILE = getattr(yappi, "__file__", None) or "yappi.py"
_MISSING = object()
_get_ident = threading.get_ident

# Opcodes at which a frame sits while it calls a C function. A "c_call" event comes from such
# an instruction of the calling frame; a "call" event comes from the first instruction of the
# new frame (or from the RESUME of a generator), never from a call instruction.
_CALL_OPCODES = frozenset(
    op
    for name, op in dis.opmap.items()
    if (name.startswith("CALL") or name == "PRECALL") and "INTRINSIC" not in name
)


def _clock_now(clock: str) -> float:
    """The calling thread's time on yappi's clock."""
    return time.thread_time() if clock == "cpu" else time.perf_counter()


# --- the profile -----------------------------------------------------------------------------


def cpu_profile(
    seconds: float,
    *,
    stop: threading.Event | None = None,
    builtins: bool = False,
    clock: str = "cpu",
) -> bytes:
    """Profile every thread of this process for ``seconds`` and return a pstats file's bytes.

    Runs yappi on all threads, those already running (their current frames included, see the
    module docstring) and those started during the window. The calling thread is left out of
    the result: it only waits. Returns early when ``stop`` is set.

    ``builtins=False`` (the default) leaves C functions out of the profile and books their time
    to the Python function that called them, as cProfile does. ``builtins=True`` keeps them as
    entries of their own, such as ``<method 'acquire' of '_thread.lock' objects>``.
    ``clock="cpu"`` (the default) measures each thread's CPU time; ``clock="wall"`` measures
    elapsed time, which includes waiting for locks, I/O and the GIL.

    The result is the marshal'd dict that ``pstats.Stats(path)`` loads. Raises ProfileBusy (a
    RuntimeError) if another profile is running in this process, ValueError on bad arguments.
    """
    if not seconds >= 0:
        raise ValueError(f"seconds must be >= 0, not {seconds!r}")
    if clock not in _CLOCKS:
        raise ValueError(f"clock must be one of {_CLOCKS}, not {clock!r}")
    if not _session_lock.acquire(blocking=False):
        raise ProfileBusy(_BUSY)
    try:
        if yappi.is_running():
            # Someone else drives yappi directly: stopping or clearing it would ruin theirs.
            raise ProfileBusy(_BUSY)
        previous_clock = yappi.get_clock_type()
        try:
            return _run_profile(seconds, stop, builtins, clock)
        finally:
            yappi.stop()
            yappi.set_tag_callback(None)
            yappi.clear_stats()
            try:
                yappi.set_clock_type(previous_clock)
            except yappi.YappiError:
                pass
    finally:
        _session_lock.release()


def _run_profile(seconds: float, stop: threading.Event | None, builtins: bool,
                 clock: str) -> bytes:
    session = _Session(clock)
    yappi.clear_stats()
    yappi.set_clock_type(clock)
    yappi.set_tag_callback(session.tag)
    session.begin()
    # Builtins are always recorded: folding their time into their callers needs them.
    yappi.start(builtins=True, profile_threads=True)
    if stop is None:
        time.sleep(seconds)
    else:
        stop.wait(seconds)
    session.flush()
    yappi.stop()
    session.end()
    return marshal.dumps(session.collect(keep_builtins=builtins))


class _Seed(NamedTuple):
    """A thread's seeding: when it happened (on yappi's clock) and the frames it pushed."""

    at: float
    codes: list[FuncKey]  # outermost first, as (filename, first line, name)


class _Session:
    """The state of one cpu_profile call, shared with yappi's tag callback.

    Each profiled thread goes, in its own tag callback, from unseen to ``seeded`` (its first
    call event in the window) and, once ``flushing`` is set, to ``flushed`` (its next call
    event); a thread blocked from start to end stays unseen. The profiling thread writes
    ``flushing`` and reads the two dicts; each thread writes only its own ident's entries.
    """

    def __init__(self, clock: str) -> None:
        self.clock = clock
        self.profiler = threading.get_ident()
        self.flushing = False
        self.seeded: dict[int, _Seed] = {}
        self.flushed: dict[int, float] = {}  # ident -> when, on yappi's clock
        self.start: dict[int, ThreadClock] = {}
        self.stop: dict[int, ThreadClock] = {}
        self.stop_frames: dict[int, FrameType] = {}
        self.alive_at_start: set[int] = set()
        self._own_code: frozenset[CodeType] = frozenset(
            {self.tag.__code__, self._seed.__code__, self._flush.__code__,
             self._live_stack.__code__}
        )

    def _clocks(self) -> dict[int, ThreadClock]:
        if self.clock == "cpu":
            return thread_cpu_times()
        now = time.perf_counter()
        return {t.ident: ThreadClock(t.native_id or 0, now)
                for t in threading.enumerate() if t.ident is not None}

    def begin(self) -> None:
        self.alive_at_start = set(sys._current_frames())
        self.start = self._clocks()

    def end(self) -> None:
        self.stop = self._clocks()
        self.stop_frames = sys._current_frames()

    # The tag callback: yappi calls it, in the profiled thread, on every call event. That makes
    # it the one place where code can run in each thread while yappi holds its stack. It must
    # stay cheap: the fast path is a set lookup.
    def tag(self) -> int:
        ident = _get_ident()
        if ident == self.profiler:
            return 0
        if self.flushing:
            if ident not in self.flushed:
                self._flush(ident)
        elif ident not in self.seeded:
            self._seed(ident)
        return 0

    def _live_stack(self) -> list[FrameType]:
        """The frames running in this thread at the current call event, outermost first."""
        frame: FrameType | None = sys._getframe(1)
        # Skip this callback and yappi's Python-level hook (new threads' first event).
        while frame is not None and (frame.f_code in self._own_code
                                     or frame.f_code.co_filename == _YAPPI_FILE):
            frame = frame.f_back
        if frame is None:
            return []
        code = frame.f_code.co_code
        lasti = frame.f_lasti
        if not (0 <= lasti < len(code) and code[lasti] in _CALL_OPCODES):
            # A "call" event: this frame is the one being entered, yappi pushes it itself.
            frame = frame.f_back
        stack = []
        while frame is not None:
            stack.append(frame)
            frame = frame.f_back
        stack.reverse()
        return stack

    def _seed(self, ident: int) -> None:
        # Mark first: the events below re-enter this callback.
        self.seeded[ident] = _Seed(_clock_now(self.clock), [])
        event = _profile_event
        if event is None:
            return
        try:
            stack = self._live_stack()
        except Exception:  # noqa: BLE001 - an exception here would make yappi drop the hook
            return
        for frame in stack:
            code = frame.f_code
            owner = _MISSING
            if code.co_argcount and code.co_varnames[0] == "self":
                try:
                    owner = frame.f_locals.get("self", _MISSING)
                except Exception:  # noqa: BLE001 - the frame still has to be pushed
                    pass
            if owner is _MISSING:
                _push_function(event, frame)
            else:
                _push_method(event, frame, owner)
        codes = [(f.f_code.co_filename, f.f_code.co_firstlineno, f.f_code.co_name)
                 for f in stack]
        self.seeded[ident] = self.seeded[ident]._replace(codes=codes)

    def _flush(self, ident: int) -> None:
        self.flushed[ident] = _clock_now(self.clock)
        if _profile_event is not None:
            try:
                stack = self._live_stack()
            except Exception:  # noqa: BLE001 - an exception here would make yappi drop the hook
                stack = []
            # One return per live frame, innermost first: yappi books each as a finished call.
            for frame in reversed(stack):
                _profile_event(frame, "return", None)
        # Nothing this thread does from now on belongs to the window. Removing the profile
        # hook from inside the hook is allowed (the interpreter re-reads it afterwards).
        sys.setprofile(None)

    def flush(self) -> None:
        """Ask every profiled thread to book its live frames, and wait for the busy ones."""
        self.flushing = True
        deadline = time.monotonic() + _FLUSH_MAX_WAIT
        idle_polls = 0
        last: dict[int, ThreadClock] = {}
        while time.monotonic() < deadline:
            time.sleep(_FLUSH_POLL)
            alive = sys._current_frames()
            pending = [i for i in self.seeded if i not in self.flushed and i in alive]
            if not pending:
                return
            if self.clock == "wall":
                # Blocked threads answer at their next call, which may never come; a wall
                # profile books their time from the stop stacks instead.
                continue
            now = thread_cpu_times()
            moved = any(now.get(i) != last.get(i) for i in pending)
            last = now
            idle_polls = 0 if moved else idle_polls + 1
            if idle_polls >= _FLUSH_IDLE_POLLS:
                return

    def collect(self, keep_builtins: bool) -> StatsTable:
        """The profile of every thread but the profiler's, as one pstats table."""
        graph = CallGraph()
        booked: dict[int, float] = {}
        for ctx in yappi.get_thread_stats():
            if ctx.tid == self.profiler:
                continue
            seconds = graph.add_thread(yappi.get_func_stats(filter={"ctx_id": ctx.id}),
                                       keep_builtins)
            booked[ctx.tid] = booked.get(ctx.tid, 0.0) + seconds
        for stack, seconds in self._gaps(booked):
            graph.charge(stack, seconds)
        return graph.table()

    def _gaps(self, booked: dict[int, float]) -> Iterator[tuple[list[StackFrame], float]]:
        """(frames, seconds) for the time each thread used in the window that yappi missed."""
        for ident, frame in self.stop_frames.items():
            if ident == self.profiler or ident not in self.stop:
                continue
            native, end = self.stop[ident]
            if ident in self.start and self.start[ident].native_id == native:
                begin = self.start[ident].seconds
            elif self.clock == "cpu" and ident not in self.alive_at_start:
                begin = 0.0  # started during the window: all its CPU time is in it
            else:
                continue  # no clock reading from the start of the window
            if ident in self.flushed:
                end = self.flushed[ident]
            pre = 0.0
            if ident in self.seeded:
                # Before its first call event the thread ran in the frames it was seeded with.
                seed = self.seeded[ident]
                pre = max(0.0, seed.at - begin)
                if pre >= _GAP_MIN and seed.codes:
                    yield [StackFrame(c, None) for c in seed.codes], pre
            rest = end - begin - pre - booked.get(ident, 0.0)
            if rest >= _GAP_MIN and ident not in self.flushed:
                # Frames yappi never saw finish: a loop without calls, a blocked thread.
                chain = []
                f: FrameType | None = frame
                while f is not None:
                    code = f.f_code
                    key = (code.co_filename, code.co_firstlineno, code.co_name)
                    chain.append(StackFrame(key, f))
                    f = f.f_back
                chain.reverse()
                yield chain, rest


# yappi names a method "Class.method" after the ``self`` it finds in PyEval_GetLocals(), the
# locals of the frame running when the event arrives. For a real event that is the frame being
# entered; for an event sent by _Session._seed it is the sender's frame. Hence two senders: one
# whose own ``self`` is the seeded frame's ``self``, one without a ``self`` at all.
def _push_method(event: _ProfileEvent, frame: FrameType, self: object) -> None:
    event(frame, "call", None)


def _push_function(event: _ProfileEvent, frame: FrameType) -> None:
    event(frame, "call", None)
