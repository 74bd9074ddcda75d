"""Conformance of ``bigexec.Executor`` with the standard library's ``concurrent.futures``.

One suite of contract tests, run against every implementation through the ``make_executor`` and
``executor`` fixtures:

- ``stdlib-thread``: ``concurrent.futures.ThreadPoolExecutor(2)``, the reference;
- ``stdlib-process``: ``concurrent.futures.ProcessPoolExecutor(2)`` (fork context), the
  reference wherever arguments and results are pickled;
- ``bigexec-threads`` and ``bigexec-local``: ``bigexec.Executor(2, system=...)``.

So every difference between bigexec and the standard library shows up as a failing test. Where
the two stdlib executors themselves differ (chunksize validation, pickling), bigexec must behave
as ``ProcessPoolExecutor`` (everything is pickled over RPC, even on ``threads``), except that it
ships lambdas and closures with cloudpickle; the stdlib variant that cannot take part is skipped
with its reason. Run only the reference with ``-k "not bigexec"``.

Tasks are module-level functions (``ProcessPoolExecutor`` pickles them by reference; the fork
context makes this module importable in its workers). State shared between the driver and the
workers goes through files in ``tmp_path``, which every implementation can see.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import dataclasses
import gc
import itertools
import os
import re
import sys
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

HAS_BUFFERSIZE = sys.version_info >= (3, 14)  # Executor.map(buffersize=) is new in 3.14


# --- tasks (module level, so that the stdlib ProcessPoolExecutor can pickle them) -------------


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: int


def add3(a, b, c):
    return a + b + c


def sleep_echo(seconds, value=None):
    time.sleep(seconds)
    return seconds if value is None else value


def raise_system_exit(code):
    raise SystemExit(code)


def fail_at(x, bad=3):
    if x == bad:
        raise ValueError(f"boom {x}")
    return x


def reverse_bytes(data):
    return data[::-1]


def scale_point(p, k):
    return Point(p.x * k, p.y * k)


def pid_and_interval(seconds):
    start = time.time()
    time.sleep(seconds)
    return os.getpid(), start, time.time()


def touch_and_sleep(dirpath, i, seconds):
    touch(dirpath, f"task-{i}")
    time.sleep(seconds)
    return i


def failing_init():
    raise RuntimeError("initializer failed on purpose")


# --- implementations ------------------------------------------------------------------------


def _thread_executor(*args, **kwargs):
    return cf.ThreadPoolExecutor(*args, **kwargs)


def _process_executor(*args, **kwargs):
    return cf.ProcessPoolExecutor(*args, mp_context=FORK, **kwargs)


IMPLS = {
    "stdlib-thread": _thread_executor,
    "stdlib-process": _process_executor,
    "bigexec-threads": bigexec_maker("Executor", "threads"),
    "bigexec-local": bigexec_maker("Executor", "local"),
}

# the stdlib variant that cannot take part in a test, and why
NO_PICKLING = ("stdlib-thread", "ThreadPoolExecutor passes arguments and results by reference: "
               "nothing is pickled, so nothing can fail to pickle")
NO_REMOTE_TB = ("stdlib-thread", "ThreadPoolExecutor runs tasks in-process: the exception keeps "
                "its real traceback and gets no remote-traceback __cause__")
NO_LAMBDAS = ("stdlib-process", "ProcessPoolExecutor pickles with pickle, which cannot pickle "
              "lambdas, closures or local classes; bigexec ships them with cloudpickle")
NO_CHUNKSIZE = ("stdlib-thread", "ThreadPoolExecutor ignores chunksize; bigexec must validate it "
                "as ProcessPoolExecutor does")


def needs_buffersize(impl):
    if impl.startswith("stdlib") and not HAS_BUFFERSIZE:
        pytest.skip(f"Executor.map(buffersize=) is new in Python 3.14; this is "
                    f"{sys.version_info.major}.{sys.version_info.minor}")


def _shutdown_within(ex, **kwargs):
    """``ex.shutdown(**kwargs)``, bounded: returns what went wrong, or None."""
    return within(f"{ex!r}.shutdown({kwargs})", partial(ex.shutdown, **kwargs))


def shutdown(ex, **kwargs):
    """``ex.shutdown(**kwargs)`` in a test: a hang fails the test in seconds, not at its timeout."""
    problem = _shutdown_within(ex, **kwargs)
    if problem:
        pytest.fail(problem)


@pytest.fixture(params=list(IMPLS))
def impl(request):
    return request.param


@pytest.fixture
def make_executor(impl):
    """Construct executors of the implementation under test; all are shut down afterwards."""
    made = []

    def make(*args, **kwargs):
        ex = IMPLS[impl](*args, **kwargs)
        made.append(ex)
        return ex

    yield make
    outcomes = [_shutdown_within(ex, wait=True, cancel_futures=True) for ex in made]
    problems = [o for o in outcomes if o]
    if problems:
        pytest.fail("; ".join(problems))


@pytest.fixture
def executor(make_executor):
    return make_executor(2)


def warm_up(ex, tmp_path, n=2):
    """Wait until ``n`` workers run tasks at the same time (machines booted, threads started)."""
    d = tmp_path / f"rendezvous-{uuid.uuid4().hex}"
    d.mkdir()
    assert all(ex.map(rendezvous, [str(d)] * n, [n] * n, timeout=2 * BOOT))


def wait_running(f, timeout=BOOT):
    deadline = time.monotonic() + timeout
    while not f.running():
        assert not f.done(), "the task finished before it was seen running"
        assert time.monotonic() < deadline, "the task never started running"
        time.sleep(0.001)


# --- construction ---------------------------------------------------------------------------


def test_is_a_concurrent_futures_executor_returning_real_futures(executor):
    assert isinstance(executor, cf.Executor)
    f = executor.submit(square, 7)
    assert isinstance(f, cf.Future)
    assert f.result(timeout=BOOT) == 49


@pytest.mark.parametrize("bad", [0, -1])
def test_max_workers_must_be_positive(make_executor, bad):
    with pytest.raises(ValueError, match="^max_workers must be greater than 0$"):
        make_executor(bad)
    gc.collect()  # a half-built executor is collected quietly


def test_initializer_must_be_callable(make_executor):
    with pytest.raises(TypeError, match="^initializer must be a callable$"):
        make_executor(2, initializer=42)
    gc.collect()  # a half-built executor is collected quietly


def test_default_max_workers_is_the_cpu_count(make_executor, tmp_path):
    ncpu = os.cpu_count() or 1
    ex = make_executor()
    warm_up(ex, tmp_path, ncpu)  # at least ncpu workers run at once
    pids = {pid for pid, _, _ in ex.map(pid_and_interval, [0.02] * (3 * ncpu))}
    assert len(pids) <= ncpu


def test_two_workers_run_tasks_at_the_same_time(executor, tmp_path):
    for round in range(3):  # on fresh workers, then on workers that have done other work
        d = tmp_path / f"meet-{round}"
        d.mkdir()
        fs = [executor.submit(rendezvous, str(d), 2) for _ in range(2)]
        assert [f.result(timeout=2 * BOOT) for f in fs] == [True, True], round
        assert list(executor.map(square, range(50), chunksize=6)) == [i * i for i in range(50)]


def test_max_workers_bounds_concurrency(executor, tmp_path):
    warm_up(executor, tmp_path)
    results = list(executor.map(pid_and_interval, [0.15] * 6, timeout=BOOT))
    intervals = [(s, e) for _, s, e in results]
    overlap = max(sum(1 for s, e in intervals if s <= t < e) for t, _ in intervals)
    assert overlap == 2
    assert len({pid for pid, _, _ in results}) <= 2


# --- submit ---------------------------------------------------------------------------------


def test_submit_positional_arguments_and_builtins(executor):
    assert executor.submit(add, 2, 3).result(timeout=BOOT) == 5
    assert executor.submit(pow, 2, 8).result(timeout=BOOT) == 256
    assert executor.submit(sorted, [3, 1, 2], reverse=True).result(timeout=BOOT) == [3, 2, 1]


def test_submit_passes_every_keyword_through_even_fn_self_and_timeout(executor):
    # submit(fn, /, *args, **kwargs): "fn" is positional-only, and nothing else is reserved
    f = executor.submit(capture, 1, "a", fn="x", self="y", timeout=3, chunksize=4)
    assert f.result(timeout=BOOT) == ((1, "a"), {"fn": "x", "self": "y", "timeout": 3,
                                                 "chunksize": 4})


def test_submit_from_many_threads_at_once(executor):
    results = {}

    def client(k):
        fs = [executor.submit(add, k, i) for i in range(25)]
        results[k] = [f.result(timeout=BOOT) for f in fs]

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {k: [k + i for i in range(25)] for k in range(4)}


def test_module_level_classes_round_trip(executor):
    p = executor.submit(scale_point, Point(3, 4), 2).result(timeout=BOOT)
    assert p == Point(6, 8)
    assert type(p) is Point


def test_large_arguments_and_results(executor):
    data = os.urandom(1024) * 4096  # 4 MiB
    assert executor.submit(reverse_bytes, data).result(timeout=BOOT) == data[::-1]
    assert executor.submit(len, data).result(timeout=BOOT) == len(data)


def test_lambdas(impl, executor):
    skip_for(impl, NO_LAMBDAS)
    assert executor.submit(lambda x: x + 1, 41).result(timeout=BOOT) == 42
    assert list(executor.map(lambda x, y: x * y, range(5), range(5))) == [0, 1, 4, 9, 16]


def test_closures(impl, executor):
    skip_for(impl, NO_LAMBDAS)
    offset = 100

    def make_adder(n):
        def adder(x):
            return x + n + offset

        return adder

    assert executor.submit(make_adder(5), 1).result(timeout=BOOT) == 106
    assert list(executor.map(make_adder(0), [1, 2])) == [101, 102]
    # a closure returned by a task comes back callable
    f = executor.submit(make_adder, 7).result(timeout=BOOT)
    assert f(1) == 108


def test_classes_defined_in_the_test(impl, executor):
    skip_for(impl, NO_LAMBDAS)

    class Accumulator:
        def __init__(self, total):
            self.total = total

        def add(self, x):
            self.total += x
            return self

    def run(acc, xs):
        for x in xs:
            acc.add(x)
        return acc

    acc = executor.submit(run, Accumulator(10), [1, 2, 3]).result(timeout=BOOT)
    assert isinstance(acc, Accumulator)
    assert acc.total == 16


# --- exceptions -----------------------------------------------------------------------------


def test_task_exception_keeps_its_type_and_message(executor):
    f = executor.submit(raise_value_error, "boom 1")
    with pytest.raises(ValueError, match="^boom 1$"):
        f.result(timeout=BOOT)
    e = f.exception(timeout=BOOT)
    assert type(e) is ValueError and e.args == ("boom 1",)

    g = executor.submit(raise_conformance_error, "custom")
    e = g.exception(timeout=BOOT)
    assert type(e) is ConformanceError and str(e) == "custom"
    # the executor is still usable
    assert executor.submit(square, 3).result(timeout=BOOT) == 9


def test_task_exception_carries_the_remote_traceback_as_cause(impl, executor):
    skip_for(impl, NO_REMOTE_TB)
    e = executor.submit(raise_value_error, "boom 2").exception(timeout=BOOT)
    assert isinstance(e, ValueError)
    cause = e.__cause__
    assert isinstance(cause, BaseException)
    text = str(cause)
    assert "Traceback (most recent call last)" in text
    assert "raise_value_error" in text  # the frame that raised
    assert "ValueError: boom 2" in text


def test_system_exit_in_a_task_fails_only_that_future(executor):
    f = executor.submit(raise_system_exit, 3)
    e = f.exception(timeout=BOOT)
    assert type(e) is SystemExit and e.code == 3
    with pytest.raises(SystemExit):
        f.result()
    assert [executor.submit(square, i).result(timeout=BOOT) for i in range(4)] == [0, 1, 4, 9]


def test_unpicklable_argument_fails_only_that_future(impl, executor):
    skip_for(impl, NO_PICKLING)
    bad = executor.submit(identity, threading.Lock())  # submit itself must not raise
    good = executor.submit(identity, 5)
    e = bad.exception(timeout=BOOT)
    assert isinstance(e, TypeError)
    assert "pickle" in str(e)
    assert good.result(timeout=BOOT) == 5
    assert executor.submit(square, 6).result(timeout=BOOT) == 36


@pytest.mark.parametrize("error", conformance_tasks.PICKLING_ERRORS, ids=lambda e: type(e).__name__)
def test_an_argument_or_result_that_fails_to_pickle_raises_what_pickling_raised(impl, executor,
                                                                                error):
    skip_for(impl, NO_PICKLING)
    bad = executor.submit(identity, conformance_tasks.RefusesToPickle(error))
    e = bad.exception(timeout=BOOT)
    assert type(e) is type(error) and str(e) == "refuses to be pickled"
    e = executor.submit(conformance_tasks.refusing_result, error).exception(timeout=BOOT)
    assert type(e) is type(error) and str(e) == "refuses to be pickled"
    assert executor.submit(square, 6).result(timeout=BOOT) == 36


def test_unpicklable_result_fails_only_that_task(impl, executor):
    skip_for(impl, NO_PICKLING)
    bad = executor.submit(make_lock)
    others = [executor.submit(square, i) for i in range(4)]
    e = bad.exception(timeout=BOOT)
    assert isinstance(e, TypeError)
    assert "pickle" in str(e)
    assert [f.result(timeout=BOOT) for f in others] == [0, 1, 4, 9]
    assert executor.submit(square, 7).result(timeout=BOOT) == 49


# --- futures: timeouts, cancellation, callbacks, waiting ------------------------------------


def test_result_and_exception_time_out_with_the_futures_timeout_error(executor):
    # concurrent.futures.TimeoutError: the builtin TimeoutError from 3.11 on, its own class on
    # 3.10, where bigexec's futures must raise the same class as the stdlib's
    f = executor.submit(sleep_echo, 0.4, "late")
    with pytest.raises(cf.TimeoutError):
        f.result(timeout=0.05)
    with pytest.raises(cf.TimeoutError):
        f.exception(timeout=0.05)
    assert f.result(timeout=BOOT) == "late"
    assert f.exception() is None


def test_cancel_a_pending_future(executor):
    blockers = [executor.submit(sleep_echo, 0.3) for _ in range(2)]
    fillers = [executor.submit(square, i) for i in range(10)]
    last = fillers[-1]
    assert last.cancel() is True
    assert last.cancelled() and last.done() and not last.running()
    with pytest.raises(cf.CancelledError):
        last.result(timeout=1)
    assert last.cancel() is True  # cancelling again still reports success
    assert [f.result(timeout=BOOT) for f in blockers] == [0.3, 0.3]
    assert [f.result(timeout=BOOT) for f in fillers[:-1]] == [i * i for i in range(9)]


def test_cancel_a_running_future_returns_false(executor):
    f = executor.submit(sleep_echo, 0.3, "done")
    wait_running(f)
    assert f.cancel() is False
    assert not f.cancelled()
    assert f.result(timeout=BOOT) == "done"


def test_cancel_a_finished_future_returns_false(executor):
    f = executor.submit(square, 5)
    assert f.result(timeout=BOOT) == 25
    assert f.cancel() is False
    assert not f.cancelled() and f.done()
    assert f.result() == 25


def test_done_callbacks_run_in_the_driver(executor):
    seen = []
    f = executor.submit(square, 4)
    f.add_done_callback(lambda fut: seen.append((os.getpid(), fut.result())))
    cf.wait([f], timeout=BOOT)
    deadline = time.monotonic() + 5
    while not seen and time.monotonic() < deadline:
        time.sleep(0.001)
    assert seen == [(os.getpid(), 16)]
    # added to a finished future: called at once, in the calling thread
    here = []
    f.add_done_callback(lambda fut: here.append(threading.get_ident()))
    assert here == [threading.get_ident()]


def test_as_completed_yields_every_future(executor):
    fs = [executor.submit(sleep_echo, s, i) for i, s in enumerate([0.2, 0.0, 0.1, 0.0, 0.05])]
    done = list(cf.as_completed(fs, timeout=BOOT))
    assert sorted(done, key=fs.index) == fs
    assert [f.result() for f in fs] == [0, 1, 2, 3, 4]


def test_as_completed_times_out(executor):
    f = executor.submit(sleep_echo, 0.4)
    with pytest.raises(cf.TimeoutError):
        next(cf.as_completed([f], timeout=0.05))
    assert f.result(timeout=BOOT) == 0.4


def test_wait_first_completed_and_all_completed(executor, tmp_path):
    warm_up(executor, tmp_path)
    slow = executor.submit(sleep_echo, 0.5, "slow")
    quick = executor.submit(sleep_echo, 0.0, "quick")
    done, not_done = cf.wait([slow, quick], timeout=BOOT, return_when=cf.FIRST_COMPLETED)
    assert done == {quick} and not_done == {slow}
    done, not_done = cf.wait([slow, quick], timeout=0.01)
    assert not_done == {slow}
    done, not_done = cf.wait([slow, quick], timeout=BOOT)
    assert done == {slow, quick} and not not_done
    failing = executor.submit(raise_value_error, "x")
    done, _ = cf.wait([failing], timeout=BOOT, return_when=cf.FIRST_EXCEPTION)
    assert done == {failing}


def test_asyncio_run_in_executor_and_wrap_future(executor):
    async def main():
        loop = asyncio.get_running_loop()
        squares = await asyncio.gather(*(loop.run_in_executor(executor, square, i)
                                         for i in range(5)))
        wrapped = await asyncio.wrap_future(executor.submit(add, 2, 2))
        return squares, wrapped

    assert asyncio.run(main()) == ([0, 1, 4, 9, 16], 4)


# --- map ------------------------------------------------------------------------------------


def test_map_returns_results_in_input_order(executor):
    sleeps = [0.2, 0.0, 0.1, 0.0, 0.05]
    assert list(executor.map(sleep_echo, sleeps, range(5))) == [0, 1, 2, 3, 4]
    assert list(executor.map(square, (i for i in range(20)))) == [i * i for i in range(20)]


@pytest.mark.parametrize("chunksize", [1, 100])
def test_map_a_thousand_items(executor, chunksize):
    out = list(executor.map(square, range(1000), chunksize=chunksize, timeout=BOOT))
    assert out == [i * i for i in range(1000)]


def test_map_several_iterables_stops_at_the_shortest(executor):
    assert list(executor.map(pow, [2, 3, 4], [5, 6])) == [32, 729]
    assert list(executor.map(add3, range(4), range(10), [10, 20, 30])) == [10, 22, 34]
    assert list(executor.map(add, [1, 2], [3, 4], chunksize=5)) == [4, 6]


def test_map_over_empty_iterables(executor):
    assert list(executor.map(square, [])) == []
    assert list(executor.map(square, [], chunksize=10)) == []
    assert list(executor.map(add, [1, 2], [])) == []


def test_map_raises_at_the_failing_item_after_earlier_results(executor):
    it = executor.map(fail_at, range(6), timeout=BOOT)
    assert [next(it), next(it), next(it)] == [0, 1, 2]
    with pytest.raises(ValueError, match="^boom 3$"):
        next(it)
    assert list(it) == []  # the iterator is finished after the exception


def test_map_with_chunks_yields_the_chunks_before_the_failing_one(executor):
    got = []
    with pytest.raises(ValueError, match="^boom 13$"):
        for x in executor.map(fail_at, range(20), [13] * 20, chunksize=5, timeout=BOOT):
            got.append(x)
    # ProcessPoolExecutor loses the failing chunk's earlier items (10..12); one item at a time
    # would also yield them: either way a prefix, never anything past the failure.
    assert got == list(range(len(got)))
    assert 10 <= len(got) <= 13


def test_map_timeout_raises_the_futures_timeout_error(executor):
    it = executor.map(sleep_echo, [0.5], timeout=0.05)
    start = time.monotonic()
    with pytest.raises(cf.TimeoutError):
        next(it)
    assert time.monotonic() - start < 0.45
    assert list(executor.map(square, range(5), timeout=BOOT)) == [0, 1, 4, 9, 16]


def test_map_consumes_the_input_eagerly_without_buffersize(executor):
    consumed = []

    def numbers():
        for i in range(5):
            consumed.append(i)
            yield i

    it = executor.map(square, numbers())
    assert consumed == [0, 1, 2, 3, 4]  # before the first result is asked for
    assert list(it) == [0, 1, 4, 9, 16]


def test_map_input_iterator_that_raises_raises_from_map(executor):
    def numbers():
        yield from (1, 2, 3)
        raise KeyError("bad input")

    with pytest.raises(KeyError, match="bad input"):
        executor.map(square, numbers())
    assert list(executor.map(square, [4])) == [16]


def test_closing_the_map_iterator_cancels_the_rest(executor, tmp_path):
    n = 40
    it = executor.map(touch_and_sleep, [str(tmp_path)] * n, range(n), [0.05] * n, timeout=BOOT)
    assert next(it) == 0
    it.close()
    shutdown(executor, wait=True)
    ran = len(os.listdir(tmp_path))
    assert 1 <= ran <= n // 2, f"{ran} of {n} tasks ran after the iterator was closed"


@pytest.mark.parametrize("bad", [0, -1])
def test_map_chunksize_must_be_positive(impl, executor, bad):
    skip_for(impl, NO_CHUNKSIZE)
    with pytest.raises(ValueError, match=f"^{re.escape('chunksize must be >= 1.')}$"):
        executor.map(square, range(3), chunksize=bad)


def test_map_buffersize_validation(impl, executor):
    needs_buffersize(impl)
    for bad in ("2", 1.5):
        with pytest.raises(TypeError, match="^buffersize must be an integer or None$"):
            executor.map(square, range(3), buffersize=bad)
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"^{re.escape('buffersize must be None or > 0')}$"):
            executor.map(square, range(3), buffersize=bad)


def test_map_buffersize_works_over_an_infinite_input(impl, executor):
    needs_buffersize(impl)

    def endless():  # itertools.count(), but an eager map fails instead of eating all memory
        for i in itertools.count():
            if i == 100_000:
                raise AssertionError("map read 100000 items of an infinite input")
            yield i

    it = executor.map(square, endless(), buffersize=3, timeout=BOOT)
    assert list(itertools.islice(it, 10)) == [i * i for i in range(10)]
    it.close()


def test_map_buffersize_bounds_how_far_the_input_is_read(impl, executor):
    needs_buffersize(impl)
    consumed = []

    def numbers():
        for i in range(30):
            consumed.append(i)
            yield i

    it = executor.map(square, numbers(), buffersize=2, timeout=BOOT)
    assert len(consumed) <= 2
    for k in range(1, 6):
        assert next(it) == (k - 1) ** 2
        assert len(consumed) <= 2 + k
    assert list(it) == [i * i for i in range(5, 30)]
    assert len(consumed) == 30


def test_map_buffersize_with_chunksize(impl, executor):
    needs_buffersize(impl)
    out = list(executor.map(add, range(50), range(50), chunksize=4, buffersize=2, timeout=BOOT))
    assert out == [2 * i for i in range(50)]


# --- shutdown and the context manager -------------------------------------------------------


def test_shutdown_wait_waits_for_running_and_pending_tasks(executor):
    fs = [executor.submit(sleep_echo, 0.1, i) for i in range(4)]
    shutdown(executor, wait=True)
    assert all(f.done() for f in fs)
    assert [f.result() for f in fs] == [0, 1, 2, 3]


def test_shutdown_without_wait_still_runs_submitted_tasks(executor):
    fs = [executor.submit(sleep_echo, 0.05, i) for i in range(4)]
    shutdown(executor, wait=False)
    assert [f.result(timeout=BOOT) for f in fs] == [0, 1, 2, 3]


def test_shutdown_is_idempotent(executor):
    assert executor.submit(square, 2).result(timeout=BOOT) == 4
    shutdown(executor)
    shutdown(executor)
    shutdown(executor, wait=False)
    shutdown(executor, wait=True, cancel_futures=True)


def test_submit_and_map_after_shutdown_raise_runtime_error(executor):
    shutdown(executor)
    message = "^cannot schedule new futures after shutdown$"
    with pytest.raises(RuntimeError, match=message):
        executor.submit(square, 2)
    with pytest.raises(RuntimeError, match=message):
        executor.map(square, [1, 2])


def test_shutdown_cancel_futures_cancels_only_pending_ones(executor):
    blockers = [executor.submit(sleep_echo, 0.3, "blocker") for _ in range(2)]
    for b in blockers:
        wait_running(b)
    pending = [executor.submit(square, i) for i in range(20)]
    shutdown(executor, wait=True, cancel_futures=True)
    if type(executor).__module__.startswith("bigexec"):
        # the documented difference: bigexec also stops the tasks that are running
        for b in blockers:
            with pytest.raises(cf.CancelledError, match="cancel_futures"):
                b.result(timeout=1)
            assert not b.cancelled()  # a running future cannot enter CANCELLED
    else:
        assert [b.result(timeout=1) for b in blockers] == ["blocker", "blocker"]
    assert all(f.done() for f in pending)
    assert all(f.cancelled() for f in pending[10:])
    for i, f in enumerate(pending):
        if not f.cancelled():
            assert f.result() == i * i


def test_submit_after_shutdown_cancel_futures_with_running_tasks_says_shutdown(executor):
    blockers = [executor.submit(sleep_echo, 0.3, "blocker") for _ in range(2)]
    for b in blockers:
        wait_running(b)
    shutdown(executor, wait=True, cancel_futures=True)
    with pytest.raises(RuntimeError, match="^cannot schedule new futures after shutdown$"):
        executor.submit(square, 2)


def test_context_manager_shuts_down_and_waits(make_executor):
    with make_executor(2) as ex:
        f = ex.submit(sleep_echo, 0.2, "ok")
    assert f.done() and f.result() == "ok"
    with pytest.raises(RuntimeError, match="^cannot schedule new futures after shutdown$"):
        ex.submit(square, 1)


def test_context_manager_returns_the_executor(make_executor):
    ex = make_executor(2)
    with ex as entered:
        assert entered is ex


# --- initializer ----------------------------------------------------------------------------


def test_initializer_runs_once_per_worker_before_its_tasks(make_executor, tmp_path):
    conformance_tasks._INIT_VALUE = None  # forked and in-process workers: no stale value
    ex = make_executor(2, initializer=record_init, initargs=(str(tmp_path), "hello"))
    values = list(ex.map(get_init_value, range(20), timeout=BOOT))
    assert values == ["hello"] * 20
    shutdown(ex, wait=True)
    assert 1 <= len(os.listdir(tmp_path)) <= 2


def test_failing_initializer_breaks_the_executor(make_executor):
    ex = make_executor(2, initializer=failing_init)
    fs = []
    try:
        for i in range(5):
            fs.append(ex.submit(square, i))
    except cf.BrokenExecutor:
        pass  # the executor may break while these are submitted: later submits then raise
    assert fs, "the first submit, before any worker started, must return a future"
    for f in fs:
        e = f.exception(timeout=BOOT)
        assert isinstance(e, cf.BrokenExecutor), repr(e)
        with pytest.raises(cf.BrokenExecutor):
            f.result()
    with pytest.raises(cf.BrokenExecutor):
        ex.submit(square, 1)
    with pytest.raises(cf.BrokenExecutor):
        ex.map(square, [1, 2])
