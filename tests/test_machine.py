"""Machines, sessions and services on the ``threads`` system."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import CancelledError, as_completed, wait

import pytest

import bigexec


class Counter:
    def __init__(self) -> None:
        self.n = 0

    def init(self, b) -> None:  # runs on the machine: events are not picklable
        self.session_kind = type(b).__name__
        self.cancelled = threading.Event()
        self.started = threading.Event()

    def incr(self, k: int = 1) -> int:
        self.n += k
        return self.n

    def get(self) -> int:
        return self.n

    def kind(self) -> str:
        return self.session_kind

    def block(self, ctx) -> str:
        self.started.set()
        if ctx.wait(30):
            self.cancelled.set()
            return "cancelled"
        return "not cancelled"

    def was_cancelled(self, timeout: float) -> bool:
        return self.cancelled.wait(timeout)

    def was_started(self, timeout: float) -> bool:
        return self.started.wait(timeout)

    def deadline(self, ctx):
        return ctx.remaining()

    def sleep(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    def _private(self) -> None:
        raise AssertionError("private methods must not be callable")


class BadInit:
    def init(self, b) -> None:
        raise ZeroDivisionError("init went wrong")

    def ping(self) -> int:
        return 1


class Relay:
    """Calls another machine's service from inside a service (machine to machine)."""

    def init(self, b) -> None:
        self.b = b

    def relay(self, addr: str, k: int) -> int:
        return self.b.dial(addr).call("Counter.incr", k, timeout=10)

    def relay_ctx(self, addr: str, ctx) -> int:
        return ctx.b.dial(addr).call("Counter.get", timeout=10)


def running(b, n=1, **services):
    ms = b.start(n, services=services or {"Counter": Counter()})
    for m in ms:
        assert m.wait(bigexec.RUNNING, timeout=10)
        assert m.err is None, m.err
        assert m.state == bigexec.RUNNING
    return ms


def test_boot_reaches_running_with_info(threads_b):
    (m,) = running(threads_b)
    assert m.addr.startswith("https://127.0.0.1:")
    assert m.owned and m.maxprocs == 1
    info = m.call("Supervisor.info")
    assert info["system"] == "threads" and info["bigexec_version"] == bigexec.__version__
    assert m.hostname == info["hostname"]
    assert threads_b.machines() == [m]
    assert m.call("Supervisor.ping", 7) == 7


def test_keepalives_flow_and_renew_the_lease(threads_b):
    (m,) = running(threads_b)
    time.sleep(0.5)
    times = m.keepalive_reply_times
    assert len(times) >= 2 and all(0 <= t < 0.5 for t in times)
    assert m.next_keepalive is not None and m.next_keepalive > time.time()
    metrics = m.call("Supervisor.metrics")
    assert metrics["keepalives"] >= 2
    assert 0 < metrics["lease_remaining"] <= 5.0


def test_state_is_per_machine_never_shared(threads_b):
    svc = Counter()
    a, b2 = running(threads_b, 2, Counter=svc)
    assert a.call("Counter.incr", 5) == 5
    assert a.call("Counter.incr", 1) == 6
    assert b2.call("Counter.get") == 0
    assert svc.n == 0  # the driver's object is untouched


def test_init_gets_a_session(threads_b):
    (m,) = running(threads_b)
    assert m.call("Counter.kind") == "Dialer"  # it dials other machines, owns none


def test_env_reaches_the_machine(threads_b):
    (m,) = threads_b.start(1, services={"Counter": Counter()}, env={"BIGEXEC_T": "v1"})
    assert m.wait(bigexec.RUNNING, 10) and m.err is None
    assert m.call("Supervisor.getenv", "BIGEXEC_T") == "v1"
    assert m.call("Supervisor.getenv", "BIGEXEC_UNSET", "dflt") == "dflt"


def test_private_and_unknown_methods_are_refused(threads_b):
    (m,) = running(threads_b)
    with pytest.raises(bigexec.UnknownMethodError, match="incr"):
        m.call("Counter._private")
    with pytest.raises(bigexec.UnknownMethodError, match="Supervisor"):
        m.call("Nope.get")


def test_call_timeout_raises_timeout_error_and_cancels_remote(threads_b):
    (m,) = running(threads_b)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        m.call("Counter.block", timeout=1.0)
    assert time.monotonic() - t0 < 3
    assert m.call("Counter.was_cancelled", 5)  # the remote ctx saw the deadline or cancel


def test_deadline_travels_with_the_call(threads_b):
    (m,) = running(threads_b)
    left = m.call("Counter.deadline", timeout=7)
    assert 6 < left <= 7
    assert m.call("Counter.deadline") is None


def test_future_cancel_raises_cancelled_and_stops_remote(threads_b):
    (m,) = running(threads_b)
    fut = m.submit("Counter.block")
    assert m.call("Counter.was_started", 5)
    assert fut.cancel()
    with pytest.raises(CancelledError):
        fut.result(timeout=1)
    assert m.call("Counter.was_cancelled", 5)


def test_submit_returns_real_futures(threads_b):
    a, b2 = running(threads_b, 2)
    futs = [m.submit("Counter.incr", 1) for m in (a, b2) for _ in range(5)]
    done = {f.result() for f in as_completed(futs, timeout=10)}
    assert done == {1, 2, 3, 4, 5}
    w = wait([a.submit("Counter.get")], timeout=10)
    assert len(w.done) == 1

    async def main():
        return await asyncio.wrap_future(a.submit("Counter.get"))

    assert asyncio.run(main()) == 5


def test_unpicklable_service_fails_before_starting(threads_b):
    with pytest.raises(TypeError, match="Locked"):
        threads_b.start(1, services={"Locked": threading.Lock()})
    assert threads_b.machines() == []


def test_init_that_raises_fails_the_machine_fast(threads_b):
    (m,) = threads_b.start(1, services={"Bad": BadInit()})
    t0 = time.monotonic()
    assert m.wait(bigexec.RUNNING, timeout=10)
    assert time.monotonic() - t0 < 5
    assert m.state == bigexec.STOPPED
    assert isinstance(m.err, bigexec.BootError)
    assert "Bad" in str(m.err) and "init went wrong" in str(m.err)
    with pytest.raises(bigexec.MachineStopped):
        m.call("Bad.ping")


def test_kill_fails_calls_and_stops_the_machine(threads_b):
    (m,) = running(threads_b)
    fut = m.submit("Counter.block")
    assert m.call("Counter.was_started", 5)
    threads_b.system.kill(m)
    with pytest.raises(bigexec.MachineStopped):
        fut.result(timeout=5)
    assert m.wait(bigexec.STOPPED, timeout=5)
    assert isinstance(m.err, bigexec.MachineLost) and "killed" in str(m.err)
    with pytest.raises(bigexec.MachineStopped) as info:
        m.call("Counter.get")
    assert info.value.cause is m.err
    assert threads_b.machines() == []


def test_keepalive_loss_stops_machine_and_fails_inflight(threads_b):
    (m,) = running(threads_b)
    fut = m.submit("Counter.sleep", 60)
    time.sleep(0.1)
    threads_b.system.kill(m, hang=True)  # connections stay open, nothing answers
    t0 = time.monotonic()
    with pytest.raises(bigexec.MachineStopped) as info:
        fut.result(timeout=10)
    assert time.monotonic() - t0 < 5  # the 1 s budget, plus one 0.5 s attempt, plus slack
    assert m.state == bigexec.STOPPED
    assert "keepalive" in str(info.value.cause)


def test_machine_watchdog_exits_when_the_lease_lapses():
    with bigexec.start("threads", keepalive_period=0.1, keepalive_lease=0.6,
                       keepalive_timeout=30, keepalive_rpc_timeout=0.5, boot_timeout=0.7) as b:
        (m,) = running(b)
        runtime = m.handle.runtime
        m._stop_event.set()  # the driver stops renewing, as a dead driver would
        assert runtime.wait(5), "the machine outlived its lease"
        assert runtime.server.closed


def test_dial_does_not_own_and_shutdown_leaves_it(tmp_path):
    ca = str(tmp_path / "ca.pem")  # sessions trust each other's machines if they share a CA
    with bigexec.start("threads", authority=ca) as owner:
        (m,) = running(owner)
        with bigexec.start("threads", authority=ca) as other:
            d = other.dial(m.addr)
            assert d.wait(bigexec.RUNNING, 5) and d.err is None
            assert not d.owned
            assert d.call("Counter.incr", 3) == 3
        assert d.state == bigexec.STOPPED and d.err is None
        assert m.state == bigexec.RUNNING
        assert m.call("Counter.get") == 3


def test_services_call_other_machines(threads_b):
    target, relay = running(threads_b, 2, Counter=Counter(), Relay=Relay())
    assert relay.call("Relay.relay", target.addr, 4) == 4
    assert relay.call("Relay.relay_ctx", target.addr) == 4
    assert target.call("Counter.get") == 4


def test_retry_call_retries_network_errors_until_running():
    # A dialed address with nothing behind it: retry_call keeps trying until its timeout.
    with bigexec.start("threads") as b:
        (m,) = running(b)
        m.retry_backoff = (0.05, 0.1, 1.5)
        assert m.retry_call("Counter.incr", 2, timeout=5) == 2
        b.system.kill(m)
        m.wait(bigexec.STOPPED, 5)
        with pytest.raises(bigexec.MachineStopped):
            m.retry_call("Counter.incr", 2, timeout=2)


def test_shutdown_stops_everything_and_refuses_more(threads_b):
    ms = running(threads_b, 3)
    threads_b.shutdown()
    assert all(m.state == bigexec.STOPPED and m.err is None for m in ms)
    with pytest.raises(RuntimeError):
        threads_b.start(1, services={})
    with pytest.raises(bigexec.MachineStopped):
        ms[0].call("Counter.get")
    threads_b.shutdown()  # idempotent


def test_cancel_stops_tracking_and_fails_inflight(threads_b):
    (m,) = running(threads_b)
    fut = m.submit("Counter.sleep", 30)
    time.sleep(0.1)
    m.cancel()
    with pytest.raises(bigexec.MachineStopped):
        fut.result(timeout=5)
    assert m.state == bigexec.STOPPED


def test_wait_times_out_and_states_are_ordered():
    assert bigexec.UNSTARTED < bigexec.STARTING < bigexec.RUNNING < bigexec.STOPPED
    with bigexec.start("threads") as b:
        (m,) = b.start(1, services={"Counter": Counter()})
        assert m.wait(bigexec.RUNNING, 10)
        assert not m.wait(bigexec.STOPPED, timeout=0.05)


def test_start_validates_arguments():
    with bigexec.start("threads") as b:
        with pytest.raises(ValueError):
            b.start(0, services={})
        with pytest.raises(ValueError):
            b.start(1, services={"Supervisor": Counter()})
        with pytest.raises(ValueError):
            b.start(1, services={"a.b": Counter()})
    with pytest.raises(ValueError, match="threads"):
        bigexec.start("nope")


def test_system_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("BIGEXEC_SYSTEM", "threads")
    with bigexec.start() as b:
        assert b.system.name == "threads"
