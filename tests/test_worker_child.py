"""``systems.worker_child.WorkerChild``: a real ``python -m bigexec.worker`` child on 127.0.0.1.

Each test ends its child (and anything the child started) itself, also when it fails.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_harness import HOST, driver_client
from test_worker_exits import _alive, _gone_within

from bigexec import __version__
from bigexec.authority import Authority
from bigexec.systems.bootstrap import Versions, WorkerSpec
from bigexec.systems.worker_child import NoAnnouncement, WorkerChild
from bigexec.worker import EXIT_DRIVER_GONE, EXIT_VERSION_MISMATCH

pytestmark = pytest.mark.timeout(120)


class _Followed:
    """What a child's ``watch`` callbacks were given: its output lines and exit status."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.output_ended = threading.Event()
        self.status: int | None = None
        self.exited = threading.Event()

    def output(self, lines: Iterator[bytes]) -> None:
        try:
            self.lines.extend(lines)
        finally:
            self.output_ended.set()

    def exit(self, code: int) -> None:
        self.status = code
        self.exited.set()

    def text(self) -> str:
        return b"".join(self.lines).decode()


def _spec(ca: Authority, **changes) -> WorkerSpec:
    return WorkerSpec(system="local", lease=60.0, listen_host=HOST,
                      credentials=ca.issue_machine(ips=[HOST]), **changes)


@contextlib.contextmanager
def _child(spec: WorkerSpec, python: str = sys.executable, env: dict[str, str] | None = None,
           watch: bool = True) -> Iterator[tuple[WorkerChild, _Followed]]:
    child = WorkerChild(spec, python=python, env=dict(os.environ) if env is None else env,
                        name="test")
    followed = _Followed()
    if watch:
        child.watch(followed.output, followed.exit)
    try:
        yield child, followed
    finally:
        child.kill()
        child.wait(20)
        if not watch and child.process.stdout is not None:
            child.process.stdout.close()  # (watch() closes it once the output ends)


def _python_with_a_grandchild(tmp_path: Path) -> tuple[str, Path]:
    """An interpreter command that starts a ``sleep`` in the worker's group, writes its pid
    to a file, then becomes the real interpreter."""
    pidfile = tmp_path / "grandchild.pid"
    script = tmp_path / "python-with-grandchild"
    script.write_text(f'#!/bin/sh\nsleep 300 &\necho $! > {pidfile}\n'
                      f'exec {sys.executable} "$@"\n')
    script.chmod(0o755)
    return str(script), pidfile


def _read_pid(pidfile: Path) -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = pidfile.read_text() if pidfile.exists() else ""
        if text.endswith("\n"):
            return int(text)
        time.sleep(0.02)
    raise AssertionError("the grandchild's pid never came")


def test_a_worker_announces_its_address_and_its_output_and_status_are_delivered():
    ca = Authority()
    with _child(_spec(ca)) as (child, followed):
        addr = child.announcement(60.0)
        assert addr.startswith(f"https://{HOST}:")
        assert child.announcement(0.0) == addr  # known: no second read
        assert child.status() is None
        client = driver_client(ca)
        try:
            assert client.call(addr, "Supervisor.ping", (3,), timeout=10) == 3
            # (a moment after its reply: with no delay it may exit before the reply is out)
            client.call(addr, "Supervisor.shutdown", (0.3, "goodbye from the child"),
                        timeout=10)
        finally:
            client.close()
        assert followed.exited.wait(20) and followed.status == 0
        assert child.wait(0) == 0
        assert followed.output_ended.wait(10)
        assert "goodbye from the child\n" in followed.text().splitlines(True)
        assert child.process.stdin is not None and child.process.stdin.closed


def test_the_environment_given_is_the_whole_environment_of_the_child(monkeypatch):
    monkeypatch.setenv("BIGEXEC_TEST_PARENT_ONLY", "parent")
    ca = Authority()
    env = {k: v for k, v in os.environ.items() if k != "BIGEXEC_TEST_PARENT_ONLY"}
    env["BIGEXEC_TEST_GIVEN"] = "given"
    with _child(_spec(ca), env=env) as (child, _):
        addr = child.announcement(60.0)
        client = driver_client(ca)
        try:
            got = {name: client.call(addr, "Supervisor.getenv", (name,), timeout=10)
                   for name in ("BIGEXEC_TEST_GIVEN", "BIGEXEC_TEST_PARENT_ONLY",
                                "BIGEXEC_SYSTEM", "PYTHONUNBUFFERED")}
        finally:
            client.close()
        assert got == {"BIGEXEC_TEST_GIVEN": "given", "BIGEXEC_TEST_PARENT_ONLY": None,
                       "BIGEXEC_SYSTEM": "local",  # the spec's system, always
                       "PYTHONUNBUFFERED": "1"}


def test_a_timeout_leaves_the_announcement_to_a_later_call():
    with _child(_spec(Authority())) as (child, _):
        with pytest.raises(TimeoutError):
            child.announcement(0.0)  # the interpreter is not even up yet
        assert child.announcement(60.0).startswith(f"https://{HOST}:")


def test_a_worker_that_exits_before_announcing_gives_its_status_and_last_lines():
    other = Versions(python="2.7", bigexec=__version__, cloudpickle="0")
    with _child(_spec(Authority(), versions=other)) as (child, followed):
        with pytest.raises(NoAnnouncement) as no:
            child.announcement(60.0)
        assert no.value.closed
        assert child.wait(20) == EXIT_VERSION_MISMATCH
        assert followed.exited.wait(20) and followed.status == EXIT_VERSION_MISMATCH
        assert followed.output_ended.wait(10)
        assert "Python 2.7" in followed.text()
        with pytest.raises(NoAnnouncement):  # the same outcome for every later call
            child.announcement(0.0)


def test_an_announcement_pipe_that_carries_something_else_gives_no_address(tmp_path):
    fake = tmp_path / "fake_worker.py"
    fake.write_text(
        "import os, sys, time\n"
        "from bigexec.systems import bootstrap\n"
        "spec = bootstrap.read_spec(sys.stdin.fileno())\n"
        "os.write(spec.announce_fd, b'hello there\\n')\n"
        "time.sleep(60)\n")
    python = tmp_path / "python-fake"
    python.write_text(f"#!/bin/sh\nexec {sys.executable} {fake}\n")
    python.chmod(0o755)
    with _child(_spec(Authority()), python=str(python)) as (child, _):
        with pytest.raises(NoAnnouncement) as no:
            child.announcement(60.0)
        assert (no.value.text, no.value.closed) == (b"hello there\n", False)
        assert child.status() is None  # it runs on: what to do with it is the user's call


def test_kill_ends_the_whole_group_and_closes_the_lifeline(tmp_path):
    python, pidfile = _python_with_a_grandchild(tmp_path)
    # not watched: no sweep after the exit, kill() alone must end the group
    with _child(_spec(Authority()), python=python, watch=False) as (child, _):
        grandchild = _read_pid(pidfile)
        child.announcement(60.0)
        assert _alive(grandchild)
        child.kill()
        assert child.process.stdin is not None and child.process.stdin.closed
        assert child.wait(20) == -9
        assert _gone_within(grandchild, 10), "kill() left the worker's grandchild running"


def test_what_a_killed_worker_leaves_of_its_group_is_swept_after_its_exit(tmp_path):
    python, pidfile = _python_with_a_grandchild(tmp_path)
    with _child(_spec(Authority()), python=python) as (child, followed):
        grandchild = _read_pid(pidfile)
        child.announcement(60.0)
        os.kill(child.pid, 9)  # the worker alone, not its group: it cannot clean up
        assert followed.exited.wait(20) and followed.status == -9
        assert _gone_within(grandchild, 10), "the grandchild outlived the worker"
        assert child.process.stdin is not None and child.process.stdin.closed


def test_a_forked_child_of_the_parent_does_not_hold_the_lifeline():
    with _child(_spec(Authority())) as (child, followed):
        child.announcement(60.0)
        fork = os.fork()
        if fork == 0:  # the forked child: sleep on, never back into pytest
            try:
                time.sleep(30)
            finally:
                os._exit(0)
        try:
            child.close_lifeline()
            # only the fork's copy of the pipe could keep the worker from reading EOF
            assert child.wait(20) == EXIT_DRIVER_GONE, "the forked child held the lifeline"
            assert followed.exited.wait(10)
            assert os.waitpid(fork, os.WNOHANG) == (0, 0), "the fork must still be alive"
        finally:
            os.kill(fork, 9)
            os.waitpid(fork, 0)
