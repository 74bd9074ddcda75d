"""A scheduler's machines: started, booted (its task service registered on them), handed to
the scheduler's slot threads, and replaced when they fail to boot, die or retire.

A machine's life here::

    start() or adopt() ──> booting (MachineSlots.started False; a thread of its own waits)
        │ boot failed: forgotten; the initializer raised: the owner breaks; else a
        │ replacement starts when boot_retry.next_boot_wait says, or none can be had
        v
    serving (started True, ``maxprocs`` slot threads run the owner's ``serve``)
        │ died, or retired after ``maxtasksperchild`` tasks (the scheduler says which: gone())
        v
    forgotten, and a replacement started, unless the owner is done or stopping its work;
    when none is left and none can be had, the owner breaks ("no machine can be had")

Everything here is guarded by the owner's lock, shared with the fleet at construction.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Protocol

from . import boot_retry
from .batching import Task
from .direct import DirectCall
from .errors import BootError, BrokenCluster, MachineStopped
from .machine import RUNNING, STOPPED, Backoff, Machine
from .rpc import codec
from .session import B
from .tasks import TaskRunner

__all__ = ["Fleet", "FleetOwner", "MachineSlots"]

log = logging.getLogger("bigexec.scheduler")  # the name these records have always had


class MachineSlots:
    """The scheduler's view of one machine: its slot threads and task counts (the caller
    holds the owner's lock for all of it)."""

    __slots__ = ("machine", "register", "slots", "dispatched", "retiring", "dead", "started",
                 "busy", "cond", "waiting", "direct")

    def __init__(self, machine: Machine, register: bool, lock: threading.RLock) -> None:
        self.machine = machine
        self.cond = threading.Condition(lock)  # its slot threads wait here
        self.waiting = 0  # slot threads waiting on cond and not yet notified
        self.direct: deque[DirectCall[MachineSlots, Task]] = deque()  # posted for its slots
        self.register = register  # the service must be registered by us (given machines)
        self.slots = 0  # its slot threads still serving
        self.dispatched = 0  # tasks it was given, ever
        self.retiring = False
        self.dead = False
        self.started = False
        self.busy = 0  # batches and direct calls in flight

    def wake_one(self) -> None:
        if self.waiting:
            self.waiting -= 1
            self.cond.notify()

    def wake_all(self) -> None:
        self.waiting = 0
        self.cond.notify_all()


class FleetOwner(Protocol):
    """What a fleet needs of the scheduler it serves."""

    def ended(self) -> bool:
        """Whether the owner has stopped or is broken (the caller holds the lock)."""

    def stopping_work(self) -> bool:
        """Whether the owner is killing the machines that run its tasks (the caller holds
        the lock)."""

    def break_cluster(self, exc: BaseException, cause: BaseException | None) -> None:
        """Fail everything, for good (the caller holds the lock)."""

    def wait_ended(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the owner to end; whether it has."""

    def serve(self, st: MachineSlots) -> None:
        """Be one slot thread of ``st``'s machine, until it should end."""


class Fleet:
    """The machines of one owner; see the module docstring. ``service`` is the name the
    owner's ``runner`` has on them; ``backoff`` the waits between boot retries."""

    def __init__(self, b: B, owner: FleetOwner, lock: threading.RLock, *, service: str,
                 runner: TaskRunner, backoff: Backoff) -> None:
        self.b = b
        self.service = service
        self.backoff = backoff
        #: Every machine not forgotten yet, booting or serving.
        self.machines: list[MachineSlots] = []
        #: The machines this fleet started (and so stops), not forgotten yet.
        self.started: list[Machine] = []
        self.replacements = 0
        self._owner = owner
        self._lock = lock
        self._runner = runner
        self._runner_blob: bytes | None = None
        self._boot_failures = 0  # in a row
        self._can_replace = b.system is not None

    def start(self, n: int) -> None:
        """Start ``n`` more machines with the service."""
        try:
            ms = self.b.start(n, services={self.service: self._runner})
        except Exception as exc:  # the session is closed, the system cannot start more
            self.unavailable(exc)
            return
        with self._lock:
            self.started.extend(ms)
        for m in ms:
            self.adopt(m, register=False)

    def adopt(self, m: Machine, register: bool) -> None:
        """Serve on ``m`` once it runs (registering the service first, if ``register``)."""
        st = MachineSlots(m, register, self._lock)
        with self._lock:
            self.machines.append(st)
        threading.Thread(target=self._machine_main, args=(st,), daemon=True,
                         name=f"bigexec-sched-{m.addr or 'boot'}").start()

    def _machine_main(self, st: MachineSlots) -> None:
        m = st.machine
        m.wait(RUNNING)
        err: BaseException | None = m.err if m.state == STOPPED else None
        if err is None and st.register:
            try:
                if self._runner_blob is None:
                    self._runner_blob = codec.dumps_bytes(self._runner)
                m.call("Supervisor.register", self.service, self._runner_blob, timeout=300)
            except Exception as exc:
                err = BootError(f"service {self.service!r} failed to start on machine "
                                f"{m.addr}: {type(exc).__name__}: {exc}")
                err.service = self.service
                err.__cause__ = exc
        if err is None and m.state == STOPPED:
            err = m.err or MachineStopped(m.addr)
        if err is not None:
            self._boot_failed(st, err)
            return
        with self._lock:
            self._boot_failures = 0
            st.started = True
            st.slots = m.maxprocs
        m.on_stop(lambda _m: self._wake(st))
        for _ in range(m.maxprocs - 1):
            threading.Thread(target=self._owner.serve, args=(st,), daemon=True,
                             name=f"bigexec-slot-{m.addr}").start()
        self._owner.serve(st)

    def _wake(self, st: MachineSlots) -> None:
        with self._lock:
            st.wake_all()

    def _boot_failed(self, st: MachineSlots, err: BaseException) -> None:
        with self._lock:
            self._forget(st)
            if self._owner.ended():
                return
            if isinstance(err, BootError) and err.service == self.service:
                self._owner.break_cluster(BrokenCluster(
                    f"A machine initializer failed, the executor is not usable anymore: {err}"),
                    err)
                return
            self._boot_failures += 1
            failures = self._boot_failures
            running = any(s.started and not s.dead for s in self.machines)
            booting = any(not s.started and not s.dead for s in self.machines)
        wait = boot_retry.next_boot_wait(failures, can_replace=self._can_replace,
                                         running=running, booting=booting,
                                         backoff=self.backoff)
        if wait is None:
            log.warning("a machine failed to boot: %s", err)
            self.unavailable(err)
        elif wait > 0:
            # Others run the tasks (or may yet) meanwhile: keep the size, retrying for as long
            # as it takes, but less often the longer boots keep failing.
            log.warning("a machine failed to boot (%d in a row), retrying in %.1fs: %s",
                        failures, wait, err)
            threading.Thread(target=self._retry_boot, args=(wait,), daemon=True,
                             name="bigexec-boot-retry").start()
        else:
            log.warning("a machine failed to boot (%d in a row), retrying now: %s", failures, err)
            self.start(1)

    def _retry_boot(self, wait: float) -> None:
        if not self._owner.wait_ended(wait):
            self.start(1)

    def unavailable(self, err: BaseException) -> None:
        """A machine could not be had: break the owner if none is left."""
        with self._lock:
            live = any(not s.dead for s in self.machines)
            # (machines killed on purpose with the work, by stop_running, break nothing)
            if live or self._owner.ended() or self._owner.stopping_work():
                return
            self._owner.break_cluster(
                BrokenCluster(f"no machine can be had to run tasks: {err}"), err)

    def _forget(self, st: MachineSlots) -> None:
        """Let go of a machine that is gone (the caller holds the lock)."""
        if st in self.machines:
            self.machines.remove(st)
        if st.machine in self.started:
            self.started.remove(st.machine)

    def gone(self, st: MachineSlots, why: BaseException | None) -> None:
        """``st``'s machine died (``why``) or retired (None): replace it to keep the size,
        unless the owner is done."""
        with self._lock:
            self._forget(st)
            replace = (not self._owner.ended() and self._can_replace
                       and not self._owner.stopping_work())
        if replace:
            self.replacements += 1
            self.start(1)
        elif why is not None:
            self.unavailable(why)
