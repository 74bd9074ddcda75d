"""A ``local`` worker that dies before it listens says why in its machine's first ``err``.

The worker's own output (a traceback, usually) is the only place that says why; it must reach
the user at the first failure, not after several, and not only with ``BIGEXEC_BOOT_LOGS=1``.
"""

from __future__ import annotations

import textwrap
import threading
import time
from concurrent.futures import BrokenExecutor

import psutil
import pytest

import bigexec

pytestmark = pytest.mark.timeout(90)

BOOT = 30.0

# Raised while the interpreter imports ``site``: a BaseException is not swallowed there, so the
# worker process dies with a traceback before it runs a line of bigexec.
_SITECUSTOMIZE = """
class WorkerRefused(BaseException):
    pass

raise WorkerRefused("this host refuses bigexec workers, see ticket 4521")
"""


@pytest.fixture
def refusing_path(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent(_SITECUSTOMIZE))
    return str(tmp_path)


def _failed_boot(b, env):
    (m,) = b.start(1, env=env)
    assert m.wait(bigexec.STOPPED, timeout=BOOT), "a worker that cannot boot must stop"
    assert m.err is not None
    return m.err


@pytest.mark.parametrize("boot_logs", [False, True])
def test_first_boot_failure_quotes_the_workers_traceback(refusing_path, boot_logs):
    with bigexec.start("local", boot_logs=boot_logs, boot_timeout=BOOT) as b:
        err = _failed_boot(b, {"PYTHONPATH": refusing_path})
    assert isinstance(err, bigexec.BootError), repr(err)
    msg = str(err)
    first_line = msg.splitlines()[0]
    assert "exited with status" in first_line, msg
    # the traceback's last line is named on the first line, the traceback itself follows
    assert "WorkerRefused: this host refuses bigexec workers, see ticket 4521" in first_line, msg
    assert "Traceback (most recent call last)" in msg, msg
    assert "sitecustomize.py" in msg, msg


def test_a_crash_in_the_worker_main_is_quoted_too():
    # A setting the worker cannot parse fails its start-up after the interpreter is up.
    with bigexec.start("local", boot_timeout=BOOT) as b:
        err = _failed_boot(b, {"BIGEXEC_FAULTS": "several"})
    assert isinstance(err, bigexec.BootError), repr(err)
    assert "BIGEXEC_FAULTS: 'several' is not name=value" in str(err).splitlines()[0], err


def test_a_machine_that_booted_still_dies_with_machine_lost():
    # Only a boot failure quotes the output: a running machine's lines were already shown live.
    with bigexec.start("local", boot_timeout=BOOT) as b:
        (m,) = b.start(1)
        assert m.wait(bigexec.RUNNING, timeout=BOOT) and m.err is None, m.err
        b.system.kill(m)
        assert m.wait(bigexec.STOPPED, timeout=10)
    assert isinstance(m.err, bigexec.MachineLost), repr(m.err)
    assert "SIGKILL" in str(m.err) and "output" not in str(m.err)


class HangingInit:
    """A service whose ``init`` never returns."""

    def init(self, b):
        threading.Event().wait()


def hang_forever():
    threading.Event().wait()


def _gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


SHORT_BOOT = 3.0


def test_boot_timeout_covers_a_services_init():
    with bigexec.start("local", boot_timeout=SHORT_BOOT) as b:
        t0 = time.monotonic()
        (m,) = b.start(1, services={"Hang": HangingInit()})
        assert m.wait(bigexec.STOPPED, timeout=SHORT_BOOT + 15), (
            f"still {m.state.name} {time.monotonic() - t0:.1f}s into a {SHORT_BOOT}s boot")
        took = time.monotonic() - t0
        pid = m.info.get("pid")
    print(f"a hanging init failed its boot after {took:.2f}s (boot_timeout={SHORT_BOOT}s)")
    assert isinstance(m.err, bigexec.BootError), repr(m.err)
    assert f"service 'Hang' init did not finish within boot_timeout={SHORT_BOOT:g}s" in str(
        m.err), m.err
    assert took < SHORT_BOOT + 5
    assert pid and _gone(pid, 10), "the machine whose boot overran must be stopped"


def test_boot_timeout_covers_an_executors_initializer():
    with bigexec.Executor(1, system="local", boot_timeout=SHORT_BOOT,
                          initializer=hang_forever) as ex:
        fut = ex.submit(int, 1)
        with pytest.raises(BrokenExecutor) as info:
            fut.result(timeout=SHORT_BOOT + 15)
    assert f"init did not finish within boot_timeout={SHORT_BOOT:g}s" in str(info.value), (
        info.value)
