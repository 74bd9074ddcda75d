"""An executor keeps its size when some boots fail while other machines run: it retries them
with backoff, for as long as it takes, and breaks only when no machine at all can be had."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import BrokenExecutor

import pytest

import bigexec
from bigexec import scheduler
from bigexec.errors import BootError
from bigexec.machine import Backoff
from bigexec.systems.base import MachineHandle
from bigexec.systems.threads import ThreadsSystem

pytestmark = pytest.mark.timeout(60)


class _NeverBoots(MachineHandle):
    """A machine the system could not provide (no capacity, say)."""

    def address(self, timeout: float) -> str:
        raise BootError("no capacity for another machine (the test's system says so)")

    def died(self, grace: float = 0.0) -> BaseException | None:
        return None

    def kill(self) -> None:
        pass

    def wait_stopped(self, timeout: float) -> bool:
        return True


class FlakySystem(ThreadsSystem):
    """Threads machines, except that machines number ``good_first + 1`` to
    ``good_first + failures`` (counting from 1, in the order asked for) fail to boot."""

    def __init__(self, *, good_first: int, failures: int, **options):
        super().__init__(**options)
        self.good_first = good_first
        self.failures = failures
        self.asked = 0
        self._count_lock = threading.Lock()

    def start(self, count, env):
        handles = []
        for _ in range(count):
            with self._count_lock:
                self.asked += 1
                n = self.asked
            if self.good_first < n <= self.good_first + self.failures:
                handles.append(_NeverBoots())
            else:
                handles.extend(super().start(1, env))
        return handles


@pytest.fixture
def quick_backoff(monkeypatch):
    monkeypatch.setattr(scheduler, "BOOT_RETRY_BACKOFF", Backoff(first=0.05, most=0.2, factor=2.0))


def test_the_executor_grows_back_to_its_size(quick_backoff, caplog):
    caplog.set_level(logging.WARNING, logger="bigexec.scheduler")
    system = FlakySystem(good_first=1, failures=6)
    with bigexec.start(system) as b, bigexec.Executor(3, b=b) as ex:
        assert ex.submit(int, 7).result(timeout=30) == 7
        deadline = time.monotonic() + 30
        while len(ex.machines()) < 3 and time.monotonic() < deadline:
            assert ex._broken is False, ex._broken
            time.sleep(0.05)
        assert len(ex.machines()) == 3, ex.machines()
        assert list(ex.map(abs, range(-20, 0))) == list(range(20, 0, -1))
    assert system.asked == 3 + 6, system.asked  # every failed boot was retried, once
    retries = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == 6, [r.getMessage() for r in caplog.records]
    assert all(r.levelno == logging.WARNING for r in retries)
    assert all("no capacity for another machine" in r.getMessage() for r in retries)


def test_the_executor_breaks_when_no_machine_can_be_had(quick_backoff):
    system = FlakySystem(good_first=0, failures=10**6)
    with bigexec.start(system) as b, bigexec.Executor(2, b=b) as ex:
        fut = ex.submit(int, 7)
        with pytest.raises(BrokenExecutor, match="no machine can be had"):
            fut.result(timeout=30)
