"""Executor and Pool when machines die: nothing is lost, nothing hangs."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from conftest import FAST

import bigexec

N = 2000


def slow_square(x):
    time.sleep(0.001)
    return x * x


def crash_on(x, bad):
    if x == bad:
        os._exit(17)  # dies as a segfault or OOM kill would: no exception, no reply
    return x


def _kill_one_when_busy(ex_or_pool, system, after: float) -> threading.Thread:
    def killer():
        time.sleep(after)
        victim = ex_or_pool._scheduler.machines()[0]
        assert victim.wait(bigexec.RUNNING, 30) and victim.err is None
        if system == "threads":
            victim.session.system.kill(victim)
        else:
            os.kill(victim.info["pid"], signal.SIGKILL)
    t = threading.Thread(target=killer)
    t.start()
    return t


@pytest.mark.parametrize("system", ["threads", "local"])
def test_killing_a_machine_mid_map_loses_nothing(system):
    with bigexec.Executor(2, system=system, **FAST) as ex:
        list(ex.map(abs, range(4)))  # both machines up
        before = {m.addr for m in ex.machines()}
        killer = _kill_one_when_busy(ex, system, 0.3)
        results = list(ex.map(slow_square, range(N), timeout=120))
        killer.join()
        assert results == [x * x for x in range(N)]
        # the executor replaced the dead machine to keep its size
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            now = {m.addr for m in ex.machines() if m.state == bigexec.RUNNING}
            if len(now) == 2 and now != before:
                break
            time.sleep(0.05)
        assert len(now) == 2 and now != before


@pytest.mark.parametrize("system", ["threads", "local"])
def test_pool_survives_a_killed_machine(system):
    with bigexec.Pool(2, system=system, **FAST) as pool:
        pool.map(abs, range(4))
        killer = _kill_one_when_busy(pool, system, 0.3)
        results = pool.map(slow_square, range(N), chunksize=10)
        killer.join()
        assert results == [x * x for x in range(N)]


def test_a_task_that_always_kills_its_machine_fails_alone():
    with bigexec.Executor(2, system="local", **FAST) as ex:
        futs = [ex.submit(crash_on, x, 7) for x in range(40)]
        results = []
        for f in futs:
            try:
                results.append(f.result(timeout=120))
            except bigexec.WorkerLostError as exc:
                results.append(exc)
        bad = results[7]
        assert isinstance(bad, bigexec.WorkerLostError)
        assert "crash_on(7, 7)" in str(bad) and "3 times" in str(bad)
        assert len(bad.reasons) == 3 and all("status 17" in r for r in bad.reasons)
        assert [r for i, r in enumerate(results) if i != 7] == [x for x in range(40) if x != 7]
        # and the executor still works, on replacement machines
        assert ex.submit(abs, -3).result(timeout=60) == 3


def test_max_crashes_is_settable():
    with bigexec.Executor(1, system="local", max_crashes=1, **FAST) as ex:
        f = ex.submit(crash_on, 1, 1)
        with pytest.raises(bigexec.WorkerLostError, match="1 times"):
            f.result(timeout=60)


def test_no_machine_to_be_had_breaks_the_executor():
    class NoMachines(bigexec.System):
        name = "nomachines"

        def start(self, count, env):
            raise OSError("no capacity")

    ex = bigexec.Executor(2, b=bigexec.start(NoMachines()))
    try:
        f = ex.submit(abs, 1)  # machines start with the first task, as the stdlib's workers
        with pytest.raises(bigexec.BrokenCluster, match="no capacity"):
            f.result(timeout=10)
        with pytest.raises(bigexec.BrokenCluster, match="no capacity"):
            ex.submit(abs, 1)
        assert "no capacity" in ex._broken
    finally:
        ex.shutdown()
        ex.session.shutdown()


def test_terminate_stops_running_tasks_and_fails_their_jobs():
    pool = bigexec.Pool(2, system="local", **FAST)
    try:
        pool.map(abs, range(4))
        for m in pool._pool:
            assert m.wait(bigexec.RUNNING, 30) and m.err is None
        pids = {m.info["pid"] for m in pool._pool}
        r = pool.map_async(time.sleep, [60] * 4, chunksize=1)
        time.sleep(0.5)
        t0 = time.monotonic()
        pool.terminate()
        assert time.monotonic() - t0 < 10
        with pytest.raises(RuntimeError, match="terminated"):
            r.get(timeout=10)
        for pid in pids:
            assert not _alive(pid)
    finally:
        pool.terminate()


def test_shutdown_cancel_futures_stops_running_tasks():
    ex = bigexec.Executor(1, system="local", **FAST)
    running = ex.submit(time.sleep, 60)
    queued = [ex.submit(time.sleep, 60) for _ in range(3)]
    time.sleep(0.5)
    t0 = time.monotonic()
    ex.shutdown(wait=True, cancel_futures=True)
    assert time.monotonic() - t0 < 10
    assert all(f.cancelled() for f in queued)
    with pytest.raises(Exception) as info:
        running.result(timeout=5)
    assert "cancel" in str(info.value).lower()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


# --- calls sent straight from submit (the scheduler's direct path) --------------------------


def test_an_interrupted_result_loses_nothing(monkeypatch):
    """Ctrl-C while ``result()`` reads a direct call's reply: the task runs again, and the
    next ``result()`` gets its value; nothing hangs, shutdown included."""
    from bigexec.machine import Machine

    real_finish = Machine.finish_call
    interrupted = []

    def finish_once(self, pending):
        if not interrupted:
            interrupted.append(pending.method)
            raise KeyboardInterrupt
        return real_finish(self, pending)

    with bigexec.Executor(1, system="threads", **FAST) as ex:
        assert ex.submit(abs, -1).result(timeout=30) == 1  # machine up, slot idle
        monkeypatch.setattr(Machine, "finish_call", finish_once)
        f = ex.submit(slow_square, 7)
        with pytest.raises(KeyboardInterrupt):
            f.result()
        assert interrupted and interrupted[0].endswith(".run_one")
        assert f.result(timeout=30) == 49
        assert [ex.submit(slow_square, i).result(timeout=30) for i in range(5)] == [
            0, 1, 4, 9, 16]


@pytest.mark.parametrize("system", ["threads", "local"])
def test_direct_calls_complete_without_anyone_waiting(system):
    """Futures nobody calls ``result()`` on still complete: callbacks and ``wait`` see them."""
    from concurrent.futures import wait

    with bigexec.Executor(2, system=system, **FAST) as ex:
        assert ex.submit(abs, -1).result(timeout=30) == 1
        done = threading.Event()
        seen = []
        f = ex.submit(slow_square, 3)
        f.add_done_callback(lambda fut: (seen.append(fut.result()), done.set()))
        assert done.wait(30) and seen == [9]
        fs = []
        for i in range(20):
            fs.append(ex.submit(slow_square, i))
            time.sleep(0.002)  # the slots are idle at each submit: every call goes direct
        finished, pending = wait(fs, timeout=30)
        assert not pending and [x.result() for x in fs] == [i * i for i in range(20)]


def test_a_direct_call_to_a_machine_killed_mid_task_runs_again():
    with bigexec.Executor(1, system="local", **FAST) as ex:
        assert ex.submit(os.getpid).result(timeout=30) > 0
        victim = ex.machines()[0]
        f = ex.submit(time.sleep, 1.0)
        time.sleep(0.3)
        os.kill(victim.info["pid"], signal.SIGKILL)
        assert f.result(timeout=60) is None  # ran again on the replacement machine
        assert ex.machines() and ex.machines()[0].addr != victim.addr


@pytest.mark.parametrize("system", ["threads", "local"])
def test_a_timed_out_result_hands_the_call_back(system):
    """``result(timeout)`` that gives up before the reply leaves it to a slot thread: the
    future completes without anyone calling ``result()`` again."""
    from concurrent.futures import TimeoutError as FuturesTimeout
    from concurrent.futures import wait

    with bigexec.Executor(1, system=system, **FAST) as ex:
        assert ex.submit(abs, -1).result(timeout=30) == 1
        f = ex.submit(time.sleep, 0.5)
        t0 = time.monotonic()
        with pytest.raises(FuturesTimeout):
            f.result(timeout=0.05)
        assert time.monotonic() - t0 < 0.4  # it did not wait for the reply
        done, _ = wait([f], timeout=30)
        assert done == {f} and f.result() is None
        g = ex.submit(abs, -5)
        assert g.result(timeout=30) == 5 and ex.submit(abs, -6).exception(timeout=30) is None
