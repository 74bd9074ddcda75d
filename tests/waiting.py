"""Waiting in tests for something another thread or process does: ``wait_until``."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(what: str, check: Callable[[], object], timeout: float,
               explain: Callable[[], str] = lambda: "", poll: float = 0.05) -> None:
    """Return once ``check()`` is true; AssertionError naming ``what`` (and ``explain()``)
    after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            extra = explain()
            raise AssertionError(f"not within {timeout} s: {what}" + (f": {extra}" if extra
                                                                        else ""))
        time.sleep(poll)
