"""The ``bigexec`` command as a shell user meets it: its help, and its output in a pipe."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytestmark = pytest.mark.timeout(60)

_ROWS = 5000  # ~100 bytes a row: several times what a pipe buffers


def _status_rows(n: int) -> list[dict]:
    return [{"addr": f"127.0.0.1:{20000 + i}", "state": "RUNNING", "uptime": 12.5,
             "memory": {"percent": 3.1}, "load": {"load1": 0.25}, "tasks_run": i,
             "rpc_calls": 2 * i, "rpc_errors": 0, "err": None} for i in range(n)]


class _FakeDriver(BaseHTTPRequestHandler):
    body = json.dumps({"machines": _status_rows(_ROWS)}).encode()

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format, *args) -> None:
        pass


@pytest.fixture
def fake_driver():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _FakeDriver)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def _bigexec(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bigexec", *args], **kw)


def test_status_into_a_reader_that_stops_early_ends_quietly(fake_driver):
    proc = _bigexec("status", fake_driver, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = proc.stdout.readline()  # like `| head -1`: one line, then the reader is gone
        proc.stdout.close()
        err = proc.stderr.read().decode()
        code = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert first.startswith(b"MACHINE"), first
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert err == ""
    assert code == 141, code


def test_status_prints_every_row_to_a_reader_that_reads_them(fake_driver):
    proc = subprocess.run([sys.executable, "-m", "bigexec", "status", fake_driver],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == _ROWS + 1
    assert lines[-1].startswith(f"127.0.0.1:{20000 + _ROWS - 1}  RUNNING")


# reST markup that must not reach a terminal: ``literals``, :roles:`x`, `links`_, directives
_REST = re.compile(r"``|:[a-z]+:`|`_|^\s*\.\. ", re.M)


@pytest.mark.parametrize("command", [[], ["status"], ["profile"], ["top"]])
def test_help_is_plain_text(command):
    proc = subprocess.run([sys.executable, "-m", "bigexec", *command, "--help"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: bigexec"), proc.stdout
    assert not _REST.search(proc.stdout), proc.stdout
    if command:  # each subcommand says what it does, and what every argument is
        assert re.search(r"^\S.*\.$", proc.stdout.split("\n\n")[1], re.M), proc.stdout
        assert "url  " in proc.stdout and "debug server" in proc.stdout
        assert "(default: " in proc.stdout, proc.stdout


def test_the_command_and_python_dash_m_say_their_version():
    import subprocess
    import sys

    import bigexec

    out = subprocess.run([sys.executable, "-m", "bigexec", "--version"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"bigexec {bigexec.__version__} (Python ")


class _Trickle(BaseHTTPRequestHandler):
    """Sends a reply's head at once, then its body a byte at a time, slower than any reader
    would wait for in all, but each byte well inside a per-read timeout."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        try:
            for _ in range(1000):
                self.wfile.write(b"x")
                self.wfile.flush()
                threading.Event().wait(0.05)
        except OSError:
            pass  # the reader gave up, as it should

    def log_message(self, format, *args) -> None:
        pass


def test_a_trickling_server_meets_the_commands_whole_deadline():
    from bigexec import cli

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        # every byte comes 0.05 s after the one before, so no single read waits 1 s: only a
        # deadline over the whole reply ends this before the 50 s the body takes
        with pytest.raises(SystemExit, match="no whole reply within 1 s"):
            cli.main(["status", f"127.0.0.1:{server.server_address[1]}", "--timeout", "1"])
    finally:
        server.shutdown()
        server.server_close()

