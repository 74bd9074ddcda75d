"""The ec2 system's boot, simulated: from ``b.start(4)`` to all 4 machines RUNNING on 2
"instances" that boot their user-data for real (tests/ec2_world.py: moto's EC2 API, a network
namespace per instance, an offline install from a wheelhouse), with the share of each step.

    sudo .venv/bin/python -m benchmarks.ec2_boot [--rounds 3]

Needs root (network and mount namespaces). Each round starts a fresh world and a driver in
its hub namespace; the steps, per instance, in wall-clock time on this one host:

    launch        b.start() to the instance's user-data starting (the API call, the
                  hypervisor noticing the instance: on real EC2, the instance's own boot)
    install       the user-data's venv and pip install from the wheelhouse
    agent start   the install done to the agent listening (Python start-up, IMDS)
    worker start  the agent listening to the instance's last machine RUNNING (the driver's
                  poll, the agent's certificate, the code bundle, the worker processes, their
                  services)

On real EC2 the launch step is the instance's boot (about 20-30 s) and the install reads
the package index instead of a local wheelhouse; the rest is what this measures.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

DRIVER = """
import json, sys, time
import bigexec
t0 = time.time()
with bigexec.start("ec2") as b:
    machines = b.start(4)
    running = {}
    for m in machines:
        m.wait(bigexec.RUNNING)
        if m.err is not None:
            raise m.err
        running[m.addr] = time.time()
    print("BOOT " + json.dumps({"requested": t0, "running": running,
                               "instances": {m.addr: m.instance_id for m in machines}}),
          flush=True)
"""

STEPS = ("launch", "install", "agent start", "worker start")


def one_round(wheels: Path) -> dict[str, float]:
    from ec2_world import running_world

    with tempfile.TemporaryDirectory() as tmp, running_world(Path(tmp) / "world") as world:
        script = Path(tmp) / "driver.py"
        script.write_text(DRIVER)
        env = {"BIGEXEC_EC2_WHEELHOUSE": str(wheels), "BIGEXEC_EC2_PROCS_PER_INSTANCE": "2",
               "BIGEXEC_EC2_MARKET": "on-demand", "BIGEXEC_EC2_ADDRESS": "private"}
        proc = world.run_driver([sys.executable, str(script)], env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        watched: set[str] = set()
        stop = threading.Event()

        def watch() -> None:  # when each agent listens (read from its namespace's TCP table)
            while not stop.is_set():
                for iid in list(world.instances):
                    if iid not in watched:
                        watched.add(iid)
                        threading.Thread(target=world.wait_listening, args=(iid, 7100, 120),
                                         daemon=True).start()
                stop.wait(0.02)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        out, _ = proc.communicate(timeout=300)
        stop.set()
        watcher.join()
        line = next((x for x in out.splitlines() if x.startswith("BOOT ")), None)
        if proc.returncode != 0 or line is None:
            raise RuntimeError(f"the driver failed:\n{out[-4000:]}")
        boot = json.loads(line[5:])
        requested = boot["requested"]
        per_instance: dict[str, list[float]] = {}
        for addr, iid in boot["instances"].items():
            per_instance.setdefault(iid, []).append(boot["running"][addr])
        steps: dict[str, list[float]] = {s: [] for s in STEPS}
        for iid, running in per_instance.items():
            instance = world.instances[iid]
            t = instance.timings()
            started = instance.booted_at
            installed = started + t["installed"]
            listening = started + t["listening:7100"]
            steps["launch"].append(started - requested)
            steps["install"].append(installed - started)
            steps["agent start"].append(listening - installed)
            steps["worker start"].append(max(running) - listening)
        result = {s: statistics.mean(v) for s, v in steps.items()}
        result["total"] = max(boot["running"].values()) - requested
        return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root (network and mount namespaces): run it with sudo")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's request lines
    from ec2_world import build_wheelhouse

    with tempfile.TemporaryDirectory() as tmp:
        wheels = build_wheelhouse(Path(tmp) / "wheels")
        print(f"wheelhouse: {len(wheels.wheels)} wheels in {wheels.seconds:.1f}s")
        rounds = []
        for n in range(args.rounds):
            r = one_round(wheels.path)
            rounds.append(r)
            print(f"round {n + 1}: " + ", ".join(f"{k} {v:.2f}s" for k, v in r.items()))
    total = statistics.median(r["total"] for r in rounds)
    print(f"\nrequest to 4 machines RUNNING on 2 instances, median of {len(rounds)}: "
          f"{total:.2f}s")
    for step in STEPS:
        value = statistics.median(r[step] for r in rounds)
        print(f"  {step:<13} {value:6.2f}s  {100 * value / total:5.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
