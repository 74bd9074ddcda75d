"""Nothing is kept alive after use: arguments, results, callables and retired machines become
collectable as soon as nothing of the user's holds them (the standard library drops a work item
once it has run: bpo-29861). Checked with weakrefs, never with timing."""

from __future__ import annotations

import gc
import time
import weakref

import pytest

import bigexec
from bigexec.machine import Machine
from bigexec.session import STOPPED_MACHINES_KEPT
from bigexec.worker import MachineRuntime

pytestmark = pytest.mark.timeout(120)

SYSTEMS = ["threads", "local"]

# Objects made on threads machines (they share this process), by id: the tests look them up.
MADE_ON_MACHINES: list[weakref.ref] = []


class Payload:
    """A weakref-able value."""

    def __init__(self, n: int = 0) -> None:
        self.n = n

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Payload) and other.n == self.n


def identity(x):
    return x


def make_payload(n=0):
    return Payload(n)


def make_tracked_payload(n=0):
    p = Payload(n)
    MADE_ON_MACHINES.append(weakref.ref(p))
    return p


def _collected(ref: weakref.ref, tries: int = 50) -> bool:
    """Whether ``ref``'s object is gone, once the threads that held it let go of it: a thread
    that completed a future may still be unwinding its frame, so allow it a few moments."""
    for _ in range(tries):
        gc.collect()
        if ref() is None:
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("system", SYSTEMS)
def test_executor_drops_arguments_results_and_callables(system):
    with bigexec.Executor(1, system=system) as ex:
        assert ex.submit(identity, 1).result(timeout=30) == 1  # booted, a slot idle
        for wait in ("result", "timed", "nobody"):
            arg = Payload(1)
            fn = lambda x: x  # noqa: E731 - shipped by value, held by the task
            refs = [weakref.ref(arg), weakref.ref(fn)]
            fut = ex.submit(fn, arg)
            if wait == "result":
                res = fut.result()
            elif wait == "timed":
                res = fut.result(timeout=30)
            else:
                while not fut.done():
                    time.sleep(0.01)
                res = fut.result()
            assert res == Payload(1)
            refs.append(weakref.ref(res))
            del arg, fn, fut, res
            for r in refs:
                assert _collected(r), (wait, r)
        # a batch (several queued tasks) too
        args = [Payload(i) for i in range(20)]
        refs = [weakref.ref(a) for a in args]
        futs = [ex.submit(identity, a) for a in args]
        results = [f.result(timeout=30) for f in futs]
        refs += [weakref.ref(r) for r in results]
        del args, futs, results
        assert all(_collected(r) for r in refs)


def test_a_threads_machine_drops_what_its_tasks_made():
    MADE_ON_MACHINES.clear()
    with bigexec.Executor(1, system="threads") as ex:
        assert ex.submit(make_tracked_payload, 1).result(timeout=30) == Payload(1)
        futs = [ex.submit(make_tracked_payload, i) for i in range(10)]
        assert [f.result(timeout=30) for f in futs] == [Payload(i) for i in range(10)]
        del futs
        assert len(MADE_ON_MACHINES) == 11
        assert all(_collected(r) for r in MADE_ON_MACHINES)


@pytest.mark.parametrize("system", SYSTEMS)
def test_map_does_not_hold_the_last_yielded_result(system):
    with bigexec.Executor(1, system=system) as ex:
        for kwargs in ({}, {"buffersize": 2}, {"timeout": 30}):
            it = ex.map(make_payload, range(3), **kwargs)
            first = next(it)
            ref = weakref.ref(first)
            del first
            assert _collected(ref), kwargs  # while the generator is paused
            assert list(it) == [Payload(1), Payload(2)]


@pytest.mark.parametrize("system", SYSTEMS)
def test_pool_drops_results_once_delivered(system):
    with bigexec.Pool(1, system=system) as pool:
        res = pool.apply(make_payload, (1,))
        ref = weakref.ref(res)
        del res
        assert _collected(ref)
        r = pool.apply_async(make_payload, (2,), callback=lambda v: None)
        res = r.get(timeout=30)
        refs = [weakref.ref(res)]
        del r, res
        assert all(_collected(x) for x in refs)
        values = pool.map(make_payload, range(5))
        refs = [weakref.ref(v) for v in values]
        del values
        assert all(_collected(x) for x in refs)


def _machines_alive(b: bigexec.B) -> list[Machine]:
    return [o for o in gc.get_objects() if type(o) is Machine and o.session is b]


@pytest.mark.parametrize("system", SYSTEMS)
def test_retired_machines_are_released(system):
    runtimes_before = sum(1 for o in gc.get_objects() if type(o) is MachineRuntime)
    kept = STOPPED_MACHINES_KEPT  # the session keeps that many stopped ones for its status
    n = kept + 50
    with bigexec.Pool(2, maxtasksperchild=1, system=system) as pool:
        assert pool.map(identity, range(n), chunksize=1) == list(range(n))
        b = pool.session
        bound = kept + 4  # 2 working, maybe 2 replacements booting: not n + 1
        for _ in range(100):  # retired machines still shutting down: let them finish
            gc.collect()
            if len(_machines_alive(b)) <= bound:
                break
            time.sleep(0.05)
        assert len(_machines_alive(b)) <= bound
        assert len(b.known_machines()) <= bound
        if system == "threads":
            # a stopped machine keeps no runtime (server, services, threads)
            runtimes = sum(1 for o in gc.get_objects() if type(o) is MachineRuntime)
            assert runtimes - runtimes_before <= 4


def test_executors_in_one_session_leave_no_metric_sources(threads_b):
    for _ in range(5):
        with bigexec.Executor(1, b=threads_b) as ex:
            assert ex.submit(identity, 1).result(timeout=30) == 1
    driver = threads_b.metrics()["driver"]
    assert not [k for k in driver if k.startswith("scheduler:")]
    with bigexec.Executor(1, b=threads_b) as ex:
        assert ex.submit(identity, 1).result(timeout=30) == 1
        assert len([k for k in threads_b.metrics()["driver"] if k.startswith("scheduler:")]) == 1
