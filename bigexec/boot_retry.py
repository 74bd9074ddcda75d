"""When a machine that failed to boot is replaced: the policy that keeps a cluster its size.

A machine that fails to boot is replaced at once while no machine runs; while others run the
tasks (or may yet: several still booting after ``MAX_BOOT_FAILURES`` failures in a row), after
a wait that grows with each failure in a row (``BOOT_RETRY_BACKOFF``: 1 s doubling to 60 s,
jittered), for as long as it takes. It is not replaced when its system cannot start more
machines, nor after ``MAX_BOOT_FAILURES`` in a row with none left: then no machine can be had.
"""

from __future__ import annotations

import random

from .machine import Backoff

__all__ = ["BOOT_RETRY_BACKOFF", "MAX_BOOT_FAILURES", "next_boot_wait", "retry_wait"]

#: Boot failures in a row, with no machine left, before the scheduler gives up (breaks).
MAX_BOOT_FAILURES = 3
#: Waits between boot retries while other machines live.
BOOT_RETRY_BACKOFF = Backoff(first=1.0, most=60.0, factor=2.0)


def retry_wait(failures: int, backoff: Backoff) -> float:
    """The wait before the next boot after ``failures`` in a row (from 1), jittered by a
    quarter either way so that machines failing together do not retry together."""
    wait = min(backoff.most, backoff.first * backoff.factor ** (failures - 1))
    return wait * random.uniform(0.75, 1.25)


def next_boot_wait(failures: int, *, can_replace: bool, running: bool, booting: bool,
                   backoff: Backoff) -> float | None:
    """After a failed boot (``failures`` in a row): how many seconds to wait before starting
    a replacement (0.0: at once), or None for none (no machine can be had this way).
    ``running``: some machine runs tasks; ``booting``: some other machine is still booting."""
    if not can_replace:
        return None
    if running or (booting and failures >= MAX_BOOT_FAILURES):
        return retry_wait(failures, backoff)
    if failures < MAX_BOOT_FAILURES:
        return 0.0
    return None
