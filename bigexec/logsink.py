"""Where machines' log lines go on the driver: its stderr, prefixed, never blocking a machine.

    worker stdout/stderr ──> log pump thread (one per machine) ──> LineSink.put(prefixed line)
                                                                        │ bounded buffer
                                    driver's sys.stderr <── writer thread (one per process)

A pump must always drain its machine's pipe: a worker whose pipe is full blocks in ``print``
with its tasks. So the pump never writes to the driver's stderr itself, which may be a pipe
that nobody reads (a driver started by a tool that collects its output later, a terminal
paused with Ctrl-S). It hands lines to the sink, which keeps up to ``MAX_BUFFERED_BYTES`` of
them; past that it drops lines, counts them, and says how many it dropped when stderr takes
lines again.
"""

from __future__ import annotations

import os
import sys
import threading
from collections import deque

__all__ = ["MAX_BUFFERED_BYTES", "LineSink", "stderr_sink"]

#: Bytes of lines held for a slow stderr before lines are dropped.
MAX_BUFFERED_BYTES = 8 << 20


class LineSink:
    """Writes lines to ``sys.stderr`` (as it is at each write) from a thread of its own."""

    def __init__(self, max_bytes: int = MAX_BUFFERED_BYTES) -> None:
        self.max_bytes = max_bytes
        self._cond = threading.Condition()
        self._lines: deque[str] = deque()
        self._bytes = 0
        #: Lines dropped since the last notice, and in all.
        self._dropped = 0
        self.dropped_total = 0
        self._writer: threading.Thread | None = None

    def put(self, line: str) -> None:
        """Queue ``line`` (ending in a newline) for stderr; never blocks on stderr."""
        with self._cond:
            if self._bytes + len(line) > self.max_bytes:
                self._dropped += 1
                self.dropped_total += 1
                return
            self._lines.append(line)
            self._bytes += len(line)
            if self._writer is None or not self._writer.is_alive():
                self._writer = threading.Thread(target=self._write_lines, daemon=True,
                                                name="bigexec-log-writer")
                self._writer.start()
            self._cond.notify()

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the queued lines to be written; whether they
        were."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._lines and self._bytes == 0, timeout)

    def _write_lines(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._lines))
                batch = list(self._lines)
                self._lines.clear()
                dropped, self._dropped = self._dropped, 0
            text = "".join(batch)
            if dropped:
                text += (f"bigexec: {dropped} lines of machines' output dropped: the driver's "
                         f"stderr did not take them fast enough\n")
            try:
                sys.stderr.write(text)
                sys.stderr.flush()
            except (OSError, ValueError):  # closed: nobody to tell
                pass
            with self._cond:
                self._bytes -= sum(len(line) for line in batch)
                self._cond.notify_all()


_sink: LineSink | None = None
_sink_lock = threading.Lock()


def stderr_sink() -> LineSink:
    """The process's sink for machines' lines."""
    global _sink
    with _sink_lock:
        if _sink is None:
            _sink = LineSink()
        return _sink


def _forget_sink_in_child() -> None:
    global _sink, _sink_lock
    _sink, _sink_lock = None, threading.Lock()  # the parent's writer and lock stay its own


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_sink_in_child)
