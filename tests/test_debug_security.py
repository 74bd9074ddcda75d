"""The debug server on a network: Host header, token, profile limits, abandoned requests, IPv6."""

from __future__ import annotations

import http.client
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import CancelledError

import netns_helpers
import pytest
from test_observe import Work  # a service that spins, for profiles to see
from waiting import wait_until

import bigexec
from bigexec import cli, debug, observe
from bigexec.debug import DebugServer, server_of

pytestmark = pytest.mark.timeout(120)

STATUS = "/debug/bigexec/status?format=json"


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not _has_ipv6_loopback(), reason="this host has no IPv6 loopback")


def _get(server: DebugServer, path: str, host: str | None = "",
         headers: dict[str, str] | None = None, addr: str = "127.0.0.1",
         timeout: float = 60) -> tuple[int, http.client.HTTPResponse, bytes]:
    """GET ``path``; ``host`` is the Host header to send ("" for the right one, None for none)."""
    conn = http.client.HTTPConnection(addr, server.port, timeout=timeout)
    try:
        conn.putrequest("GET", path, skip_host=True)
        if host == "":
            host = f"{'[' + addr + ']' if ':' in addr else addr}:{server.port}"
        if host is not None:
            conn.putheader("Host", host)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp, resp.read()
    finally:
        conn.close()


def _send_and_leave(port: int, path: str, token: str | None = None, reset: bool = False
                    ) -> socket.socket:
    """Send a whole GET for ``path`` and return the socket, for the caller to close unread."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}\r\n".encode())
    if reset:  # close with a RST rather than a FIN, as a killed client's kernel may
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return s


@pytest.fixture
def session():
    with bigexec.start("threads") as b:
        yield b


@pytest.fixture
def two_machines():
    """A session with two machine processes, each spinning so a profile has work to see."""
    with bigexec.start("local") as b:
        ms = b.start(2, services={"Work": Work()})
        for m in ms:
            assert m.wait(bigexec.RUNNING, 60) and m.err is None
        futs = [m.submit("Work.spin", 90.0) for m in ms]
        yield b, ms
        for f in futs:
            f.cancel()


def _profiling(m) -> bool:
    return "Supervisor.profile" in m.call("Supervisor.metrics", timeout=30)["running_calls"]


# --- Host header -----------------------------------------------------------------------------


def test_a_host_header_that_names_another_site_is_refused(session):
    server = session.serve_debug(port=0)
    p = server.port
    for bad in (f"evil.example:{p}", f"127.0.0.1.evil.example:{p}", f"127.0.0.1:{p + 1}",
                "127.0.0.1", f"0.0.0.0:{p}", None):
        status, _, body = _get(server, STATUS, host=bad)
        assert status == 403 and b"Host" in body, (bad, status, body)
    for good in (f"127.0.0.1:{p}", f"localhost:{p}", f"LOCALHOST:{p}", f"[::1]:{p}"):
        status, _, _ = _get(server, STATUS, host=good)
        assert status == 200, (good, status)


# --- token -----------------------------------------------------------------------------------


def test_a_server_reachable_from_elsewhere_wants_its_token(session):
    server = session.serve_debug(port=0, allow_remote=True)
    assert server.login_url == f"{server.url}?token={server.token}"
    assert len(server.token) >= 32
    for path in (STATUS, "/debug/bigexec/", "/debug/bigexec/threads", "/debug/bigexec/vars"):
        status, resp, _ = _get(server, path)
        assert status == 401 and resp.getheader("WWW-Authenticate") == "Bearer", path
    assert _get(server, STATUS + "&token=nope")[0] == 401
    assert _get(server, STATUS, headers={"Authorization": "Bearer nope"})[0] == 401
    assert _get(server, STATUS, headers={"Authorization": f"Bearer {server.token}"})[0] == 200
    # The token in the query sets a cookie, which the page's links (without it) then carry.
    status, resp, _ = _get(server, f"/debug/bigexec/?token={server.token}")
    cookie = resp.getheader("Set-Cookie")
    assert status == 200 and cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    pair = cookie.split(";", 1)[0]
    assert _get(server, STATUS, headers={"Cookie": f"other=1; {pair}"})[0] == 200
    assert _get(server, STATUS, headers={"Cookie": f"{pair.split('=')[0]}=nope"})[0] == 401


def test_the_bigexec_command_sends_the_token(session, monkeypatch, capsys):
    server = session.serve_debug(port=0, allow_remote=True)
    with pytest.raises(SystemExit, match="HTTP 401"):
        cli.main(["status", server.url])
    assert cli.main(["status", server.login_url]) == 0
    assert cli.main(["status", server.url, "--token", server.token]) == 0
    monkeypatch.setenv(debug.TOKEN_ENV, server.token)
    assert cli.main(["status", f"127.0.0.1:{server.port}"]) == 0
    assert capsys.readouterr().out.count("MACHINE") == 3


def test_a_token_never_looks_like_an_option():
    # A token starting with "-" broke `bigexec status URL --token TOKEN` (1 in 64 of them).
    tokens = {debug.new_token() for _ in range(2000)}
    assert len(tokens) == 2000 and all(len(t) >= 43 for t in tokens)
    assert not [t for t in tokens if t.startswith("-")]


def test_peer_uid_names_the_user_of_a_loopback_client():
    families = [(socket.AF_INET, "127.0.0.1")]
    if _has_ipv6_loopback():
        families.append((socket.AF_INET6, "::1"))
    for family, addr in families:
        with socket.socket(family) as listener:
            listener.bind((addr, 0))
            listener.listen()
            with socket.socket(family) as client:
                client.connect(listener.getsockname())
                conn, peer = listener.accept()
                with conn:
                    assert debug.peer_uid(peer, listener.getsockname()) == os.getuid(), addr
                    # a connection that does not exist has no owner
                    assert debug.peer_uid((addr, 1), listener.getsockname()) is None


def _status_as(uid: int, port: int, path: str, token: str | None = None) -> int:
    """The HTTP status a client running as user ``uid`` gets for ``path`` (a forked child)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only system calls from here on, then _exit
        code = 1
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            s = socket.socket()
            s.settimeout(60)
            s.connect(("127.0.0.1", port))
            auth = f"Authorization: Bearer {token}\r\n" if token else ""
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}"
                      f"Connection: close\r\n\r\n".encode())
            head = s.recv(64)
            os.write(write, head.split(b" ", 2)[1])
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    try:
        status = os.read(read, 16)
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    return int(status)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another user")
def test_on_loopback_another_user_needs_the_token_for_a_profile(session):
    (m,) = session.start(1)
    assert m.wait(bigexec.RUNNING, 30)
    server = session.serve_debug(port=0)
    profile = "/debug/bigexec/profile?seconds=0.2&format=text"
    nobody = 65534
    assert _status_as(nobody, server.port, STATUS) == 200  # the read-only pages are open
    assert _status_as(nobody, server.port, profile) == 401
    assert _status_as(nobody, server.port, profile, server.token) == 200
    assert _get(server, profile)[0] == 200  # the driver's own user needs no token


# --- profiles --------------------------------------------------------------------------------


def test_a_profile_longer_than_the_maximum_is_refused(session):
    server = session.serve_debug(port=0)
    too_long = debug.MAX_PROFILE_SECONDS + 1
    status, _, body = _get(server, f"/debug/bigexec/profile?seconds={too_long:g}")
    assert status == 400 and b"seconds must be in (0, 120]" in body, body


def test_an_abandoned_profile_stops_on_every_machine(two_machines, caplog):
    b, ms = two_machines
    server = b.serve_debug(port=0)
    caplog.set_level(logging.INFO, logger="bigexec.debug")
    client = _send_and_leave(server.port, "/debug/bigexec/profile?seconds=120&format=text")
    try:
        wait_until("both machines profiling", lambda: all(_profiling(m) for m in ms), 30)
        # While it runs, a second profile waits its turn with a clear answer, not a 500.
        status, resp, body = _get(server, "/debug/bigexec/profile?seconds=1&format=text")
        assert status == 409 and b"another profile is running" in body, (status, body)
        assert 60 <= int(resp.getheader("Retry-After")) <= 120
    finally:
        client.close()  # the client goes away without reading
    wait_until("the machines' profilers stopped",
               lambda: not any(_profiling(m) for m in ms), 5)
    assert any("stopped early" in r.getMessage() for r in caplog.records)
    status, _, body = _get(server, "/debug/bigexec/profile?seconds=0.5&format=text")
    assert status == 200 and b"spin" in body, body


def test_a_profile_running_outside_the_server_answers_409(session):
    (m,) = session.start(1)
    assert m.wait(bigexec.RUNNING, 30)
    server = session.serve_debug(port=0)
    stop = threading.Event()
    outcome: list[BaseException] = []

    def profile_elsewhere() -> None:
        try:
            observe.profile(session, 30, stop=stop)
        except BaseException as exc:
            outcome.append(exc)

    elsewhere = threading.Thread(target=profile_elsewhere)
    elsewhere.start()
    try:
        wait_until("the machine profiling", lambda: _profiling(m), 30)
        status, _, body = _get(server, "/debug/bigexec/profile?seconds=1&format=text")
        assert status == 409 and b"already running" in body, (status, body)
    finally:
        stop.set()
        elsewhere.join(30)
    assert not elsewhere.is_alive() and isinstance(outcome[0], CancelledError)
    wait_until("the machine's profiler stopped", lambda: not _profiling(m), 5)


# --- abandoned and half-sent requests --------------------------------------------------------


def test_a_half_sent_request_times_out(session):
    server = DebugServer(session, "127.0.0.1", 0, request_timeout=0.5)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
            s.sendall(b"GET /debug/bigexec/status HTTP/1.1\r\nHost: 127.0.")  # and no more
            started = time.monotonic()
            assert s.recv(1024) == b""  # the server hung up
            assert time.monotonic() - started < 20
        # and serves the next client as ever
        assert _get(server, STATUS)[0] == 200
    finally:
        server.close()


def test_a_flood_of_idle_connections_holds_no_more_than_the_cap_of_threads(session):
    server = DebugServer(session, "127.0.0.1", 0, request_timeout=30)
    flood: list[socket.socket] = []
    try:
        before = threading.active_count()
        for _ in range(debug.MAX_CONNECTIONS + 40):
            flood.append(socket.create_connection(("127.0.0.1", server.port), timeout=30))
        # the connections past the cap are closed at once; the first ones each hold a thread
        refused = 0
        for s in flood[debug.MAX_CONNECTIONS:]:
            s.settimeout(10)
            try:
                refused += s.recv(1) == b""
            except ConnectionResetError:
                refused += 1
        assert refused == 40
        assert threading.active_count() - before <= debug.MAX_CONNECTIONS
    finally:
        for s in flood:
            s.close()
    try:
        wait_until("served after the flood",
                   lambda: _get(server, STATUS, timeout=5)[0] == 200, 20)
    finally:
        server.close()


def test_a_client_that_goes_away_leaves_no_traceback(session, capfd, caplog):
    (m,) = session.start(1)
    assert m.wait(bigexec.RUNNING, 30)
    server = session.serve_debug(port=0)
    caplog.set_level(logging.DEBUG, logger="bigexec.debug")
    # one leaves halfway through its request's head, with a reset
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"GET /debug/bigexec/status HTTP/1.1\r\nHo")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    # one asks for a profile and leaves, with a reset, before the answer
    _send_and_leave(server.port, "/debug/bigexec/profile?seconds=1&format=text",
                    reset=True).close()
    err = ""

    def seen_leaving() -> bool:
        nonlocal err
        err += capfd.readouterr().err
        return "Traceback" in err or sum("went away" in r.getMessage() or "stopped early" in
                                         r.getMessage() for r in caplog.records) >= 2

    wait_until("both clients seen leaving", seen_leaving, 10)
    time.sleep(1.5)  # past the profile's own end, when an answer would have been written
    assert _get(server, STATUS)[0] == 200
    err += capfd.readouterr().err
    assert "Traceback" not in err and "Exception occurred" not in err, err
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# --- IPv6 ------------------------------------------------------------------------------------


def test_parse_addr_takes_ipv6_in_brackets():
    assert debug.parse_addr("[::1]:3333") == ("::1", 3333)
    assert debug.parse_addr("[fe80::1%eth0]:80") == ("fe80::1%eth0", 80)
    assert debug.parse_addr(":4000") == ("127.0.0.1", 4000)
    assert debug.parse_addr("4000") == ("127.0.0.1", 4000)
    with pytest.raises(ValueError, match="in brackets"):
        debug.parse_addr("::1:3333")


@needs_ipv6
def test_a_server_on_ipv6_loopback(session):
    server = session.serve_debug(port=0, host="::1")
    assert server.url == f"http://[::1]:{server.port}/debug/bigexec/"
    status, _, body = _get(server, STATUS, addr="::1")
    assert status == 200 and b'"machines"' in body
    assert _get(server, STATUS, addr="::1", host=f"evil.example:{server.port}")[0] == 403


@needs_ipv6
def test_debug_addr_in_brackets_from_the_environment(monkeypatch, capfd):
    monkeypatch.setenv("BIGEXEC_DEBUG_ADDR", "[::1]:0")
    with bigexec.start("threads") as b:
        assert server_of(b) is not None and server_of(b).url.startswith("http://[::1]:")
        assert _get(server_of(b), STATUS, addr="::1")[0] == 200
        login_url = server_of(b).login_url
    assert f"bigexec debug server at {login_url}" in capfd.readouterr().err


# --- from another host -----------------------------------------------------------------------


@pytest.mark.skipif(not netns_helpers.available(), reason=netns_helpers.reason)
def test_a_client_on_another_host_needs_the_token(session):
    """A client in a network namespace (a second host, reached over a veth pair only)."""
    host_ip, ns_ip = "10.213.78.1", "10.213.78.2"
    with netns_helpers.linked_namespace(host_ip, ns_ip) as net:
        ns = net["far"]
        server = session.serve_debug(port=0, host=host_ip, allow_remote=True)
        assert server.login_url.startswith(f"http://{host_ip}:{server.port}/")
        url = f"http://{host_ip}:{server.port}{STATUS}"
        probe = ("import sys, urllib.request, urllib.error\n"
                 "for url in sys.argv[1:]:\n"
                 "    try:\n"
                 "        print(urllib.request.urlopen(url, timeout=10).status)\n"
                 "    except urllib.error.HTTPError as e:\n"
                 "        print(e.code)\n")
        out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", probe,
                              url, url + "&token=" + server.token, url + "&token=x"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["401", "200", "401"]
