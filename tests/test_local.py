"""The ``local`` system: every machine is a ``python -m bigexec.worker`` process over mutual TLS.

These tests start real worker processes and kill them (and a whole driver) with SIGKILL, then
check what the driver sees and that no process is left behind.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest

import bigexec

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parent.parent
BOOT = 30.0  # generous: a worker is a fresh interpreter importing bigexec and this module


# --- services (module level: they travel pickled by reference to ``test_local``) ------------


class Echo:
    def echo(self, x):
        return x

    def getenv(self, name):
        return os.environ.get(name)

    def pid(self):
        return os.getpid()

    def say(self, text):
        print(text, flush=True)
        return True

    def say_err(self, text):
        print(text, file=sys.stderr, flush=True)
        return True

    def say_partial(self, text):
        """Write ``text`` with no newline after it: a line the worker never finished."""
        sys.stdout.write(text)
        sys.stdout.flush()
        return True

    def say_many(self, prefix, n):
        """Print ``n`` numbered lines, the last one ``{prefix}-last``, then return."""
        for i in range(n):
            print(f"{prefix}-{i}")
        print(f"{prefix}-last", flush=True)
        return n

    def sleep(self, seconds):
        time.sleep(seconds)
        return "slept"


class Locked:
    """Cannot be pickled: it holds a lock."""

    def __init__(self):
        self.lock = threading.Lock()

    def ping(self):
        return "pong"


class BadInit:
    def init(self, b):
        raise RuntimeError("init exploded on purpose")

    def ping(self):
        return "pong"


# --- helpers --------------------------------------------------------------------------------


def _is_gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (absent, or a zombie nobody reaped yet)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _is_gone(pid):
            return True
        time.sleep(0.05)
    return _is_gone(pid)


def _worker_children() -> list[psutil.Process]:
    """This process's live descendants that are bigexec workers."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "bigexec.worker" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _running(m: bigexec.Machine) -> None:
    assert m.wait(bigexec.RUNNING, timeout=BOOT), f"{m} did not boot within {BOOT}s"
    assert m.state == bigexec.RUNNING, f"{m} stopped while booting: {m.err!r}"
    assert m.err is None


def _hostport(m: bigexec.Machine) -> str:
    return m.addr.split("://", 1)[1]


class _Err:
    """Accumulates what ``capfd`` captured on stderr, so lines can be waited for."""

    def __init__(self, capfd: pytest.CaptureFixture[str]) -> None:
        self.capfd = capfd
        self.text = ""

    def read(self) -> str:
        self.text += self.capfd.readouterr().err
        return self.text

    def wait_for(self, needle: str, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while needle not in self.read():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# --- tests ----------------------------------------------------------------------------------


def test_boot_to_running_in_separate_processes():
    with bigexec.start("local") as b:
        ms = b.start(2, services={"Echo": Echo()})
        assert len(ms) == 2
        pids = set()
        for m in ms:
            _running(m)
            assert m.addr.startswith("https://127.0.0.1:"), m.addr
            assert int(m.addr.rsplit(":", 1)[1]) > 0
            assert m.maxprocs == 1
            info = m.call("Supervisor.info")
            pid = info["pid"]
            assert pid != os.getpid()
            assert psutil.pid_exists(pid) and not _is_gone(pid)
            proc = psutil.Process(pid)
            assert proc.ppid() == os.getpid()
            assert "bigexec.worker" in " ".join(proc.cmdline())
            assert info["system"] == "local"
            # the service really runs there, not in the driver
            assert m.call("Echo.pid") == pid
            assert m.call("Echo.echo", {"k": [1, 2, 3]}) == {"k": [1, 2, 3]}
            pids.add(pid)
        assert len(pids) == 2, "two machines must be two processes"
        assert ms[0].addr != ms[1].addr
        assert sorted(b.machines(), key=id) == sorted(ms, key=id)


def test_env_reaches_the_machine():
    assert "BIGEXEC_TEST_X" not in os.environ
    with bigexec.start("local") as b:
        (m,) = b.start(1, services={"Echo": Echo()}, env={"BIGEXEC_TEST_X": "42"})
        _running(m)
        assert m.call("Echo.getenv", "BIGEXEC_TEST_X") == "42"
        assert m.call("Supervisor.getenv", "BIGEXEC_TEST_X") == "42"
        assert m.call("Supervisor.getenv", "BIGEXEC_TEST_NOT_SET", "dflt") == "dflt"
    # the driver's own environment is untouched
    assert "BIGEXEC_TEST_X" not in os.environ


def test_user_module_imports_on_the_worker(tmp_path, monkeypatch):
    modname = f"bigexec_helper_{uuid.uuid4().hex[:8]}"
    path = tmp_path / f"{modname}.py"
    path.write_text(textwrap.dedent("""
        import os

        class Helper:
            def __init__(self, factor):
                self.factor = factor

            def where(self):
                return __file__, os.getpid()

            def times(self, x):
                return self.factor * x
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = __import__(modname)
    try:
        from bigexec.rpc import codec

        blob = codec.dumps_bytes(mod.Helper(3))
        assert modname.encode() in blob, "the helper class should be pickled by reference"
        assert b"cloudpickle" not in blob, "a by-reference pickle carries no class skeleton"
        with bigexec.start("local") as b:
            (m,) = b.start(1, services={"Helper": mod.Helper(3)})
            _running(m)
            file, pid = m.call("Helper.where")
            assert Path(file).resolve() == path.resolve()
            assert pid != os.getpid()
            assert m.call("Helper.times", 14) == 42
    finally:
        sys.modules.pop(modname, None)


def test_worker_output_is_prefixed_line_by_line(capfd):
    err = _Err(capfd)
    tag = uuid.uuid4().hex[:8]
    with bigexec.start("local") as b:
        (m,) = b.start(1, services={"Echo": Echo()})
        _running(m)
        hp = _hostport(m)
        assert hp.startswith("127.0.0.1:")
        assert m.call("Echo.say", f"hello-{tag}")
        assert err.wait_for(f"{hp}: hello-{tag}\n"), err.text
        # several lines in one print: every line gets its own prefix
        assert m.call("Echo.say", f"one-{tag}\ntwo-{tag}")
        assert err.wait_for(f"{hp}: two-{tag}\n"), err.text
        assert f"{hp}: one-{tag}\n{hp}: two-{tag}\n" in err.text
        # the worker's stderr goes the same way
        assert m.call("Echo.say_err", f"oops-{tag}")
        assert err.wait_for(f"{hp}: oops-{tag}\n"), err.text
    text = err.read()
    for line in text.splitlines():
        if tag in line:
            assert line.startswith(f"{hp}: "), line
    # and none of it went to the driver's stdout
    assert tag not in capfd.readouterr().out


def test_shutdown_delivers_last_lines_and_ends_the_worker(capfd):
    err = _Err(capfd)
    tag = uuid.uuid4().hex[:8]
    b = bigexec.start("local")
    with b:
        (m,) = b.start(1, services={"Echo": Echo()})
        _running(m)
        pid = m.call("Supervisor.info")["pid"]
        hp = _hostport(m)
        # a burst of output the pump cannot have drained yet when the call returns
        assert m.call("Echo.say_many", tag, 3000) == 3000
        assert m.call("Echo.say", f"final-{tag}")
        assert m.call("Echo.say_partial", f"unfinished-{tag}")
        b.shutdown()
        # right after shutdown returns, with no waiting: the last lines are there, all of them
        text = err.read()
        assert f"{hp}: {tag}-last\n" in text
        assert f"{hp}: final-{tag}\n" in text
        # a last line without its newline is still delivered, as a line of its own
        assert f"{hp}: unfinished-{tag}\n" in text
        assert sum(1 for line in text.splitlines() if line.startswith(f"{hp}: {tag}-")) == 3001
        assert m.state == bigexec.STOPPED
        assert m.err is None, "an orderly shutdown stops a machine with err None"
        assert _is_gone(pid), "the worker must be gone when shutdown returns"
        assert not psutil.pid_exists(pid), "and reaped"
        with pytest.raises(bigexec.MachineStopped):
            m.call("Echo.echo", 1)
        with pytest.raises(RuntimeError):
            b.start(1)


def test_sigkill_is_seen_at_once_and_fails_calls():
    with bigexec.start("local") as b:
        (m,) = b.start(1, services={"Echo": Echo()})
        _running(m)
        pid = m.call("Supervisor.info")["pid"]
        fut = m.submit("Echo.sleep", 30)
        # make sure the call is running on the worker before killing it
        deadline = time.monotonic() + 10
        while "Echo.sleep" not in m.call("Supervisor.metrics")["running_calls"]:
            assert time.monotonic() < deadline, "the sleep call never started"
            time.sleep(0.02)
        assert not fut.done()
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        assert m.wait(bigexec.STOPPED, timeout=5), "the driver did not notice the SIGKILL"
        noticed = time.monotonic() - t0
        assert noticed < 3, f"noticing a dead worker took {noticed:.1f}s"
        assert m.state == bigexec.STOPPED
        assert m.err is not None
        assert "SIGKILL" in str(m.err), repr(m.err)
        assert isinstance(m.err, bigexec.MachineLost)
        with pytest.raises(bigexec.MachineStopped) as ei:
            fut.result(timeout=5)
        assert time.monotonic() - t0 < 5, "the call in flight did not fail promptly"
        assert ei.value.cause is m.err
        assert "SIGKILL" in str(ei.value)
        with pytest.raises(bigexec.MachineStopped):
            m.call("Echo.echo", 1)
        with pytest.raises(bigexec.MachineStopped):
            m.submit("Echo.echo", 1).result(timeout=5)
        assert m not in b.machines()
        assert _wait_gone(pid, 5)


def test_unpicklable_service_starts_no_process():
    before = {p.pid for p in _worker_children()}
    with bigexec.start("local") as b:
        with pytest.raises(TypeError) as ei:
            b.start(1, services={"Echo": Echo(), "Locked": Locked()})
        assert "Locked" in str(ei.value)
        assert b.machines() == []
        after = {p.pid for p in _worker_children()}
        assert after == before, "an unpicklable service must not start any worker"
        # the session still works afterwards
        (m,) = b.start(1, services={"Echo": Echo()})
        _running(m)
        assert m.call("Echo.echo", "ok") == "ok"


def test_failing_init_fails_the_machine_fast():
    with bigexec.start("local") as b:
        t0 = time.monotonic()
        (m,) = b.start(1, services={"Echo": Echo(), "Bad": BadInit()})
        assert m.wait(bigexec.RUNNING, timeout=BOOT)
        assert time.monotonic() - t0 < 15
        assert m.state == bigexec.STOPPED
        assert isinstance(m.err, bigexec.BootError), repr(m.err)
        msg = str(m.err)
        assert "Bad" in msg and "init exploded on purpose" in msg, msg
        assert "RuntimeError" in msg, msg
        # the process was killed (a machine we gave up on must not live on)
        pid = m.handle.proc.pid
        assert _wait_gone(pid, 5), "the worker of a failed machine is still running"
        deadline = time.monotonic() + 5
        while _worker_children() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _worker_children() == []
        with pytest.raises(bigexec.MachineStopped) as ei:
            m.call("Echo.echo", 1)
        assert ei.value.cause is m.err


_DRIVER = """
import sys, time
import bigexec

b = bigexec.start("local", keepalive_period=0.2, keepalive_lease=LEASE, keepalive_timeout=1.0,
                  keepalive_rpc_timeout=0.5, boot_timeout=30)
(m,) = b.start(1)
if not m.wait(bigexec.RUNNING, timeout=30) or m.err is not None:
    print("BOOT-FAILED", m.state, m.err, flush=True)
    sys.exit(1)
# wait for the first keepalives, so the lease is the short one, not the boot lease
deadline = time.monotonic() + 10
while len(m.keepalive_reply_times) < 2 and time.monotonic() < deadline:
    time.sleep(0.05)
print(m.call("Supervisor.info")["pid"], flush=True)
time.sleep(600)
"""


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    buf = b""
    fd = proc.stdout.fileno()
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
    return buf.decode()


def _start_driver(tmp_path, name: str, lease: float) -> tuple[subprocess.Popen, int]:
    """A driver process with one local machine (fast keepalives, this lease); its worker."""
    script = tmp_path / f"{name}.py"
    script.write_text(_DRIVER.replace("LEASE", repr(lease)))
    errfile = tmp_path / f"{name}.err"
    with open(errfile, "wb") as err:
        driver = subprocess.Popen([sys.executable, str(script)], cwd=str(REPO),
                                  stdout=subprocess.PIPE, stderr=err)
    line = _read_line(driver, BOOT + 10)
    if not line.strip().isdigit():
        driver.kill()
        driver.wait(5)
        pytest.fail(f"driver said {line!r}; stderr: {errfile.read_text()}")
    worker_pid = int(line)
    assert worker_pid not in (driver.pid, os.getpid())
    assert psutil.Process(worker_pid).ppid() == driver.pid
    return driver, worker_pid


def _stop_driver(driver: subprocess.Popen, worker_pid: int | None) -> None:
    if driver.poll() is None:
        driver.kill()
        driver.wait(5)
    if driver.stdout is not None:
        driver.stdout.close()
    if worker_pid is not None:
        _kill_quietly(worker_pid)


def test_sigkilled_driver_leaves_no_worker(tmp_path):
    """The worker's stdin is its lifeline: a driver killed outright takes its workers along
    at once, long before their lease (60 s here) would lapse."""
    driver, worker_pid = _start_driver(tmp_path, "driver", lease=60.0)
    try:
        driver.send_signal(signal.SIGKILL)
        driver.wait(5)
        assert _wait_gone(worker_pid, 20), (
            f"worker {worker_pid} still alive 20s after its driver was SIGKILLed: it waits "
            f"for its lease (status {psutil.Process(worker_pid).status()})")
    finally:
        _stop_driver(driver, worker_pid)


def test_a_hung_driver_loses_its_workers_to_the_lease(tmp_path):
    """A driver that stops answering (SIGSTOP: its lifeline stays open, its keepalives stop)
    loses its worker once the lease lapses: the watchdog's doing, not the lifeline's."""
    driver, worker_pid = _start_driver(tmp_path, "hung", lease=2.0)
    try:
        driver.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        lease = 2.0
        assert not _is_gone(worker_pid), "the worker died at once: not the watchdog's doing"
        assert _wait_gone(worker_pid, lease + 8), (
            f"worker {worker_pid} still alive {lease + 8}s after its driver hung")
        assert time.monotonic() - stopped_at > 0.5, "it did not wait for its lease"
    finally:
        driver.send_signal(signal.SIGCONT)
        _stop_driver(driver, worker_pid)


def test_forked_children_of_the_driver_do_not_hold_workers_alive(tmp_path):
    """A child forked by the driver closes its copy of the lifeline: killing the driver
    still ends the worker while the child lives on."""
    script = tmp_path / "forking.py"
    script.write_text(_DRIVER.replace("LEASE", "60.0").replace(
        'print(m.call("Supervisor.info")["pid"], flush=True)',
        'child = os.fork()\n'
        'if child == 0:\n'
        '    time.sleep(60)\n'
        '    os._exit(0)\n'
        'print(m.call("Supervisor.info")["pid"], child, flush=True)').replace(
        "import sys, time", "import os, sys, time"))
    with open(tmp_path / "forking.err", "wb") as err:
        driver = subprocess.Popen([sys.executable, str(script)], cwd=str(REPO),
                                  stdout=subprocess.PIPE, stderr=err)
    worker_pid = child = None
    try:
        fields = _read_line(driver, BOOT + 10).split()
        assert len(fields) == 2, f"driver said {fields!r}: {(tmp_path / 'forking.err').read_text()}"
        worker_pid, child = int(fields[0]), int(fields[1])
        driver.send_signal(signal.SIGKILL)
        driver.wait(5)
        assert not _is_gone(child)
        assert _wait_gone(worker_pid, 20), "the forked child kept the worker alive"
    finally:
        if child is not None:
            _kill_quietly(child)
        _stop_driver(driver, worker_pid)


def test_no_worker_outlives_a_normal_session_exit():
    # children other tests left (stdlib pools still exiting) are not this test's business
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with bigexec.start("local") as b:
        ms = b.start(2, services={"Echo": Echo()})
        for m in ms:
            _running(m)
        pids = [m.call("Supervisor.info")["pid"] for m in ms]
        kids = {p.pid for p in psutil.Process().children(recursive=True)}
        assert set(pids) <= kids
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert left == [], [(p.pid, p.cmdline()) for p in left]
    for pid in pids:
        assert not psutil.pid_exists(pid)
    for m in ms:
        assert m.state == bigexec.STOPPED and m.err is None



def test_machines_boot_and_answer_with_descriptors_past_1024():
    """select() cannot wait on a descriptor numbered 1024 or more; a driver with many
    machines (or files) open gets there. Boot and a timed result() must still work."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1400
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.skip(f"this host allows {hard} open descriptors per process: too few to test")
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    filler = []
    try:
        while len(filler) < 1100:
            filler.append(os.open(os.devnull, os.O_RDONLY))
        assert max(filler) >= 1024
        with bigexec.Executor(1, system="local") as ex:
            assert ex.submit(abs, -2).result(timeout=60) == 2  # boot: the address pipe
            assert ex.submit(abs, -3).result(timeout=60) == 3  # a direct call, timed
    finally:
        for fd in filler:
            os.close(fd)
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
