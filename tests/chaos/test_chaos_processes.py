"""Chaos: machines and drivers killed, stopped, starved of memory; a log reader that stalls.

The short version runs in CI; ``BIGEXEC_SOAK=1`` makes every count ten times larger, to run
by hand. Each test prints one ``chaos:`` line with its figures (``pytest -s`` shows them);
the reliability table of docs/design.md quotes them.
"""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import FAST

import bigexec

SOAK = 10 if os.environ.get("BIGEXEC_SOAK") == "1" else 1
REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(300 * SOAK)


def slow_square(x):
    time.sleep(0.0005)
    return x * x


def _all_up(ex, n: int) -> None:
    """Wait for the executor's ``n`` machines to run (it starts them at its first task)."""
    list(ex.map(abs, range(4 * n)))
    deadline = time.monotonic() + 60
    while len(ex.machines()) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    machines = ex.machines()
    assert len(machines) == n
    for m in machines:
        assert m.wait(bigexec.RUNNING, 60) and m.err is None, m.err


def _worker_pids(ex) -> list[int]:
    return [m.info["pid"] for m in ex.machines() if m.state == bigexec.RUNNING and m.info]


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_kill_storm_loses_duplicates_and_reorders_nothing():
    kills = 6 * SOAK
    n = 20_000 * SOAK
    killed: list[int] = []
    with bigexec.Executor(3, system="local", max_crashes=1000, **FAST) as ex:
        _all_up(ex, 3)
        done = threading.Event()

        def storm():
            rng = random.Random(5)
            while len(killed) < kills and not done.wait(0.4):
                pids = _worker_pids(ex)
                if pids:
                    victim = rng.choice(pids)
                    os.kill(victim, signal.SIGKILL)
                    killed.append(victim)

        killer = threading.Thread(target=storm)
        killer.start()
        t0 = time.monotonic()
        try:
            rounds = 0
            while len(killed) < kills:  # keep the machines busy until the storm is over
                assert list(ex.map(slow_square, range(n // 4))) == [x * x for x in range(n // 4)]
                rounds += 1
        finally:
            done.set()
            killer.join()
        assert len(ex.machines()) == 3  # the executor replaced every machine it lost
    print(f"chaos: kill storm: {kills} SIGKILLs during {rounds} maps of {n // 4} tasks "
          f"({rounds * n // 4} tasks) in {time.monotonic() - t0:.1f}s: 0 lost, 0 duplicated")


def test_a_stopped_machine_loses_its_tasks_to_the_others():
    # SIGSTOP: the machine's connections stay open and nothing answers. Its keepalives fail,
    # it is declared lost within the keepalive budget, and its tasks run elsewhere.
    with bigexec.Executor(2, system="local", **FAST) as ex:
        _all_up(ex, 2)
        victim = _worker_pids(ex)[0]
        futures = [ex.submit(slow_square, x) for x in range(2000)]
        os.kill(victim, signal.SIGSTOP)
        t0 = time.monotonic()
        try:
            got = [f.result(timeout=60) for f in futures]
            took = time.monotonic() - t0
        finally:
            try:
                os.kill(victim, signal.SIGCONT)
            except ProcessLookupError:  # the driver killed the machine it lost: good
                pass
        assert got == [x * x for x in range(2000)]
        lease = FAST["keepalive_lease"]
        assert took < lease + 15, f"the tasks of a stopped machine took {took:.1f}s to move"
    print(f"chaos: SIGSTOP: a stopped machine's tasks moved and completed in {took:.1f}s "
          f"(lease {lease}s)")


_CGROUP_V1 = Path("/sys/fs/cgroup/memory")
_CGROUP_V2 = Path("/sys/fs/cgroup/unified")


def _memory_cgroup(name: str, limit: int) -> tuple[Path, Path] | None:
    """A memory cgroup limited to ``limit`` bytes: (its directory, its tasks file)."""
    if os.geteuid() != 0:
        return None
    if (_CGROUP_V1 / "memory.limit_in_bytes").exists():
        d = _CGROUP_V1 / name
        d.mkdir(exist_ok=True)
        (d / "memory.limit_in_bytes").write_text(str(limit))
        swap = d / "memory.memsw.limit_in_bytes"
        if swap.exists():
            swap.write_text(str(limit))
        return d, d / "cgroup.procs"  # the whole process ("tasks" takes one thread)
    if "memory" in (_CGROUP_V2 / "cgroup.controllers").read_text() if (
            _CGROUP_V2 / "cgroup.controllers").exists() else False:
        d = _CGROUP_V2 / name
        d.mkdir(exist_ok=True)
        (d / "memory.max").write_text(str(limit))
        return d, d / "cgroup.procs"
    return None


_OOM_DRIVER = textwrap.dedent("""
    import os, sys, time
    import bigexec
    from bigexec.errors import WorkerLostError

    def hog(x):
        if x == 7:
            block = bytearray(3 << 30)  # far past the cgroup's limit: the OOM killer strikes
            for i in range(0, len(block), 4096):
                block[i] = 1
        time.sleep(0.001)
        return x

    if __name__ == "__main__":
        with open(sys.argv[1], "w") as f:  # this driver, and so every worker it starts
            f.write(str(os.getpid()))
        with bigexec.Executor(2, system="local", max_crashes=2, keepalive_period=0.1,
                              keepalive_lease=5.0, keepalive_timeout=1.0,
                              keepalive_rpc_timeout=0.5) as ex:
            futures = [ex.submit(hog, x) for x in range(200)]
            outcomes = []
            for f in futures:
                try:
                    outcomes.append(f.result(timeout=120))
                except WorkerLostError as exc:
                    outcomes.append("lost: " + str(exc))
        print(repr(outcomes), flush=True)
""")


def test_an_oom_killed_task_fails_alone_and_the_others_complete(tmp_path):
    # The driver runs in a memory cgroup, as in a container: its workers and their
    # replacements are in it too. The task that allocates past the limit is OOM-killed with its
    # machine each time it runs; it fails with WorkerLostError, and the others complete.
    name = f"bigexec-chaos-{os.getpid()}"
    cg = _memory_cgroup(name, 800 << 20)
    if cg is None:
        pytest.skip("needs root and a memory cgroup controller (CI has both)")
    directory, procs = cg
    script = tmp_path / "oom.py"
    script.write_text(_OOM_DRIVER)
    try:
        run = subprocess.run([sys.executable, str(script), str(procs)], cwd=str(REPO),
                             capture_output=True, timeout=240)
        assert run.returncode == 0, run.stderr.decode()[-2000:]
        outcomes = eval(run.stdout.decode())  # a list of ints and strings, from our script
        # how the machine's death shows first: its SIGKILL, or its keepalives stalling as it
        # thrashes under the limit
        assert outcomes[7].startswith("lost: task hog(7) was running when its machine died"), \
            outcomes[7]
        assert [o for i, o in enumerate(outcomes) if i != 7] == [
            x for x in range(200) if x != 7]
    finally:
        for pid in procs.read_text().split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                directory.rmdir()
                break
            except OSError:
                time.sleep(0.1)
    print("chaos: OOM kill in a memory cgroup: the task failed with WorkerLostError, "
          "199 others completed")


_DRIVER = textwrap.dedent("""
    import sys, time
    import bigexec

    def square(x):
        time.sleep(0.001)
        return x * x

    if __name__ == "__main__":
        ex = bigexec.Executor(2, system="local", keepalive_period=0.2, keepalive_lease=8.0,
                              keepalive_timeout=1.0, keepalive_rpc_timeout=0.5)
        list(ex.map(abs, range(20)))
        while len(ex.machines()) < 2:
            time.sleep(0.05)
        for m in ex.machines():
            m.wait(bigexec.RUNNING, 30)
        print(" ".join(str(m.info["pid"]) for m in ex.machines()), flush=True)
        for _ in range(1000):
            list(ex.map(square, range(500)))
""")


@pytest.fixture
def busy_driver(tmp_path):
    """A driver process in the middle of maps, and its workers' pids."""
    script = tmp_path / "driver.py"
    script.write_text(_DRIVER)
    procs: list[subprocess.Popen] = []
    pids: list[int] = []

    def start() -> tuple[subprocess.Popen, list[int]]:
        p = subprocess.Popen([sys.executable, str(script)], cwd=str(REPO),
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        procs.append(p)
        line = p.stdout.readline().decode()  # type: ignore[union-attr]
        workers = [int(w) for w in line.split()]
        assert len(workers) == 2, f"driver said {line!r}"
        pids.extend(workers)
        return p, workers

    try:
        yield start
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
            p.wait(10)
            p.stdout.close()  # type: ignore[union-attr]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM", "SIGSTOP"])
def test_no_worker_outlives_its_driver(busy_driver, sig):
    # SIGKILL and SIGTERM end the driver: the workers read EOF on their lifeline at once.
    # SIGSTOP leaves it hanging: the workers leave when their lease (8 s here) lapses.
    driver, workers = busy_driver()
    time.sleep(0.5)  # mid-map
    driver.send_signal(getattr(signal, sig))
    t0 = time.monotonic()
    budget = 25.0 if sig == "SIGSTOP" else 10.0
    while not all(_gone(w) for w in workers) and time.monotonic() - t0 < budget:
        time.sleep(0.02)
    took = time.monotonic() - t0
    orphans = [w for w in workers if not _gone(w)]
    assert not orphans, f"workers {orphans} outlived a {sig}ed driver by {took:.1f}s"
    print(f"chaos: driver {sig}: 0 orphans, workers gone {took:.2f}s after")


_CHATTY = textwrap.dedent("""
    import sys, time
    import bigexec

    def chatty(i):
        for k in range(2000):
            print(f"task {i} line {k} " + "x" * 80, flush=True)
        return i

    if __name__ == "__main__":
        with bigexec.Executor(1, system="local") as ex:
            print(list(ex.map(chatty, range(10))) == list(range(10)), flush=True)
""")


def test_a_driver_stderr_nobody_reads_never_blocks_a_worker(tmp_path):
    # 2 MB of worker output into a pipe the test never reads (64 KiB would fill it).
    script = tmp_path / "chatty.py"
    script.write_text(_CHATTY)
    p = subprocess.Popen([sys.executable, str(script)], cwd=str(REPO), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    try:
        t0 = time.monotonic()
        ready, _, _ = select.select([p.stdout], [], [], 60)
        took = time.monotonic() - t0
        assert ready, "the map hung: its worker blocked writing to a full pipe"
        assert p.stdout.readline() == b"True\n"  # type: ignore[union-attr]
    finally:
        p.kill()
        p.wait(10)
        p.stdout.close()  # type: ignore[union-attr]
        p.stderr.close()  # type: ignore[union-attr]
    print(f"chaos: a driver whose stderr nobody reads: 20,000 lines of output, the map done "
          f"in {took:.1f}s")
