"""The scheduler under Executor and Pool: tasks to the slot threads of machines, batched,
surviving lost machines.

    submit(task) ──> queue (FIFO) ──> slot threads, ``maxprocs`` per machine
                                        │ take a batch (see batching.py for its size)
                                        │ call "<service>.run" on the machine; its reply streams
                                        │ one frame per task as each finishes, completing its
                                        │ future at once
                                        └ the machine died: the unfinished tasks pay for it
                                          (batching.charge_loss) and go back to the front of
                                          the queue, and a replacement machine starts

    submit(task), queue empty and a slot idle ──> the submitting thread sends "<service>.run_one"
        itself: a direct call (see direct.py), read by the future's waiter or by the idle
        slot thread woken at submit; the slot's capacity is counted as busy until it is read.

    machines: fleet.py starts them, boots them, hands each to ``maxprocs`` slot threads
        (``Scheduler.serve``) and replaces those that fail to boot, die or retire.

The scheduler is *broken* (every pending future fails with ``BrokenCluster`` and ``submit``
raises it) when a machine's initializer raises, or when no machine can be had any more.
Nothing waits forever: every future ends with a result or an exception.

All the state below is guarded by one lock (``Scheduler._lock``); each machine's slot threads
wait on a condition of it, ``wait_idle`` on another.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from . import boot_retry
from .batching import (
    Task,
    TaskTimer,
    batch_size,
    charge_loss,
    lost_error,
    reply_records,
    settle,
)
from .direct import DirectCall, prepare_small
from .errors import BrokenCluster, MachineStopped, NetworkError
from .fleet import Fleet, MachineSlots
from .machine import RUNNING, STOPPED, Machine
from .map_tracking import MapBoard
from .rpc import codec, wire
from .session import B
from .tasks import OK, UNPICKLABLE_RESULT, FunctionCache, TaskRunner

__all__ = ["BOOT_RETRY_BACKOFF", "Scheduler", "Task"]

log = logging.getLogger("bigexec.scheduler")

#: Waits between boot retries while other machines live (read when a scheduler is made, so
#: that a test may set it here).
BOOT_RETRY_BACKOFF = boot_retry.BOOT_RETRY_BACKOFF
_ids = itertools.count(1)


def _close(stream: Any) -> None:
    if hasattr(stream, "close"):
        stream.close()


#: A direct call as this scheduler makes it: on one of its machine's slots, for one task.
_Direct = DirectCall[MachineSlots, Task]


class Scheduler:
    """Runs ``Task``s on the machines of a session; see the module docstring."""

    def __init__(
        self,
        *,
        b: B,
        own_session: bool,
        count: int = 0,
        machines: list[Machine] | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple = (),
        max_crashes: int = 3,
        maxtasksperchild: int | None = None,
        unpicklable_result: Callable[[BaseException], BaseException] | None = None,
        lazy: bool = False,
    ) -> None:
        self.b = b
        self._own_session = own_session
        self._service = f"BigexecTasks{next(_ids)}"
        self._functions = FunctionCache()
        self._max_crashes = max_crashes
        self._maxtasks = maxtasksperchild
        self._unpicklable_result = unpicklable_result
        # One lock; slot threads wait on their machine's condition for work, ``wait_idle`` on
        # ``_idle`` for the end of it. A profile of submit().result() showed every completion
        # waking every idle slot thread when they all shared one condition.
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)
        self._queue: deque[Task] = deque()
        self._inflight = 0
        self._broken: BaseException | None = None
        self._closing = False
        self._stopped = False
        self._cancel_running: BaseException | None = None
        self._task_time = TaskTimer()
        self._size = count or len(machines or [])
        self.tasks_completed = 0
        self.crashes = 0
        self._fleet = Fleet(b, self, self._lock, service=self._service,
                            runner=TaskRunner(initializer, initargs), backoff=BOOT_RETRY_BACKOFF)
        #: The maps in flight over this scheduler (see map_tracking.py); its metrics list them.
        self.maps = MapBoard()
        b.add_metrics_source(f"scheduler:{self._service}", self._metrics)
        if machines:
            for m in machines:
                self._fleet.adopt(m, register=True)
        # ``lazy``: machines start with the first task, as the standard executors' workers do
        # (so an initializer that fails shows in that task's future, not in the submit).
        self._to_start = count if lazy else 0
        if count and not lazy:
            self._fleet.start(count)

    @property
    def replacements(self) -> int:
        """How many machines were started to replace lost or retired ones."""
        return self._fleet.replacements

    def _metrics(self) -> dict[str, Any]:
        with self._lock:
            return {"queued": len(self._queue), "running": self._inflight,
                    "completed": self.tasks_completed, "crashes": self.crashes,
                    "replacements": self._fleet.replacements,
                    "machines": sum(1 for s in self._fleet.machines if not s.dead),
                    "mean_task_seconds": self._task_time.mean or 0.0,
                    "maps": self.maps.snapshot()["maps"]}

    # --- the fleet's owner (see fleet.py) ----------------------------------------------

    def ended(self) -> bool:
        return self._stopped or self._broken is not None

    def stopping_work(self) -> bool:
        return self._cancel_running is not None

    def break_cluster(self, exc: BaseException, cause: BaseException | None) -> None:
        self._break(exc, cause)

    def wait_ended(self, timeout: float) -> bool:
        with self._lock:
            return self._idle.wait_for(self.ended, timeout)

    def serve(self, st: MachineSlots) -> None:
        """Be one slot thread of ``st``'s machine: run its batches and direct calls."""
        try:
            while self._serve_once(st):
                pass
        except BaseException:  # a bug here must not strand futures: fail loudly instead
            log.exception("bigexec scheduler slot failed")
            with self._lock:
                self._break(BrokenCluster("internal scheduler error; see the log"))
        finally:
            self._slot_done(st)

    # --- the slots -----------------------------------------------------------------------

    def _serve_once(self, st: MachineSlots) -> bool:
        """Take one batch or direct call and run it; False when the slot should end.

        A frame of its own per piece of work, so that an idle slot thread holds nothing of
        the last one (its tasks, their arguments and results) while it waits for the next."""
        work = self._take(st)
        if work is None:
            return False
        if isinstance(work, DirectCall):
            if work.claim():  # else its future's waiter reads the reply
                self.read_direct(work)
            return True
        try:
            self._run(st, work)
        finally:
            with self._lock:
                st.busy -= 1
        return not st.dead

    def _notify_everyone(self) -> None:
        """The state changed for all (stop, break, requeue): wake slots and idle waiters."""
        for st in self._fleet.machines:
            st.wake_all()
        self._idle.notify_all()

    def _wake_slots(self, n: int) -> None:
        """Wake up to ``n`` idle slot threads (the caller holds the lock)."""
        for st in self._fleet.machines:
            if n <= 0:
                return
            k = min(n, st.waiting)
            if k and st.busy < st.slots:
                st.waiting -= k
                st.cond.notify(k)
                n -= k

    def _slot_done(self, st: MachineSlots) -> None:
        m = st.machine
        with self._lock:
            st.slots -= 1
            # direct calls left to this machine: read them here (it is leaving, they fail fast)
            orphans, st.direct = list(st.direct), deque()
        for d in orphans:
            if d.claim():
                self.read_direct(d)
        with self._lock:
            if st.slots > 0 or st.dead:
                return
            st.dead = True
            retiring = st.retiring
        if retiring and m.state != STOPPED:
            m.shutdown()
            self._fleet.gone(st, None)
        elif m.state == STOPPED:  # it died while idle
            self._fleet.gone(st, m.err or MachineStopped(m.addr))

    def _take(self, st: MachineSlots) -> list[Task] | _Direct | None:
        with self._lock:
            while True:
                if st.direct:
                    return st.direct.popleft()
                if (self._stopped or self._broken is not None or st.dead or st.retiring
                        or st.machine.state == STOPPED):
                    if self._queue:
                        self._wake_slots(1)  # the wake-up this slot cannot use goes on
                    return None
                if self._queue and self._cancel_running is None and st.busy < st.slots:
                    batch = self._pop_batch(st)
                    if batch:
                        return batch
                    continue
                st.waiting += 1
                st.cond.wait()

    def _pop_batch(self, st: MachineSlots) -> list[Task]:
        q = self._queue
        # Machines still booting count too: else the first one up takes the whole queue in one
        # batch, and tasks meant to run side by side run one after another on it.
        slots = max(sum(s.slots for s in self._fleet.machines if s.started and not s.dead),
                    self._size, 1)
        n = batch_size(len(q), q[0].suspect, self._task_time.mean, slots)
        if self._maxtasks is not None:
            n = min(n, self._maxtasks - st.dispatched)
        batch: list[Task] = []
        while q and len(batch) < n:
            if batch and q[0].suspect:
                break
            t = q.popleft()
            if not t.started:
                if not t.future.set_running_or_notify_cancel():
                    continue  # cancelled while queued
                t.started = True
            batch.append(t)
        st.dispatched += len(batch)
        st.busy += 1
        self._inflight += len(batch)
        if not q:
            self._idle.notify_all()  # cancelled tasks may have been all that was left
        else:
            self._wake_slots(1)  # more work than this slot took: pass it on
        if self._maxtasks is not None and st.dispatched >= self._maxtasks:
            st.retiring = True
        return batch

    def _send(self, m: Machine, batch: list[Task]) -> Any:
        """Run ``batch`` on ``m``: its reply frames, streamed (or, for one task, in a list:
        a plain reply costs less than a stream)."""
        fn = self._functions.encode
        if len(batch) == 1:
            t = batch[0]
            return [m.call(f"{self._service}.run_one", fn(t.fn), t.args, t.kwargs)]
        return m.call(f"{self._service}.run", [(fn(t.fn), t.args, t.kwargs) for t in batch])

    # --- direct calls (see direct.py): this scheduler as their DirectOwner -------------------

    def _direct_slot(self) -> MachineSlots | None:
        """A machine with an idle slot thread and nothing queued (the caller holds the lock)."""
        if (self._queue or self._broken is not None or self._closing or self._stopped
                or self._cancel_running is not None or self._to_start):
            return None
        for st in self._fleet.machines:
            if (st.waiting and st.busy < st.slots and st.started and not st.dead
                    and not st.retiring and st.machine.state == RUNNING):
                return st
        return None

    def _send_direct(self, task: Task) -> bool:
        """Send ``task`` to an idle machine from this thread, if one is idle and the task
        small; return whether it went. A slot thread would only add a wake-up to the trip."""
        if self._direct_slot() is None:  # a guess without the lock; checked again below
            return False
        prepared = prepare_small(self._functions, task.fn, task.args, task.kwargs)
        if prepared is None:
            return False
        with self._lock:
            st = self._direct_slot()
            if st is None:
                return False
            if not task.future.set_running_or_notify_cancel():
                return True  # cancelled before it was ever queued
            task.started = True
            st.busy += 1
            st.dispatched += 1
            self._inflight += 1
        d = DirectCall(self, st, task, st.machine)
        d.send(f"{self._service}.run_one", prepared)
        with self._lock:
            gone = st.slots <= 0  # its slot threads have all left: nobody else will read it
            if not gone:
                st.direct.append(d)
                st.wake_one()
        if gone and d.claim():
            self.read_direct(d)
        return True

    def hand_back(self, call: _Direct) -> None:
        """A waiter claimed ``call`` but its reply was not whole in time: a slot thread reads
        it."""
        st = call.slot
        with self._lock:
            if st.slots > 0:
                call.unclaim()
                st.direct.append(call)
                st.wake_one()
                return
        self.read_direct(call)  # its slot threads have all left (it is dying): read it here

    def read_direct(self, d: _Direct) -> None:
        """Read and deliver a claimed direct call's reply here, then free its slot."""
        st = d.slot
        try:
            self._run(st, [d.task], d)
        except BaseException:
            # Interrupted while reading (Ctrl-C in result()): the reply is lost with its
            # connection, so the task runs again, as after a lost machine; nothing hangs.
            if not d.task.future.done():
                self._requeue([d.task], charge=None)
            raise
        finally:
            with self._lock:
                st.busy -= 1
                if self._queue and st.busy < st.slots:
                    st.wake_one()

    # --- running a call, and what a lost machine costs ------------------------------------

    def _run(self, st: MachineSlots, batch: list[Task], direct: _Direct | None = None) -> None:
        m = st.machine
        try:
            try:
                stream = self._send(m, batch) if direct is None else [direct.finish()]
            except codec.EncodeError:  # find the culprits, fail them, send the rest
                if direct is not None:
                    raise
                batch = self._drop_unpicklable(batch)
                if not batch:
                    return
                stream = self._send(m, batch)
        except (MachineStopped, NetworkError) as exc:
            # the machine's call waited for the system to confirm a death already
            self._lost(st, batch, exc, grace=0.0)
            return
        except Exception as exc:
            self._fail(batch, exc)
            return
        finished = [False] * len(batch)
        try:
            for frame in stream:
                for r in reply_records(frame):
                    finished[r.position] = True
                    self._complete(batch[r.position], r.outcome, r.value)
                    self._task_time.add(r.seconds)
        except (MachineStopped, NetworkError) as exc:
            _close(stream)
            self._lost(st, [t for t, f in zip(batch, finished, strict=True) if not f], exc)
            return
        except Exception as exc:
            _close(stream)
            self._fail([t for t, f in zip(batch, finished, strict=True) if not f], exc)
            return
        rest = [t for t, f in zip(batch, finished, strict=True) if not f]
        if rest:  # the machine stopped the batch early: it was cancelled
            self._requeue(rest, charge=None)

    def _complete(self, task: Task, outcome: int, value: Any) -> None:
        """Settle ``task`` with its result (``value``, for OK) or its encoded error."""
        if outcome == OK:
            settle(task.future, result=value)
        elif isinstance(value, BaseException):  # decoding its result failed here
            settle(task.future, error=value)
        else:
            exc = wire.decode_error(value, base_exceptions=True)  # as the stdlib's futures
            if outcome == UNPICKLABLE_RESULT and self._unpicklable_result is not None:
                exc = self._unpicklable_result(exc)
            settle(task.future, error=exc)
        with self._lock:
            self._inflight -= 1
            self.tasks_completed += 1
            if self._inflight == 0 and not self._queue:
                self._idle.notify_all()

    def _fail(self, tasks: list[Task], exc: BaseException) -> None:
        for t in tasks:
            settle(t.future, error=exc)
        with self._lock:
            self._inflight -= len(tasks)
            self._idle.notify_all()

    def _drop_unpicklable(self, batch: list[Task]) -> list[Task]:
        """Fail the tasks that cannot be pickled; return the others."""
        good = []
        for t in batch:
            try:
                codec.dumps((t.fn, t.args, t.kwargs))
            except codec.EncodeError as exc:
                self._fail([t], exc.raised)
            else:
                good.append(t)
        return good

    def _lost(self, st: MachineSlots, unfinished: list[Task], exc: BaseException,
              grace: float = 1.0) -> None:
        """The call on ``st``'s machine failed in transport: the machine died, most likely;
        ``grace`` is how long to wait for its system to confirm a death."""
        m = st.machine
        why: BaseException | None = None
        if m.state == STOPPED:
            why = m.err or exc
        else:
            why = m.died(grace)
        if why is None and m.state != STOPPED:
            # a transport failure on a live machine: run the tasks again, but charge the one
            # that was running, so that a task that always breaks the transport ends
            self._requeue(unfinished, charge=f"transport failure on {m.addr}: {exc}")
            return
        with self._lock:
            first_time = not st.dead
            st.dead = True
            st.wake_all()  # its idle slot threads leave (and read its direct calls)
        self._requeue(unfinished, charge=str(why or exc))
        if first_time:
            if m.state != STOPPED:
                m.cancel()
            self._fleet.gone(st, why or exc)

    def _requeue(self, tasks: list[Task], charge: str | None) -> None:
        if not tasks:
            return
        doomed: list[tuple[Task, BaseException]] = []
        with self._lock:
            if self._cancel_running is not None:
                doomed = [(t, self._cancel_running) for t in tasks]
                tasks = []
            elif self._broken is not None:
                doomed = [(t, self._broken) for t in tasks]
                tasks = []
            elif charge is not None:
                self.crashes += 1
                lost = charge_loss(tasks, charge, self._max_crashes)
                if lost is not None:
                    doomed.append((lost, lost_error(lost)))
                    tasks = [t for t in tasks if t is not lost]
            self._inflight -= len(tasks)
            self._queue.extendleft(reversed(tasks))
            self._notify_everyone()
        # The doomed stay in flight until settled: else wait_idle could return (and a Pool
        # stop its result thread) before their futures' callbacks have run.
        for t, err in doomed:
            settle(t.future, error=err)
        if doomed:
            with self._lock:
                self._inflight -= len(doomed)
                self._idle.notify_all()

    # --- the public side -----------------------------------------------------------------

    @property
    def broken(self) -> BaseException | None:
        return self._broken

    def _break(self, exc: BaseException, cause: BaseException | None = None) -> None:
        """Fail everything queued; the caller holds the lock."""
        if cause is not None:
            exc.__cause__ = cause
        self._broken = exc
        queued, self._queue = list(self._queue), deque()
        self._notify_everyone()
        for t in queued:
            settle(t.future, error=exc)

    def submit(self, task: Task) -> Future:
        self.submit_many([task])
        return task.future

    def submit_many(self, tasks: list[Task]) -> None:
        if len(tasks) == 1 and self._maxtasks is None and self._send_direct(tasks[0]):
            return
        with self._lock:
            if self._broken is not None:
                raise self._broken
            if self._closing:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._queue.extend(tasks)
            self._wake_slots(len(tasks))  # a slot that wakes for nothing costs a round trip
            start, self._to_start = self._to_start, 0
        if start:
            self._fleet.start(start)

    def cancel_pending(self) -> None:
        """Cancel every queued task that has not started (as ``cancel_futures=True``)."""
        with self._lock:
            keep: deque[Task] = deque()
            for t in self._queue:
                if t.started or not t.future.cancel():
                    keep.append(t)
            self._queue = keep

    def stop_running(self, reason: BaseException) -> None:
        """Stop the tasks running now: their futures fail with ``reason``.

        Python cannot interrupt a running function, so the machines running them are killed.
        """
        with self._lock:
            self._cancel_running = reason
            self._closing = True  # nothing submitted from now on could run
            queued, self._queue = list(self._queue), deque()
            busy = [s.machine for s in self._fleet.machines if s.busy]
            self._notify_everyone()
        for t in queued:
            if not t.future.cancel():
                settle(t.future, error=reason)
        for m in busy:
            if m.owned:
                m.cancel()

    def wait_idle(self, timeout: float | None = None) -> bool:
        def idle() -> bool:
            if self._broken is not None:
                return True
            if self._inflight > 0:
                return False
            # tasks cancelled in the queue (e.g. by a closed map iterator) are no work
            return all(t.future.cancelled() and not t.started for t in self._queue)

        with self._idle:
            return self._idle.wait_for(idle, timeout)

    def close(self) -> None:
        """Refuse new tasks; queued and running ones go on."""
        with self._lock:
            self._closing = True

    def shutdown(self, wait: bool = True) -> None:
        """Refuse new tasks, finish the queued ones (if ``wait``), then stop the machines."""
        self.close()

        def finish() -> None:
            self.wait_idle()
            self._release()

        if wait:
            finish()
        else:
            threading.Thread(target=finish, name="bigexec-shutdown", daemon=True).start()

    def _release(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._notify_everyone()
            leftovers, self._queue = list(self._queue), deque()
            started = list(self._fleet.started)
        self.b.remove_metrics_source(f"scheduler:{self._service}")
        err = self._broken or RuntimeError("the executor shut down before the task could run")
        for t in leftovers:
            if not t.future.cancel():
                settle(t.future, error=err)
        if self._own_session:
            self.b.shutdown()
        else:
            for m in started:
                m.shutdown()

    def machines(self) -> list[Machine]:
        with self._lock:
            return [s.machine for s in self._fleet.machines if not s.dead]
