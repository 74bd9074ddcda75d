"""The function cache: a function is pickled once only while what it captures cannot change."""

from __future__ import annotations

import math
import types

import bigexec
from bigexec.tasks import FunctionCache, PickledFunction

SETTINGS = {"scale": 1}
FACTOR = 3


def pure(x):
    return math.sqrt(x) * FACTOR


def reads_mutable_global(x):
    return x * SETTINGS["scale"]


def helper(x):
    return x + 1


def uses_helper(x):
    return helper(x) * 2


def as_main(fn):
    """A copy of ``fn`` as if defined in ``__main__``: pickled by value, as a script's are."""
    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__,
                              fn.__closure__)
    copy.__module__ = "__main__"
    return copy


def test_pure_functions_are_pickled_once():
    cache = FunctionCache()
    f = as_main(pure)
    a, b = cache.encode(f), cache.encode(f)
    assert isinstance(a, PickledFunction) and a is b


def test_functions_reading_mutable_data_are_pickled_every_time():
    cache = FunctionCache()
    f = as_main(reads_mutable_global)
    assert cache.encode(f) is f
    items = []
    assert cache.encode(lambda: len(items)) is not None
    f = lambda: len(items)  # noqa: E731
    assert cache.encode(f) is f


def test_closures_over_immutable_values_are_told_apart():
    cache = FunctionCache()

    def make(k):
        return lambda x: x * k

    two, three = make(2), make(3)
    e2, e3 = cache.encode(two), cache.encode(three)
    assert isinstance(e2, PickledFunction) and isinstance(e3, PickledFunction)
    assert e2.blob != e3.blob


def test_rebinding_a_referenced_global_invalidates(monkeypatch):
    cache = FunctionCache()
    f = as_main(uses_helper)
    monkeypatch.setitem(f.__globals__, "helper", as_main(helper))
    first = cache.encode(f)
    assert isinstance(first, PickledFunction) and cache.encode(f) is first
    monkeypatch.setitem(f.__globals__, "helper", as_main(lambda x: x - 1))
    second = cache.encode(f)
    assert isinstance(second, PickledFunction) and second is not first


def test_builtins_and_importable_functions_go_by_reference():
    cache = FunctionCache()
    assert cache.encode(abs) is abs
    assert cache.encode(math.sqrt) is math.sqrt


def test_executor_sees_a_rebound_global_but_keeps_its_copy_of_one_changed_in_place(
        monkeypatch):
    # bigexec.namespaces: the machine's copy of a global is replaced only when the driver
    # binds the name to another object (as under fork, a change in place is not seen).
    monkeypatch.setitem(globals(), "SETTINGS", {"scale": 1})
    with bigexec.Executor(1, system="threads") as ex:
        reads, p = as_main(reads_mutable_global), as_main(pure)
        assert ex.submit(reads, 5).result(timeout=30) == 5
        SETTINGS["scale"] = 10
        assert ex.submit(reads, 5).result(timeout=30) == 5
        monkeypatch.setitem(globals(), "SETTINGS", {"scale": 10})
        assert ex.submit(reads, 5).result(timeout=30) == 50
        assert ex.submit(p, 4).result(timeout=30) == 6.0
        assert ex.submit(p, 9).result(timeout=30) == 9.0  # the cached pickle, run again


# --- how a batch's results leave the machine ------------------------------------------------


def _records(frames):
    from bigexec.rpc import codec
    from bigexec.tasks import decode_frame

    out = []
    for frame in frames:
        for index, outcome, _seconds, payload in decode_frame(frame):
            out.append((index, outcome, codec.loads(payload)))
    return out


def test_quick_results_share_frames_and_never_wait_for_a_slow_task():
    import time

    from bigexec.tasks import OK, TaskRunner

    runner = TaskRunner()
    batch = [(abs, (-i,), {}) for i in range(200)] + [(time.sleep, (0.6,), {})]
    t0 = time.monotonic()
    frames = []
    quick_done_at = None
    for frame in runner.run(batch, None):
        frames.append(frame)
        if quick_done_at is None and len(_records(frames)) >= 200:
            quick_done_at = time.monotonic() - t0
        if len(frames) == 1:
            time.sleep(0.1)  # records that arrive meanwhile wait, then leave together
    got = _records(frames)
    assert [g[0] for g in got] == list(range(201))
    assert all(outcome == OK for _, outcome, _ in got)
    assert [value for _, _, value in got[:200]] == list(range(200))
    assert len(frames) < 100, f"{len(frames)} frames for 201 results: nothing was joined"
    # the slow task's 0.6 s did not hold back the results before it
    assert quick_done_at is not None and quick_done_at < 0.55, quick_done_at


def test_closing_a_batch_early_runs_no_more_tasks():
    import time

    from bigexec.tasks import TaskRunner

    ran = []

    def note(i):
        ran.append(i)
        time.sleep(0.01)
        return i

    runner = TaskRunner()
    stream = runner.run([(note, (i,), {}) for i in range(100)], None)
    next(stream)
    stream.close()  # as the server does when the driver goes away
    time.sleep(0.1)
    count = len(ran)
    time.sleep(0.2)
    assert len(ran) == count < 100, "tasks kept running after the batch was closed"
