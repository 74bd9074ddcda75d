"""Machine.submit's threads: bounded however many calls are pending, and sound in a forked
child (a multiprocessing worker, a pre-forking server) of a driver."""

from __future__ import annotations

import os
import select
import threading
import time

import pytest
from conftest import FAST

import bigexec
from bigexec.callpool import CallPool

pytestmark = pytest.mark.timeout(120)

GATE = threading.Event()  # threads machines share this process: their services see it


class Gate:
    def hold(self, i):
        GATE.wait(60)
        return i

    def ping(self, x):
        return x


def test_ten_thousand_pending_submits_cost_a_few_dozen_threads(threads_b):
    GATE.clear()
    (m,) = threads_b.start(1, services={"Gate": Gate()})
    assert m.wait(bigexec.RUNNING, 30) and m.err is None
    before = threading.active_count()
    try:
        futures = [m.submit("Gate.hold", i) for i in range(10_000)]
        time.sleep(0.5)  # the first calls reach the machine and block there
        # the driver's call threads, and the machine's server threads serving them
        assert threading.active_count() - before <= 2 * threads_b.max_concurrent_calls + 8
        assert not any(f.done() for f in futures)
    finally:
        GATE.set()
    assert [f.result(timeout=60) for f in futures] == list(range(10_000))


def test_max_concurrent_calls_is_settable_and_checked(threads_b):
    threads_b.max_concurrent_calls = 4
    assert threads_b.max_concurrent_calls == 4
    with pytest.raises(ValueError, match="positive int"):
        threads_b.max_concurrent_calls = 0


def test_a_cancel_is_never_stuck_behind_the_backlog(threads_b):
    GATE.clear()
    threads_b.max_concurrent_calls = 2
    (m,) = threads_b.start(1, services={"Gate": Gate()})
    assert m.wait(bigexec.RUNNING, 30) and m.err is None
    try:
        futures = [m.submit("Gate.hold", i) for i in range(5)]
        time.sleep(0.3)
        assert futures[4].cancel()  # still in the backlog: cancelled at once
        assert futures[0].cancel()  # running remotely: cancelled, with a remote cancel
    finally:
        GATE.set()
    assert [f.result(timeout=30) for f in futures[1:4]] == [1, 2, 3]


def test_call_pool_runs_everything_in_order_past_its_bound():
    pool = CallPool(max_threads=3)
    done: list[int] = []
    lock = threading.Lock()
    release = threading.Event()
    finished = threading.Event()

    def work(i):
        def run():
            release.wait(10)
            with lock:
                done.append(i)
                if len(done) == 50:
                    finished.set()
        return run

    for i in range(50):
        pool.submit(work(i))
    assert pool.threads == 3 and pool.backlog == 47
    release.set()
    assert finished.wait(10)
    assert sorted(done) == list(range(50))
    pool.close()

    one = CallPool(max_threads=1)  # one thread: the backlog runs first in, first out
    order: list[int] = []
    gate = threading.Event()
    for i in range(20):
        one.submit(lambda i=i: (gate.wait(10), order.append(i)))
    assert one.threads == 1 and one.backlog == 19
    gate.set()
    for _ in range(200):
        if len(order) == 20:
            break
        time.sleep(0.01)
    assert order == list(range(20))
    one.close()


def _in_forked_child(fn) -> tuple[int, bytes]:
    """Run ``fn()`` (returning bytes) in a forked child; its exit status and what it wrote."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never back into pytest
        code = 1
        try:
            os.close(r)
            os.write(w, fn())
            code = 0
        except BaseException as exc:
            try:
                os.write(w, repr(exc).encode())
            except OSError:
                pass
        finally:
            os._exit(code)
    os.close(w)
    out = b""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready, _, _ = select.select([r], [], [], 0.5)
        if ready:
            chunk = os.read(r, 65536)
            if not chunk:
                break
            out += chunk
    os.close(r)
    for _ in range(100):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), out
        time.sleep(0.1)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return -9, out


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_submit_works_in_a_forked_child_and_the_parents_connections_survive():
    with bigexec.start("local", **FAST) as b:
        (m,) = b.start(1, services={"Gate": Gate()})
        assert m.wait(bigexec.RUNNING, 30) and m.err is None
        # warm pooled TLS connections and an idle call thread in the parent
        assert [m.submit("Gate.ping", i).result(timeout=10) for i in range(5)] == list(range(5))
        assert [m.call("Gate.ping", i, timeout=10) for i in range(5)] == list(range(5))

        def child() -> bytes:
            got = [m.submit("Gate.ping", i).result(timeout=10) for i in range(3)]
            got += [m.call("Gate.ping", i, timeout=10) for i in range(3)]
            return repr(got).encode()

        code, out = _in_forked_child(child)
        assert (code, out) == (0, b"[0, 1, 2, 0, 1, 2]")
        # the parent's pooled connections were not touched by the child
        assert [m.call("Gate.ping", i, timeout=10) for i in range(20)] == list(range(20))
        assert [m.submit("Gate.ping", i).result(timeout=10) for i in range(5)] == list(range(5))
