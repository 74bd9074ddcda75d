"""The direct-call fast path: ``submit`` sends a lone task's request itself, and whoever claims
the call first reads its reply, so that a round trip costs one thread hand-off fewer than
through the scheduler's queue.

A direct call's states, and who may move it between them::

    (idle slot, empty queue)
        │ the submitting thread reserves the slot's capacity, makes the DirectCall (which
        │ attaches itself to the task's TaskFuture) and sends the request
        v
      SENT ── posted on its slot; the slot's capacity stays busy until the reply is read
        │ claim(): the first of
        │   - the waiter in future.result() / future.exception(), or
        │   - a slot thread of that machine, woken at submit (so that a future nobody waits
        │     on completes too), or one leaving because its machine is going
        v
      CLAIMED ── the claimer alone may touch the call from here
        │ the claimer reads and delivers the reply (DirectOwner.read_direct), which frees
        │ the slot's capacity  ─────────────────────────────────────────────> DONE
        │
        └ a timed wait (the timeout is a deadline) finds the reply incomplete: it hands
          the call back (DirectOwner.hand_back): unclaim() and posted on its slot again,
          SENT once more, for a slot thread to read; or, when the machine's slot threads
          have all left, read at once by the waiter after all

Why a lock is the ownership token: claiming must be a test-and-set that exactly one of
several threads wins, without the scheduler's lock (a waiter must not queue behind the slot
threads for it) and without the loser ever blocking: ``Lock.acquire(blocking=False)`` is that,
atomic and cheap. The winner holds it while it owns the call; releasing it (``unclaim``) puts
the call up for claiming again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Generic, Protocol, TypeVar

from .machine import Machine
from .rpc import codec, wire
from .rpc.client import CallHandle, Client, PendingCall, PreparedCall, new_call_id
from .tasks import FunctionCache

__all__ = ["MAX_REQUEST_BYTES", "DirectCall", "DirectOwner", "TaskFuture", "prepare_small"]

#: Larger requests go through a slot thread: ``submit`` must not block on a large send.
MAX_REQUEST_BYTES = 64 * 1024


class HasFuture(Protocol):
    """What a direct call needs of the task it carries."""

    future: Future[Any]


SlotT = TypeVar("SlotT")
TaskT = TypeVar("TaskT", bound=HasFuture)


class DirectOwner(Protocol):
    """What a direct call needs of the scheduler that sent it."""

    def read_direct(self, call: DirectCall[Any, Any]) -> None:
        """Read and deliver the claimed ``call``'s reply in this thread, then free its slot."""

    def hand_back(self, call: DirectCall[Any, Any]) -> None:
        """The claimed ``call``'s reply was not whole in time: have a slot thread read it."""


def prepare_small(functions: FunctionCache, fn: Callable[..., Any], args: tuple,
                  kwargs: dict) -> PreparedCall | None:
    """The encoded request of a direct call of ``fn(*args, **kwargs)`` (as ``run_one`` takes
    it), or None when the call should go through the queue: it cannot be encoded (the
    queue's path fails it as it should), or it is large."""
    try:
        prepared = Client.prepare((functions.encode(fn), args, kwargs), {})
    except codec.EncodeError:
        return None
    if wire.body_length(prepared.body) > MAX_REQUEST_BYTES:
        return None
    return prepared


class TaskFuture(Future):
    """The Executor's future. While a direct call of its task is SENT, the first ``result()``
    or ``exception()`` claims it and reads the reply itself, in the waiting thread, instead
    of being woken by the slot thread that would read it. With a timeout, which is a
    deadline, it reads only a reply that is whole by then (a reply that starts in time may
    still arrive slowly); else it hands the call back and waits as usual."""

    # Set while a direct call waits for claiming; cleared by the claim (see DirectCall).
    _direct: DirectCall[Any, Any] | None = None

    def _read_here(self, timeout: float | None) -> None:
        d = self._direct
        if d is None or not d.claim():
            return
        if timeout is not None and not d.reply_buffered(timeout):
            d.owner.hand_back(d)
            return
        d.owner.read_direct(d)

    def _read_first(self, timeout: float | None) -> float | None:
        """Read a direct call's reply here if this thread can; return what is left of
        ``timeout``."""
        if timeout is None:
            self._read_here(None)
            return None
        deadline = time.monotonic() + timeout
        self._read_here(timeout)
        return max(0.0, deadline - time.monotonic())

    def result(self, timeout: float | None = None) -> Any:
        if self._direct is not None:
            timeout = self._read_first(timeout)
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._direct is not None:
            timeout = self._read_first(timeout)
        return super().exception(timeout)


class DirectCall(Generic[SlotT, TaskT]):
    """``task``'s call, sent by the submitting thread to ``machine`` (of the owner's
    ``slot``); see the module docstring for its states. ``error`` holds what sending raised,
    for the reader to handle as a failed call."""

    __slots__ = ("owner", "slot", "task", "machine", "pending", "error", "_token")

    def __init__(self, owner: DirectOwner, slot: SlotT, task: TaskT, machine: Machine) -> None:
        self.owner = owner
        self.slot = slot
        self.task = task
        self.machine = machine
        self.pending: PendingCall | None = None
        self.error: BaseException | None = None
        self._token = threading.Lock()
        fut = task.future
        if type(fut) is TaskFuture:
            fut._direct = self  # before anyone can claim the call, so that a claim clears it

    def send(self, method: str, prepared: PreparedCall) -> None:
        """Send the request (SENT); a failure is kept in ``error`` for the reader."""
        try:
            self.pending = self.machine.begin_call(method, prepared, None, new_call_id(),
                                                   CallHandle())
        except BaseException as exc:
            self.error = exc

    def claim(self) -> bool:
        """Take the call (SENT -> CLAIMED); False if another thread has it."""
        if not self._token.acquire(blocking=False):
            return False
        fut = self.task.future
        if type(fut) is TaskFuture:
            fut._direct = None
        return True

    def unclaim(self) -> None:
        """Put a claimed call up for claiming again (CLAIMED -> SENT)."""
        fut = self.task.future
        if type(fut) is TaskFuture:
            fut._direct = self
        self._token.release()

    def reply_buffered(self, timeout: float) -> bool:
        """Whether the reply is whole within ``timeout`` seconds (or sending failed: then
        there is nothing to wait for)."""
        if self.error is not None or self.pending is None:
            return True
        return self.machine.reply_buffered(self.pending, timeout)

    def finish(self) -> Any:
        """Read the reply (by the claimer): what the call returned, or raise what it or
        sending raised."""
        if self.error is not None:
            raise self.error
        assert self.pending is not None  # sent without error
        return self.machine.finish_call(self.pending)
