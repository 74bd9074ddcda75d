"""Work for the ec2 end-to-end tests: a module of the driver's own (not installed), so that it
reaches the instances in the driver's code bundle, and so do the pickles that name it."""

from __future__ import annotations

import os
import time


def square_slowly(x: int, seconds: float = 0.0) -> tuple[int, int]:
    """``x * x`` and the pid of the worker that computed it."""
    if seconds:
        time.sleep(seconds)
    return x * x, os.getpid()
