"""The worker processes an agent starts: ``python -m bigexec.worker`` children it watches.

    agent                                     worker process (its own session and group)
    ─────                                     ──────────────────────────────────────────
    WorkerChild ── stdin: the WorkerSpec ───> read_spec; stdin stays open: the lifeline (the
                                              agent dies, however: the worker exits at once)
    address(): announcement <── announce_fd   "bigexec-worker-listening https://HOST:PORT"
    output thread <── stdout+stderr ────────  every line, kept in a bounded buffer that each
                                              ``lines()`` reader follows from its start
    waiter: the exit status (negative: the signal, e.g. -9 for the kernel's OOM killer)

A child, not an exec: the agent outlives its workers, so it sees how each ended and can say
so to the driver. The process side (start, pipes, group, lifeline, exit) is
``systems.worker_child``'s, shared with the ``local`` system; the buffer and the agent's
words for a failed boot are this module's.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
from collections import deque
from collections.abc import Iterator, Mapping

from ..systems.bootstrap import MachineOutput, WorkerSpec
from ..systems.worker_child import NoAnnouncement, WorkerChild
from ..worker import describe_exit

__all__ = ["MAX_BUFFERED_BYTES", "MAX_BUFFERED_LINES", "MAX_LINE_BYTES", "WorkerProcess"]

#: Output a worker's buffer keeps, at most (the oldest lines go first); a reader that falls
#: further behind is told how many lines it missed.
MAX_BUFFERED_LINES = 10000
MAX_BUFFERED_BYTES = 8 << 20
#: A longer line is cut into pieces of this size.
MAX_LINE_BYTES = 64 << 10
_BOOT_OUTPUT_LINES = 20  # quoted in the error of a worker that died before it listened


class WorkerProcess:
    """One worker process, from its start to its exit status.

    ``env`` is the worker's whole environment (default: the agent's own), not additions to
    the agent's: the driver sends the one its machine gets. ``BIGEXEC_SYSTEM`` (the spec's
    system) and ``PYTHONUNBUFFERED=1`` are set on top of it.
    """

    def __init__(self, worker_id: str, spec: WorkerSpec, *, python: str = sys.executable,
                 env: Mapping[str, str] | None = None) -> None:
        self.worker_id = worker_id
        self._cond = threading.Condition()
        self._lines: deque[bytes] = deque()
        self._buffered_bytes = 0
        self._max_lines, self._max_bytes = MAX_BUFFERED_LINES, MAX_BUFFERED_BYTES
        self._first = 0  # the sequence number of _lines[0]
        self._output_ended = False
        self._child = WorkerChild(spec, python=python,
                                  env=os.environ if env is None else env,
                                  name=f"agent-{worker_id}")
        self.pid = self._child.pid
        self._who = f"{worker_id} (pid {self.pid})"
        self._boot = MachineOutput(self._who, keep=_BOOT_OUTPUT_LINES)
        self._child.watch(self._buffer, max_line_bytes=MAX_LINE_BYTES)

    def _buffer(self, lines: Iterator[bytes]) -> None:
        try:
            for line in lines:
                self._boot.line(line.decode("utf-8", "replace"))
                with self._cond:
                    self._lines.append(line)
                    self._buffered_bytes += len(line)
                    while len(self._lines) > self._max_lines or (
                            self._buffered_bytes > self._max_bytes and len(self._lines) > 1):
                        self._buffered_bytes -= len(self._lines.popleft())
                        self._first += 1
                    self._cond.notify_all()
        finally:
            self._boot.end()
            with self._cond:
                self._output_ended = True
                self._cond.notify_all()

    # --- what the agent asks -----------------------------------------------------------------

    def status(self) -> int | None:
        """None while the worker runs, else its exit status (negative: killed by a signal)."""
        return self._child.status()

    def address(self, timeout: float) -> str:
        """The address the worker announced, waiting up to ``timeout`` seconds; ``BootError``
        quoting its last output lines if it ended (or stayed silent) without one."""
        try:
            return self._child.announcement(timeout)
        except TimeoutError:
            raise self._boot.boot_error(self._who,
                                        f"did not listen within {timeout:g}s") from None
        except NoAnnouncement:
            pass
        code = self._child.wait(5.0)
        self._boot.wait_ended(5.0)  # its last lines say why
        what = (f"{describe_exit(code)} before it listened" if code is not None
                else "closed its announcement pipe without an address")
        raise self._boot.boot_error(self._who, what)

    def lines(self) -> Iterator[bytes]:
        """Every output line from the oldest one kept, then each new one, until the worker's
        output ends. A reader that fell behind what the buffer keeps gets a line
        saying how many it missed."""
        seq = 0
        while True:
            with self._cond:
                while seq >= self._first + len(self._lines) and not self._output_ended:
                    self._cond.wait()
                missed = max(0, self._first - seq)
                seq += missed
                batch = list(itertools.islice(self._lines, seq - self._first, None))
                ended = self._output_ended
            # (never yield with the lock held: the reader may take its time)
            if missed:
                yield f"bigexec-agent: {missed} output lines were dropped\n".encode()
            seq += len(batch)
            if batch:
                yield b"".join(batch)
            elif ended:
                return

    def kill(self) -> None:
        """SIGKILL the worker's process group (what its tasks started too) and close its
        lifeline."""
        self._child.kill()

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit status, waiting up to ``timeout``; None if it still runs."""
        return self._child.wait(timeout)
