"""``BIGEXEC_DEBUG_ADDR`` with several sessions in one process: each gets a port, none crashes."""

from __future__ import annotations

import json
import socket
import urllib.request

import pytest

import bigexec
from bigexec.debug import server_of

pytestmark = pytest.mark.timeout(60)


def _free_port_run(length: int) -> int:
    """A loopback port p such that p .. p+length-1 are free right now."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = s.getsockname()[1]
        if first + length > 65535:
            continue
        socks = []
        try:
            for p in range(first, first + length):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return first
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no run of free loopback ports")


def _status_of(b) -> list:
    with urllib.request.urlopen(server_of(b).url + "status?format=json", timeout=10) as r:
        return json.loads(r.read())["machines"]


def test_a_second_session_takes_the_next_free_port(monkeypatch, capfd):
    port = _free_port_run(4)
    monkeypatch.setenv("BIGEXEC_DEBUG_ADDR", f"127.0.0.1:{port}")
    with bigexec.start("threads") as outer:
        (m,) = outer.start(1)
        assert m.wait(bigexec.RUNNING, 30) and m.err is None
        with bigexec.start("threads") as inner:
            assert server_of(outer).port == port
            assert server_of(inner).port == port + 1
            printed = (server_of(outer).login_url, server_of(inner).login_url)
            outer_token = server_of(outer).token
            # each serves its own session
            assert [row["addr"] for row in _status_of(outer)] == [m.addr]
            assert _status_of(inner) == []
    err = capfd.readouterr().err
    # printed with the token, so that the URL opens every page from anywhere
    assert printed[0] == f"http://127.0.0.1:{port}/debug/bigexec/?token={outer_token}"
    assert server_of(outer) is None  # it closed with its session
    assert f"bigexec debug server at {printed[0]}\n" in err, err
    assert f"at {printed[1]} (port {port} was taken" in err, err


def test_an_executor_inside_a_session_does_not_crash(monkeypatch):
    port = _free_port_run(4)
    monkeypatch.setenv("BIGEXEC_DEBUG_ADDR", f"127.0.0.1:{port}")
    with bigexec.start("threads") as b:
        with bigexec.Executor(max_workers=1, system="threads") as ex:
            assert ex.submit(pow, 2, 10).result(timeout=30) == 1024
            assert server_of(ex.session) is not None and server_of(ex.session).port == port + 1
        assert server_of(b).port == port


def test_a_port_taken_by_another_program_moves_the_server(monkeypatch):
    port = _free_port_run(3)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        monkeypatch.setenv("BIGEXEC_DEBUG_ADDR", f"127.0.0.1:{port}")
        with bigexec.start("threads") as b:
            assert server_of(b).port == port + 1
            assert _status_of(b) == []


def test_a_port_out_of_range_is_refused_before_a_session_starts(monkeypatch):
    monkeypatch.setenv("BIGEXEC_DEBUG_ADDR", "127.0.0.1:99999")
    with pytest.raises(ValueError, match="0 to 65535"):
        bigexec.start("threads")
