"""How much CPU time each thread of this process has used: the clock both profilers run on.

:func:`thread_cpu_times` reads every thread's CPU clock in one snapshot. The CPU profile
(:mod:`bigexec.profiling`) uses it to book time yappi missed, the stack sampler
(:mod:`bigexec.stacks`) to give each thread samples in proportion to the CPU it used.
"""

from __future__ import annotations

import threading
import time
from typing import NamedTuple

import psutil

__all__ = ["ThreadClock", "thread_cpu_times"]


class ThreadClock(NamedTuple):
    """One thread's CPU clock at a snapshot.

    The native id tells a thread from a later one that reuses its ``threading`` ident: two
    readings of the same ident are only comparable when their native ids agree.
    """

    native_id: int
    seconds: float


_linux_clocks: bool | None = None


def _linux_thread_clock(native_id: int) -> int:
    # Linux names the CPU clock of thread `tid` as ~tid << 3 | PERTHREAD(4) | SCHED(2), the
    # encoding glibc's pthread_getcpuclockid uses. Going through the native id rather than
    # time.pthread_getcpuclockid(ident) matters: the latter reads the pthread struct, which
    # may be gone once a detached thread has exited, while a stale tid is a clean EINVAL.
    return (~native_id << 3) | 6


def _use_linux_clocks() -> bool:
    global _linux_clocks
    if _linux_clocks is None:
        try:
            time.clock_gettime_ns(_linux_thread_clock(threading.get_native_id()))
            _linux_clocks = True
        except (OSError, OverflowError, AttributeError):
            _linux_clocks = False
    return _linux_clocks


def thread_cpu_times() -> dict[int, ThreadClock]:
    """CPU seconds used so far by each thread ``threading`` knows, by ``threading`` ident.

    A thread that exits during the snapshot is left out.
    """
    natives = {t.ident: t.native_id for t in threading.enumerate()
               if t.ident is not None and t.native_id is not None}
    times: dict[int, ThreadClock] = {}
    if _use_linux_clocks():
        # Nanosecond clocks, a fraction of a microsecond each. /proc and psutil only count
        # whole scheduler ticks (10 ms), coarser than a 5 ms sampling interval, and psutil
        # reads every thread's stat file each time (milliseconds for one snapshot).
        for ident, native in natives.items():
            try:
                ns = time.clock_gettime_ns(_linux_thread_clock(native))
            except OSError:
                continue  # the thread has just exited
            times[ident] = ThreadClock(native, ns / 1e9)
        return times
    try:
        by_tid = {t.id: t.user_time + t.system_time for t in psutil.Process().threads()}
    except (psutil.Error, OSError):
        return times
    for ident, native in natives.items():
        if native in by_tid:
            times[ident] = ThreadClock(native, by_tid[native])
    return times
