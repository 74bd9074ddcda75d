"""The exceptions bigexec raises.

A remote call can fail in four distinct ways, and callers need to tell them apart:

* the remote method raised: the caller gets *that* exception, re-raised with its own type when
  it unpickles (``RemoteError`` otherwise), with the remote traceback attached as
  ``__cause__`` the way ``concurrent.futures`` does it;
* the transport failed (refused, reset, TLS failure): ``NetworkError``, which is temporary and
  what ``Machine.retry_call`` retries;
* the machine is gone, or went during the call: ``MachineStopped``, whose ``__cause__`` says why;
* the call itself is wrong (unknown method, malformed request): ``UnknownMethodError`` or
  ``ProtocolError``, both final.

Deadlines and cancellation raise the standard ``TimeoutError`` and
``concurrent.futures.CancelledError``, unwrapped.
"""

from __future__ import annotations

from concurrent.futures import BrokenExecutor as _BrokenExecutor

__all__ = [
    "BigexecError",
    "BootError",
    "BrokenCluster",
    "MachineLost",
    "MachineStopped",
    "NetworkError",
    "ProtocolError",
    "RemoteError",
    "UnknownMethodError",
    "WorkerLostError",
]


class BigexecError(Exception):
    """Base class of every error bigexec itself raises."""


class NetworkError(BigexecError, ConnectionError):
    """The transport to a machine failed; the call may or may not have run. Temporary."""


class ProtocolError(BigexecError):
    """A peer sent something that is not a valid bigexec message (or refused ours)."""


class UnknownMethodError(ProtocolError, LookupError):
    """The named service or method does not exist on the machine."""


class MachineStopped(BigexecError):
    """The machine is stopped, or stopped while the call was in flight.

    ``cause`` (also ``__cause__``) is the reason the machine stopped.
    """

    def __init__(self, addr: str, cause: BaseException | None = None) -> None:
        msg = f"machine {addr or '(no address)'} stopped"
        if cause is not None:
            msg += f": {cause}"
        super().__init__(msg)
        self.addr = addr
        self.cause = cause
        self.__cause__ = cause

    def __reduce__(self):  # keep it picklable across machines
        return (type(self), (self.addr, self.cause))


class BootError(BigexecError):
    """A machine could not be brought to the running state.

    ``service`` names the service whose registration (or ``init``) failed, if that was why.
    """

    service: str | None = None


class RemoteError(BigexecError):
    """An exception raised by a remote method that could not be re-created locally.

    ``type_name`` is the remote exception's qualified type name, ``traceback`` its formatted
    remote traceback.
    """

    def __init__(self, type_name: str, message: str, traceback: str = "") -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.traceback = traceback

    def __reduce__(self):
        return (type(self), (self.type_name, self.message, self.traceback))


class RemoteTraceback(Exception):
    """Carries a remote traceback as the ``__cause__`` of a re-raised remote exception."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


class MachineLost(BigexecError):
    """A machine died or became unreachable: the ``err`` of a machine that did not stop cleanly."""


class BrokenCluster(_BrokenExecutor, BigexecError):
    """The executor or pool can no longer run tasks: an initializer failed, or no machine
    could be had. Pending work fails with it and new submissions raise it."""


class WorkerLostError(_BrokenExecutor, BigexecError):
    """A task's machine died under it too many times; the task is given up.

    ``task`` describes the call, ``reasons`` says how each machine died.
    """

    def __init__(self, task: str, reasons: list[str]) -> None:
        super().__init__(
            f"task {task} was running when its machine died {len(reasons)} times; giving up "
            f"on it (last: {reasons[-1] if reasons else 'unknown'})"
        )
        self.task = task
        self.reasons = reasons

    def __reduce__(self):
        return (type(self), (self.task, self.reasons))
