"""Conformance of ``bigexec.Pool`` with the standard library's ``multiprocessing.pool.Pool``.

One suite of contract tests, run against every implementation through the ``make_pool`` and
``pool`` fixtures:

- ``stdlib-pool``: ``multiprocessing.pool.Pool(2)`` with the fork context, the reference;
- ``bigexec-threads`` and ``bigexec-local``: ``bigexec.Pool(2, system=...)``.

So every difference between bigexec and the standard library shows up as a failing test. bigexec
also ships lambdas and closures (cloudpickle), which the stdlib pool cannot: those tests skip the
stdlib param with the reason. Run only the reference with ``-k "not bigexec"``.

Tasks are module-level functions (the stdlib pickles them by reference; the fork context makes
this module importable in its workers). State shared between the driver and the workers goes
through files in ``tmp_path``, which every implementation can see.
"""

from __future__ import annotations

import gc
import multiprocessing
import multiprocessing.pool
import os
import re
import threading
import time
import uuid
from functools import partial

import conformance_tasks
import pytest
from conformance_tasks import (
    BOOT,
    FORK,
    ConformanceError,
    add,
    bigexec_maker,
    capture,
    get_init_value,
    identity,
    make_lock,
    raise_conformance_error,
    raise_value_error,
    record_init,
    rendezvous,
    skip_for,
    square,
    touch,
    within,
)

pytestmark = conformance_tasks.MARKS


# --- tasks (module level, so that the stdlib pool can pickle them) ---------------------------


def sleep_echo(seconds):
    time.sleep(seconds)
    return seconds


def sleep_then(seconds, value):
    time.sleep(seconds)
    return value


def fail_at_3(x):
    if x == 3:
        raise ValueError(f"boom {x}")
    return x


def pid_of(_=None):
    return os.getpid()


def map_async_item(dirpath, i):
    """Item 0 fails at once, items 1..7 finish later (marking a file), item 7 fails too."""
    if i == 0:
        raise ValueError("first")
    time.sleep(0.05 if i < 7 else 0.3)
    touch(dirpath, f"done-{i}")
    if i == 7:
        raise ValueError("second")
    return i


# --- implementations ------------------------------------------------------------------------


def _stdlib_pool(*args, **kwargs):
    return multiprocessing.pool.Pool(*args, context=FORK, **kwargs)


IMPLS = {
    "stdlib-pool": _stdlib_pool,
    "bigexec-threads": bigexec_maker("Pool", "threads"),
    "bigexec-local": bigexec_maker("Pool", "local"),
}

NO_LAMBDAS = ("stdlib-pool", "multiprocessing.pool.Pool pickles with pickle, which cannot pickle "
              "lambdas or closures; bigexec ships them with cloudpickle")
SHARED_PID = ("bigexec-threads", "machines of the threads system share the driver's pid, so a "
              "replaced machine cannot be told apart by os.getpid()")


def _terminate_and_join(pool):
    pool.terminate()
    pool.join()


def join(pool):
    """``pool.join()`` in a test: a hang fails the test in seconds, not at its timeout."""
    problem = within(f"{pool!r}.join()", pool.join)
    if problem:
        pytest.fail(problem)


@pytest.fixture(params=list(IMPLS))
def impl(request):
    return request.param


@pytest.fixture
def make_pool(impl):
    """Construct pools of the implementation under test; all are terminated afterwards."""
    made = []

    def make(*args, **kwargs):
        p = IMPLS[impl](*args, **kwargs)
        made.append(p)
        return p

    yield make
    outcomes = [within(f"{p!r}.terminate(); join()", partial(_terminate_and_join, p))
                for p in made]
    problems = [o for o in outcomes if o]
    if problems:
        pytest.fail("; ".join(problems))


@pytest.fixture
def pool(make_pool):
    return make_pool(2)


def warm_up(pool, tmp_path, n=2):
    """Wait until ``n`` workers run tasks at the same time (machines booted)."""
    d = tmp_path / f"rendezvous-{uuid.uuid4().hex}"
    d.mkdir()
    assert all(pool.starmap(rendezvous, [(str(d), n)] * n, chunksize=1))


def drain(it):
    """Everything an imap iterator yields, exceptions included as ``("raised", repr)``."""
    out = []
    while True:
        try:
            out.append(it.next(timeout=BOOT))
        except StopIteration:
            return out
        except Exception as e:
            out.append(("raised", repr(e)))


NOT_RUNNING = "^Pool not running$"


# --- construction ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1])
def test_processes_must_be_at_least_one(make_pool, bad):
    with pytest.raises(ValueError, match="^Number of processes must be at least 1$"):
        make_pool(bad)
    gc.collect()  # a half-built pool is collected quietly


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_maxtasksperchild_must_be_a_positive_int(make_pool, bad):
    with pytest.raises(ValueError, match="^maxtasksperchild must be a positive int or None$"):
        make_pool(1, maxtasksperchild=bad)
    gc.collect()  # a half-built pool is collected quietly


def test_initializer_must_be_callable(make_pool):
    with pytest.raises(TypeError, match="^initializer must be a callable$"):
        make_pool(1, initializer=42)
    gc.collect()  # a half-built pool is collected quietly


def test_processes_run_tasks_at_the_same_time(pool, tmp_path):
    for round in range(3):  # on fresh workers, then on workers that have done other work
        d = tmp_path / f"meet-{round}"
        d.mkdir()
        assert pool.starmap(rendezvous, [(str(d), 2)] * 2, chunksize=1) == [True, True], round
        assert sorted(pool.imap_unordered(square, range(50), chunksize=6)) == [
            i * i for i in range(50)]


def test_default_processes_is_the_cpu_count(make_pool, tmp_path):
    ncpu = os.cpu_count() or 1
    p = make_pool()
    warm_up(p, tmp_path, ncpu)


def test_initializer_runs_in_each_worker_before_its_tasks(make_pool, tmp_path):
    conformance_tasks._INIT_VALUE = None  # forked and in-process workers: no stale value
    p = make_pool(2, initializer=record_init, initargs=(str(tmp_path), "hello"))
    assert p.map(get_init_value, range(20), chunksize=1) == ["hello"] * 20
    p.close()
    join(p)
    assert 1 <= len(os.listdir(tmp_path)) <= 2


def test_maxtasksperchild_replaces_the_worker(impl, make_pool):
    skip_for(impl, SHARED_PID)
    p = make_pool(1, maxtasksperchild=2)
    pids = p.map(pid_of, range(6), chunksize=1)
    assert os.getpid() not in pids
    assert pids[0] == pids[1] and pids[2] == pids[3] and pids[4] == pids[5], pids
    assert len(set(pids)) == 3, pids


# --- apply and apply_async ------------------------------------------------------------------


def test_apply(pool):
    assert pool.apply(pow, (2, 8)) == 256
    assert pool.apply(capture, (1, "a"), {"k": 2}) == ((1, "a"), {"k": 2})
    assert pool.apply(capture) == ((), {})


def test_apply_reraises_the_task_exception_with_a_remote_traceback(pool):
    with pytest.raises(ValueError, match="^boom$") as info:
        pool.apply(raise_value_error, ("boom",))
    text = str(info.value.__cause__)
    assert "Traceback (most recent call last)" in text
    assert "raise_value_error" in text
    with pytest.raises(ConformanceError, match="^custom$"):
        pool.apply(raise_conformance_error, ("custom",))
    assert pool.apply(square, (5,)) == 25  # still usable


def test_async_result_states(pool):
    r = pool.apply_async(sleep_then, (0.3, 7))
    assert not r.ready()
    with pytest.raises(ValueError, match="not ready$"):
        r.successful()
    assert r.wait(0.01) is None
    assert not r.ready()
    r.wait(BOOT)
    assert r.ready() and r.successful()
    assert r.get() == 7 and r.get(timeout=0) == 7


def test_async_result_of_a_failure(pool):
    r = pool.apply_async(raise_value_error, ("nope",))
    r.wait(BOOT)
    assert r.ready()
    assert r.successful() is False
    with pytest.raises(ValueError, match="^nope$"):
        r.get()


def test_async_get_timeout_raises_multiprocessing_timeout_error(pool):
    r = pool.apply_async(sleep_echo, (0.4,))
    with pytest.raises(multiprocessing.TimeoutError):
        r.get(timeout=0.05)
    assert not r.ready()
    assert r.get(timeout=BOOT) == 0.4


def test_apply_async_callback_runs_in_the_driver_before_get_returns(pool):
    seen = []
    r = pool.apply_async(square, (6,), callback=lambda v: seen.append((os.getpid(), v)),
                         error_callback=lambda e: seen.append(("error", e)))
    assert r.get(timeout=BOOT) == 36
    assert seen == [(os.getpid(), 36)]


def test_apply_async_error_callback_gets_the_exception(pool):
    seen = []
    r = pool.apply_async(raise_value_error, ("bad",), callback=lambda v: seen.append(("ok", v)),
                         error_callback=lambda e: seen.append((os.getpid(), e)))
    with pytest.raises(ValueError, match="^bad$"):
        r.get(timeout=BOOT)
    assert len(seen) == 1
    pid, e = seen[0]
    assert pid == os.getpid()
    assert type(e) is ValueError and str(e) == "bad"


def test_apply_async_kwds(pool):
    r = pool.apply_async(capture, (1,), {"x": 2})
    assert r.get(timeout=BOOT) == ((1,), {"x": 2})


# --- map, map_async, starmap ----------------------------------------------------------------


def test_map_returns_results_in_order(pool):
    assert pool.map(sleep_then, []) == []  # not called: empty input
    assert pool.map(square, range(10)) == [i * i for i in range(10)]
    assert pool.map(square, (i for i in range(10)), chunksize=3) == [i * i for i in range(10)]
    sleeps = [0.2, 0.0, 0.1, 0.0]
    assert pool.map(sleep_echo, sleeps, chunksize=1) == sleeps


@pytest.mark.parametrize("chunksize", [1, 100])
def test_map_a_thousand_items(pool, chunksize):
    assert pool.map(square, range(1000), chunksize=chunksize) == [i * i for i in range(1000)]


def test_empty_iterables(pool):
    assert pool.map(square, []) == []
    assert pool.starmap(add, []) == []
    assert list(pool.imap(square, [])) == []
    assert list(pool.imap_unordered(square, [])) == []
    seen = []
    for chunksize in (None, 5):
        r = pool.map_async(square, [], chunksize, callback=seen.append,
                           error_callback=seen.append)
        assert r.ready() and r.successful()  # at once
        assert r.get(timeout=0) == []
    assert seen == []  # the stdlib never calls the callback for an empty input


def test_map_reraises_the_task_exception(pool):
    with pytest.raises(ValueError, match="^boom 3$") as info:
        pool.map(fail_at_3, range(6), chunksize=1)
    assert "fail_at_3" in str(info.value.__cause__)
    assert pool.map(square, [2]) == [4]


def test_map_input_iterator_that_raises_raises_from_map(pool):
    def numbers():
        yield from (1, 2, 3)
        raise KeyError("bad input")

    with pytest.raises(KeyError, match="bad input"):
        pool.map(square, numbers())
    assert pool.map(square, [3]) == [9]


def test_map_async_callback_gets_the_full_list_in_the_driver(pool):
    seen = []
    r = pool.map_async(square, range(50), chunksize=7,
                       callback=lambda v: seen.append((os.getpid(), v)),
                       error_callback=lambda e: seen.append(("error", e)))
    assert r.get(timeout=BOOT) == [i * i for i in range(50)]
    assert seen == [(os.getpid(), [i * i for i in range(50)])]
    assert r.successful()


def test_map_async_does_not_fail_fast(pool, tmp_path):
    warm_up(pool, tmp_path)
    d = tmp_path / "items"
    d.mkdir()
    seen = []

    def on_error(e):
        seen.append((os.getpid(), e, sorted(os.listdir(d))))

    r = pool.starmap_async(map_async_item, [(str(d), i) for i in range(8)], chunksize=1,
                           callback=lambda v: seen.append(("success", v)),
                           error_callback=on_error)
    r.wait(BOOT)
    with pytest.raises(ValueError, match="^first$"):
        r.get()
    assert not r.successful()
    assert len(seen) == 1, seen  # once, with the first exception, after every item finished
    pid, e, done = seen[0]
    assert pid == os.getpid()
    assert type(e) is ValueError and str(e) == "first"
    assert done == [f"done-{i}" for i in range(1, 8)]


def test_map_async_wait_and_ready(pool):
    r = pool.map_async(sleep_echo, [0.2, 0.2], chunksize=1)
    assert not r.ready()
    with pytest.raises(ValueError, match="not ready$"):
        r.successful()
    with pytest.raises(multiprocessing.TimeoutError):
        r.get(timeout=0.01)
    r.wait(BOOT)
    assert r.ready() and r.successful()
    assert r.get() == [0.2, 0.2]


def test_starmap_unpacks_argument_tuples(pool):
    assert pool.starmap(pow, [(2, 3), (3, 2), (10, 0)]) == [8, 9, 1]
    pairs = [(i, 2 * i) for i in range(100)]
    assert pool.starmap(add, pairs, chunksize=7) == [3 * i for i in range(100)]
    assert pool.starmap(capture, [(), (1,), (1, 2)]) == [((), {}), ((1,), {}), ((1, 2), {})]


def test_starmap_async_and_its_callback(pool):
    seen = []
    r = pool.starmap_async(add, [(1, 2), (3, 4)], callback=seen.append)
    assert r.get(timeout=BOOT) == [3, 7]
    assert seen == [[3, 7]]
    with pytest.raises(ValueError, match="^boom 3$"):
        pool.starmap(fail_at_3, [(1,), (3,)])


# --- imap and imap_unordered ----------------------------------------------------------------


def test_imap_keeps_the_input_order(pool):
    sleeps = [0.2, 0.0, 0.1, 0.0, 0.05]
    assert list(pool.imap(sleep_echo, sleeps)) == sleeps
    assert list(pool.imap(square, range(50), chunksize=6)) == [i * i for i in range(50)]
    it = pool.imap(square, range(3))
    assert iter(it) is it
    assert [next(it), it.next(), it.next(timeout=BOOT)] == [0, 1, 4]
    with pytest.raises(StopIteration):
        next(it)


def test_imap_unordered_yields_everything_as_it_completes(pool, tmp_path):
    assert sorted(pool.imap_unordered(square, range(50), chunksize=6)) == [i * i for i in
                                                                           range(50)]
    warm_up(pool, tmp_path)
    it = pool.imap_unordered(sleep_echo, [0.4, 0.0, 0.0, 0.0])
    first = it.next(timeout=BOOT)
    assert first == 0.0  # the slow item does not hold back the others
    assert sorted([first] + list(it)) == [0.0, 0.0, 0.0, 0.4]


def test_imap_next_timeout_raises_multiprocessing_timeout_error(pool):
    for method in (pool.imap, pool.imap_unordered):
        it = method(sleep_echo, [0.3])
        with pytest.raises(multiprocessing.TimeoutError):
            it.next(timeout=0.02)
        assert it.next(timeout=BOOT) == 0.3
        with pytest.raises(StopIteration):
            it.next(timeout=BOOT)


def test_imap_next_timeout_is_one_deadline_while_other_results_arrive(pool, tmp_path):
    # item 0 is slow; the others finish one by one meanwhile, each an arrival that must not
    # restart next()'s wait
    warm_up(pool, tmp_path)
    it = pool.imap(sleep_echo, [5.0] + [0.2] * 15)
    time.sleep(0.3)  # the quick items are arriving
    start = time.monotonic()
    with pytest.raises(multiprocessing.TimeoutError):
        it.next(timeout=0.5)
    assert time.monotonic() - start < 2.0


def test_imap_raises_at_the_failing_item_and_goes_on(pool):
    assert drain(pool.imap(fail_at_3, range(6))) == [0, 1, 2, ("raised", "ValueError('boom 3')"),
                                                     4, 5]
    out = drain(pool.imap_unordered(fail_at_3, range(6)))
    assert sorted(map(str, out)) == sorted(map(str, [0, 1, 2, 4, 5,
                                                     ("raised", "ValueError('boom 3')")]))


def test_imap_delivers_results_before_a_failing_input_iterator(pool):
    def numbers():
        yield from (1, 2, 3)
        raise KeyError("bad input")

    assert drain(pool.imap(square, numbers())) == [1, 4, 9, ("raised", "KeyError('bad input')")]
    out = drain(pool.imap_unordered(square, numbers()))
    assert sorted(map(str, out)) == sorted(map(str, [1, 4, 9,
                                                     ("raised", "KeyError('bad input')")]))
    assert pool.map(square, [4]) == [16]


@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
def test_imap_chunksize_must_be_positive(pool, method):
    with pytest.raises(ValueError, match=f"^{re.escape('Chunksize must be 1+, not 0')}$"):
        getattr(pool, method)(square, [1], chunksize=0)


# --- pickling -------------------------------------------------------------------------------


def test_lambdas_and_closures(impl, pool):
    skip_for(impl, NO_LAMBDAS)
    k = 10

    def add_k(x):
        return x + k

    assert pool.map(lambda x: x * 2, range(5)) == [0, 2, 4, 6, 8]
    assert pool.apply(add_k, (1,)) == 11
    assert list(pool.imap(add_k, [1, 2])) == [11, 12]
    assert pool.starmap(lambda a, b: a - b, [(5, 3)]) == [2]


def test_unpicklable_argument_fails_only_that_task(pool):
    r = pool.apply_async(identity, (threading.Lock(),))
    with pytest.raises(TypeError, match="pickle"):
        r.get(timeout=BOOT)
    with pytest.raises(TypeError, match="pickle"):
        pool.map(identity, [1, threading.Lock()], chunksize=1)
    assert pool.map(square, [1, 2]) == [1, 4]


@pytest.mark.parametrize("error", conformance_tasks.PICKLING_ERRORS, ids=lambda e: type(e).__name__)
def test_an_argument_that_fails_to_pickle_raises_what_pickling_raised(pool, error):
    bad = conformance_tasks.RefusesToPickle(error)
    with pytest.raises(type(error), match="^refuses to be pickled$"):
        pool.apply(identity, (bad,))
    with pytest.raises(type(error), match="^refuses to be pickled$"):
        pool.map(identity, [1, bad], chunksize=1)
    assert pool.map(square, [1, 2]) == [1, 4]


def test_a_task_exception_has_a_multiprocessing_remote_traceback_cause(pool):
    with pytest.raises(ValueError) as info:
        pool.apply(raise_value_error, ("boom",))
    assert type(info.value.__cause__) is multiprocessing.pool.RemoteTraceback
    with pytest.raises(ValueError) as info:
        pool.map(raise_value_error, ["boom"])
    assert type(info.value.__cause__) is multiprocessing.pool.RemoteTraceback
    with pytest.raises(ValueError) as info:
        list(pool.imap(raise_value_error, ["boom"]))
    assert type(info.value.__cause__) is multiprocessing.pool.RemoteTraceback


def test_unpicklable_result_raises_maybe_encoding_error(pool):
    r = pool.apply_async(make_lock)
    with pytest.raises(multiprocessing.pool.MaybeEncodingError, match="^Error sending result: "):
        r.get(timeout=BOOT)
    assert pool.apply(square, (3,)) == 9


# --- close, join, terminate, context manager ------------------------------------------------


def test_close_then_join_finishes_outstanding_work(pool):
    seen = []
    rs = [pool.apply_async(sleep_then, (0.05, i), callback=seen.append) for i in range(6)]
    pool.close()
    join(pool)
    assert all(r.ready() for r in rs)
    assert [r.get(timeout=0) for r in rs] == list(range(6))
    assert sorted(seen) == list(range(6))


def test_join_before_close_raises(pool):
    with pytest.raises(ValueError, match="^Pool is still running$"):
        pool.join()


def test_every_submission_after_close_raises(pool):
    pool.close()
    calls = [
        lambda: pool.apply(square, (1,)),
        lambda: pool.apply_async(square, (1,)),
        lambda: pool.map(square, [1]),
        lambda: pool.map_async(square, [1]),
        lambda: pool.imap(square, [1]),
        lambda: pool.imap_unordered(square, [1]),
        lambda: pool.starmap(add, [(1, 2)]),
        lambda: pool.starmap_async(add, [(1, 2)]),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=NOT_RUNNING):
            call()
    join(pool)


def test_terminate_stops_outstanding_work(pool):
    assert pool.apply(square, (2,)) == 4  # started
    pool.map_async(sleep_echo, [1.0] * 10, chunksize=1)
    time.sleep(0.1)
    start = time.monotonic()
    problem = within("terminate(); join()", partial(_terminate_and_join, pool))
    assert problem is None, problem
    assert time.monotonic() - start < 2.5  # 10 s of work queued on 2 workers
    with pytest.raises(ValueError, match=NOT_RUNNING):
        pool.apply_async(square, (1,))


# Longer than bigexec's imap window (8 chunks per process), so that its feeder waits for room;
# short enough that the standard library's task handler never blocks on a full pipe (with
# 100,000 items, the stdlib pool's own terminate()/join() hung once on 3.10).
_LONG_INPUT = 200


def _break_at_2(it):
    for x in it:
        if x >= 2:
            break


def _raise_at_3(it):
    with pytest.raises(ValueError, match="boom 3"):
        for _ in it:
            pass


@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
@pytest.mark.parametrize("task, leave", [(identity, _break_at_2), (fail_at_3, _raise_at_3)],
                         ids=["break", "task-error"])
def test_leaving_with_in_the_middle_of_imap_returns(make_pool, method, task, leave):
    p = make_pool(2)

    def leave_early():
        with p:
            leave(getattr(p, method)(task, range(_LONG_INPUT)))

    problem = within("leaving the with block", leave_early)
    assert problem is None, problem
    join(p)


@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
def test_terminate_after_reading_part_of_imap_returns_and_join_too(pool, method):
    it = getattr(pool, method)(identity, range(_LONG_INPUT))
    assert it.next(timeout=BOOT) is not None
    assert it.next(timeout=BOOT) is not None
    problem = within("terminate(); join()", partial(_terminate_and_join, pool))
    assert problem is None, problem


@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
def test_close_then_join_with_an_unread_imap_returns_and_keeps_its_results(pool, method):
    it = getattr(pool, method)(square, range(200))
    pool.close()
    join(pool)
    assert sorted(it) == [i * i for i in range(200)]


def test_context_manager_terminates_on_exit(make_pool):
    with make_pool(2) as p:
        assert p.map(square, range(4)) == [0, 1, 4, 9]
    with pytest.raises(ValueError, match=NOT_RUNNING):
        p.map_async(square, [1])
    with pytest.raises(ValueError, match=NOT_RUNNING):
        p.apply(square, (1,))
    join(p)  # allowed after terminate
