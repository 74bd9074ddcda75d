"""Starts ``python -m bigexec.agent`` for tests: on 127.0.0.1 only, cleaned up on any exit."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from bigexec import tls
from bigexec.agent import ANNOUNCE_PREFIX, AgentDocument
from bigexec.authority import Authority
from bigexec.rpc.client import Client
from bigexec.systems.bootstrap import WorkerSpec

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


def agent_document(ca: Authority, *, lease: float = 60.0, poweroff: Sequence[str] | None = None,
                   instance_id: str = "i-0123456789abcdef0") -> AgentDocument:
    """A document as the ec2 system writes one: a leaf for 127.0.0.1, the CA's certificate."""
    leaf = ca.issue("agent i-test", ips=[HOST], usage="server")
    return AgentDocument(session="session-test", lease=lease, credentials=leaf,
                         instance_id=instance_id, port=0,
                         poweroff=tuple(poweroff) if poweroff else ("true",))


def worker_spec(ca: Authority, lease: float = 60.0) -> bytes:
    """A real WorkerSpec for a worker on 127.0.0.1, with credentials from ``ca``."""
    return WorkerSpec(system="ec2", lease=lease, listen_host=HOST,
                      credentials=ca.issue_machine(ips=[HOST])).encode()


def driver_client(ca: Authority) -> Client:
    return Client(tls.client_context(ca.issue_driver()), connect_timeout=5.0)


@dataclass
class RunningAgent:
    proc: subprocess.Popen[str]
    addr: str
    document_path: Path
    #: The agent's stdout and stderr lines after its announcement.
    output: list[str]


@contextlib.contextmanager
def running_agent(tmp_path: Path, doc: AgentDocument,
                  timeout: float = 60.0) -> Iterator[RunningAgent]:
    """Write ``doc``, start the agent on it, wait for its announcement; at the end kill the
    agent's workers (through it) and the agent."""
    path = tmp_path / "agent.json"
    path.write_bytes(doc.to_json())
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bigexec.agent", "--bootstrap", str(path), "--host", HOST],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        start_new_session=True)
    lines: list[str] = []
    announced = threading.Event()
    addr: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(ANNOUNCE_PREFIX) and not addr:
                addr.append(line[len(ANNOUNCE_PREFIX):].strip())
                announced.set()
            else:
                lines.append(line)
        announced.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        announced.wait(timeout)
        assert addr, f"the agent did not announce an address: {''.join(lines)[-2000:]}"
        yield RunningAgent(proc, addr[0], path, lines)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # it kills its workers as it ends
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        reader.join(10)  # (its workers, if any survived, see their lifeline close)
