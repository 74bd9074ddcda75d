"""The scheduler's parts on their own: boot-retry policy, batch sizing, crash charging, reply
records, the direct call's ownership token, and the session an executor runs in."""

from __future__ import annotations

import threading
from concurrent.futures import TimeoutError as FutureTimeout  # builtin only from 3.11

import pytest

from bigexec import boot_retry, scheduler
from bigexec.batching import (
    BATCH_SECONDS,
    MAX_BATCH,
    Record,
    Task,
    batch_size,
    charge_loss,
    lost_error,
    reply_records,
)
from bigexec.direct import DirectCall, TaskFuture
from bigexec.errors import WorkerLostError
from bigexec.machine import Backoff
from bigexec.session_choice import session_for
from bigexec.tasks import OK

pytestmark = pytest.mark.timeout(60)


def square(x):
    return x * x


# --- boot retries -------------------------------------------------------------------------


def test_boot_retry_backoff_is_a_named_backoff_whose_factor_counts():
    assert scheduler.BOOT_RETRY_BACKOFF == Backoff(first=1.0, most=60.0, factor=2.0)
    b = Backoff(first=1.0, most=20.0, factor=3.0)
    assert 0.75 * 9 <= boot_retry.retry_wait(3, b) <= 1.25 * 9  # 1, 3, 9
    assert 0.75 * 20 <= boot_retry.retry_wait(10, b) <= 1.25 * 20  # at most ``most``


@pytest.mark.parametrize(("failures", "can_replace", "running", "booting", "expect"), [
    (1, False, True, False, None),  # the system cannot start more: none
    (1, True, True, False, "later"),  # others run the tasks: after a wait
    (5, True, True, False, "later"),  # for as long as it takes
    (1, True, False, False, "now"),  # none runs: at once
    (boot_retry.MAX_BOOT_FAILURES, True, False, False, None),  # none can be had
    (boot_retry.MAX_BOOT_FAILURES, True, False, True, "later"),  # others may yet boot
])
def test_next_boot_wait(failures, can_replace, running, booting, expect):
    wait = boot_retry.next_boot_wait(failures, can_replace=can_replace, running=running,
                                     booting=booting, backoff=Backoff(0.5, 4.0, 2.0))
    if expect is None:
        assert wait is None
    elif expect == "now":
        assert wait == 0.0
    else:
        assert wait is not None and wait > 0


# --- batches ------------------------------------------------------------------------------


def test_batch_size_measures_first_then_fills_about_batch_seconds_of_work():
    assert batch_size(1000, False, None, 2) == 1  # nothing measured yet
    assert batch_size(1000, True, 0.0001, 2) == 1  # a suspect runs alone
    assert batch_size(1000, False, 0.001, 2) == int(BATCH_SECONDS / 0.001)
    assert batch_size(10, False, 0.0001, 4) == 3  # a fair share of the queue: ceil(10 / 4)
    assert batch_size(10**6, False, 1e-9, 1) == MAX_BATCH
    assert batch_size(5, False, 10.0, 2) == 1  # long tasks: one at a time


def test_a_lone_unfinished_task_is_charged_until_it_has_crashed_enough():
    t = Task(square, (3,), {})
    assert charge_loss([t], "died once", 2) is None
    assert charge_loss([t], "died twice", 2) is t
    assert t.crashes == ["died once", "died twice"]
    err = lost_error(t)
    assert isinstance(err, WorkerLostError) and "square(3)" in str(err)


def test_several_unfinished_tasks_are_not_charged_but_become_suspects():
    ts = [Task(square, (i,), {}) for i in range(3)]
    assert charge_loss(ts, "died", 1) is None
    assert all(t.suspect and not t.crashes for t in ts)


def test_a_run_one_reply_is_a_named_record():
    (r,) = list(reply_records((0, OK, 0.25, 9)))
    assert r == Record(position=0, outcome=OK, seconds=0.25, value=9)


# --- the direct call's ownership token ----------------------------------------------------


class _Machine:
    """As much of a Machine as a direct call uses."""

    def __init__(self, buffered: bool) -> None:
        self.buffered = buffered

    def begin_call(self, method, prepared, timeout, call_id, handle):
        return ("pending", method)

    def reply_buffered(self, pending, timeout):
        return self.buffered

    def finish_call(self, pending):
        return 42


class _Owner:
    def __init__(self) -> None:
        self.readers: list[threading.Thread] = []
        self.handed_back: list[DirectCall] = []

    def read_direct(self, call):
        self.readers.append(threading.current_thread())
        call.task.future.set_result(call.finish())

    def hand_back(self, call):
        self.handed_back.append(call)
        call.unclaim()


def _sent(buffered: bool = True) -> tuple[_Owner, Task, DirectCall]:
    owner, task = _Owner(), Task(square, (2,), {})
    assert type(task.future) is TaskFuture
    assert task.future.set_running_or_notify_cancel()
    call = DirectCall(owner, "slot", task, _Machine(buffered))
    call.send("S.run_one", None)
    return owner, task, call


def test_only_one_thread_claims_a_direct_call_until_it_is_handed_back():
    _, _, call = _sent()
    assert call.claim()
    assert not call.claim()  # a slot thread, say, finds it taken and does nothing
    call.unclaim()
    assert call.claim()


def test_the_waiter_reads_a_direct_reply_itself():
    owner, task, call = _sent()
    assert task.future.result(timeout=5) == 42
    assert owner.readers == [threading.current_thread()]
    assert not call.claim() and not owner.handed_back  # the waiter holds it: nobody else reads


def test_a_timed_wait_hands_back_a_reply_not_whole_in_time():
    owner, task, call = _sent(buffered=False)
    with pytest.raises(FutureTimeout):
        task.future.result(timeout=0.05)
    assert owner.handed_back == [call] and not owner.readers
    assert call.claim()  # up for claiming again, by a slot thread


def test_a_failed_send_is_raised_to_the_reader():
    class Refusing(_Machine):
        def begin_call(self, *args):
            raise ConnectionResetError("gone")

    task = Task(square, (2,), {})
    call = DirectCall(_Owner(), "slot", task, Refusing(True))
    call.send("S.run_one", None)
    assert call.reply_buffered(10.0)  # nothing to wait for
    with pytest.raises(ConnectionResetError):
        call.finish()


# --- the session --------------------------------------------------------------------------


def test_machines_of_no_driver_session_are_refused():
    class Dialed:
        session = object()  # what a machine dialed from inside a worker has

    with pytest.raises(TypeError, match="driver's session"):
        session_for(None, [Dialed()], None, {})  # type: ignore[list-item]
