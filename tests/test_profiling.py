"""bigexec.profiling: CPU profiles (yappi), their merging and rendering, stack sampling, dumps."""

from __future__ import annotations

import inspect
import marshal
import os
import pstats
import random
import re
import sys
import threading
import time
from collections import Counter

import pytest
import yappi

from bigexec import profile_formats, profiling, stacks
from bigexec.profiling import (
    ProfileBusy,
    collapsed_text,
    cpu_profile,
    merge_collapsed,
    merge_pstats,
    pstats_bytes,
    sample_stacks,
    thread_stacks,
    to_callgrind,
    to_text,
)

WINDOW = 1.0
HERE = os.path.basename(__file__)


# --- workloads -------------------------------------------------------------------------------


def crunch() -> int:
    s = 0
    for i in range(20_000):
        s += i * i
    return s


def busy_loop(done: threading.Event) -> None:
    while not done.is_set():
        crunch()


def spin(box: list) -> None:
    # No call at all inside the loop (a subscript is not a call): yappi gets no event from it.
    x = 0
    while not box[0]:
        x += 1


def sleeper(done: threading.Event) -> None:
    while not done.is_set():
        time.sleep(0.01)


def napper(done: threading.Event) -> None:
    while not done.is_set():
        time.sleep(0.005)


def known() -> int:
    return len(str(12345))


class Running:
    """Threads started (before any profile) with ``target(arg)``; stopped and joined on exit."""

    def __init__(self, *targets, arg=None) -> None:
        self.done = threading.Event()
        arg = self.done if arg is None else arg
        self.threads = [threading.Thread(target=t, args=(arg,), name=f"test-{t.__name__}",
                                         daemon=True) for t in targets]

    def __enter__(self) -> Running:
        for t in self.threads:
            t.start()
        time.sleep(0.1)  # they are well inside their loops before the profile starts
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        for t in self.threads:
            t.join(5)


def entry(stats: pstats.Stats, name: str) -> tuple:
    """The (cc, nc, tt, ct, callers) of the function called ``name``, methods included."""
    found = [v for k, v in stats.stats.items()
             if k[2] == name or k[2].endswith("." + name)]
    assert len(found) == 1, (name, found)
    return found[0]


def own_time(stats: pstats.Stats, name: str) -> float:
    found = [v[2] for k, v in stats.stats.items() if k[2] == name or k[2].endswith("." + name)]
    return sum(found)


def own_share(stats: pstats.Stats, name: str) -> float:
    """``name``'s own time as a share of all the time in the profile.

    The claims about busy threads are shares, not seconds: how much CPU a thread gets in a
    window depends on how loaded the host is, but what it was doing when it got it does not.
    """
    total = sum(v[2] for v in stats.stats.values())
    return own_time(stats, name) / total if total else 0.0


def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def profile_in_background(**kwargs) -> tuple[threading.Thread, threading.Event, dict]:
    """cpu_profile in another thread (so that this one is profiled); returns once it runs."""
    stop = threading.Event()
    out: dict = {}

    def run() -> None:
        try:
            out["blob"] = cpu_profile(30, stop=stop, **kwargs)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            out["error"] = e

    t = threading.Thread(target=run, name="test-profiler", daemon=True)
    t.start()
    wait_until(lambda: yappi.is_running() or "error" in out)
    return t, stop, out


def test_every_name_is_still_importable_from_profiling():
    # Users and the rest of bigexec import these from bigexec.profiling; they live elsewhere.
    assert set(profiling.__all__) >= {
        "ProfileBusy", "collapsed_text", "cpu_profile", "merge_collapsed", "merge_pstats",
        "pstats_bytes", "sample_stacks", "thread_stacks", "to_callgrind", "to_text"}
    for name in ("collapsed_text", "merge_collapsed", "merge_pstats", "pstats_bytes",
                 "to_callgrind", "to_text", "FuncKey"):
        assert getattr(profiling, name) is getattr(profile_formats, name), name
    for name in ("sample_stacks", "thread_stacks"):
        assert getattr(profiling, name) is getattr(stacks, name), name


# --- cpu_profile -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def busy_profile():
    """A 1 s profile of a busy thread and a sleeping thread, both started before it."""
    with Running(busy_loop, sleeper):
        t0 = time.monotonic()
        blob = cpu_profile(WINDOW)
        elapsed = time.monotonic() - t0
    return blob, merge_pstats([blob]), elapsed


def test_busy_pre_existing_thread_has_cpu_time_idle_has_none(busy_profile):
    blob, stats, elapsed = busy_profile
    assert isinstance(blob, bytes)
    assert WINDOW <= elapsed < WINDOW + 5.0  # the window, not the 30 s of a missed stop
    # The thread was already in busy_loop when the profile started.
    assert own_share(stats, "crunch") > 0.5
    assert own_time(stats, "crunch") > 0.02 * WINDOW  # seconds of it, not noise
    assert own_time(stats, "sleeper") < 0.05 * WINDOW
    # busy_loop was entered before the start and was still running at the end: yappi alone
    # knows neither; seeding makes it crunch's caller, flushing books its time.
    _cc, _nc, _tt, ct, _callers = entry(stats, "busy_loop")
    crunch_callers = {k[2] for k in entry(stats, "crunch")[4]}
    assert "busy_loop" in crunch_callers
    assert ct >= 0.9 * own_time(stats, "crunch")
    # The profiler's own thread is not in the profile.
    assert not any(k[2] == "cpu_profile" for k in stats.stats)


def test_call_free_loop_in_pre_existing_thread_is_booked():
    box = [False]
    with Running(spin, arg=box):
        try:
            stats = merge_pstats([cpu_profile(0.5)])
        finally:
            box[0] = True
    assert own_share(stats, "spin") > 0.5
    assert own_time(stats, "spin") > 0.02 * 0.5


def test_pstats_file_loads(busy_profile, tmp_path):
    blob, merged, _ = busy_profile
    path = tmp_path / "cpu.prof"
    path.write_bytes(blob)
    loaded = pstats.Stats(str(path))
    assert own_time(loaded, "crunch") == pytest.approx(own_time(merged, "crunch"))
    assert own_share(loaded, "crunch") > 0.5
    assert marshal.loads(pstats_bytes(merged)) == merged.stats
    again = tmp_path / "again.prof"
    again.write_bytes(pstats_bytes(merged))
    assert pstats.Stats(str(again)).stats == merged.stats


def test_merge_sums_calls_of_a_function():
    blobs = []
    for n in (7, 11):
        t, stop, out = profile_in_background()
        for _ in range(n):
            known()
        stop.set()
        t.join(10)
        assert "error" not in out, out
        blobs.append(out["blob"])
    assert [entry(merge_pstats([b]), "known")[1] for b in blobs] == [7, 11]
    cc, nc, _tt, _ct, _callers = entry(merge_pstats(blobs), "known")
    assert (cc, nc) == (18, 18)
    with pytest.raises(ValueError):
        merge_pstats([])
    with pytest.raises(ValueError):
        merge_pstats([marshal.dumps([1, 2])])


def test_concurrent_profile_raises():
    t, stop, out = profile_in_background()
    try:
        with pytest.raises(ProfileBusy, match="a CPU profile is already running in this process"):
            cpu_profile(0.1)
    finally:
        stop.set()
        t.join(10)
    assert "blob" in out
    # yappi started by someone else is not ours to stop either.
    yappi.start()
    try:
        with pytest.raises(ProfileBusy, match="already running"):
            cpu_profile(0.1)
    finally:
        yappi.stop()
        yappi.clear_stats()


def test_stop_ends_early_and_yappi_is_left_clean():
    stop = threading.Event()
    timer = threading.Timer(0.2, stop.set)
    timer.start()
    t0 = time.monotonic()
    blob = cpu_profile(30, stop=stop)
    assert time.monotonic() - t0 < 3
    assert isinstance(blob, bytes)
    assert not yappi.is_running()
    assert yappi.get_func_stats().empty()


def test_error_still_stops_and_clears_yappi(monkeypatch):
    def boom(self, keep_builtins):
        raise OSError("boom")

    monkeypatch.setattr(profiling._Session, "collect", boom)
    with pytest.raises(OSError, match="boom"):
        cpu_profile(0.05)
    assert not yappi.is_running()
    assert yappi.get_func_stats().empty()
    assert not profiling._session_lock.locked()


def test_bad_arguments():
    with pytest.raises(ValueError):
        cpu_profile(-1)
    with pytest.raises(ValueError):
        cpu_profile(0.1, clock="gpu")
    with pytest.raises(ValueError):
        sample_stacks(0.1, interval=0)


def test_wall_clock_counts_sleeping():
    with Running(napper):
        stats = merge_pstats([cpu_profile(0.5, clock="wall")])
    # time.sleep is a builtin: its (wall) time is booked to the function that called it.
    assert own_time(stats, "napper") > 0.6 * 0.5


# --- rendering -------------------------------------------------------------------------------


def test_to_text_lists_busy_function_first(busy_profile):
    _, stats, _ = busy_profile
    text = to_text(stats, limit=5)
    lines = text.splitlines()
    total = sum(v[2] for v in stats.stats.values())
    assert lines[0].startswith(f"total {total:.3f} CPU seconds")
    rows = lines[4:]
    assert 1 <= len(rows) <= 5
    assert rows[0].endswith("(crunch)")
    by_cum = to_text(stats, limit=0, sort="cumtime").splitlines()[4:]
    assert len(by_cum) == len(stats.stats)
    cumtimes = [float(r.split()[3]) for r in by_cum]
    assert cumtimes == sorted(cumtimes, reverse=True)
    with pytest.raises(ValueError):
        to_text(stats, sort="bogus")


def parse_callgrind(text: str) -> tuple[dict, dict]:
    """A strict reader: returns (header, {fn: {"self": cost, "calls": {callee: (n, cost)}}})."""
    lines = text.split("\n")
    header: dict[str, str] = {}
    i = 0
    while lines[i]:
        if not lines[i].startswith("#"):
            key, value = lines[i].split(": ", 1)
            header[key] = value
        i += 1
    names: dict[str, dict[str, str]] = {"fl": {}, "fn": {}}

    def name(kind: str, ref: str) -> str:
        m = re.fullmatch(r"\((\d+)\)(?: (.+))?", ref)
        assert m, ref
        if m.group(2) is not None:
            names[kind][m.group(1)] = m.group(2)
        return names[kind][m.group(1)]

    functions: dict[str, dict] = {}
    current = callee = None
    expect = None  # "self" after fn=, "call" after calls=
    pending_calls = 0
    for line in lines[i:]:
        if not line:
            continue
        cost = re.fullmatch(r"(\d+) (\d+)", line)
        if expect == "call":
            assert cost, f"calls= not followed by a cost line: {line!r}"
            functions[current]["calls"][callee] = (pending_calls, int(cost.group(2)))
            expect = None
        elif cost:
            assert expect == "self", f"cost line out of place: {line!r}"
            functions[current]["self"] = int(cost.group(2))
            expect = None
        elif line.startswith("fl="):
            name("fl", line[3:])
        elif line.startswith("fn="):
            assert expect is None
            current = name("fn", line[3:])
            functions[current] = {"self": None, "calls": {}}
            expect = "self"
        elif line.startswith("cfl="):
            name("fl", line[4:])
        elif line.startswith("cfn="):
            callee = name("fn", line[4:])
        elif line.startswith("calls="):
            pending_calls = int(line[6:].split()[0])
            expect = "call"
        else:
            raise AssertionError(f"unknown line {line!r}")
    assert expect is None
    return header, functions


def test_callgrind_output_parses_and_matches_stats(busy_profile):
    _, stats, _ = busy_profile
    header, functions = parse_callgrind(to_callgrind(stats))
    assert header["events"] == "Microseconds"
    assert all(f["self"] is not None for f in functions.values())
    own = sum(f["self"] for f in functions.values())
    assert own == int(header["summary"])
    total_us = sum(v[2] for v in stats.stats.values()) * 1e6
    assert abs(own - total_us) <= len(functions)  # one rounding per function at most
    crunch_fn = next(n for n in functions if n.startswith("crunch:"))
    assert functions[crunch_fn]["self"] > 0.5 * own
    busy_fn = next(n for n in functions if n.startswith("busy_loop:"))
    calls, inclusive = functions[busy_fn]["calls"][crunch_fn]
    assert calls == entry(stats, "crunch")[4][next(
        k for k in entry(stats, "crunch")[4] if k[2] == "busy_loop")][0]
    assert inclusive >= functions[crunch_fn]["self"] * 0.99


# --- sampling and dumps ----------------------------------------------------------------------


FRAME = re.compile(r"[^;]+ \([^;/\\]+:\d+\)")


def test_sample_stacks_busy_vs_sleeping():
    before = sys.getswitchinterval()
    with Running(busy_loop, sleeper):
        counts = sample_stacks(WINDOW)
    assert sys.getswitchinterval() == before
    for stack in counts:
        assert all(FRAME.fullmatch(f) for f in stack.split(";")), stack
        assert "sample_stacks (" not in stack  # the sampler's own thread is skipped
    busy = sum(n for s, n in counts.items() if "busy_loop (" in s)
    sleepy = sum(n for s, n in counts.items() if "sleeper (" in s)
    # Samples follow CPU time, which a loaded host hands out sparingly: a share, then.
    assert busy > 0.5 * sum(counts.values()), counts
    assert busy >= 10
    assert sleepy <= max(2, 0.05 * busy)
    assert any(s.split(";")[-1].startswith(f"crunch ({HERE}:") for s in counts)


def chatty(done: threading.Event) -> None:
    while not done.is_set():
        for _ in range(4):
            crunch()
        # Gives the GIL away for a moment, every ~3 ms. Not sleep(0): on 3.10 that is a
        # select() that returns at once, so this thread took the GIL straight back each time
        # and a thread waiting for it (the test's own, after a sleep) starved for 20 s and
        # more. A real sleep, however short, lets the waiter in.
        time.sleep(0.0001)


def test_sample_stacks_sees_where_cpu_goes_not_where_the_gil_is_released():
    # The sampler gets the GIL when the thread gives it away: with the default 5 ms switch
    # interval that is always at the sleep(0) line, which uses no CPU to speak of. A sampler
    # that saw the thread there would give crunch nothing; it gets most of the thread's CPU.
    # Samples follow CPU time, of which a loaded host gives a thread little in half a second:
    # sample until there are enough for a share to mean something.
    leaves: Counter = Counter()
    with Running(chatty):
        deadline = time.monotonic() + 20
        while sum(leaves.values()) < 100 and time.monotonic() < deadline:
            for stack, n in sample_stacks(0.5).items():
                leaves[stack.split(";")[-1].split(" ")[0]] += n
    assert sum(leaves.values()) >= 30, leaves
    assert leaves["crunch"] > 0.25 * sum(leaves.values()), leaves


def test_merge_collapsed_and_text():
    a = {"main (a.py:1);f (a.py:5)": 3, "main (a.py:1)": 1}
    b = {"main (a.py:1);f (a.py:5)": 2, "main (a.py:1);g (b.py:7)": 4}
    merged = merge_collapsed([a, b])
    assert merged == {"main (a.py:1);f (a.py:5)": 5, "main (a.py:1)": 1,
                      "main (a.py:1);g (b.py:7)": 4}
    assert collapsed_text(merged) == (
        "main (a.py:1) 1\nmain (a.py:1);f (a.py:5) 5\nmain (a.py:1);g (b.py:7) 4\n")
    assert merge_collapsed([]) == {}


def parked(event: threading.Event) -> None:
    event.wait(10)


def test_thread_stacks_lists_named_thread():
    event = threading.Event()
    t = threading.Thread(target=parked, args=(event,), name="test-parked-thread", daemon=True)
    t.start()
    try:
        text = thread_stacks()
    finally:
        event.set()
        t.join(5)
    blocks = text.split("\nThread ")
    assert text.startswith(f"Thread 'MainThread' ident={threading.main_thread().ident}")
    block = next(b for b in blocks if "'test-parked-thread'" in b)
    assert f"ident={t.ident}" in block and "daemon=True" in block
    assert "in parked" in block and "event.wait(10)" in block


# --- the lock contention lesson --------------------------------------------------------------

_LOCK = threading.Lock()
_SHARED = random.Random(1)


class LockedPI:
    """Go's global rand: one generator behind one lock, used by every thread."""

    def sample(self, n: int) -> int:
        inside = 0
        for _ in range(n):
            with _LOCK:
                x = _SHARED.random()
            with _LOCK:
                y = _SHARED.random()
            inside += (x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.25
        return inside


class CirclePI:
    """The fix: a generator per call."""

    def sample(self, n: int) -> int:
        r = random.Random()
        inside = 0
        for _ in range(n):
            x, y = r.random(), r.random()
            inside += (x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.25
        return inside


def serve(service, measure, nthreads: int = 4):
    """``measure()`` while ``nthreads`` threads call ``service.sample`` over and over."""
    done = threading.Event()

    def worker() -> None:
        while not done.is_set():
            service.sample(20_000)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(nthreads)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    try:
        return measure()
    finally:
        done.set()
        for t in threads:
            t.join(10)


def lock_lines() -> set[str]:
    source, first = inspect.getsourcelines(LockedPI.sample)
    return {f"sample ({HERE}:{first + i})" for i, line in enumerate(source)
            if "with _LOCK" in line}


def test_lock_contention_is_visible():
    def lock_share(stats: pstats.Stats) -> float:
        # Only locks taken by the service count: other threads of the test process (sessions
        # left idle by earlier tests, pytest's own) may wake on a lock during the window.
        total = sum(v[2] for v in stats.stats.values())
        return sum(v[2] for k, v in stats.stats.items()
                   if "_thread.lock" in k[2]
                   and any(caller[2].endswith("sample") for caller in v[4])) / total

    def top(stats: pstats.Stats) -> str:
        return max(stats.stats.items(), key=lambda kv: kv[1][2])[0][2]

    # Deterministic profile with builtins: the lock's __exit__ (a release that must wake a
    # waiter) is an entry of its own; __enter__ has no profile event, its cost stays in sample.
    locked = merge_pstats([serve(LockedPI(), lambda: cpu_profile(0.8, builtins=True))])
    fixed = merge_pstats([serve(CirclePI(), lambda: cpu_profile(0.8, builtins=True))])
    assert lock_share(locked) > 0.05
    assert "{method '__exit__' of '_thread.lock' objects}" in to_text(locked, limit=3)
    assert lock_share(fixed) == 0
    assert top(fixed) == "CirclePI.sample"
    # Without builtins the lock's cost is the caller's own time: no lock entry.
    folded = merge_pstats([serve(LockedPI(), lambda: cpu_profile(0.4))])
    assert lock_share(folded) == 0 and top(folded) == "LockedPI.sample"

    # Sampling: the threads are seen waiting at the `with _LOCK:` lines.
    def leaves(counts: dict[str, int]) -> Counter:
        out: Counter = Counter()
        for stack, n in counts.items():
            out[stack.split(";")[-1]] += n
        return out

    locked_leaves = leaves(serve(LockedPI(), lambda: sample_stacks(0.8)))
    fixed_leaves = leaves(serve(CirclePI(), lambda: sample_stacks(0.8)))
    at_lock = sum(n for leaf, n in locked_leaves.items() if leaf in lock_lines())
    assert at_lock > 0.5 * sum(locked_leaves.values())
    in_sample = sum(n for leaf, n in fixed_leaves.items() if leaf.startswith("sample ("))
    assert in_sample > 0.8 * sum(fixed_leaves.values())


# --- functions of the driver's __main__, profiled on a machine --------------------------------

_MAIN_SCRIPT = '''\
import json
import sys
import time

import bigexec


def busy(seconds):
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        n += 1
    return n


class Spinner:
    def spin(self, seconds):
        return busy(seconds)


if __name__ == "__main__":
    with bigexec.start("local") as b:
        (m,) = b.start(1, services={"Spinner": Spinner()})
        assert m.wait(bigexec.RUNNING, 60), m.err
        call = m.submit("Spinner.spin", 120.0)
        deadline = time.monotonic() + 60
        while "Spinner.spin" not in m.call("Supervisor.metrics")["running_calls"]:
            assert time.monotonic() < deadline, "the spin never started"
            time.sleep(0.02)
        stats = b.profile(seconds=0.5)
        call.cancel()
    json.dump({"keys": [list(k) for k in stats.stats]}, sys.stdout)
'''


def test_main_functions_keep_their_file_and_line_on_machines(tmp_path):
    """Functions of the driver's __main__ travel by value (cloudpickle); a machine's profile
    names them by the script's path and their def lines, not cloudpickle's "<dynamic-code>"."""
    import json
    import subprocess

    script = tmp_path / "driver_main.py"
    script.write_text(_MAIN_SCRIPT)
    lines = _MAIN_SCRIPT.splitlines()
    busy_line = lines.index("def busy(seconds):") + 1
    spin_line = lines.index("    def spin(self, seconds):") + 1
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [root, *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("BIGEXEC_SYSTEM", None)
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    keys = {tuple(k) for k in json.loads(run.stdout)["keys"]}
    assert (str(script), busy_line, "busy") in keys, sorted(keys)
    assert (str(script), spin_line, "Spinner.spin") in keys, sorted(keys)
    assert not any("dynamic-code" in k[0] for k in keys), sorted(keys)


# --- flame graph and speedscope, from collapsed stacks -----------------------------------------

_SVG = "{http://www.w3.org/2000/svg}"


def _flame_frames(page: str) -> dict[str, list[tuple[float, float, str, int]]]:
    """The boxes of a flame graph page: label -> [(x, width, tooltip, depth)]."""
    import xml.etree.ElementTree as ET

    svg = ET.fromstring(page[page.index("<svg"):page.index("</svg>") + len("</svg>")])
    frames: dict[str, list[tuple[float, float, str, int]]] = {}
    for g in svg.iter(_SVG + "g"):
        rect = g.find(_SVG + "rect")
        title = g.find(_SVG + "title")
        assert rect is not None and title is not None and title.text
        frames.setdefault(g.get("data-n", ""), []).append(
            (float(rect.get("x", "nan")), float(rect.get("width", "nan")), title.text,
             int(g.get("data-d", "-1"))))
    return frames


def test_flamegraph_page_draws_each_frame_as_wide_as_its_time():
    from bigexec.flamegraph import WIDTH, flamegraph_html

    counts = {"main (a.py:1);work (a.py:5);crunch (a.py:9)": 60,
              "main (a.py:1);work (a.py:5)": 20,
              "main (a.py:1);<lambda> & <x> (b.py:7)": 15,
              "main (a.py:1)": 5}
    page = flamegraph_html(counts, 0.01, title="t <&>")
    assert page.startswith("<!DOCTYPE html>") and "<title>t &lt;&amp;&gt;</title>" in page
    # self-contained: no address but the SVG namespace, nothing loaded from anywhere
    assert re.findall(r"https?://[^\"'\s<>]+", page) == ["http://www.w3.org/2000/svg"]
    assert " src=" not in page and " href=" not in page and "@import" not in page
    frames = _flame_frames(page)
    assert set(frames) == {"all", "main (a.py:1)", "work (a.py:5)", "crunch (a.py:9)",
                           "<lambda> & <x> (b.py:7)"}
    expected = {"all": (100, 0), "main (a.py:1)": (100, 1), "work (a.py:5)": (80, 2),
                "crunch (a.py:9)": (60, 3), "<lambda> & <x> (b.py:7)": (15, 2)}
    for label, (samples, depth) in expected.items():
        ((x, width, tooltip, d),) = frames[label]
        assert d == depth
        assert width == pytest.approx(WIDTH * samples / 100, abs=0.01), label
        assert tooltip == f"{label} \u2014 {samples * 0.01:.3f} s, {samples:.2f}%"
    # callees sit on their caller, side by side, in the order of their names
    lam, work = frames["<lambda> & <x> (b.py:7)"][0], frames["work (a.py:5)"][0]
    assert lam[0] == pytest.approx(0) and work[0] == pytest.approx(lam[1], abs=0.01)
    assert frames["crunch (a.py:9)"][0][0] == pytest.approx(work[0], abs=0.01)
    assert "1.000 s of CPU time in 100 samples" in page


def test_flamegraph_page_without_samples_says_so():
    from bigexec.flamegraph import flamegraph_html

    page = flamegraph_html({}, 0.005)
    assert "No samples" in page and _flame_frames(page) == {}
    with pytest.raises(ValueError, match="seconds_per_sample"):
        flamegraph_html({"a (a.py:1)": 1}, 0)


def test_flamegraph_leaves_out_frames_too_narrow_to_see():
    from bigexec.flamegraph import flamegraph_html

    frames = _flame_frames(flamegraph_html({"big (a.py:1)": 10**6, "tiny (a.py:2)": 1}, 1.0))
    assert "big (a.py:1)" in frames and "tiny (a.py:2)" not in frames
    assert frames["all"][0][2].startswith("all \u2014 1000001.000 s")  # its time is still there


def test_speedscope_file_has_shared_frames_and_sampled_profiles_in_seconds():
    import json

    from bigexec.profile_formats import SPEEDSCOPE_SCHEMA, frame_parts, to_speedscope

    one = {"main (a.py:1);f (a.py:5)": 30, "main (a.py:1)": 10}
    two = {"main (a.py:1);g <x> (b.py:7)": 4, "odd frame;f (a.py:5)": 6, "zero (z.py:1)": 0}
    doc = json.loads(to_speedscope({"m1": one, "m2": two}, 0.005, name="n"))
    assert doc["$schema"] == SPEEDSCOPE_SCHEMA and doc["name"] == "n"
    frames = doc["shared"]["frames"]
    assert {"name": "main", "file": "a.py", "line": 1} in frames
    assert {"name": "g <x>", "file": "b.py", "line": 7} in frames
    assert {"name": "odd frame"} in frames
    assert len(frames) == len({json.dumps(f, sort_keys=True) for f in frames}) == 4
    assert [p["name"] for p in doc["profiles"]] == ["m1", "m2"]
    for p, counts in zip(doc["profiles"], (one, two), strict=True):
        assert p["type"] == "sampled" and p["unit"] == "seconds" and p["startValue"] == 0
        assert len(p["samples"]) == len(p["weights"])
        total = sum(n for n in counts.values()) * 0.005
        assert sum(p["weights"]) == pytest.approx(total) == pytest.approx(p["endValue"])
        # each sample is a stack of indexes into the shared frames, outermost first
        stacks = {";".join(_label(frames[i]) for i in s): w
                  for s, w in zip(p["samples"], p["weights"], strict=True)}
        assert stacks == pytest.approx({k: n * 0.005 for k, n in counts.items() if n})
    assert 0 <= doc["activeProfileIndex"] < len(doc["profiles"])
    assert frame_parts("f (x (y).py:3)") == ("f (x (y).py:3)", None, None)


def _label(frame: dict) -> str:
    return f"{frame['name']} ({frame['file']}:{frame['line']})" if "file" in frame \
        else frame["name"]
