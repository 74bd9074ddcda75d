"""bigexec.progress: bars over futures, as_completed, Executor.map, Pool.imap and booting
machines, drawn with tqdm and as log lines."""

from __future__ import annotations

import concurrent.futures as cf
import gc
import importlib
import logging
import multiprocessing
import sys
import threading

import pytest
from conftest import FAST

import bigexec

progress_module = importlib.import_module("bigexec.progress")
tqdm_auto = pytest.importorskip("tqdm.auto")  # the test extra installs it


class RecordingBar(tqdm_auto.tqdm):
    """A real tqdm bar that remembers what it was told, drawing into nowhere."""

    made: list[RecordingBar] = []

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("file", _Nowhere())
        super().__init__(*args, **kwargs)
        self.updates = 0
        self.closes = 0
        self.postfixes: list[dict] = []
        RecordingBar.made.append(self)

    def update(self, n=1):
        self.updates += n
        return super().update(n)

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        self.postfixes.append(dict(kwargs))
        return super().set_postfix(ordered_dict, refresh, **kwargs)

    def close(self):
        self.closes += 1
        return super().close()


class _Nowhere:
    def write(self, s):
        return len(s)

    def flush(self):
        pass


@pytest.fixture
def bars(monkeypatch):
    RecordingBar.made = []
    monkeypatch.setattr(tqdm_auto, "tqdm", RecordingBar)
    return RecordingBar.made


@pytest.fixture
def lines(caplog):
    caplog.set_level(logging.INFO, logger="bigexec.progress")

    def read() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "bigexec.progress"]

    return read


@pytest.fixture
def no_tqdm(monkeypatch):
    """tqdm is not installed, as far as bigexec can tell."""
    for name in [m for m in sys.modules if m == "tqdm" or m.startswith("tqdm.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)


@pytest.fixture
def threads():
    with cf.ThreadPoolExecutor(4) as ex:
        yield ex


def _gated(ex: cf.ThreadPoolExecutor, n: int) -> tuple[list[threading.Event], list[cf.Future]]:
    """``n`` futures, each finishing (with its index) when its event is set."""
    gates = [threading.Event() for _ in range(n)]

    def run(i: int) -> int:
        assert gates[i].wait(30)
        if i == 2:
            raise ValueError("item 2 fails")
        return i

    return gates, [ex.submit(run, i) for i in range(n)]


# --- futures -----------------------------------------------------------------------------

def test_futures_advance_as_they_finish_without_iterating(bars):
    ex = cf.ThreadPoolExecutor(4)
    try:
        gates, fs = _gated(ex, 4)
        p = bigexec.progress(fs, desc="work", bar="tqdm")
        (bar,) = bars
        assert bar.total == 4 and bar.desc == "work" and p.total == 4
        assert list(p) == fs and len(p) == 4  # at once, in order: nothing is waited for
        gates[1].set()
        assert fs[1].result(10) == 1
        assert p.wait(0) is False
        gates[2].set()
        assert fs[2].exception(10) is not None
        assert bar.closes == 0
        gates[0].set()
        gates[3].set()
        assert p.wait(10) is True
        assert (p.n, p.failed, p.closed) == (4, 1, True)
        assert bar.updates == 4 and bar.closes == 1
        assert {"failed": 1} in bar.postfixes
    finally:
        for g in gates:
            g.set()
        ex.shutdown()


def test_wait_and_as_completed_over_the_wrapper_block_as_over_the_futures(threads, lines):
    gates, fs = _gated(threads, 3)
    p = bigexec.progress(fs, bar="log", desc="jobs")
    done, not_done = cf.wait(p, timeout=0)  # a deadline of 0 is kept
    assert done == set() and not_done == set(fs)
    gates[0].set()
    gates[1].set()
    gates[2].set()
    assert {f for f in cf.as_completed(p, timeout=10)} == set(fs)
    assert p.wait(10)
    first, *_, last = lines()
    assert first == "jobs: 0/3 (0%)"
    assert last.startswith("jobs: 3/3 (100%), 1 failed, in ")


def test_futures_already_done_and_no_futures(lines):
    f: cf.Future = cf.Future()
    f.set_result(1)
    p = bigexec.progress([f], bar="log")
    assert p.closed and p.n == 1 and p.wait(0)
    empty = bigexec.progress([], bar="log", desc="nothing")
    assert empty.closed and empty.n == 0 and empty.total == 0
    assert "nothing: 0/0, in " in lines()[-1]


def test_a_cancelled_future_counts_as_failed():
    f: cf.Future = cf.Future()
    p = bigexec.progress([f, cf.Future()], bar="none")
    assert f.cancel()
    assert (p.n, p.failed, p.closed) == (1, 1, False)
    p.close()
    assert p.closed


# --- as_completed ------------------------------------------------------------------------

def test_as_completed_yields_what_it_yields(threads, bars):
    fs = [threads.submit(pow, 2, i) for i in range(10)]
    p = bigexec.progress(cf.as_completed(fs), bar="tqdm")
    assert p.total is None  # a generator has no length: the total is unknown
    got = list(p)
    assert set(got) == set(fs) and len(got) == 10
    (bar,) = bars
    assert bar.total is None and bar.updates == 10 and bar.closes == 1


def test_as_completed_with_a_total(threads, lines):
    fs = [threads.submit(pow, 2, i) for i in range(10)]
    p = bigexec.progress(cf.as_completed(fs), total=len(fs), desc="pow", bar="log")
    assert sum(f.result() for f in p) == 2 ** 10 - 1
    assert lines()[0] == "pow: 0/10 (0%)"
    assert lines()[-1].startswith("pow: 10/10 (100%), in ")


def test_as_completed_timeout_passes_through(threads):
    gate = threading.Event()
    fs = [threads.submit(gate.wait, 30)]
    try:
        p = bigexec.progress(cf.as_completed(fs, timeout=0.01), bar="none")
        with pytest.raises(cf.TimeoutError):
            next(p)
        assert p.closed  # the generator is over: so is the bar
    finally:
        gate.set()


# --- Executor.map ------------------------------------------------------------------------

def _fails_on_3(x: int) -> int:
    if x == 3:
        raise ValueError("three")
    return x * 10


@pytest.fixture(scope="module")
def executor():
    with bigexec.Executor(2, system="threads", **FAST) as ex:
        yield ex


def test_executor_map_in_order(executor, bars):
    p = bigexec.progress(executor.map(abs, range(-6, 0)), desc="abs", bar="tqdm")
    assert list(p) == [6, 5, 4, 3, 2, 1]
    (bar,) = bars
    assert bar.updates == 6 and bar.closes == 1 and p.closed
    # the total is what the map's iterator says its length hint is
    assert p.total == 6


def test_executor_map_exception_passes_through_and_closes(executor, lines):
    p = bigexec.progress(executor.map(_fails_on_3, range(6)), total=6, desc="m", bar="log")
    got = []
    with pytest.raises(ValueError, match="three"):
        for x in p:
            got.append(x)
    assert got == [0, 10, 20]
    assert (p.n, p.failed, p.closed) == (4, 1, True)
    assert lines()[-1].startswith("m: stopped at 4/6 (66%), 1 failed, in ")


def test_break_closes_the_bar_when_let_go(bars):
    def endless():
        i = 0
        while True:
            yield i
            i += 1

    gen = endless()
    for x in bigexec.progress(gen, bar="tqdm"):
        if x == 4:
            break
    gc.collect()
    (bar,) = bars
    assert bar.updates == 5 and bar.closes == 1
    assert gen.gi_frame is None  # the input was closed with it


def test_close_closes_the_input(bars):
    gen = (i for i in range(100))
    with bigexec.progress(gen, bar="tqdm") as p:
        assert next(p) == 0
    assert p.closed and gen.gi_frame is None and bars[0].closes == 1
    with pytest.raises(StopIteration):
        next(p)
    p.close()  # idempotent
    assert bars[0].closes == 1


# --- Pool.imap ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pool():
    with bigexec.Pool(2, system="threads", **FAST) as p:
        yield p


@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
def test_pool_imap(pool, bars, method):
    p = bigexec.progress(getattr(pool, method)(abs, range(-8, 0)), total=8, bar="tqdm")
    got = list(p)
    if method == "imap_unordered":
        got.sort(reverse=True)
    assert got == [8, 7, 6, 5, 4, 3, 2, 1]
    (bar,) = bars
    assert bar.total == 8 and bar.updates == 8 and bar.closes == 1


def test_pool_imap_error_passes_through_and_the_rest_follow(pool):
    p = bigexec.progress(pool.imap(_fails_on_3, range(6)), bar="none")
    got = [next(p), next(p), next(p)]
    with pytest.raises(ValueError, match="three"):
        next(p)
    assert not p.closed  # imap goes on after a failed item, as the stdlib's does
    got += list(p)
    assert got == [0, 10, 20, 40, 50]
    assert (p.n, p.failed, p.closed) == (6, 1, True)


def test_pool_imap_next_timeout_passes_through(pool, tmp_path):
    gate = tmp_path / "go"  # threads machines share this process's files
    p = bigexec.progress(pool.imap(_when_file_exists, [str(gate)] * 2), bar="none")
    with pytest.raises(multiprocessing.TimeoutError):
        p.next(timeout=0)
    assert p.n == 0 and not p.closed  # no item yet: nothing counted
    gate.touch()
    assert p.next(timeout=30) is True
    assert p.next(timeout=30) is True
    with pytest.raises(StopIteration):
        p.next(timeout=30)
    assert p.closed


def _when_file_exists(path: str) -> bool:
    import os
    import time

    deadline = time.monotonic() + 30
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_timeout_for_an_input_that_takes_none():
    p = bigexec.progress(iter([1]), bar="none")
    with pytest.raises(TypeError, match="takes no timeout"):
        p.next(timeout=1)


# --- totals, lines, bad input ------------------------------------------------------------

class _Hinted:
    def __init__(self, n: int) -> None:
        self.left = n

    def __iter__(self):
        return self

    def __next__(self):
        if not self.left:
            raise StopIteration
        self.left -= 1
        return self.left

    def __length_hint__(self) -> int:
        return self.left


def test_totals():
    assert bigexec.progress([1, 2, 3], bar="none").total == 3
    assert bigexec.progress(range(10), bar="none").total == 10
    assert bigexec.progress(_Hinted(7), bar="none").total == 7
    assert bigexec.progress(_Hinted(0), bar="none").total is None
    assert bigexec.progress(iter([1, 2]), bar="none").total == 2  # list_iterator hints
    assert bigexec.progress((x for x in [1]), bar="none").total is None
    assert bigexec.progress((x for x in [1]), total=5, bar="none").total == 5


def test_unknown_total_log_lines(lines, monkeypatch):
    monkeypatch.setattr(progress_module, "LOG_INTERVAL", 0.0)
    assert list(bigexec.progress((x for x in "abc"), desc="g", bar="log")) == ["a", "b", "c"]
    got = lines()
    assert got[0] == "g: 0"
    assert [line.split(",")[0] for line in got] == ["g: 0", "g: 1", "g: 2", "g: 3", "g: 3"]
    assert all("%" not in line and "left" not in line for line in got)


def test_known_total_log_lines_say_what_is_left(lines, monkeypatch):
    monkeypatch.setattr(progress_module, "LOG_INTERVAL", 0.0)
    list(bigexec.progress(range(4), desc="r", bar="log"))
    got = lines()
    assert got[1].startswith("r: 1/4 (25%), ") and got[1].endswith(" left")
    assert got[-1].startswith("r: 4/4 (100%), in ")


def test_log_lines_are_rate_limited(lines):
    assert sum(bigexec.progress(range(20_000), desc="big", bar="log")) == 199_990_000
    got = lines()
    assert got[0] == "big: 0/20000 (0%)" and got[-1].startswith("big: 20000/20000 (100%)")
    # the first and the last, and one per LOG_INTERVAL (5 s) at most in between
    assert len(got) < 20


def test_bar_none_counts_quietly(lines, bars):
    p = bigexec.progress(range(3), bar="none")
    assert list(p) == [0, 1, 2] and p.n == 3 and p.closed
    assert lines() == [] and bars == []


def test_bad_input():
    with pytest.raises(TypeError, match="needs an iterable"):
        bigexec.progress(5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="wrap it in a list"):
        bigexec.progress(cf.Future())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="got a int among them"):
        bigexec.progress([cf.Future(), 3])
    with pytest.raises(ValueError, match="bar must be one of"):
        bigexec.progress([], bar="fancy")
    with pytest.raises(ValueError, match="total must be"):
        bigexec.progress([], total=-1)


# --- with and without tqdm ---------------------------------------------------------------

def test_without_tqdm_auto_logs_and_tqdm_is_a_clear_error(no_tqdm, lines):
    p = bigexec.progress(range(2), desc="plain")  # bar="auto"
    assert list(p) == [0, 1]
    assert lines()[0] == "plain: 0/2 (0%)"
    with pytest.raises(ImportError, match=r"pip install 'bigexec\[progress\]'"):
        bigexec.progress(range(2), bar="tqdm")


class _Terminal:
    def isatty(self) -> bool:
        return True

    def write(self, s: str) -> int:
        return len(s)

    def flush(self) -> None:
        pass


def test_auto_draws_with_tqdm_on_a_terminal_and_logs_elsewhere(bars, lines, monkeypatch):
    list(bigexec.progress(range(2), desc="file"))  # pytest's stderr is no terminal
    assert bars == [] and lines()[0] == "file: 0/2 (0%)"
    monkeypatch.setattr(sys, "stderr", _Terminal())
    list(bigexec.progress(range(2), desc="tty"))
    (bar,) = bars
    assert bar.desc == "tty" and bar.updates == 2 and bar.closes == 1


# --- booting machines --------------------------------------------------------------------

class _BadInit:
    def init(self, b) -> None:
        raise ZeroDivisionError("init went wrong")


@pytest.mark.parametrize("system", ["threads", "local"])
def test_boot_progress(system, bars):
    with bigexec.start(system, **FAST) as b:
        p = bigexec.progress(b.start(2), desc="booting", bar="tqdm")
        assert p.wait(60)
        assert all(m.state == bigexec.RUNNING for m in p)
        assert (p.n, p.failed, p.closed) == (2, 0, True)
        (bar,) = bars
        assert bar.total == 2 and bar.updates == 2 and bar.closes == 1


def test_a_machine_that_fails_to_boot_counts_as_failed(threads_b, lines):
    machines = threads_b.start(1, services={"Bad": _BadInit()}) + threads_b.start(1)
    p = bigexec.progress(machines, desc="boot", bar="log")
    assert p.wait(60)
    assert (p.n, p.failed) == (2, 1)
    assert lines()[-1].startswith("boot: 2/2 (100%), 1 failed, in ")


def test_machine_on_state_fires_once_now_or_later(threads_b):
    (m,) = threads_b.start(1)
    seen: list[tuple[str, bigexec.State]] = []
    m.on_state(bigexec.STOPPED, lambda mm: seen.append(("stopped", mm.state)))
    m.on_state(bigexec.RUNNING, lambda mm: seen.append(("running", mm.state)))
    assert m.wait(bigexec.RUNNING, 60)
    m.on_state(bigexec.STARTING, lambda mm: seen.append(("late", mm.state)))  # at once
    assert ("running", bigexec.RUNNING) in seen and ("late", bigexec.RUNNING) in seen
    assert [s for s, _ in seen].count("stopped") == 0
    m.shutdown(10)
    assert seen.count(("stopped", bigexec.STOPPED)) == 1
    assert len(seen) == 3
