"""Status, metrics, the debug server, its status page in a real browser, and the command."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import netns_helpers
import pytest

import bigexec
from bigexec import cli
from bigexec.debug import server_of


class Work:
    def spin(self, seconds: float) -> int:
        end = time.perf_counter() + seconds
        n = 0
        while time.perf_counter() < end:
            n += 1
        return n

    def say(self, text: str) -> str:
        logging.getLogger("bigexec.test.work").warning("said %s", text)
        return text


def _fetch(url: str, timeout: float = 60) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


def _start_two(b, name, service):
    """Two RUNNING machines of ``b`` serving ``service`` as ``name``."""
    ms = b.start(2, services={name: service})
    for m in ms:
        assert m.wait(bigexec.RUNNING, 30) and m.err is None
    return ms


@pytest.fixture
def cluster():
    with bigexec.start("local") as b:
        ms = _start_two(b, "Work", Work())
        yield b, ms


def test_status_lists_every_machine_with_resources(cluster):
    b, ms = cluster
    for m in ms:
        m.call("Work.spin", 0.01)
    rows = {r["addr"]: r for r in b.status()}
    assert set(rows) == {m.addr for m in ms}
    for m in ms:
        r = rows[m.addr]
        assert r["state"] == "RUNNING" and r["err"] is None
        assert r["pid"] == m.info["pid"] and r["uptime"] > 0
        assert 0 < r["memory"]["percent"] <= 100 and r["memory"]["process_rss"] > 0
        assert r["disk"]["total"] > 0 and "load1" in r["load"]
        assert r["rpc_calls"] >= 1  # the spin at least


def test_stopped_machines_show_why(cluster):
    b, ms = cluster
    os.kill(ms[0].info["pid"], 9)
    assert ms[0].wait(bigexec.STOPPED, 10)
    rows = {r["addr"]: r for r in b.status()}
    assert rows[ms[0].addr]["state"] == "STOPPED"
    assert "SIGKILL" in rows[ms[0].addr]["err"]
    assert rows[ms[1].addr]["state"] == "RUNNING"


def test_metrics_aggregate_machines_and_driver(cluster):
    b, ms = cluster
    for m in ms:
        for _ in range(3):
            m.call("Work.spin", 0.001)
    mt = b.metrics()
    assert set(mt["machines"]) == {m.addr for m in ms}
    per = [mt["machines"][m.addr]["rpc"]["served"]["Work.spin"]["count"] for m in ms]
    assert per == [3, 3]
    assert mt["total"]["rpc"]["served"]["Work.spin"]["count"] == 6
    assert mt["driver"]["rpc"]["made"]["Work.spin"]["count"] == 6
    assert mt["driver"]["machines"]["running"] == 2


def test_executor_tasks_show_in_status_and_metrics():
    with bigexec.Executor(2, system="threads") as ex:
        assert sum(ex.map(abs, range(100), chunksize=10)) == 4950
        mt = ex.metrics()
        sched = next(v for k, v in mt["driver"].items() if k.startswith("scheduler:"))
        assert sched["completed"] == 10 and sched["queued"] == 0
        assert sum(r.get("tasks_run", 0) for r in ex.status()) == 10


def test_debug_server_pages(cluster):
    b, ms = cluster
    server = b.serve_debug(port=0)
    assert server.url.startswith("http://127.0.0.1:")
    status, ctype, body = _fetch(server.url + "status?format=json")
    assert status == 200 and ctype == "application/json"
    assert {m["addr"] for m in json.loads(body)["machines"]} == {m.addr for m in ms}
    status, ctype, body = _fetch(server.url + "status")
    assert status == 200 and ctype.startswith("text/html")
    for m in ms:
        assert m.addr.encode() in body
    status, _, body = _fetch(server.url + "vars")
    assert status == 200 and set(json.loads(body)["machines"]) == {m.addr for m in ms}
    status, _, body = _fetch(server.url + "threads")
    assert status == 200 and body.count(b"=== machine") == 2 and b"bigexec-watchdog" in body
    assert _fetch(server.url + "nope")[0] == 404
    assert _fetch(server.url + "profile?seconds=-1")[0] == 400
    assert _fetch(server.url + "profile?seconds=1&format=svg")[0] == 400
    assert _fetch(server.url + "profile?seconds=1&machine=1.2.3.4:5")[0] == 400


def test_status_page_in_a_real_browser(cluster, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    b, ms = cluster
    server = b.serve_debug(port=0)
    shot = tmp_path / "status.png"
    profile_dir = tempfile.mkdtemp(prefix="bigexec-chromium-")
    try:
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile_dir}", "--window-size=1400,500"]
        dom = subprocess.run([chromium, *flags, "--dump-dom", server.url + "status"],
                             capture_output=True, text=True, timeout=90)
        assert dom.returncode == 0, dom.stderr[-2000:]
        assert "bigexec cluster status" in dom.stdout
        for m in ms:  # the browser rendered one row per machine
            assert m.addr in dom.stdout
        assert dom.stdout.count('class="RUNNING"') == 2
        subprocess.run([chromium, *flags, f"--screenshot={shot}", server.url + "status"],
                       capture_output=True, text=True, timeout=90, check=True)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 5000
    finally:
        shutil.rmtree(profile_dir, ignore_errors=True)


def test_bigexec_command_status(cluster, capsys):
    b, ms = cluster
    server = b.serve_debug(port=0)
    assert cli.main(["status", f"127.0.0.1:{server.port}"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("MACHINE")
    for m in ms:
        assert m.addr in out
    assert out.count("RUNNING") == 2


def test_bigexec_command_reports_an_unreachable_driver():
    with pytest.raises(SystemExit, match="cannot reach"):
        cli.main(["status", "127.0.0.1:1", "--timeout", "2"])


def test_debug_addr_from_the_environment(monkeypatch):
    monkeypatch.setenv("BIGEXEC_DEBUG_ADDR", "127.0.0.1:0")
    with bigexec.start("threads") as b:
        assert server_of(b) is not None
        assert _fetch(server_of(b).url + "status?format=json")[0] == 200
        url = server_of(b).url
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url + "status", timeout=5)  # closed with the session


@pytest.mark.skipif(not netns_helpers.available(), reason=netns_helpers.reason)
@pytest.mark.parametrize("allow_remote", [False, True])
def test_debug_server_refuses_non_loopback_clients(allow_remote):
    """A client in a network namespace (a second host) is refused unless allowed."""
    host_ip, ns_ip = "10.213.77.1", "10.213.77.2"
    with netns_helpers.linked_namespace(host_ip, ns_ip) as net:
        ns = net["far"]
        with bigexec.start("threads") as b:
            server = b.serve_debug(port=0, host=host_ip, allow_remote=allow_remote)
            url = (f"http://{host_ip}:{server.port}/debug/bigexec/status?format=json"
                   f"&token={server.token}")
            probe = ("import urllib.request, urllib.error, sys\n"
                     "try:\n"
                     f"    r = urllib.request.urlopen({url!r}, timeout=10); print(r.status)\n"
                     "except urllib.error.HTTPError as e:\n"
                     "    print(e.code)\n")
            out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", probe],
                                 capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            assert out.stdout.strip() == ("200" if allow_remote else "403")


def test_threads_log_records_are_marked_with_their_machine(caplog):
    with bigexec.start("threads") as b:
        (m,) = b.start(1, services={"Work": Work()})
        assert m.wait(bigexec.RUNNING, 10)
        with caplog.at_level(logging.WARNING, logger="bigexec.test.work"):
            m.call("Work.say", "hello")
            logging.getLogger("bigexec.test.work").warning("from the driver")
    label = m.addr.split("://", 1)[1]
    by_msg = {r.getMessage(): r for r in caplog.records}
    assert f"{label}: said hello" in by_msg
    assert by_msg[f"{label}: said hello"].machine == label
    assert by_msg["from the driver"].machine == ""


def _tagged_spin(seconds: float) -> int:
    """Spin in a function named after this process, so a merged profile tells machines apart."""
    code = _spin_body.__code__
    name = f"spin_pid{os.getpid()}"
    names = {"co_name": name}
    if sys.version_info >= (3, 11):  # co_qualname is new in 3.11
        names["co_qualname"] = name
    fn = type(_spin_body)(code.replace(**names), _spin_body.__globals__, name)
    return fn(seconds)


def _spin_body(seconds: float) -> int:
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        n += 1
    return n


class Tagged:
    def spin(self, seconds: float) -> int:
        return _tagged_spin(seconds)


def _wait_running(m, method: str) -> None:
    deadline = time.monotonic() + 10
    while method not in m.call("Supervisor.metrics")["running_calls"]:
        assert time.monotonic() < deadline, f"{method} never started on {m.addr}"
        time.sleep(0.02)


def test_merged_profile_has_samples_from_both_machines():
    import pstats as _pstats

    with bigexec.start("local") as b:
        ms = _start_two(b, "Tagged", Tagged())
        futs = [m.submit("Tagged.spin", 4.0) for m in ms]
        for m in ms:
            _wait_running(m, "Tagged.spin")
        stats = b.profile(seconds=1.0)
        assert isinstance(stats, _pstats.Stats)
        # Claims that hold however a loaded host shares its cores among the machines, and
        # however it splits a spin's time between the loop and the clock the loop reads:
        # shares of what was profiled, inclusive times, and call counts.
        entries = {key[2]: (key, value) for key, value in stats.stats.items()}
        total = sum(value[2] for value in stats.stats.values())
        top = sorted(((v[3], name) for name, (_, v) in entries.items()), reverse=True)[:5]
        spins = {}
        for m in ms:
            name = f"spin_pid{m.info['pid']}"
            assert name in entries, (name, top)
            key, (_cc, _nc, _tt, cumtime, _callers) = entries[name]
            spins[key] = cumtime
            assert cumtime >= 0.1 * total, (name, cumtime, total, top)
        # the two spins are (nearly) all the machines did in the window
        assert sum(spins.values()) >= 0.8 * total, (spins, total, top)
        # and the clock the spins read was called from both, each machine's calls kept apart
        clock_callers = entries["<built-in method time.perf_counter>"][1][4]
        for key in spins:
            assert clock_callers[key][1] > 1000, (key, clock_callers)
        for f in futs:
            f.result(timeout=30)


def test_profile_formats_over_http():
    from bigexec import profiling

    with bigexec.start("local") as b:
        ms = _start_two(b, "Work", Work())
        # Spinning for longer than five profiles take on a loaded host; cancelled at the end.
        futs = [m.submit("Work.spin", 60.0) for m in ms]
        for m in ms:
            _wait_running(m, "Work.spin")
        server = b.serve_debug(port=0)
        status, ctype, body = _fetch(server.url + "profile?seconds=0.5")
        assert status == 200 and ctype == "application/octet-stream"
        path = os.path.join(tempfile.mkdtemp(), "p.prof")
        with open(path, "wb") as f:
            f.write(body)
        import pstats as _pstats

        names = {k[2] for k in _pstats.Stats(path).stats}
        assert any(n.endswith("spin") for n in names), names
        status, _, body = _fetch(server.url + "profile?seconds=0.5&format=text&limit=5")
        assert status == 200 and body.startswith(b"total ") and b"spin" in body
        status, _, body = _fetch(server.url + "profile?seconds=0.5&format=callgrind")
        assert status == 200 and b"events:" in body and b"spin" in body
        status, _, body = _fetch(server.url + "profile?seconds=0.5&format=collapsed")
        lines = body.decode().splitlines()
        assert status == 200 and lines and all(line.rsplit(" ", 1)[1].isdigit() for line in lines)
        assert any("spin" in line for line in lines)
        status, _, body = _fetch(server.url + f"profile?seconds=0.5&format=text&machine="
                                              f"{ms[0].addr.split('://')[1]}")
        assert status == 200 and b"spin" in body
        for f in futs:
            f.cancel()  # the session's shutdown ends the machines, spin and all
        assert profiling.merge_collapsed([{"a": 1}, {"a": 2}]) == {"a": 3}


def test_bigpi_lock_lesson_shows_in_the_merged_profile(monkeypatch):
    """The seed's bigpi lesson: the lock-protected global generator shows the lock on top; the
    fixed version shows the sampling function on top and no lock."""
    # the workers get the driver's sys.path, so they import the example by name
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "..", "examples"))
    import bigpi

    results = {}
    for label, service in (("locked", bigpi.GlobalRandPI()), ("fixed", bigpi.CirclePI())):
        with bigexec.start("local") as b:
            ms = _start_two(b, "PI", service)
            futs = [m.submit("PI.sample", 10**8) for m in ms for _ in range(4)]
            for m in ms:
                _wait_running(m, "PI.sample")
            stats = b.profile(seconds=1.5)
            for f in futs:
                f.cancel()  # the ctx tells the samplers to stop
            own = sorted(((v[2], k[2]) for k, v in stats.stats.items()), reverse=True)
            total = sum(t for t, _ in own)
            lock_share = sum(t for t, name in own if "_thread.lock" in name) / total
            results[label] = ([name for _, name in own[:3]], lock_share)
    (locked, locked_share), (fixed, fixed_share) = results["locked"], results["fixed"]
    assert any("_thread.lock" in name for name in locked[:2]), locked
    assert "GlobalRandPI.sample" in locked[0] or "GlobalRandPI.sample" in locked[1], locked
    assert locked_share > 0.10, (locked, locked_share)
    assert "CirclePI.sample" in fixed[0], fixed
    assert fixed_share < 0.03, (fixed, fixed_share)  # no lock to speak of


class Blob:
    def make(self, n: int) -> bytes:
        return b"x" * n


def test_driver_counts_the_bytes_of_replies():
    with bigexec.start("threads") as b:
        (m,) = b.start(1, services={"Blob": Blob()})
        assert m.wait(bigexec.RUNNING, 10)
        assert len(m.call("Blob.make", 1 << 20)) == 1 << 20
        assert len(m.call("Blob.make", 10)) == 10
        mt = b.metrics()
        made = mt["driver"]["rpc"]["made"]["Blob.make"]
        served = mt["machines"][m.addr]["rpc"]["served"]["Blob.make"]
        assert made["count"] == 2
        assert made["reply_bytes"] >= (1 << 20) + 10
        # both ends count the reply's body, so they agree
        assert made["reply_bytes"] == served["reply_bytes"]
        assert mt["driver"]["rpc"]["made_total"]["reply_bytes"] >= made["reply_bytes"]


def test_profile_without_running_machines_answers_503_or_409():
    with bigexec.start("threads") as b:
        server = b.serve_debug(port=0)
        # before b.start: nothing to profile yet, which may change (503)
        status, ctype, body = _fetch(server.url + "profile?seconds=0.2&format=text")
        assert status == 503 and ctype.startswith("text/plain"), (status, body)
        assert b"no running machine" in body and b"started none" in body
        with pytest.raises(RuntimeError, match="no running machine"):
            b.profile(seconds=0.1)
        ms = _start_two(b, "Work", Work())
        ms[0].shutdown()
        assert ms[0].wait(bigexec.STOPPED, 30)
        # a named machine that is not running conflicts with the request (409)
        label = ms[0].addr.split("://", 1)[1]
        status, ctype, body = _fetch(server.url + f"profile?seconds=0.2&machine={label}")
        assert status == 409 and ctype.startswith("text/plain"), (status, body)
        assert label.encode() in body and b"STOPPED" in body
        # an address the session never had is still a bad request (400)
        assert _fetch(server.url + "profile?seconds=0.2&machine=127.0.0.1:1")[0] == 400
        # the other machine still answers
        status, _, body = _fetch(server.url + "profile?seconds=0.2&format=text")
        assert status == 200 and body.startswith(b"total "), (status, body)
        ms[1].shutdown()
        assert ms[1].wait(bigexec.STOPPED, 30)
        # every machine stopped: 503 again, saying so
        status, ctype, body = _fetch(server.url + "profile?seconds=0.2")
        assert status == 503 and ctype.startswith("text/plain"), (status, body)
        assert b"all 2 of the session's machines are stopped" in body
        for fmt in ("flamegraph", "speedscope", "collapsed"):
            status, ctype, body = _fetch(server.url + f"profile?seconds=0.2&format={fmt}")
            assert status == 503 and ctype.startswith("text/plain"), (fmt, status, body)
        # the driver alone can still be profiled
        status, _, body = _fetch(server.url + "profile?seconds=0.2&format=text&driver=1")
        assert status == 200 and body.startswith(b"total "), (status, body)


def _flame_boxes(page: bytes) -> list[tuple[str, float, float]]:
    """(label, width, seconds in its tooltip) for every box of a flame graph page."""
    import re
    import xml.etree.ElementTree as ET

    text = page.decode()
    svg = ET.fromstring(text[text.index("<svg"):text.index("</svg>") + len("</svg>")])
    ns = "{http://www.w3.org/2000/svg}"
    boxes = []
    for g in svg.iter(ns + "g"):
        title = g.find(ns + "title").text
        seconds = float(re.search(r"\u2014 ([0-9.]+) s, ", title).group(1))
        boxes.append((g.get("data-n"), float(g.find(ns + "rect").get("width")), seconds))
    return boxes


def test_flamegraph_and_speedscope_over_http():
    from urllib.parse import quote

    with bigexec.start("local") as b:
        ms = _start_two(b, "Tagged", Tagged())
        futs = [m.submit("Tagged.spin", 60.0) for m in ms]  # cancelled at the end
        for m in ms:
            _wait_running(m, "Tagged.spin")
        server = b.serve_debug(port=0)
        names = {m.addr: f"spin_pid{m.info['pid']}" for m in ms}

        status, ctype, page = _fetch(server.url + "profile?seconds=1&format=flamegraph")
        assert status == 200 and ctype == "text/html; charset=utf-8", (status, page[:500])
        boxes = _flame_boxes(page)
        (root,) = [box for box in boxes if box[0] == "all"]
        assert root[1] == pytest.approx(1200.0) and root[2] > 0
        for label, width, seconds in boxes:  # every box as wide as its share of the time
            assert width == pytest.approx(1200.0 * seconds / root[2], abs=1.5), label
        for name in names.values():  # both machines' spins, labelled function (file:line)
            spins = [box for box in boxes if box[0].startswith(f"{name} (test_observe.py:")]
            assert spins, (name, sorted({box[0] for box in boxes}))
            # the machines spin all through the window: most of their CPU is in the spins
            assert sum(box[2] for box in spins) >= 0.2 * root[2], (name, spins, root)

        # the status page's link: one machine, by its address
        m0 = ms[0]
        status, _, page = _fetch(server.url + f"profile?machine={quote(m0.addr, safe='')}"
                                              f"&seconds=0.5&format=flamegraph")
        assert status == 200, page[:500]
        labels = {box[0].split(" (")[0] for box in _flame_boxes(page)}
        assert names[m0.addr] in labels and names[ms[1].addr] not in labels, labels

        status, ctype, body = _fetch(server.url + "profile?seconds=0.5&format=speedscope")
        assert status == 200 and ctype == "application/json"
        doc = json.loads(body)
        assert doc["$schema"] == "https://www.speedscope.app/file-format-schema.json"
        frames = doc["shared"]["frames"]
        assert {p["name"] for p in doc["profiles"]} == set(names)  # one profile per machine
        for p in doc["profiles"]:
            assert p["type"] == "sampled" and p["unit"] == "seconds"
            assert all(0 <= i < len(frames) for s in p["samples"] for i in s)
            assert sum(p["weights"]) == pytest.approx(p["endValue"]) and p["endValue"] > 0
            spin = [w for s, w in zip(p["samples"], p["weights"], strict=True)
                    if frames[s[-1]]["name"] == names[p["name"]]]
            assert sum(spin) >= 0.2 * p["endValue"], (p["name"], spin, p["endValue"])
            assert any(f["name"] == names[p["name"]] and f["file"] == "test_observe.py"
                       for f in frames)
        for f in futs:
            f.cancel()


def test_bigexec_command_writes_flamegraph_and_speedscope(tmp_path, capsys):
    from bigexec import observe

    # local: the spin ends with its worker process (on threads it would go on spinning in
    # this process, under the tests that follow)
    with bigexec.start("local") as b:
        (m,) = b.start(1, services={"Work": Work()})
        assert m.wait(bigexec.RUNNING, 30)
        fut = m.submit("Work.spin", 60.0)
        _wait_running(m, "Work.spin")
        server = b.serve_debug(port=0)
        url = f"127.0.0.1:{server.port}"
        flame, scope = tmp_path / "flame.html", tmp_path / "p.speedscope.json"
        assert cli.main(["profile", url, "--seconds", "0.5", "--format", "flamegraph",
                         "-o", str(flame)]) == 0
        assert cli.main(["profile", url, "--seconds", "0.5", "--format", "speedscope",
                         "-o", str(scope)]) == 0
        fut.cancel()
    assert any(label.startswith("spin (test_observe.py:")
               for label, _, _ in _flame_boxes(flame.read_bytes()))
    doc = json.loads(scope.read_text())
    assert any(f["name"] == "spin" for f in doc["shared"]["frames"])
    # the command offers every format the server has
    with pytest.raises(SystemExit):
        cli.main(["profile", "--help"])
    usage = capsys.readouterr().out
    for fmt in observe.PROFILE_FORMATS:
        assert fmt in usage
