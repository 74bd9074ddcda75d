"""Marking log records with the machine that wrote them, without touching the process's logging.

On ``local`` (and later ``ec2``) a machine is its own process, and the driver prefixes every
line of its output with the machine's address. On ``threads`` the machines share the driver's
process and its log handlers, so records say whose they are instead: a record created while a
machine serves a call gets ``record.machine`` (the machine's address; ``""`` outside machines)
and its message prefixed with that address.

Which records are marked, and by whom:

* records of the ``bigexec`` loggers (``bigexec`` and ``bigexec.*``): always, on ``threads``.
  A handler that emits nothing sits on the ``bigexec`` logger and marks each record as it
  passes, before the handlers further up (the user's, on the root logger) see it;
* records of any other logger (the user's service code): only for handlers the user gives a
  ``MachineFilter``, e.g. ``handler.addFilter(bigexec.logs.MachineFilter())``.

Python's logging has no per-record hook that sees every logger's records except the global
record factory (or logger class), and replacing those would change every record of the whole
process, also outside machines: so bigexec leaves them alone, and the user opts in with the
filter for loggers that are not bigexec's.
"""

from __future__ import annotations

import logging
import threading

__all__ = ["MachineFilter", "current_machine", "install_machine_marker", "set_machine"]

_local = threading.local()
_install_lock = threading.Lock()
_LIBRARY_LOGGER = "bigexec"


def set_machine(label: str | None) -> None:
    """Mark the current thread as working for machine ``label`` (None: for nobody)."""
    _local.machine = label


def current_machine() -> str | None:
    """The machine the current thread works for, if any (see ``set_machine``)."""
    return getattr(_local, "machine", None)


class MachineFilter(logging.Filter):
    """Marks each record with the machine its thread works for, and lets it pass.

    Sets ``record.machine`` (``""`` outside machines) and prefixes a machine's messages with
    its address. Add it to a handler (``handler.addFilter(MachineFilter())``) to have records
    of your own loggers marked on ``threads``; a record marked already is left as it is.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "machine"):
            label = current_machine()
            record.machine = label or ""
            if label and isinstance(record.msg, str):
                record.msg = f"{label}: {record.msg}"
        return True


class _MachineMarker(logging.Handler):
    """Emits nothing: on the ``bigexec`` logger, it marks the records passing by."""

    def __init__(self) -> None:
        super().__init__()
        self._mark = MachineFilter()

    def handle(self, record: logging.LogRecord) -> bool:
        self._mark.filter(record)
        return False  # nothing emitted

    def emit(self, record: logging.LogRecord) -> None:  # handle() never calls it
        pass


def install_machine_marker() -> None:
    """Have records of the ``bigexec`` loggers marked with their machine (once)."""
    logger = logging.getLogger(_LIBRARY_LOGGER)
    with _install_lock:
        if not any(isinstance(h, _MachineMarker) for h in logger.handlers):
            logger.addHandler(_MachineMarker())
