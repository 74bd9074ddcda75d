"""Marking log records with the machine that wrote them.

On ``local`` (and later ``ec2``) a machine is its own process, and the driver prefixes every
line of its output with the machine's address. On ``threads`` the machines share the driver's
process and its log handlers, so instead every ``logging`` record created while a machine
serves a call carries ``record.machine`` (its address) and a message prefixed with it. Threads
that are not serving a machine's call are left alone.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

__all__ = ["set_machine", "current_machine", "install_record_marking"]

_local = threading.local()
_installed = False
_install_lock = threading.Lock()


def set_machine(label: str | None) -> None:
    """Mark the current thread as working for machine ``label`` (None: for nobody)."""
    _local.machine = label


def current_machine() -> str | None:
    return getattr(_local, "machine", None)


def install_record_marking() -> None:
    """Wrap the log record factory once, so records know their machine."""
    global _installed
    with _install_lock:
        if _installed:
            return
        previous = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            label = getattr(_local, "machine", None)
            record.machine = label or ""
            if label and isinstance(record.msg, str):
                record.msg = f"{label}: {record.msg}"
            return record

        logging.setLogRecordFactory(factory)
        _installed = True
