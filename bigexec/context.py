"""The per-call context a service method may ask for.

A method that declares a parameter named ``ctx`` receives a ``Context``: the call's deadline
(sent by the caller as a relative timeout, so clocks need not agree), a cancellation flag that
the machine sets when the caller times out or cancels, and the machine's session for calling
other machines. Cancellation is cooperative: Python cannot stop a running thread, so a
long-running method should poll ``ctx.cancelled`` or block in ``ctx.wait``.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .dialer import Dialer

__all__ = ["Context"]


class Context:
    """Deadline, cancellation and session of one remote call."""

    __slots__ = ("call_id", "method", "deadline", "b", "_event")

    def __init__(
        self, call_id: str, method: str, timeout: float | None, b: Dialer | None = None
    ) -> None:
        self.call_id = call_id
        self.method = method
        #: ``time.monotonic()`` value after which the caller has given up, or None.
        self.deadline = None if timeout is None else time.monotonic() + timeout
        #: The session of the machine running the call.
        self.b = b
        self._event = threading.Event()

    @property
    def cancel_event(self) -> threading.Event:
        """Set when the call is cancelled: for code that waits on several things at once."""
        return self._event

    def cancel(self) -> None:
        """Mark the call cancelled (the caller gave up)."""
        self._event.set()

    def remaining(self) -> float | None:
        """Seconds left before the deadline (never negative), or None without one."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    @property
    def cancelled(self) -> bool:
        """True once the caller cancelled the call or its deadline passed."""
        if self._event.is_set():
            return True
        return self.deadline is not None and time.monotonic() >= self.deadline

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the call is cancelled or ``timeout`` passes; return ``cancelled``."""
        remaining = self.remaining()
        if remaining is not None and (timeout is None or remaining < timeout):
            timeout = remaining
        self._event.wait(timeout)
        return self.cancelled

    def raise_if_cancelled(self) -> None:
        """Raise ``CancelledError`` (or ``TimeoutError`` past the deadline) if the call is over."""
        if self._event.is_set():
            raise CancelledError(f"{self.method} cancelled by the caller")
        if self.cancelled:
            raise TimeoutError(f"{self.method} passed its deadline")

    def __repr__(self) -> str:
        state = "cancelled" if self.cancelled else "live"
        return f"<Context {self.method} {self.call_id} {state} remaining={self.remaining()}>"

    def __reduce__(self) -> Any:
        raise TypeError("a Context belongs to one call on one machine and cannot be pickled")
