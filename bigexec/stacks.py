"""The stacks of this process's threads: sampled for a flame graph, or dumped as text.

- :func:`sample_stacks` is a sampling profiler; its counts are what
  :func:`bigexec.profile_formats.collapsed_text` writes for ``flamegraph.pl`` and speedscope.
- :func:`thread_stacks` is a dump of every thread's stack.

Both look at the other threads from the calling one, through ``sys._current_frames()``::

    calling thread                                    every other thread
    sample_stacks ── lowers the GIL switch interval ──> gives the GIL away sooner
        │  every ~interval: thread CPU clocks + sys._current_frames()
        └─> counts[stack] += samples earned by the CPU the thread used since the last tick

The switch interval is process-wide and sample_stacks calls may overlap (two profile requests
on one machine): the first call in saves the interval, the last one out puts it back.
"""

from __future__ import annotations

import os
import random
import sys
import threading
import time
import traceback
from collections import Counter
from types import CodeType, FrameType

from .thread_clocks import thread_cpu_times

__all__ = ["SAMPLE_INTERVAL", "sample_stacks", "thread_stacks"]

#: Seconds of CPU time one sample of :func:`sample_stacks` stands for, unless told otherwise:
#: what turns a stack's count into seconds (a flame graph's widths, speedscope's weights).
SAMPLE_INTERVAL = 0.005


# --- the GIL switch interval, shared by overlapping samplers ---------------------------------

_switch_lock = threading.Lock()
_switch_users = 0  # sample_stacks calls running now
_switch_saved = 0.0  # the interval before the first of them lowered it


def _shorten_switch_interval(target: float) -> None:
    global _switch_users, _switch_saved
    with _switch_lock:
        if _switch_users == 0:
            _switch_saved = sys.getswitchinterval()
        _switch_users += 1
        if target < sys.getswitchinterval():
            sys.setswitchinterval(target)


def _restore_switch_interval() -> None:
    global _switch_users
    with _switch_lock:
        _switch_users -= 1
        if _switch_users == 0:
            sys.setswitchinterval(_switch_saved)


# --- sampling --------------------------------------------------------------------------------


def _frame_label(code: CodeType, line: int | None) -> str:
    label = f"{code.co_name} ({os.path.basename(code.co_filename)}:{line or 0})"
    # ";" separates frames and a newline ends a record in the collapsed format.
    return label.replace(";", ":").replace("\n", " ")


def sample_stacks(
    seconds: float,
    *,
    interval: float = SAMPLE_INTERVAL,
    stop: threading.Event | None = None,
) -> dict[str, int]:
    """Sample the stacks of this process's threads for a flame graph.

    Every ``interval`` seconds, for ``seconds`` (less if ``stop`` is set), takes every
    thread's stack and counts it for the threads that used CPU since the previous sample.
    The counts are proportional to CPU time: a thread earns one sample per ``interval`` of
    CPU it used, so a thread on a core all the time gets one per tick and a thread that
    wakes for a few microseconds now and then gets (almost) none. The sampler's own thread is
    skipped.

    The sampler needs the GIL to look at the other threads, so it sees each of them where it
    last gave the GIL away. A thread that releases the GIL often (I/O, a blocking lock,
    ``os.urandom``) would be seen there every time, however little it spends there; for the
    duration of the call the GIL switch interval is therefore lowered to ``interval / 10``,
    so that the sampler gets the GIL within a fraction of an interval, wherever the running
    thread is. Threads blocked on a lock are still seen at the line that waits for it, which
    is what shows lock contention.

    Returns ``{"outer (file.py:12);...;inner (file.py:40)": count}``, frames outermost first,
    each as ``func (basename:line)``.
    """
    if not seconds >= 0:
        raise ValueError(f"seconds must be >= 0, not {seconds!r}")
    if not interval > 0:
        raise ValueError(f"interval must be > 0, not {interval!r}")
    waiter = stop if stop is not None else threading.Event()
    counts: Counter[str] = Counter()
    _shorten_switch_interval(max(interval / 10, 1e-4))
    try:
        _sample_loop(seconds, interval, waiter, counts)
    finally:
        _restore_switch_interval()
    return dict(counts)


def _sample_loop(seconds: float, interval: float, waiter: threading.Event,
                 counts: Counter[str]) -> None:
    me = threading.get_ident()
    labels: dict[tuple[CodeType, int | None], str] = {}
    credit: dict[int, float] = {}
    # A fixed period can lock in phase with a thread's own cycle (work, release the GIL, work)
    # and see it at the same point every time; a random period cannot.
    jitter = random.Random()
    last = thread_cpu_times()
    deadline = time.monotonic() + seconds
    while True:
        remaining = deadline - time.monotonic()
        pause = interval * jitter.uniform(0.5, 1.5)
        if remaining <= 0 or waiter.wait(min(pause, remaining)):
            break
        now = thread_cpu_times()
        for ident, frame in sys._current_frames().items():
            if ident == me or ident not in now:
                continue  # unknown to threading: no clock to tell whether it ran
            clock = now[ident]
            before = last.get(ident)
            # A thread born since the last sample has spent all its CPU time in between.
            if before is not None and before.native_id == clock.native_id:
                used = clock.seconds - before.seconds
            else:
                used = clock.seconds
            earned = credit.get(ident, 0.0) + max(0.0, used)
            n = int(earned / interval)
            credit[ident] = earned - n * interval
            if not n:
                continue
            parts = []
            f: FrameType | None = frame
            while f is not None:
                key = (f.f_code, f.f_lineno)
                label = labels.get(key)
                if label is None:
                    label = labels[key] = _frame_label(f.f_code, f.f_lineno)
                parts.append(label)
                f = f.f_back
            parts.reverse()
            counts[";".join(parts)] += n
        last = now


# --- thread dump -----------------------------------------------------------------------------


def thread_stacks() -> str:
    """The stack of every thread of this process, as text.

    One block per thread: a header with its name, ident, native id and daemon flag, then its
    stack formatted like a traceback (innermost call last). The main thread comes first.
    """
    threads = {t.ident: t for t in threading.enumerate()}
    main = threading.main_thread().ident

    def order(item: tuple[int, FrameType]) -> tuple[bool, str, int]:
        t = threads.get(item[0])
        return (item[0] != main, t.name if t is not None else "", item[0])

    blocks = []
    for ident, frame in sorted(sys._current_frames().items(), key=order):
        t = threads.get(ident)
        if t is None:
            header = f"Thread <not from threading> ident={ident}"
        else:
            header = (f"Thread {t.name!r} ident={ident} native_id={t.native_id} "
                      f"daemon={t.daemon}")
        blocks.append(header + "\n" + "".join(traceback.format_stack(frame)))
    return "\n".join(blocks)
