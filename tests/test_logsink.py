"""The driver's sink for machines' lines: it never blocks, and says what it dropped."""

from __future__ import annotations

import io
import re
import sys
import threading

from bigexec.logsink import LineSink


class StuckStderr(io.StringIO):
    """A stderr whose writes block until ``release`` is set, as a pipe nobody reads."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def write(self, text: str) -> int:
        self.release.wait(30)
        return super().write(text)


def test_a_stuck_stderr_never_blocks_put_and_drops_are_reported(monkeypatch):
    stderr = StuckStderr()
    monkeypatch.setattr(sys, "stderr", stderr)
    sink = LineSink(max_bytes=1000)
    done = threading.Event()

    def produce():
        for i in range(500):  # 5,500 bytes: far more than the sink holds
            sink.put(f"line {i:04}\n")
        done.set()

    threading.Thread(target=produce, daemon=True).start()
    assert done.wait(10), "put blocked on a stuck stderr"
    assert sink.dropped_total > 0
    stderr.release.set()
    assert sink.flush(10)
    text = stderr.getvalue()
    assert "line 0000\n" in text  # the first lines were kept, in order
    kept = [line for line in text.splitlines() if line.startswith("line ")]
    assert kept == sorted(kept) and len(kept) + sink.dropped_total == 500
    # one notice per stretch of drops: a notice the writer made while it was stuck counts
    # the drops until then, a later one the rest
    notices = re.findall(r"bigexec: (\d+) lines of machines' output dropped", text)
    assert notices and sum(int(n) for n in notices) == sink.dropped_total, notices
