"""Every promised timeout is an absolute deadline, on every path: a reply that starts in time
but arrives slowly, or results for other items arriving meanwhile, never stretch a wait."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time

import pytest

import bigexec
from bigexec.rpc import wire

pytestmark = pytest.mark.timeout(60)

BIG = 4 * 1024 * 1024  # a reply sent in pieces (larger than wire's small-message threshold)


def square(x):
    return x * x


def big_reply(n):
    return b"x" * n


@pytest.fixture
def stalling_replies(monkeypatch):
    """Large replies send their first piece, then stall for ``stall`` seconds before the rest,
    as a worker that hangs in the middle of sending its reply."""
    stall = 3.0
    real = wire.send_message
    stalled = threading.Event()

    def send_message(sock, head, pieces, length):
        if length < BIG:
            return real(sock, head, pieces, length)
        sock.sendall(head + bytes(pieces[0]))
        stalled.set()
        time.sleep(stall)
        for p in pieces[1:]:
            sock.sendall(p)

    monkeypatch.setattr(wire, "send_message", send_message)
    return stall, stalled


def test_result_timeout_holds_when_the_reply_stalls_midway(stalling_replies):
    stall, stalled = stalling_replies
    with bigexec.Executor(1, system="threads") as ex:
        assert ex.submit(square, 3).result(timeout=30) == 9  # booted, the slot idle
        fut = ex.submit(big_reply, BIG)  # goes straight to the idle machine
        assert stalled.wait(10)
        start = time.monotonic()
        with pytest.raises(cf.TimeoutError):  # the builtin TimeoutError from 3.11 on
            fut.result(timeout=0.5)
        assert time.monotonic() - start < stall - 1.0  # well before the stall ends
        assert fut.result(timeout=30) == b"x" * BIG  # the reply still arrives, once


def test_exception_timeout_holds_when_the_reply_stalls_midway(stalling_replies):
    stall, stalled = stalling_replies
    with bigexec.Executor(1, system="threads") as ex:
        assert ex.submit(square, 3).result(timeout=30) == 9
        fut = ex.submit(big_reply, BIG)
        assert stalled.wait(10)
        start = time.monotonic()
        with pytest.raises(cf.TimeoutError):
            fut.exception(timeout=0.5)
        assert time.monotonic() - start < stall - 1.0
        assert fut.exception(timeout=30) is None


class Big:
    def reply(self, n):
        return b"x" * n


@pytest.fixture
def trickling_replies(monkeypatch):
    """Large replies arrive in 64 KiB pieces, 0.1 s apart: every read gets data in time, but
    the whole reply takes seconds."""
    real = wire.send_message

    def send_message(sock, head, pieces, length):
        if length < BIG:
            return real(sock, head, pieces, length)
        data = memoryview(b"".join([head, *(bytes(p) for p in pieces)]))
        for i in range(0, len(data), 64 * 1024):
            sock.sendall(data[i : i + 64 * 1024])
            time.sleep(0.1)

    monkeypatch.setattr(wire, "send_message", send_message)


def test_call_timeout_holds_when_the_reply_trickles_in(threads_b, trickling_replies):
    (m,) = threads_b.start(1, services={"Big": Big()})
    assert m.wait(bigexec.RUNNING, 30) and m.err is None
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        m.call("Big.reply", BIG, timeout=1.0)  # the reply takes about 6 s to arrive
    assert time.monotonic() - start < 3.0
    assert m.call("Big.reply", 10, timeout=10) == b"x" * 10  # the machine is still fine


def test_session_shutdown_returns_within_its_timeout_when_a_machine_hangs():
    b = bigexec.start("threads")
    machines = b.start(3)
    for m in machines:
        assert m.wait(bigexec.RUNNING, 30) and m.err is None
    b.system.kill(machines[0], hang=True)  # answers nothing, its shutdown call included
    start = time.monotonic()
    b.shutdown(timeout=1.5)
    assert time.monotonic() - start < 2.5  # the machine's 5 s shutdown call is cut short
    assert all(m.state == bigexec.STOPPED for m in machines)


def test_a_timed_result_still_reads_a_small_reply_in_the_waiting_thread(monkeypatch):
    # the direct path's point: no thread hand-off for a quick reply, timeout or not
    from bigexec import scheduler

    readers: list[threading.Thread] = []
    real = scheduler.Scheduler.read_direct

    def run_direct(self, d):
        readers.append(threading.current_thread())
        return real(self, d)

    monkeypatch.setattr(scheduler.Scheduler, "read_direct", run_direct)
    with bigexec.Executor(1, system="threads") as ex:
        assert ex.submit(square, 3).result(timeout=30) == 9
        readers.clear()
        for i in range(50):
            assert ex.submit(square, i).result(timeout=30) == i * i
        me = threading.current_thread()
        assert readers  # the calls went straight to the idle machine
        assert sum(1 for t in readers if t is me) >= len(readers) // 2
