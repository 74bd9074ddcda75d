"""The whole cluster seen as one program: status, metrics and profiles gathered from machines.

    B.status()  ── Supervisor.status on every machine, in parallel ──> one row per machine
    B.metrics() ── Supervisor.metrics on every machine ──> {driver, machines, total}
    B.profile() ── Supervisor.profile (yappi) on one machine per process, in parallel
                   (+ the driver) ──> profiling.merge_pstats ──> one pstats.Stats
    sample()    ── Supervisor.sample (stack sampler) likewise ──> collapsed stacks per
                   machine ──> merged, a flame graph page, or speedscope's JSON

Machines of the ``threads`` system share the driver's process, and yappi profiles a whole
process, so a process is profiled once however many machines live in it.
"""

from __future__ import annotations

import os
import pstats
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, CancelledError, Future, wait
from typing import TYPE_CHECKING, Any, Protocol

from .machine import RUNNING, STOPPED, Machine
from .metrics import aggregate

if TYPE_CHECKING:
    from .rpc.client import Client
    from .systems.base import System

__all__ = ["status", "driver", "metrics", "profile", "sample", "sample_by_machine",
           "thread_dumps", "PROFILE_FORMATS", "ClusterViews", "ObservedSession", "NothingToProfile"]


class ObservedSession(Protocol):
    """What the views need of a session (``B`` is one): its machines, its RPC client's
    counters and the metrics sources added to it."""

    @property
    def system(self) -> System: ...

    @property
    def client(self) -> Client: ...

    def known_machines(self) -> list[Machine]: ...

    def metrics_sources(self) -> dict[str, Callable[[], dict[str, Any]]]: ...

    def serve_debug(self, port: int = 3333, host: str = "127.0.0.1",
                    allow_remote: bool = False) -> Any: ...

_STATUS_TIMEOUT = 10.0
_METRICS_TIMEOUT = 30.0
_PROFILE_SLACK = 60.0  # beyond the profile's own seconds: boot of yappi, transfer
_STOP_POLL = 0.1  # how often a profile in flight looks at its stop event
#: What ``render_profile`` writes: yappi's profile as pstats, callgrind or a text table; stack
#: samples as collapsed stacks, a flame graph (an HTML page) or speedscope's JSON.
PROFILE_FORMATS = ("pstats", "callgrind", "collapsed", "text", "flamegraph", "speedscope")


class NothingToProfile(RuntimeError):
    """A profile was asked of no running machine (none started yet, every one stopped, or the
    ones named not running) without the driver: there is nothing to profile."""


def _gather(machines: list[Machine], method: str, args: tuple, timeout: float
            ) -> dict[Machine, Any]:
    """Call ``method`` on every machine at once; a machine that fails maps to its error."""
    futures: dict[Machine, Future] = {}
    for m in machines:
        try:
            futures[m] = m.submit(method, *args, timeout=timeout)
        except Exception as exc:
            f: Future = Future()
            f.set_exception(exc)
            futures[m] = f
    out: dict[Machine, Any] = {}
    for m, f in futures.items():
        try:
            out[m] = f.result()
        except Exception as exc:
            out[m] = exc
    return out


def _all_machines(b: ObservedSession) -> list[Machine]:
    return b.known_machines()


def status(b: ObservedSession) -> list[dict[str, Any]]:
    """One dict per machine the session knows (stopped ones too, with why they stopped)."""
    machines = _all_machines(b)
    live = [m for m in machines if m.state == RUNNING]
    reports = _gather(live, "Supervisor.status", (), _STATUS_TIMEOUT)
    rows = []
    now = time.time()
    for m in machines:
        row: dict[str, Any] = {
            "addr": m.addr,
            "key": m.addr or f"booting-{id(m):x}",
            "state": m.state.name,
            "owned": m.owned,
            "hostname": m.hostname,
            "maxprocs": m.maxprocs,
            "err": None if m.err is None else f"{type(m.err).__name__}: {m.err}",
            "keepalive_reply_times": m.keepalive_reply_times,
            "next_keepalive_in": (None if m.next_keepalive is None or m.state == STOPPED
                                  else max(0.0, m.next_keepalive - now)),
        }
        booted = m.info.get("booted")
        row["booted"] = booted
        if booted is not None and m.state != STOPPED:
            row["uptime"] = now - booted
        handle = m.handle
        if handle is not None and m.state != RUNNING and m.state != STOPPED:
            row["boot_phase"] = handle.boot_phase()
        report = reports.get(m)
        if isinstance(report, dict):
            row.update(memory=report.get("memory"), disk=report.get("disk"),
                       load=report.get("load"), process=report.get("process"))
            pid = (report.get("process") or {}).get("pid")
            # a threads machine lives in the driver's process: its process figures are the
            # driver's, shared by every machine of that system
            row["in_driver_process"] = pid == os.getpid() and m.hostname == socket.gethostname()
            mt = report.get("metrics", {})
            tasks = aggregate(s for s in mt.get("services", {}).values()
                              if isinstance(s, dict))
            row["tasks_run"] = tasks.get("tasks_run", 0)
            row["tasks_running"] = tasks.get("tasks_running", 0)
            total = mt.get("rpc", {}).get("served_total", {})
            row["rpc_calls"] = total.get("count", 0)
            row["rpc_errors"] = total.get("errors", 0)
            # the calls made of the machine's services: its work, without the keepalives,
            # status and other Supervisor calls the driver makes
            work = [v for k, v in mt.get("rpc", {}).get("served", {}).items()
                    if not k.startswith("Supervisor.") and isinstance(v, dict)]
            row["calls"] = sum(v.get("count", 0) for v in work)
            row["call_errors"] = sum(v.get("errors", 0) for v in work)
            row["pid"] = report.get("info", {}).get("pid")
        elif isinstance(report, BaseException):
            row["status_error"] = f"{type(report).__name__}: {report}"
        rows.append(row)
    return rows


def driver(b: ObservedSession) -> dict[str, Any]:
    """The driver's side of the status page: its process, the work its executors and pools
    hold (queued and running tasks, each map in flight) and the machines still booting."""
    import psutil

    proc = psutil.Process()
    with proc.oneshot():
        cpu = proc.cpu_times()
        process = {"pid": proc.pid, "cpu_seconds": cpu.user + cpu.system,
                   "rss": proc.memory_info().rss, "threads": proc.num_threads()}
    out: dict[str, Any] = {"process": process, "queued": 0, "running": 0, "completed": 0,
                           "crashes": 0, "replacements": 0, "maps": [], "schedulers": 0}
    for name, source in b.metrics_sources().items():
        if not name.startswith("scheduler:"):
            continue
        try:
            report = source()
        except Exception:  # a scheduler shutting down; the page must still render
            continue
        out["schedulers"] += 1
        for key in ("queued", "running", "completed", "crashes", "replacements"):
            out[key] += int(report.get(key, 0))
        out["maps"].extend(report.get("maps", ()))
    made = b.client.stats.totals()
    out["rpc_calls_made"], out["rpc_errors"] = made.get("count", 0), made.get("errors", 0)
    machines = _all_machines(b)
    out["booting"] = sum(1 for m in machines if m.state != RUNNING and m.state != STOPPED)
    out["running_machines"] = sum(1 for m in machines if m.state == RUNNING)
    return out


def metrics(b: ObservedSession) -> dict[str, Any]:
    """The driver's counters, every running machine's, and their sum."""
    live = [m for m in _all_machines(b) if m.state == RUNNING]
    reports = _gather(live, "Supervisor.metrics", (), _METRICS_TIMEOUT)
    machines = {m.addr: r for m, r in reports.items() if isinstance(r, dict)}
    errors = {m.addr: repr(r) for m, r in reports.items() if not isinstance(r, dict)}
    driver: dict[str, Any] = {
        "rpc": {"made": b.client.stats.snapshot(), "made_total": b.client.stats.totals()},
        "machines": {s.name.lower(): sum(1 for m in _all_machines(b) if m.state == s)
                     for s in type(RUNNING)},
        "keepalive_reply_seconds": {
            m.addr: (sum(m.keepalive_reply_times) / len(m.keepalive_reply_times))
            for m in live if m.keepalive_reply_times
        },
    }
    for name, source in b.metrics_sources().items():
        try:
            driver[name] = source()
        except Exception as exc:
            driver[name] = {"error": repr(exc)}
    out: dict[str, Any] = {"driver": driver, "machines": machines,
                           "total": aggregate(machines.values())}
    if errors:
        out["errors"] = errors
    return out


def _one_per_process(machines: list[Machine]) -> list[Machine]:
    seen: set[tuple[Any, Any]] = set()
    out = []
    for m in machines:
        key = (m.info.get("hostname"), m.info.get("pid"))
        if key in seen:
            continue
        seen.add(key)
        out.append(m)
    return out


def _targets(b: ObservedSession, machines: list[Machine] | None) -> list[Machine]:
    chosen = machines if machines is not None else [
        m for m in _all_machines(b) if m.state == RUNNING]
    return _one_per_process([m for m in chosen if m.state == RUNNING])


def _driver_in(machines: list[Machine]) -> bool:
    me = (socket.gethostname(), os.getpid())
    return any((m.info.get("hostname"), m.info.get("pid")) == me for m in machines)


def _collect(b: ObservedSession, method: str, local: Any, seconds: float,
             machines: list[Machine] | None,
             include_driver: bool, stop: threading.Event | None = None
             ) -> list[tuple[str, Any]]:
    """Run ``method`` (a profiler) on every target machine at once, ``local(seconds, stop)``
    in the driver if asked, and return the results.

    Setting ``stop`` ends the profile early everywhere: every machine's call is cancelled at
    once (the Supervisor's profilers watch their call's context) and CancelledError raised.
    A machine that fails ends the others' profiles too: a merged profile without it is not
    the one asked for, and the others need not keep running under the profiler for nothing.
    """
    from . import profiling

    targets = _targets(b, machines)
    if not targets and not include_driver:
        raise NothingToProfile(_nothing_running(b, machines))
    halt = threading.Event()  # ends the driver's own profile early
    driver: Future = Future()
    thread = None
    if include_driver and not _driver_in(targets):
        def run_local() -> None:
            try:
                driver.set_result(local(seconds, halt))
            except BaseException as exc:  # reported below, with the machines' failures
                driver.set_exception(exc)

        thread = threading.Thread(target=run_local, name="bigexec-profile-driver", daemon=True)
        thread.start()
    futures: dict[Machine, Future] = {}
    for m in targets:
        try:
            futures[m] = m.submit(method, seconds, timeout=seconds + _PROFILE_SLACK)
        except Exception as exc:
            failed: Future = Future()
            failed.set_exception(exc)
            futures[m] = failed
    pending = set(futures.values()) | ({driver} if thread is not None else set())
    stopped = False
    while pending:
        if stop is not None and stop.is_set():
            stopped = True
            break
        done, pending = wait(pending, timeout=_STOP_POLL, return_when=FIRST_EXCEPTION)
        if any(f.exception() is not None for f in done):
            break
    if pending:  # stopped, or something failed: end every profile still running, at once
        halt.set()
        for f in pending:
            if f is not driver:
                f.cancel()  # tells its machine without waiting for the others
    if thread is not None:
        thread.join()
    if stopped:
        raise CancelledError("the profile was stopped before it ended")
    out = []
    parts = list(futures.items()) + ([("driver", driver)] if thread is not None else [])
    for who, f in parts:
        if f.cancelled():
            continue  # ended because another part failed; that one is reported
        name = who if isinstance(who, str) else f"machine {who.addr}"
        r = f.exception()
        if r is None:
            out.append((who if isinstance(who, str) else who.addr, f.result()))
        elif isinstance(r, profiling.ProfileBusy):
            raise profiling.ProfileBusy(f"{name}: {r}") from r
        else:
            raise RuntimeError(f"profiling {name} failed: {r}") from r
    if not out:
        raise NothingToProfile(_nothing_running(b, machines))
    return out


def _nothing_running(b: ObservedSession, machines: list[Machine] | None) -> str:
    """Why there is no machine to profile, for a person."""
    if machines is not None:
        states = ", ".join(f"{m.addr or '(booting)'} is {m.state.name}"
                           + ("" if m.err is None else f" ({type(m.err).__name__}: {m.err})")
                           for m in machines)
        return f"no running machine to profile: {states or 'no machine was named'}"
    known = _all_machines(b)
    if not known:
        return "no running machine to profile: the session has started none (b.start(n))"
    return (f"no running machine to profile: all {len(known)} of the session's machines "
            f"are stopped or still starting")


def profile(b: ObservedSession, seconds: float = 30.0, machines: list[Machine] | None = None,
            include_driver: bool = False, stop: threading.Event | None = None) -> pstats.Stats:
    """A CPU profile (yappi) of the machines (default: every running one), merged.

    Setting ``stop`` ends it early on every machine and raises CancelledError; a machine
    already being profiled raises ``profiling.ProfileBusy``."""
    from . import profiling

    parts = _collect(b, "Supervisor.profile",
                     lambda s, halt: profiling.cpu_profile(s, stop=halt, builtins=True),
                     seconds, machines, include_driver, stop)
    return profiling.merge_pstats([blob for _, blob in parts])


def sample_by_machine(b: ObservedSession, seconds: float = 30.0,
                      machines: list[Machine] | None = None, include_driver: bool = False,
                      stop: threading.Event | None = None) -> dict[str, dict[str, int]]:
    """On-CPU stack samples of each machine (one per process): its address (``"driver"`` for
    the driver) -> collapsed stack -> count, each count ``stacks.SAMPLE_INTERVAL`` seconds of
    CPU. ``stop`` as for ``profile``."""
    from . import profiling

    parts = _collect(b, "Supervisor.sample",
                     lambda s, halt: profiling.sample_stacks(s, stop=halt),
                     seconds, machines, include_driver, stop)
    return dict(parts)


def sample(b: ObservedSession, seconds: float = 30.0, machines: list[Machine] | None = None,
           include_driver: bool = False, stop: threading.Event | None = None
           ) -> dict[str, int]:
    """On-CPU stack samples of the machines, merged: collapsed stack -> count. ``stop`` as
    for ``profile``."""
    from . import profiling

    parts = sample_by_machine(b, seconds, machines, include_driver, stop)
    return profiling.merge_collapsed(list(parts.values()))


def thread_dumps(b: ObservedSession, machines: list[Machine] | None = None) -> str:
    """The stacks of every thread of every running machine (default) or of ``machines``,
    and of the driver when no machine is named."""
    from . import profiling

    targets = _targets(b, machines)
    dumps = _gather(targets, "Supervisor.threads", (), _STATUS_TIMEOUT)
    parts = []
    if machines is None and not _driver_in(targets):
        parts.append(f"=== driver (pid {os.getpid()}) ===\n{profiling.thread_stacks()}")
    for m in targets:
        text = dumps.get(m)
        if isinstance(text, BaseException):
            text = f"(failed: {text})"
        parts.append(f"=== machine {m.addr} (pid {m.info.get('pid')}) ===\n{text}")
    return "\n".join(parts)


def render_profile(b: ObservedSession, fmt: str, seconds: float,
                   machines: list[Machine] | None = None,
                   include_driver: bool = False, limit: int = 40,
                   stop: threading.Event | None = None) -> bytes:
    """A merged profile in one of ``PROFILE_FORMATS``, as bytes ready to save or serve.
    ``stop`` ends it early everywhere (CancelledError), as for ``profile``."""
    from . import flamegraph, profile_formats, profiling, stacks

    if fmt not in PROFILE_FORMATS:
        raise ValueError(f"unknown profile format {fmt!r}; formats: {', '.join(PROFILE_FORMATS)}")
    if fmt in ("collapsed", "flamegraph", "speedscope"):
        parts = sample_by_machine(b, seconds, machines, include_driver, stop)
        if fmt == "speedscope":
            return profile_formats.to_speedscope(
                parts, stacks.SAMPLE_INTERVAL, name=_profile_name(parts, seconds)).encode()
        counts = profiling.merge_collapsed(list(parts.values()))
        if fmt == "collapsed":
            return profiling.collapsed_text(counts).encode()
        return flamegraph.flamegraph_html(counts, stacks.SAMPLE_INTERVAL,
                                          note=_profile_name(parts, seconds)).encode()
    stats = profile(b, seconds, machines, include_driver, stop)
    if fmt == "pstats":
        return profiling.pstats_bytes(stats)
    if fmt == "callgrind":
        return profiling.to_callgrind(stats).encode()
    return profiling.to_text(stats, limit=limit).encode()


def _profile_name(parts: dict[str, dict[str, int]], seconds: float) -> str:
    """What a sampled profile covers, for a person: how long, and which processes."""
    who = ", ".join(parts) if len(parts) <= 4 else f"{len(parts)} machines"
    return f"bigexec: on-CPU stacks of {who}, sampled for {seconds:g} s"


class ClusterViews:
    """The session's views, offered by Executor and Pool (which have a ``session``)."""

    @property
    def session(self) -> ObservedSession:
        """The session whose views these are."""
        raise NotImplementedError

    def status(self) -> list[dict[str, Any]]:
        """See ``B.status``."""
        return status(self.session)

    def metrics(self) -> dict[str, Any]:
        """See ``B.metrics``."""
        return metrics(self.session)

    def profile(self, seconds: float = 30.0, machines: list[Machine] | None = None,
                include_driver: bool = False) -> pstats.Stats:
        """See ``B.profile``: one CPU profile merged from the machines doing the work."""
        return profile(self.session, seconds, machines, include_driver)

    def serve_debug(self, port: int = 3333, host: str = "127.0.0.1",
                    allow_remote: bool = False) -> Any:
        """See ``B.serve_debug``."""
        return self.session.serve_debug(port, host, allow_remote)
