"""One cell of the suite: one workload on one peer, run in its own process.

    python -m benchmarks.cell '<spec json>' OUT.json

``benchmarks.run`` starts every cell as a child process with a deadline, so a peer that hangs
costs its cell only (the runner kills the whole process tree). The cell writes its results to
``OUT.json`` after every repetition, so even a cell that is killed leaves what it measured.
Every executor is shut down in a ``finally``; at the end the cell reports (and kills) any child
process still alive.
"""

from __future__ import annotations

import faulthandler
import gc
import json
import os
import statistics
import sys
import threading
import time
import traceback
import warnings
from typing import Any

import psutil

from . import floor, tasks
from .peers import NotInstalled, make_peer

MiB = 1 << 20
MB = 1e6
# Helpers the standard library and loky leave running until their parent exits, by design.
_HELPERS = ("resource_tracker", "forkserver", "semaphore_tracker")


class Recorder:
    """Collects the cell's figures and rewrites ``out`` after each one."""

    def __init__(self, spec: dict, out: str) -> None:
        self.out = out
        self.data: dict[str, Any] = {"spec": spec, "status": "running", "metrics": {},
                                     "extra": {}, "pid": os.getpid()}
        self.flush()

    def add(self, metric: str, value: float, unit: str, better: str) -> None:
        m = self.data["metrics"].setdefault(metric, {"unit": unit, "better": better,
                                                     "values": []})
        m["values"].append(value)
        self.flush()

    def extra(self, key: str, value: Any) -> None:
        self.data["extra"][key] = value
        self.flush()

    def flush(self) -> None:
        tmp = self.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f)
        os.replace(tmp, self.out)


def _p99(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(0.99 * (len(s) - 1))))]


def _add_latencies(rec: Recorder, prefix: str, lat: list[float]) -> None:
    """Median and p99 of latencies in seconds, recorded in microseconds."""
    rec.add(f"{prefix}_median_us", statistics.median(lat) * 1e6, "us", "lower")
    rec.add(f"{prefix}_p99_us", _p99(lat) * 1e6, "us", "lower")


def _bench_machine(b: Any, timeout: float) -> Any:
    """One RUNNING machine of session ``b`` with the ``Bench`` service."""
    import bigexec

    m = b.start(1, services={"Bench": tasks.BenchService()})[0]
    if not m.wait(bigexec.RUNNING, timeout) or m.err is not None:
        raise RuntimeError(f"machine did not start: {m.err}")
    return m


class _peer:
    """Context manager: a started peer, shut down however the block ends."""

    def __init__(self, name: str) -> None:
        self.peer = make_peer(name)

    def __enter__(self):
        self.peer.start()
        return self.peer

    def __exit__(self, *exc: Any) -> None:
        self.peer.shutdown()


# --- the workloads ---------------------------------------------------------------------

def w_startup(peer: str, p: dict, rec: Recorder) -> None:
    for _ in range(p["repeat"]):
        gc.collect()
        ad = make_peer(peer)
        try:
            t0 = time.perf_counter()
            ad.start()
            ad.submit(tasks.noop).result(p["timeout"])
            t1 = time.perf_counter()
        finally:
            t2 = time.perf_counter()
            ad.shutdown()
            t3 = time.perf_counter()
        rec.add("startup_s", t1 - t0, "s", "lower")
        rec.add("shutdown_s", t3 - t2, "s", "lower")


def w_submit(peer: str, p: dict, rec: Recorder) -> None:
    n, timeout = p["n"], p["timeout"]
    with _peer(peer) as ad:
        for f in [ad.submit(tasks.noop) for _ in range(min(n, 500))]:  # warm-up
            f.result(timeout)
        for _ in range(p["repeat"]):
            gc.collect()
            t0 = time.perf_counter()
            fs = [ad.submit(tasks.noop) for _ in range(n)]
            t1 = time.perf_counter()
            for f in fs:
                f.result(timeout)
            dt = time.perf_counter() - t0
            del fs
            rec.add("submit_per_s", n / dt, "tasks/s", "higher")
            rec.add("submit_only_s", t1 - t0, "s", "lower")


def w_map(peer: str, p: dict, rec: Recorder) -> None:
    with _peer(peer) as ad:
        list(ad.map(tasks.noop, range(200), 1))  # warm-up
        list(ad.map(tasks.noop, range(1000), 100))
        for _ in range(p["repeat"]):
            for cs, n in ((1, p["n1"]), (100, p["n100"])):
                gc.collect()
                t0 = time.perf_counter()
                out = list(ad.map(tasks.noop, range(n), cs))
                dt = time.perf_counter() - t0
                if len(out) != n:
                    raise AssertionError(f"map returned {len(out)} results, not {n}")
                rec.add(f"map{cs}_per_s", n / dt, "items/s", "higher")


def _latencies(fn: Any, n: int) -> list[float]:
    clock = time.perf_counter
    out = []
    for _ in range(n):
        t0 = clock()
        fn()
        out.append(clock() - t0)
    return out


def w_roundtrip(peer: str, p: dict, rec: Recorder) -> None:
    n, timeout = p["n"], p["timeout"]
    with _peer(peer) as ad:
        call = lambda: ad.submit(tasks.noop).result(timeout)  # noqa: E731
        _latencies(call, p["warmup"])
        for _ in range(p["repeat"]):
            gc.collect()
            _add_latencies(rec, "rt", _latencies(call, n))
    if peer.startswith("bigexec-"):  # the primitive under the executor: Machine.call
        import bigexec

        with bigexec.start(peer.split("-", 1)[1]) as b:
            m = _bench_machine(b, timeout)
            call = lambda: m.call("Bench.noop", 0)  # noqa: E731
            _latencies(call, p["warmup"])
            for _ in range(p["repeat"]):
                gc.collect()
                _add_latencies(rec, "call", _latencies(call, n))


PAIRED = ["floor", "call", "submit", "mp-pool", "ppe-fork"]
# A block whose mutual-TLS floor median is below this ran while waking the other process was
# cheap ("fast" regime, about 20 us a call); above it, the "slow" regime (about 70-100 us).
FAST_FLOOR = 45e-6


def w_paired(peer: str, p: dict, rec: Recorder) -> None:
    """Round trips of several callers alternating in small blocks, in one process.

    This shared virtual machine swings between two regimes (waking the other process costs
    about 10 us or about 70 us, with the host's load); figures taken minutes apart may sit in
    different regimes. Blocks of ``block`` calls, each caller in turn (the order rotating),
    compare the callers at the same moment: each ratio is taken per block, then its median.
    """
    import concurrent.futures as cf
    import multiprocessing as mp

    import bigexec

    timeout, block, blocks = p["timeout"], p["block"], p["blocks"]
    # Every fork happens before bigexec starts its threads.
    fl = floor.Floor("http-mtls", timeout)
    pool = ppe = ex = b = None
    try:
        pool = mp.get_context("fork").Pool(2)
        ppe = cf.ProcessPoolExecutor(2, mp_context=mp.get_context("fork"))
        ppe.submit(tasks.noop).result(timeout)
        ex = bigexec.Executor(2, system=peer.split("-", 1)[1])
        _all_running(ex, 2, timeout)
        b = bigexec.start(peer.split("-", 1)[1])
        m = _bench_machine(b, timeout)
        callers = {
            "floor": fl.call,
            "call": lambda: m.call("Bench.noop", 0),
            "submit": lambda: ex.submit(tasks.noop).result(timeout),
            "mp-pool": lambda: pool.apply_async(tasks.noop).get(timeout),
            "ppe-fork": lambda: ppe.submit(tasks.noop).result(timeout),
        }
        for fn in callers.values():
            _latencies(fn, p["warmup"])
        pairs = [("call", "floor"), ("submit", "floor"), ("submit", "mp-pool"),
                 ("submit", "ppe-fork"), ("call", "ppe-fork")]
        for _ in range(p["repeat"]):
            gc.collect()
            lat: dict[str, list[float]] = {k: [] for k in callers}
            ratios: dict[tuple[str, str], list[float]] = {pr: [] for pr in pairs}
            fast: list[bool] = []
            for i in range(blocks):
                med = {}
                for j in range(len(PAIRED)):
                    name = PAIRED[(i + j) % len(PAIRED)]
                    xs = _latencies(callers[name], block)
                    lat[name] += xs
                    med[name] = statistics.median(xs)
                for a, c in pairs:
                    ratios[(a, c)].append(med[a] / med[c])
                fast.append(med["floor"] < FAST_FLOOR)
            for name, xs in lat.items():
                _add_latencies(rec, name, xs)
            for (a, c), rs in ratios.items():
                rec.add(f"{a}_over_{c}", statistics.median(rs), "x", "lower")
                # the same ratio within each regime of the host (see the docstring)
                for regime, want in (("fast", True), ("slow", False)):
                    sel = [r for r, f in zip(rs, fast, strict=True) if f == want]
                    if sel:
                        rec.add(f"{a}_over_{c}_{regime}", statistics.median(sel), "x", "lower")
            rec.add("fast_block_share", sum(fast) / len(fast), "", "higher")
    finally:
        for closer in (lambda: b and b.shutdown(), lambda: ex and ex.shutdown(),
                       lambda: ppe and ppe.shutdown(), lambda: pool and pool.terminate(),
                       fl.close):
            try:
                closer()
            except Exception:
                traceback.print_exc()


def w_echo(peer: str, p: dict, rec: Recorder) -> None:
    timeout = p["timeout"]
    sizes = [(name, int(mib * MiB), k) for name, mib, k in p["sizes"]]
    payloads = {name: os.urandom(size) for name, size, _ in sizes}

    def measure(call: Any, prefix: str) -> None:
        call(payloads[sizes[0][0]])  # warm-up
        for _ in range(p["repeat"]):
            for name, size, k in sizes:
                data = payloads[name]
                gc.collect()
                spent = 0.0
                for _ in range(k):
                    t0 = time.perf_counter()
                    r = call(data)
                    spent += time.perf_counter() - t0
                    if len(r) != size or r[:64] != data[:64] or r[-64:] != data[-64:]:
                        raise AssertionError(f"echo of {name} came back different")
                    del r
                rec.add(f"{prefix}echo{name}_MBps", 2 * size * k / spent / MB, "MB/s",
                        "higher")

    with _peer(peer) as ad:
        measure(lambda data: ad.submit(tasks.echo, data).result(timeout), "")
    if peer == "bigexec-local":  # the floors: one bare socket, with and without mutual TLS
        for kind in floor.ECHO_KINDS:
            fl = floor.Floor(kind, timeout)
            try:
                measure(fl.call, f"floor_{kind.split('-')[1]}_")
            finally:
                fl.close()
    if peer.startswith("bigexec-"):  # the primitive under the executor: Machine.call
        import bigexec

        with bigexec.start(peer.split("-", 1)[1]) as b:
            m = _bench_machine(b, timeout)
            measure(lambda data: m.call("Bench.echo", data, timeout=timeout), "call_")


def w_cpu(peer: str, p: dict, rec: Recorder) -> None:
    """bigpi in 2 tasks vs serially. On bigexec, a ProcessPoolExecutor (fork) runs the same
    parallel step right after each bigexec one, so the two speedups also compare paired,
    under the same load from elsewhere."""
    import concurrent.futures as cf
    import multiprocessing as mp

    n, timeout = p["n"], p["timeout"]
    half = n // 2
    ppe = None
    if peer.startswith("bigexec-"):  # forked before bigexec starts its threads
        ppe = cf.ProcessPoolExecutor(2, mp_context=mp.get_context("fork"))
    try:

        def parallel(ex: Any) -> tuple[int, float]:
            t0 = time.perf_counter()
            fs = [ex.submit(tasks.bigpi, half, 1), ex.submit(tasks.bigpi, n - half, 2)]
            inside = sum(f.result(timeout) for f in fs)
            return inside, time.perf_counter() - t0

        with _peer(peer) as ad:
            for ex in (ad, ppe) if ppe is not None else (ad,):
                for f in [ex.submit(tasks.bigpi, 1000, s) for s in (1, 2)]:  # warm-up
                    f.result(timeout)
            for _ in range(p["repeat"]):
                gc.collect()
                t0 = time.perf_counter()
                serial = tasks.bigpi(half, 1) + tasks.bigpi(n - half, 2)
                ts = time.perf_counter() - t0
                got, tp = parallel(ad)
                if got != serial:
                    raise AssertionError(f"bigpi: parallel {got} != serial {serial}")
                rec.add("serial_s", ts, "s", "lower")
                rec.add("parallel_s", tp, "s", "lower")
                rec.add("speedup", ts / tp, "x", "higher")
                if ppe is not None:
                    got, tq = parallel(ppe)
                    if got != serial:
                        raise AssertionError(f"bigpi on PPE: {got} != serial {serial}")
                    rec.add("paired_ppe_parallel_s", tq, "s", "lower")
                    # (serial / tp) / (serial / tq): this speedup over PPE's, paired
                    rec.add("speedup_over_ppe_paired", tq / tp, "x", "higher")
    finally:
        if ppe is not None:
            ppe.shutdown()


class _RssSampler:
    """Samples the RSS of some processes every ``period`` seconds; keeps the maximum."""

    def __init__(self, pids: dict[str, int], period: float = 0.005) -> None:
        self.procs = {k: psutil.Process(pid) for k, pid in pids.items()}
        self.period = period
        self.peak = dict.fromkeys(pids, 0)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._t = threading.Thread(target=self._run, daemon=True, name="rss-sampler")
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            for k, proc in self.procs.items():
                try:
                    rss = proc.memory_info().rss
                except psutil.Error:
                    continue
                with self._lock:
                    if rss > self.peak[k]:
                        self.peak[k] = rss

    def reset(self) -> None:
        with self._lock:
            self.peak = dict.fromkeys(self.peak, 0)

    def take(self) -> dict[str, int]:
        with self._lock:
            return dict(self.peak)

    def close(self) -> None:
        self._stop.set()
        self._t.join()


def w_stream(peer: str, p: dict, rec: Recorder) -> None:
    import resource

    import bigexec

    size = int(p["mib"] * MiB)
    chunk = os.urandom(MiB)

    def source():
        left = size
        while left > 0:
            yield chunk if left >= MiB else chunk[:left]
            left -= MiB

    with bigexec.start(peer.split("-", 1)[1]) as b:
        m = _bench_machine(b, p["timeout"])
        wpid = m.call("Bench.pid")
        if wpid == os.getpid():
            raise RuntimeError("the stream workload needs a machine in another process")
        rec.extra("worker_pid", wpid)
        # warm-up: a small transfer each way, so code paths and buffers exist before baselines
        m.call("Bench.consume", iter([chunk] * 4))
        for _ in m.call("Bench.produce", 4 * MiB):
            pass
        sampler = _RssSampler({"driver": os.getpid(), "worker": wpid})
        try:
            for _ in range(p["repeat"]):
                for direction in ("up", "down"):
                    gc.collect()
                    d0 = tasks.rss_bytes()
                    w0 = m.call("Bench.memory")["rss"]
                    sampler.reset()
                    t0 = time.perf_counter()
                    if direction == "up":
                        got = m.call("Bench.consume", source(), timeout=p["timeout"])
                    else:
                        got = 0
                        with m.call("Bench.produce", size, timeout=p["timeout"]) as s:
                            for piece in s:
                                got += len(piece)
                    dt = time.perf_counter() - t0
                    time.sleep(0.02)  # one more sample after the end
                    peak = sampler.take()
                    if got != size:
                        raise AssertionError(f"{direction}: {got} bytes arrived, not {size}")
                    wmem = m.call("Bench.memory")
                    dmax = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                    rec.add(f"{direction}_MBps", size / dt / MB, "MB/s", "higher")
                    rec.add(f"{direction}_driver_peak_MiB", max(0, peak["driver"] - d0) / MiB,
                            "MiB", "lower")
                    rec.add(f"{direction}_worker_peak_MiB", max(0, peak["worker"] - w0) / MiB,
                            "MiB", "lower")
                    # high-water marks (ru_maxrss) bound what any sampling could have missed
                    rec.add(f"{direction}_driver_hwm_MiB", max(0, dmax - d0) / MiB, "MiB",
                            "lower")
                    rec.add(f"{direction}_worker_hwm_MiB", max(0, wmem["maxrss"] - w0) / MiB,
                            "MiB", "lower")
        finally:
            sampler.close()


def _worker_children() -> list[psutil.Process]:
    out = []
    for c in psutil.Process().children(recursive=True):
        try:
            if "bigexec.worker" in " ".join(c.cmdline()):
                out.append(c)
        except psutil.Error:
            pass
    return out


def _all_running(ex: Any, n: int, timeout: float) -> list:
    """Wait until the executor has ``n`` machines, all RUNNING; return them.

    A no-op is submitted first: an executor may start its machines with its first task.
    """
    import bigexec

    deadline = time.monotonic() + timeout
    first = ex.submit(tasks.noop)
    ms = ex.machines()
    while len(ms) < n and time.monotonic() < deadline:
        time.sleep(0.005)
        ms = ex.machines()
    for m in ms:
        m.wait(bigexec.RUNNING, max(0.0, deadline - time.monotonic()))
    bad = [str(m.err) for m in ms if m.state != bigexec.RUNNING]
    if len(ms) != n or bad:
        raise RuntimeError(f"{len(ms)} machines of {n} within {timeout}s; failed: {bad[:3]}")
    first.result(max(0.0, deadline - time.monotonic()))
    return ms


def w_scale(peer: str, p: dict, rec: Recorder) -> None:
    import subprocess

    import bigexec

    system = peer.split("-", 1)[1]
    n = p["machines"]
    rec.extra("machines", n)
    for _ in range(p["repeat"]):
        gc.collect()
        threads0 = threading.active_count()
        t0 = time.perf_counter()
        ex = bigexec.Executor(n, system=system)
        ms: list = []
        try:
            ms = _all_running(ex, n, p["timeout"])
            t1 = time.perf_counter()
            out = list(ex.map(tasks.noop, range(p["tasks"]), timeout=p["timeout"]))
            t2 = time.perf_counter()
            if len(out) != p["tasks"]:
                raise AssertionError("map lost results")
            workers = _worker_children()
        finally:
            t3 = time.perf_counter()
            ex.shutdown(wait=True)
            t4 = time.perf_counter()
        errs = [str(m.err) for m in ms if m.err is not None]
        # what is left: worker processes (psutil and pgrep agree) and bigexec threads
        gone, alive = psutil.wait_procs(workers, timeout=5)
        pgrep = subprocess.run(["pgrep", "-P", str(os.getpid()), "-f", "bigexec.worker"],
                               capture_output=True, text=True)
        left_pgrep = len(pgrep.stdout.split())
        t_end = time.monotonic() + 5
        while threading.active_count() > threads0 and time.monotonic() < t_end:
            time.sleep(0.05)
        threads_left = threading.active_count() - threads0
        rec.add("start_s", t1 - t0, "s", "lower")
        rec.add("map_s", t2 - t1, "s", "lower")
        rec.add("shutdown_s", t4 - t3, "s", "lower")
        rec.add("total_s", t4 - t0, "s", "lower")
        rec.add("left_processes", len(alive) + left_pgrep, "", "lower")
        rec.add("left_threads", max(0, threads_left), "", "lower")
        rec.add("machine_errors", len(errs), "", "lower")
        if system == "local":
            rec.add("worker_processes_seen", len(workers), "", "higher")
        if errs:
            rec.extra("machine_errors_sample", errs[:3])
        for proc in alive:
            proc.kill()


def w_idle(peer: str, p: dict, rec: Recorder) -> None:
    import bigexec

    n = p["machines"]
    me = psutil.Process()
    ex = bigexec.Executor(n, system=peer.split("-", 1)[1])
    try:
        ms = _all_running(ex, n, p["timeout"])
        list(ex.map(tasks.noop, range(4 * n)))
        workers = _worker_children()
        rec.extra("keepalive_period_s", ex.session.keepalive.period)
        time.sleep(1.0)  # let the boot's last threads settle
        for _ in range(p["repeat"]):
            c0 = me.cpu_times()
            w0 = sum(sum(w.cpu_times()[:2]) for w in workers)
            t0 = time.monotonic()
            time.sleep(p["seconds"])
            dt = time.monotonic() - t0
            c1 = me.cpu_times()
            w1 = sum(sum(w.cpu_times()[:2]) for w in workers)
            driver = (c1.user - c0.user) + (c1.system - c0.system)
            rec.add("driver_pct_core", 100 * driver / dt, "%", "lower")
            rec.add("workers_pct_core", 100 * (w1 - w0) / dt, "%", "lower")
        rec.add("keepalives_seen", sum(len(m.keepalive_reply_times) for m in ms), "", "higher")
    finally:
        ex.shutdown(wait=True)


def w_floor(kind: str, p: dict, rec: Recorder) -> None:
    for _ in range(p["repeat"]):
        gc.collect()
        _add_latencies(rec, "rt", floor.measure(kind, p["n"], p["warmup"],
                                                 timeout=p["timeout"]))


WORKLOADS = {
    "floor": w_floor,
    "startup": w_startup,
    "submit": w_submit,
    "map": w_map,
    "roundtrip": w_roundtrip,
    "paired": w_paired,
    "echo": w_echo,
    "cpu": w_cpu,
    "stream": w_stream,
    "scale": w_scale,
    "idle": w_idle,
}


def _leftover_children(grace: float) -> list[dict]:
    """Child processes still alive after the cell's work (helpers aside); killed."""
    kids = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if not any(h in " ".join(proc.cmdline()) for h in _HELPERS):
                kids.append(proc)
        except psutil.Error:
            pass
    gone, alive = psutil.wait_procs(kids, timeout=grace) if kids else ([], [])
    out = []
    for proc in alive:
        try:
            cmd = " ".join(proc.cmdline())[:200]
        except psutil.Error:
            continue
        out.append({"pid": proc.pid, "cmdline": cmd})
        try:
            proc.kill()
        except psutil.Error:
            pass
    return out


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    # Dask warns about every large argument of submit (the echo workload): noise here
    warnings.filterwarnings("ignore", message=".*Sending large graph.*")
    rec = Recorder(spec, argv[1])
    # on a hang, the runner kills us; dump every thread's stack to our log just before
    faulthandler.dump_traceback_later(max(5.0, spec["deadline"] - 5.0), exit=False)
    t0 = time.perf_counter()
    try:
        WORKLOADS[spec["workload"]](spec["peer"], spec["params"], rec)
        rec.data["status"] = "ok"
    except NotInstalled as exc:
        rec.data["status"] = "not installed"
        rec.data["error"] = str(exc)
    except BaseException as exc:
        rec.data["status"] = "error"
        rec.data["error"] = f"{type(exc).__name__}: {exc}"
        rec.data["traceback"] = traceback.format_exc()
    rec.data["seconds"] = time.perf_counter() - t0
    left = _leftover_children(5.0)
    if left:
        rec.data["leftover_children"] = left
    # threads that would keep this process from exiting on its own
    stuck = [t.name for t in threading.enumerate()
             if t is not threading.main_thread() and t.is_alive() and not t.daemon]
    if stuck:
        rec.data["nondaemon_threads_left"] = stuck
    rec.flush()
    faulthandler.cancel_dump_traceback_later()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # do not wait on stray non-daemon threads a peer may have left


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
