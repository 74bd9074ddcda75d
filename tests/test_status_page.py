"""The status page as a person meets it: in a real browser (Debian's chromium, headless),
with live data. It shows each machine's own CPU and memory, the driver's row, a map in
progress and plots with points, and every link on it works."""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from waiting import wait_until

import bigexec
from bigexec.status_history import StatusHistory
from bigexec.status_page import sparkline

pytestmark = pytest.mark.timeout(240)

_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
          "--disable-background-networking", "--disable-component-update", "--disable-sync",
          "--window-size=1600,1000"]


def _fetch(url: str, timeout: float = 60) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class _Browser:
    def __init__(self, chromium: str, artefacts: Path) -> None:
        self.chromium = chromium
        self.artefacts = artefacts
        self.profile = tempfile.mkdtemp(prefix="bigexec-chromium-")

    def run(self, *args: str) -> str:
        done = subprocess.run([self.chromium, *_FLAGS, f"--user-data-dir={self.profile}",
                               *args], capture_output=True, text=True, timeout=90)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    def screenshot(self, url: str, name: str) -> Path:
        shot = self.artefacts / name
        self.run(f"--screenshot={shot}", url)
        return shot

    def close(self) -> None:
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture
def browser(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    artefacts = Path(os.environ.get("BIGEXEC_TEST_ARTEFACTS") or tmp_path)
    artefacts.mkdir(parents=True, exist_ok=True)
    b = _Browser(chromium, artefacts)
    try:
        yield b
    finally:
        b.close()


def test_the_status_page_in_a_browser_shows_live_work(browser):
    stop = threading.Event()
    with bigexec.Executor(2, system="local") as ex:
        server = ex.session.serve_debug(port=0)
        # a map that runs for longer than the test looks at it (2,000 calls of 50 ms on two
        # machines), fed lazily so that closing it cancels the rest
        results = ex.map(time.sleep, (0.05 for _ in range(2000)), buffersize=8)

        def consume() -> None:
            for _ in results:
                if stop.is_set():
                    return

        consumer = threading.Thread(target=consume, daemon=True)
        consumer.start()
        try:
            wait_until("the map to be under way and three samples taken",
                       lambda: len(server.history.series()["driver"]) >= 3
                       and any(m["done"] > 0 for m in
                               _driver_maps(server)), timeout=60,
                       explain=lambda: str(server.history.series()["driver"][-1:]))
            url = server.url + "status"
            try:
                dom = browser.run("--dump-dom", url)
                _check_page(dom, ex, server)
            except AssertionError as exc:
                shot = browser.screenshot(url, "status-page-failure.png")
                raise AssertionError(f"{exc}\n(screenshot of the page: {shot})") from exc
            shot = browser.screenshot(url, "status-page.png")
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20000
        finally:
            stop.set()
            consumer.join(30)
            results.close()


def _driver_maps(server) -> list[dict]:
    from bigexec import observe

    return observe.driver(server.b)["maps"]


def _check_page(dom: str, ex, server) -> None:
    assert "bigexec cluster status" in dom
    machines = ex.machines()
    assert len(machines) == 2
    for m in machines:
        assert m.addr in dom
    # each machine row: its own process's CPU % and RSS, filled
    cpu = re.findall(r'class="num cpu">(\d+)%', dom)
    rss = re.findall(r'class="num rss">([\d.]+) (MiB|GiB)', dom)
    assert len(cpu) == 2 and len(rss) == 2, (cpu, rss)
    pids = {m.info["pid"] for m in machines}
    assert len(pids) == 2 and os.getpid() not in pids  # local machines: processes of their own
    # the driver row, and the map in progress with done/total
    assert 'id="driver"' in dom and 'class="driver"' in dom
    done = re.findall(r'<tr class="map"><td>Executor.map</td><td class="num done">(\d+)/\?</td>',
                      dom)
    assert done and int(done[0]) > 0, re.findall(r'<tr class="map">.*?</tr>', dom)
    # plots with points: every driver plot has several, each machine's tasks/s at least two
    points = re.findall(r'<svg class="spark" data-key="(\w+)" data-points="(\d+)"', dom)
    keys = {k for k, n in points if int(n) >= 2}
    assert {"tasks_per_second", "queued", "running", "cpu_percent", "rss"} <= keys, points
    polylines = re.findall(r'<polyline points="([^"]+)"', dom)
    assert polylines and all(len(p.split()) >= 2 for p in polylines)
    # every link works
    hrefs = {html.unescape(h) for h in re.findall(r'href="([^"]+)"', dom)}
    per_machine = [h for h in hrefs if "machine=" in h]
    assert len(per_machine) == 6, per_machine  # flame graph, profile, stacks per machine
    base = server.url.split("/debug/bigexec/")[0]
    for href in sorted(hrefs):
        # the profiles run for a shorter while than the page offers: the route, the machine
        # and the format are what is checked here
        target = base + href.replace("seconds=10", "seconds=0.5").replace("seconds=5",
                                                                           "seconds=0.5")
        status, body = _fetch(target)
        assert status == 200, (href, status, body[:300])
        if "threads?machine=" in href:
            assert body.count(b"=== machine") == 1 and b"=== driver" not in body
        if "format=flamegraph" in href:
            assert b"<svg" in body


def test_history_turns_counters_into_rates_and_keeps_state_changes():
    history = StatusHistory(keep_seconds=10, sample_seconds=2)
    row = {"addr": "https://127.0.0.1:1", "state": "RUNNING", "tasks_run": 0, "calls": 0,
           "process": {"cpu_seconds": 1.0, "rss": 100, "time": 1000.0}}
    history.record([row], {"completed": 0}, now=1000.0)
    row2 = dict(row, tasks_run=20, calls=10,
                process={"cpu_seconds": 2.0, "rss": 200, "time": 1002.0})
    history.record([row2], {"completed": 50}, now=1002.0)
    # a reading right after the last is not turned into rates
    history.record([dict(row2, tasks_run=25)], {"completed": 60}, now=1002.1)
    stopped = dict(row2, state="STOPPED", err="MachineLost: gone",
                   process={"cpu_seconds": 2.0, "rss": 200, "time": 1004.0})
    history.record([stopped], {"completed": 60}, now=1004.0)
    rows, driver = [dict(stopped)], {}
    history.annotate(rows, driver)
    points = history.series()["machines"]["https://127.0.0.1:1"]
    assert [p["t"] for p in points] == [1000.0, 1002.0, 1004.0]
    assert points[1]["cpu_percent"] == pytest.approx(50.0)
    assert points[1]["tasks_per_second"] == pytest.approx(10.0)
    assert points[1]["calls_per_second"] == pytest.approx(5.0)
    assert points[2]["tasks_per_second"] == 0.0
    assert [(s["state"], s["why"]) for s in rows[0]["state_history"]] == [
        ("RUNNING", None), ("STOPPED", "MachineLost: gone")]
    assert driver["tasks_per_second"] == pytest.approx(5.0)
    # bounded: 10 s of 2 s samples
    for i in range(20):
        t = 1010.0 + 2 * i
        history.record([dict(row, process=dict(row["process"], time=t))], {}, now=t)
    assert len(history.series()["machines"]["https://127.0.0.1:1"]) == 6


def test_a_sparkline_has_a_vertex_per_point_and_escapes_its_text():
    points = [{"t": 0.0, "x": 1.0}, {"t": 1.0}, {"t": 2.0, "x": 3.0}, {"t": 3.0, "x": 2.0}]
    svg = sparkline(points, "x", lambda v: f"<{v}>")
    assert 'data-points=\'3\'' in svg
    assert len(re.search(r"<polyline points='([^']+)'", svg).group(1).split()) == 3
    assert "&lt;2.0&gt; now" in svg and "<2.0>" not in svg
    assert "no data yet" in sparkline([], "x")
