"""Chaos: RPC faults injected on the machines' servers (``bigexec.rpc.faults``).

The short version runs in CI; ``BIGEXEC_SOAK=1`` makes every figure ten times larger, to run
by hand. A map's results are checked whole and in order: a lost result, a duplicate or a
reordering fails ``==``.
"""

from __future__ import annotations

import os
import time

import pytest
from conftest import FAST

import bigexec
from bigexec.errors import NetworkError
from bigexec.rpc import faults
from bigexec.rpc.client import Client
from bigexec.rpc.faults import FaultInjector
from bigexec.rpc.server import Server
from bigexec.service import ServiceRegistry

SOAK = 10 if os.environ.get("BIGEXEC_SOAK") == "1" else 1
pytestmark = pytest.mark.timeout(300 * SOAK)


def square(x):
    return x * x


class Counter:
    def __init__(self) -> None:
        self.calls = 0

    def incr(self, by: int) -> int:
        self.calls += by
        return self.calls

    def echo(self, value):
        return value


def test_the_spec_is_read_and_bad_specs_say_what_is_wrong():
    inj = FaultInjector.from_spec("drop=0.25, truncate=0.5,delay=0.125,delay_seconds=0.5,"
                                  "seed=7,methods=Tasks.|Echo.add")
    assert inj is not None
    assert inj.rates == {"drop": 0.25, "truncate": 0.5, "delay": 0.125}
    assert inj.delay_seconds == 0.5 and inj.methods == ("Tasks.", "Echo.add")
    assert FaultInjector.from_spec("") is None and FaultInjector.from_spec(None) is None
    for spec, words in [("drop=2", "between 0 and 1"), ("drop=0.6,truncate=0.6", "more than 1"),
                        ("drop", "not name=value"), ("lose=0.1", "unknown setting 'lose'"),
                        ("drop=often", "BIGEXEC_FAULTS"), ("delay_seconds=-1", "negative")]:
        with pytest.raises(ValueError, match=words):
            FaultInjector.from_spec(spec)


def test_rates_are_kept_and_the_supervisor_is_spared_by_default():
    inj = FaultInjector(drop=0.1, truncate=0.05, delay=0.02, seed=1)
    n = 20000
    for _ in range(n):
        inj.choose("Tasks.run")
    # binomial: 5 standard deviations either side
    for kind, rate in inj.rates.items():
        sd = (n * rate * (1 - rate)) ** 0.5
        assert abs(inj.injected[kind] - n * rate) < 5 * sd, (kind, inj.injected)
    assert all(inj.choose("Supervisor.keepalive") is None for _ in range(1000))
    everything = FaultInjector(drop=1.0, methods=("*",))
    assert everything.choose("Supervisor.keepalive") == "drop"
    only = FaultInjector(drop=1.0, methods=("Counter.echo",))
    assert only.choose("Counter.incr") is None and only.choose("Counter.echo") == "drop"


@pytest.fixture
def faulty_server():
    registry = ServiceRegistry()
    counter = Counter()
    registry.add("Counter", counter)
    server = Server(registry)
    server.start()
    client = Client()
    try:
        yield server, client, counter
    finally:
        client.close()
        server.close()


@pytest.mark.parametrize("kind", ["drop", "truncate"])
def test_a_broken_reply_is_a_network_error_after_the_method_ran(faulty_server, kind):
    server, client, counter = faulty_server
    server.faults = FaultInjector(**{kind: 1.0})
    big = b"x" * 200_000  # a reply long enough to be cut in its body as well as its head
    for value in (1, big):
        before = counter.calls
        with pytest.raises(NetworkError):
            client.call(server.addr, "Counter.incr", (1,))
        assert counter.calls == before + 1  # it ran once, and was not sent again
        with pytest.raises(NetworkError):
            client.call(server.addr, "Counter.echo", (value,))
    assert server.faults.injected[kind] == 4
    server.faults = None
    assert client.call(server.addr, "Counter.echo", (big,)) == big  # the server serves on


def test_a_delayed_reply_arrives_late_and_whole(faulty_server):
    server, client, _ = faulty_server
    server.faults = FaultInjector(delay=1.0, delay_seconds=0.3)
    t0 = time.monotonic()
    assert client.call(server.addr, "Counter.echo", ("late",)) == "late"
    assert time.monotonic() - t0 >= 0.3
    with pytest.raises(TimeoutError):
        client.call(server.addr, "Counter.echo", ("late",), timeout=0.1)


def test_retry_call_survives_drops_and_truncations(monkeypatch):
    monkeypatch.setenv(faults.ENV, "drop=0.05,truncate=0.05,seed=3")
    with bigexec.start("threads", **FAST) as b:
        (m,) = b.start(1, services={"Counter": Counter()})
        m.retry_backoff = (0.001, 0.01, 2.0)
        values = [m.retry_call("Counter.echo", i, timeout=30) for i in range(300 * SOAK)]
    assert values == list(range(300 * SOAK))


def _struck(caplog, capsys, seen: list[str]) -> list[str]:
    """The faults injected since the last look (threads machines log in this process, local
    ones on its stderr), added to ``seen``."""
    lines = [r.getMessage() for r in caplog.records] + capsys.readouterr().err.splitlines()
    caplog.clear()
    seen += [line for line in lines if "fault injected:" in line]
    return seen


@pytest.mark.parametrize("system", ["threads", "local"])
def test_a_map_under_drops_and_truncations_returns_every_result_once(
        monkeypatch, caplog, capsys, system):
    # 1% of the replies dropped and 1% cut short, after the tasks ran: the scheduler runs the
    # tasks of a broken reply again, and every result arrives exactly once, in order. A map of
    # 10,000 tasks makes about 30 calls (the scheduler batches), so maps are run until the
    # faults have struck a few times each.
    monkeypatch.setenv(faults.ENV, "drop=0.01,truncate=0.01,seed=11")
    n = 10_000
    want = [x * x for x in range(n)]
    seen: list[str] = []
    # A lost reply counts as a crash of the task that was running (a task that always breaks
    # the transport must end): with 2% of replies broken, 3 in a row strike a task now and
    # then over 20,000 calls, so the soak allows more.
    with bigexec.Executor(2, system=system, max_crashes=10, **FAST) as ex:
        for _ in range(200):
            assert list(ex.map(square, range(n))) == want
            _struck(caplog, capsys, seen)
            drops = sum("drop" in line for line in seen)
            if min(drops, len(seen) - drops) >= 3 * SOAK:
                break
        else:
            raise AssertionError(f"too few faults struck in 200 maps: {seen}")
        seen.clear()
        # one call per task (the direct path): 2% of the calls are broken
        calls = (2000 if system == "threads" else 400) * SOAK
        got = [ex.submit(square, x).result(timeout=60) for x in range(calls)]
        assert got == [x * x for x in range(calls)]
    assert len(_struck(caplog, capsys, seen)) >= 2, seen
