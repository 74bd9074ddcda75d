"""A ``python -m bigexec.worker`` child process, from its start to its exit status.

    parent (a WorkerChild)                     worker process (its own session and group)
    ──────────────────────                     ──────────────────────────────────────────
    Popen(start_new_session) ── stdin ───────> its WorkerSpec (``announce_fd`` filled in),
                                               then nothing: stdin stays open as the
                                               lifeline (the parent dies, however: the
                                               worker reads EOF and exits at once)
    announcement(timeout) <──── announce_fd ── "bigexec-worker-listening https://HOST:PORT"
        select.poll under a deadline, in the caller's thread
    output thread <──────── stdout+stderr ──── line by line, to the consumer the user gave
    waiter thread: exit status ──> SIGKILL what is left of the group, close the lifeline,
                   finish the announcement pipe, then ``exited(status)`` if the user asked
    kill() ──────────────────────────────────> SIGKILL the whole group, close the lifeline
    os.fork() of the parent: the forked child points its copies of every lifeline at
                             /dev/null, so it keeps no worker alive

Why: every system whose workers are its own children (``local`` on the driver's host, the
ec2 agent on an instance) needs exactly this, and its details are easy to get wrong (a pipe
read past its deadline, the group a SIGKILLed worker leaves, a fork that keeps a lifeline
open). What each makes of the output and of an exit (printing, buffering, a ``BootError``'s
words) stays its own. The worker's own session and group keep ^C in the parent's terminal
the parent's, and hold whatever its tasks start, so ``kill()`` and the sweep end them too.
"""

from __future__ import annotations

import dataclasses
import os
import select
import signal
import subprocess
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import IO

from .bootstrap import WorkerSpec, parse_announcement

__all__ = ["NoAnnouncement", "WorkerChild"]

#: Bytes of an announcement at the most: a worker that writes more without a newline wrote
#: something else.
_MAX_ANNOUNCEMENT = 4096


class NoAnnouncement(Exception):
    """The worker's announcement pipe gave no address: it closed before a whole line came
    (``closed``: the worker is gone or going), or what came is no announcement (``text``)."""

    def __init__(self, text: bytes, closed: bool) -> None:
        super().__init__(f"no announcement but {text[:80]!r}" + (" (closed)" if closed else ""))
        self.text = text
        self.closed = closed


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:  # nobody left
        pass


class WorkerChild:
    """One worker process: started at construction, watched once ``watch`` is called.

    ``env`` is the child's whole environment (nothing of the parent's is added but
    ``BIGEXEC_SYSTEM``, the spec's system, and ``PYTHONUNBUFFERED=1``, so that its prints
    reach the pipe as they happen). The spec is written to the worker's stdin before the
    constructor returns; output waits in its pipe until ``watch`` starts reading it.
    """

    def __init__(self, spec: WorkerSpec, *, python: str, env: Mapping[str, str],
                 name: str = "worker") -> None:
        self.name = name
        read_end, write_end = os.pipe()
        spec = dataclasses.replace(spec, announce_fd=write_end)
        environ = dict(env)
        environ.update(BIGEXEC_SYSTEM=spec.system, PYTHONUNBUFFERED="1")
        try:
            self.process = subprocess.Popen(
                [python, "-m", "bigexec.worker"], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, pass_fds=(write_end,),
                env=environ, start_new_session=True)
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        self.pid = self.process.pid
        self._announce_lock = threading.Lock()  # one reader of the pipe at a time
        self._announce_fd = read_end  # -1 once closed
        self._announce_data = b""
        self._address: str | None = None
        self._announce_closed = False  # it ended before a whole line
        _lifelines.add(self)
        stdin: IO[bytes] = self.process.stdin  # type: ignore[assignment]
        try:
            stdin.write(spec.encode())
            stdin.flush()
        except OSError:
            pass  # it died at once: its status, output and announcement pipe say how

    # --- output and exit -----------------------------------------------------------------

    def watch(self, output: Callable[[Iterator[bytes]], object],
              exited: Callable[[int], object] | None = None, *,
              max_line_bytes: int = -1) -> None:
        """Start the two threads that follow the worker (call it once; named after ``name``
        and the pid). ``output`` is given
        an iterator of the worker's stdout+stderr lines, which ends with its output; it must
        consume it all, or the worker blocks on a full pipe. A line longer than
        ``max_line_bytes`` (if positive) comes in pieces of that size. ``exited`` is told
        the exit status once the worker is reaped and what was left of its group killed."""
        threading.Thread(target=self._pump, args=(output, max_line_bytes), daemon=True,
                         name=f"bigexec-output-{self.name}-{self.pid}").start()
        threading.Thread(target=self._reap, args=(exited,), daemon=True,
                         name=f"bigexec-wait-{self.name}-{self.pid}").start()

    def _pump(self, output: Callable[[Iterator[bytes]], object], max_line_bytes: int) -> None:
        out: IO[bytes] = self.process.stdout  # type: ignore[assignment]
        try:
            output(iter(lambda: out.readline(max_line_bytes), b""))
        finally:
            out.close()

    def _reap(self, exited: Callable[[int], object] | None) -> None:
        code = self.process.wait()
        # The worker kills its group as it exits, but not when it was killed: sweep. Its pid
        # cannot name another group meanwhile: a pid is not reused while its group has members.
        _kill_group(self.pid)
        self.close_lifeline()
        # Nobody may ever ask for the announcement: read what is left, which closes the pipe
        # (the writer is gone, so the end of it is there at once).
        if self._announce_lock.acquire(blocking=False):  # else its reader will close it
            try:
                self._read_announcement(time.monotonic() + 1.0)
            except TimeoutError:
                pass
            finally:
                self._announce_lock.release()
        if exited is not None:
            exited(code)

    def status(self) -> int | None:
        """None while the worker runs, else its exit status (negative: killed by a signal)."""
        return self.process.poll()

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit status, waiting up to ``timeout`` seconds; None if it still runs."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    # --- the announcement ----------------------------------------------------------------

    def announcement(self, timeout: float) -> str:
        """The address the worker announced, waiting up to ``timeout`` seconds for it.

        ``TimeoutError`` if it did not come in time (the pipe stays open: a later call reads
        on), ``NoAnnouncement`` if the pipe closed first or carried something else. Once
        known, the outcome is the same for every later call.
        """
        deadline = time.monotonic() + timeout
        if not self._announce_lock.acquire(timeout=max(0.0, timeout)):
            raise TimeoutError(f"{self.name} {self.pid} did not announce within {timeout:g}s")
        try:
            self._read_announcement(deadline)
        finally:
            self._announce_lock.release()
        if self._address is None:
            raise NoAnnouncement(self._announce_data, self._announce_closed)
        return self._address

    def _read_announcement(self, deadline: float) -> None:
        # (with _announce_lock held) Read on until a whole line, the end or the deadline.
        if self._announce_fd < 0:
            return
        poller = select.poll()  # select() fails on descriptors past 1024
        poller.register(self._announce_fd, select.POLLIN)
        data = self._announce_data
        while not data.endswith(b"\n") and len(data) < _MAX_ANNOUNCEMENT:
            left = deadline - time.monotonic()
            if left <= 0:
                self._announce_data = data
                raise TimeoutError(f"{self.name} {self.pid} did not announce in time")
            if poller.poll(left * 1000):
                try:
                    chunk = os.read(self._announce_fd, 512)
                except OSError:
                    chunk = b""
                if not chunk:
                    self._announce_closed = True
                    break
                data += chunk
        os.close(self._announce_fd)
        self._announce_fd = -1
        self._announce_data = data
        if not self._announce_closed:
            self._address = parse_announcement(data.decode("utf-8", "replace"))

    # --- ending it -----------------------------------------------------------------------

    def kill(self) -> None:
        """SIGKILL the worker's process group (what its tasks started too) and close its
        lifeline."""
        if self.process.poll() is None:
            _kill_group(self.pid)
        self.close_lifeline()

    def close_lifeline(self) -> None:
        """Close the worker's stdin: it reads EOF and exits as if its parent were gone."""
        try:
            if self.process.stdin is not None:
                self.process.stdin.close()
        except OSError:  # it died with unread data in the pipe
            pass


_lifelines: weakref.WeakSet[WorkerChild] = weakref.WeakSet()


def _release_lifelines_in_child() -> None:
    # A forked child must not hold its parent's workers alive after the parent is gone. The
    # descriptor is pointed at /dev/null rather than closed: the pipe's file object still owns
    # it and will close it some day, which must not hit a descriptor reused meanwhile.
    try:
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    try:
        for child in list(_lifelines):
            try:
                stdin = child.process.stdin
                if stdin is not None and not stdin.closed:
                    os.dup2(null, stdin.fileno(), inheritable=False)
            except (OSError, ValueError):
                pass
    finally:
        os.close(null)


os.register_at_fork(after_in_child=_release_lifelines_in_child)
