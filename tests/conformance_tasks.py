"""What the Executor and Pool conformance suites share: module-level tasks (so that the
standard library's pools can pickle them by reference) and small helpers."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import threading
import time
import uuid

import pytest

FORK = multiprocessing.get_context("fork")
BOOT = 30.0  # upper bound for anything that may wait for machines to boot


class ConformanceError(Exception):
    """An exception class of this module: must come back with its own type."""


class RefusesToPickle:
    """An argument or result whose pickling raises ``error`` (an exception instance)."""

    def __init__(self, error):
        self.error = error

    def __reduce__(self):
        raise self.error


def refusing_result(error):
    return RefusesToPickle(error)


# what pickling may raise; the standard library's pools report it as it is
PICKLING_ERRORS = [RuntimeError("refuses to be pickled"),
                   pickle.PicklingError("refuses to be pickled")]


def square(x):
    return x * x


def add(a, b):
    return a + b


def identity(x):
    return x


def capture(*args, **kwargs):
    return args, kwargs


def raise_value_error(msg):
    raise ValueError(msg)


def raise_conformance_error(msg):
    raise ConformanceError(msg)


def make_lock(_=None):
    return threading.Lock()


def touch(dirpath, name=None):
    name = name or f"{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex}"
    with open(os.path.join(dirpath, name), "w"):
        pass


def rendezvous(dirpath, n, timeout=BOOT / 2):
    """Arrive, then wait until ``n`` tasks have arrived: True only if ``n`` ran at once."""
    touch(dirpath)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(os.listdir(dirpath)) >= n:
            return True
        time.sleep(0.005)
    return False


_INIT_VALUE = None


def record_init(dirpath, value):
    global _INIT_VALUE
    _INIT_VALUE = value
    touch(dirpath)


def get_init_value(_=None):
    return _INIT_VALUE


def skip_for(impl, skip):
    name, reason = skip
    if impl == name:
        pytest.skip(reason)


# --- helpers both suites use -----------------------------------------------------------------

MARKS = [
    pytest.mark.timeout(60),
    # an exception nobody sees (in __del__, in a background thread) is a bug here too
    pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning"),
]


def bigexec_maker(cls_name, system):
    """A constructor of ``bigexec.<cls_name>`` on ``system``, like the stdlib's classes."""

    def make(*args, **kwargs):
        import bigexec  # lazily: the stdlib params run without it

        return getattr(bigexec, cls_name)(*args, system=system, **kwargs)

    return make


def within(what, fn, timeout=20.0):
    """Call ``fn()``, bounded: returns what went wrong, or None."""
    errors = []

    def run():
        try:
            fn()
        except BaseException as e:  # reported below
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        return f"{what} did not return within {timeout} s"
    if errors:
        return f"{what} raised {errors[0]!r}"
    return None
