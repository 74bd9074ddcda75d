"""The worker processes an agent starts: ``python -m bigexec.worker`` children it watches.

    agent                                     worker process (its own session and group)
    ─────                                     ──────────────────────────────────────────
    Popen ── stdin: the WorkerSpec ─────────> read_spec; stdin stays open: the lifeline (the
                                              agent dies, however: the worker exits at once)
    announce pipe reader <── announce_fd ───  "bigexec-worker-listening https://HOST:PORT"
    output reader <── stdout+stderr ────────  every line, kept in a bounded buffer that each
                                              ``lines()`` reader follows from its start
    waiter: the exit status (negative: the signal, e.g. -9 for the kernel's OOM killer)

A child, not an exec: the agent outlives its workers, so it sees how each ended and can say
so to the driver.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Iterator, Mapping
from typing import IO

from ..systems.bootstrap import MachineOutput, WorkerSpec, parse_announcement
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
    """One worker process, from its start to its exit status."""

    def __init__(self, worker_id: str, spec: WorkerSpec, *, python: str = sys.executable,
                 env: Mapping[str, str] | None = None) -> None:
        self.worker_id = worker_id
        read_end, write_end = os.pipe()
        spec = dataclasses.replace(spec, announce_fd=write_end)
        environ = dict(os.environ if env is None else env)
        environ.update(BIGEXEC_SYSTEM=spec.system, PYTHONUNBUFFERED="1")
        try:
            self.proc = subprocess.Popen(
                [python, "-m", "bigexec.worker"], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, pass_fds=(write_end,),
                env=environ,
                # its own group: kill() ends what its tasks started too
                start_new_session=True)
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        self.pid = self.proc.pid
        self._boot = MachineOutput(f"{worker_id} (pid {self.pid})", keep=_BOOT_OUTPUT_LINES)
        self._cond = threading.Condition()
        self._lines: deque[bytes] = deque()
        self._buffered_bytes = 0
        self._max_lines, self._max_bytes = MAX_BUFFERED_LINES, MAX_BUFFERED_BYTES
        self._first = 0  # the sequence number of _lines[0]
        self._output_ended = False
        self._addr: str | None = None
        self._announce_over = threading.Event()
        stdin: IO[bytes] = self.proc.stdin  # type: ignore[assignment]
        try:
            stdin.write(spec.encode())
            stdin.flush()
        except OSError:
            pass  # it died at once: its status and output say how
        threading.Thread(target=self._read_announcement, args=(read_end,), daemon=True,
                         name=f"bigexec-agent-announce-{worker_id}").start()
        threading.Thread(target=self._read_output, daemon=True,
                         name=f"bigexec-agent-output-{worker_id}").start()
        threading.Thread(target=self._reap, daemon=True,
                         name=f"bigexec-agent-wait-{worker_id}").start()

    # --- the worker's side of the pipes ------------------------------------------------------

    def _read_announcement(self, fd: int) -> None:
        data = b""
        try:
            while not data.endswith(b"\n") and len(data) < 4096:
                chunk = os.read(fd, 512)
                if not chunk:
                    break
                data += chunk
        except OSError:
            pass
        finally:
            os.close(fd)
        self._addr = parse_announcement(data.decode("utf-8", "replace"))
        self._announce_over.set()

    def _read_output(self) -> None:
        out: IO[bytes] = self.proc.stdout  # type: ignore[assignment]
        try:
            for line in iter(lambda: out.readline(MAX_LINE_BYTES), b""):
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
            out.close()
            self._boot.end()
            with self._cond:
                self._output_ended = True
                self._cond.notify_all()

    def _reap(self) -> None:
        self.proc.wait()
        # A worker kills its group as it exits, but not when it is killed: sweep. Its pid
        # cannot name another group meanwhile: a pid is not reused while its group has members.
        self._kill_group()
        self._close_lifeline()

    # --- what the agent asks -----------------------------------------------------------------

    def status(self) -> int | None:
        """None while the worker runs, else its exit status (negative: killed by a signal)."""
        return self.proc.poll()

    def address(self, timeout: float) -> str:
        """The address the worker announced, waiting up to ``timeout`` seconds; ``BootError``
        quoting its last output lines if it ended (or stayed silent) without one."""
        self._announce_over.wait(timeout)
        if self._addr is not None:
            return self._addr
        if not self._announce_over.is_set():
            raise self._boot.boot_error(f"{self.worker_id} (pid {self.pid})",
                                        f"did not listen within {timeout:g}s")
        try:
            code: int | None = self.proc.wait(5.0)
        except subprocess.TimeoutExpired:
            code = None
        self._boot.wait_ended(5.0)  # its last lines say why
        what = (f"{describe_exit(code)} before it listened" if code is not None
                else "closed its announcement pipe without an address")
        raise self._boot.boot_error(f"{self.worker_id} (pid {self.pid})", what)

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
        if self.proc.poll() is None:
            self._kill_group()
        self._close_lifeline()

    def _kill_group(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except OSError:  # nobody left
            pass

    def _close_lifeline(self) -> None:
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:  # it died with unread data in the pipe
            pass

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit status, waiting up to ``timeout``; None if it still runs."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
