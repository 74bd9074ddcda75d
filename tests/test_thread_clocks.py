"""bigexec.thread_clocks: every thread's CPU clock in one snapshot."""

from __future__ import annotations

import threading
import time

import pytest

from bigexec import thread_clocks
from bigexec.thread_clocks import ThreadClock, thread_cpu_times


def burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


@pytest.fixture(params=["clock_gettime", "psutil"])
def clock_source(request, monkeypatch):
    """Both ways of reading the clocks: Linux's per-thread clocks and psutil's tick counts."""
    if request.param == "psutil":
        monkeypatch.setattr(thread_clocks, "_linux_clocks", False)
    elif not thread_clocks._use_linux_clocks():
        pytest.skip("no per-thread clock_gettime on this platform")
    return request.param


def test_a_busy_thread_s_clock_moves_and_an_idle_one_s_does_not(clock_source):
    go, done, stop = threading.Event(), threading.Event(), threading.Event()

    def busy() -> None:
        go.wait(10)
        burn(0.2)
        done.set()
        stop.wait(10)

    busy_thread = threading.Thread(target=busy, daemon=True)
    idle_thread = threading.Thread(target=stop.wait, args=(10,), daemon=True)
    busy_thread.start()
    idle_thread.start()
    try:
        before = thread_cpu_times()
        go.set()
        assert done.wait(10)
        after = thread_cpu_times()
    finally:
        stop.set()
        busy_thread.join(10)
        idle_thread.join(10)
    assert isinstance(after[busy_thread.ident], ThreadClock)
    assert after[busy_thread.ident].native_id == busy_thread.native_id
    # psutil counts whole scheduler ticks: 0.2 s of CPU reads as 0.19 s or so.
    used = after[busy_thread.ident].seconds - before[busy_thread.ident].seconds
    assert used >= 0.15
    idle = after[idle_thread.ident].seconds - before[idle_thread.ident].seconds
    assert idle < 0.05


def test_the_calling_thread_reads_its_own_cpu_time(clock_source):
    burn(0.05)
    mine = thread_cpu_times()[threading.get_ident()]
    assert mine.native_id == threading.get_native_id()
    assert mine.seconds == pytest.approx(time.thread_time(), abs=0.03)


def test_a_finished_thread_is_left_out(clock_source):
    t = threading.Thread(target=burn, args=(0.01,))
    t.start()
    t.join(10)
    assert t.ident not in thread_cpu_times()
