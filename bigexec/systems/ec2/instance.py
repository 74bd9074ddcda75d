"""An ``ec2`` instance as the driver sees it, and the machines on it.

    Ec2System (system.py) ── place(slot, machine) ──> InstanceAgent: the instance's agent,
                                                      its worker slots, its heartbeat
        boot thread: wait_for_agent (the instance-id cookie; the user-data's stand-in may
            ask for the driver's wheel, or say why the boot failed), its own certificate,
            then a worker per placed machine (owner.start_worker)
        heartbeat thread: Agent.heartbeat ──> worker exit statuses, a spot notice
    Ec2Machine (a MachineHandle): address() from Agent.address, output from the Agent.output
        stream into MachineOutput, death from the heartbeat, the stream's end, the monitor

What the instance and its machines need of the system is ``InstanceOwner``: they never reach
into ``Ec2System`` itself.
"""

from __future__ import annotations

import http.client
import logging
import math
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple, Protocol

from ... import tls
from ...errors import BootError, MachineLost, NetworkError, ProtocolError
from ...rpc.client import Client
from ...worker import describe_exit
from ..base import KeepaliveConfig, MachineHandle
from ..bootstrap import MachineOutput, format_address
from ..code_bundle import CodeBundle
from ..own_wheel import OwnWheel
from .instances import InstanceRecord
from .monitor import DeadInstanceMonitor
from .options import Ec2Options
from .user_data import BOOT_FAILED_MARK, WANTS_WHEEL_MARK, WHEEL_PATH

__all__ = ["Ec2Machine", "InstanceAgent", "InstanceOwner", "Placement"]

log = logging.getLogger("bigexec.systems.ec2")

_BOOT_OUTPUT_LINES = 20
_AGENT_POLL = 1.0  # seconds between tries to reach an agent that is not up yet
_DESCRIBE_WHILE_BOOTING = 15.0  # seconds between looks at an instance whose agent is silent
_EXIT_STATUS_WAIT = 5.0  # seconds a worker whose output ended may take to be reaped


class InstanceOwner(Protocol):
    """What an instance and its machines need of the system that launched them."""

    lock: threading.RLock  # guards placements, slots and the instances' states
    keepalive: KeepaliveConfig
    boot_timeout: float
    boot_logs: bool
    options: Ec2Options
    session_id: str

    @property
    def renew_after(self) -> float: ...

    def agent_client(self) -> Client: ...

    def monitor(self) -> DeadInstanceMonitor: ...

    def agent_credentials(self, instance_id: str | None) -> tls.Credentials: ...

    def start_worker(self, instance: InstanceAgent, p: Placement) -> None: ...

    def boot_failed(self, instance: InstanceAgent, err: BaseException) -> None: ...

    def machine_ended(self, machine: Ec2Machine) -> None: ...


def _lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """The lines in a stream's chunks (a chunk may hold several lines, or part of one)."""
    rest = b""
    for chunk in chunks:
        rest += chunk
        *whole, rest = rest.split(b"\n")
        for line in whole:
            yield line + b"\n"
    if rest:
        yield rest


class Ec2Machine(MachineHandle):
    """One machine of the ``ec2`` system: a worker process that an instance's agent runs."""

    def __init__(self, system: InstanceOwner, index: int) -> None:
        super().__init__()
        self._system = system
        self.maxprocs = 1
        #: The instance the machine runs on, and the host the driver reaches it at.
        self.instance_id: str | None = None
        self.host: str | None = None
        self.output = MachineOutput(f"ec2 machine {index}", show_boot=system.boot_logs,
                                    keep=_BOOT_OUTPUT_LINES)
        self._placed = threading.Event()
        self._failure: BaseException | None = None
        self._instance: InstanceAgent | None = None
        self._worker_id: str | None = None
        self._ended = threading.Event()  # the worker is gone, or the instance is
        self._created = time.monotonic()
        self._listening = False

    # --- placing the machine (the system's boot thread) ----------------------------------

    def attach(self, instance: InstanceAgent, worker_id: str) -> None:
        self._instance, self._worker_id = instance, worker_id
        self.instance_id, self.host = instance.record.instance_id, instance.host
        self.output.label = f"{instance.record.instance_id}/{worker_id}"
        threading.Thread(target=self._pump_output, daemon=True,
                         name=f"bigexec-ec2-log-{instance.record.instance_id}-{worker_id}"
                         ).start()
        self._placed.set()

    def fail(self, exc: BaseException) -> None:
        """The machine will never run (its instance did not launch or boot)."""
        if self._placed.is_set():
            return
        self._failure = exc
        self.mark_dead(exc)
        self._ended.set()
        self._placed.set()

    # --- MachineHandle --------------------------------------------------------------------

    def log_label(self, label: str) -> None:
        self.output.label = label

    def address(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        if not self._placed.wait(timeout):
            raise BootError(f"no EC2 instance was ready for the machine within {timeout:g}s")
        if self._failure is not None:
            raise self._failure
        instance, worker_id = self._instance, self._worker_id
        assert instance is not None and worker_id is not None
        left = max(0.001, deadline - time.monotonic())
        try:
            addr = instance.call("Agent.address", (worker_id, left), timeout=left + 10.0)
        except BootError as exc:
            raise BootError(f"on EC2 instance {instance.record.instance_id}: {exc}") from None
        except (NetworkError, OSError, TimeoutError) as exc:
            raise BootError(f"the agent on EC2 instance {instance.record.instance_id} "
                            f"({instance.host}) stopped answering while worker {worker_id} "
                            f"booted: {exc}") from exc
        self.output.mark_listening(str(addr).split("://", 1)[-1])
        self._listening = True
        log.info("ec2: machine %s on %s listening, %.1fs after its start", addr,
                 instance.record.instance_id, time.monotonic() - self._created)
        return str(addr)

    def boot_phase(self) -> str | None:
        if self._failure is not None or self._listening:
            return None
        if not self._placed.is_set():
            return "waiting for an EC2 instance (launch, boot, install)"
        return f"worker starting on {self.instance_id}"

    def kill(self) -> None:
        instance, worker_id = self._instance, self._worker_id
        if instance is not None and worker_id is not None and not self._ended.is_set():
            try:
                instance.call("Agent.kill", (worker_id,), timeout=10.0)
            except Exception as exc:  # the instance's end ends the worker too
                log.debug("killing %s/%s failed: %s", instance.record.instance_id, worker_id,
                          exc)
        self._ended.set()
        self._system.machine_ended(self)

    def wait_stopped(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        if not self._ended.wait(timeout):
            return False
        return self.output.wait_ended(max(0.0, min(2.0, deadline - time.monotonic())))

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    @property
    def worker_id(self) -> str | None:
        """The agent's id of the machine's worker, once it has one."""
        return self._worker_id

    # --- what the agent and EC2 say -------------------------------------------------------

    def _pump_output(self) -> None:
        instance, worker_id = self._instance, self._worker_id
        assert instance is not None and worker_id is not None
        try:
            # no deadline: a worker may print nothing for hours; TCP keepalive and the
            # heartbeat notice a dead connection
            stream = instance.call("Agent.output", (worker_id,), timeout=None)
            self.output.pump(_lines(iter(stream)))
        except Exception as exc:
            self.output.end()
            if not self._ended.is_set():
                log.debug("the output stream of %s/%s broke: %s", instance.record.instance_id,
                          worker_id, exc)
                instance.suspect()
            return
        # its output ended: its exit status is known in a moment (the agent reaps it)
        deadline = time.monotonic() + _EXIT_STATUS_WAIT
        while not self._ended.is_set() and time.monotonic() < deadline:
            try:
                code = instance.call("Agent.status", (worker_id,), timeout=10.0)
            except Exception:
                break
            if code is not None:
                self.worker_exited(int(code))
                return
            time.sleep(0.05)
        instance.check_soon()

    def worker_exited(self, code: int) -> None:
        """The agent reports the worker's exit status."""
        if self._ended.is_set() and self.died() is not None:
            return
        self.output.wait_ended(2.0)  # the last lines first, then the news
        where = f"on EC2 instance {self.instance_id}"
        if not self.output.listening:
            reason: BaseException = self.output.boot_error(
                f"{self._worker_id} {where}", f"{describe_exit(code)} before it listened")
        else:
            lease = self._system.keepalive.lease
            reason = MachineLost(f"machine {self.output.label} {where} "
                                 f"{describe_exit(code, lease)}")
        self._gone(reason)

    def instance_lost(self, reason: BaseException) -> None:
        """The instance is gone or going (terminated, interrupted)."""
        self._gone(reason)

    def _gone(self, reason: BaseException) -> None:
        if not self._placed.is_set():  # it never got a worker: its boot fails with this
            self._failure = reason
            self._placed.set()
        self.mark_dead(reason)
        self._ended.set()
        self.output.flush(1.0)
        self.report_lost(reason)
        self._system.machine_ended(self)

    def keepalive_failed(self) -> None:
        if self._instance is not None:
            self._instance.suspect()


class Placement(NamedTuple):
    slot: int
    machine: Ec2Machine
    env: dict[str, str]
    bundle: CodeBundle | None


class InstanceAgent:
    """One launched instance as the driver sees it: its agent, its worker slots and
    machines, its heartbeat."""

    def __init__(self, system: InstanceOwner, record: InstanceRecord, host: str,
                 procs: int) -> None:
        self.system = system
        self.record = record
        self.host = host
        self.agent_addr = format_address(host, system.options.agent_port)
        #: Every machine placed here, and which holds each worker slot (port) now.
        self.machines: list[Ec2Machine] = []
        self.slots: list[Ec2Machine | None] = [None] * procs
        self.launched_at = time.monotonic()
        self._stop = threading.Event()
        self._check = threading.Event()
        self._pending: list[Placement] = []  # placed, its worker not asked for yet
        self._ready = False  # the agent answered: workers can be started
        self.terminated = False
        self.lost: BaseException | None = None
        self.credentials_renew_at = math.inf

    # --- placing machines (the system's lock held) -----------------------------------------

    def free_slots(self) -> list[int]:
        if self.terminated or self.lost is not None:
            return []
        return [k for k, m in enumerate(self.slots) if m is None or m.ended]

    def place(self, slot: int, machine: Ec2Machine, env: dict[str, str],
              bundle: CodeBundle | None) -> bool:
        """Give ``machine`` the worker slot ``slot``; whether its worker can be asked for now
        (the agent answers) rather than after the boot."""
        self.slots[slot] = machine
        self.machines.append(machine)
        self._pending.append(Placement(slot, machine, env, bundle))
        return self._ready

    # --- starting workers (no lock held) -------------------------------------------------

    def boot(self, deadline: float) -> None:
        """The boot thread: wait for the agent, then start the workers placed so far."""
        try:
            self.wait_for_agent(deadline)
        except BaseException as exc:
            err = exc if isinstance(exc, BootError) else BootError(
                f"EC2 instance {self.record.instance_id} failed to boot: {exc}")
            self.system.boot_failed(self, err)
            return
        try:  # its own leaf: the user-data's is shared by every instance of the launch
            self.renew_credentials()
        except Exception as exc:
            log.warning("ec2: giving the agent on %s its own certificate failed (it keeps the "
                        "launch's): %s", self.record.instance_id, exc)
        self.start_heartbeat()
        with self.system.lock:
            self._ready = True
        self.start_workers(deadline)

    def start_workers(self, deadline: float | None = None) -> None:
        """Ask the agent for a worker for every placement not yet started."""
        if deadline is None:
            deadline = time.monotonic() + self.system.boot_timeout
        sent: set[str] = set()
        while True:
            with self.system.lock:
                if not self._pending:
                    return
                p = self._pending.pop(0)
            if p.machine.ended:  # killed (or its session ended) before its worker started
                continue
            try:
                if p.bundle is not None and p.bundle.digest not in sent:
                    self._ensure_bundle(p.bundle, deadline)
                    sent.add(p.bundle.digest)
                self.system.start_worker(self, p)
            except BaseException as exc:
                p.machine.fail(exc if isinstance(exc, BootError) else BootError(
                    f"the agent on EC2 instance {self.record.instance_id} did not start a "
                    f"worker: {exc}"))
                self.system.machine_ended(p.machine)

    def _ensure_bundle(self, bundle: CodeBundle, deadline: float) -> None:
        if self.call("Agent.has_bundle", (bundle.digest,), timeout=30.0):
            return
        left = max(30.0, deadline - time.monotonic())
        self.call("Agent.put_bundle", (bundle.digest, bundle.data), timeout=left)
        log.info("ec2: sent the driver's modules (%s: %d KiB) to %s", ", ".join(bundle.names),
                 len(bundle.data) >> 10, self.record.instance_id)

    def fail_pending(self, err: BaseException) -> None:
        with self.system.lock:
            pending, self._pending = self._pending, []
        for p in pending:
            p.machine.fail(err)

    def call(self, method: str, args: tuple = (), *, timeout: float | None) -> Any:
        return self.system.agent_client().call(self.agent_addr, method, args, timeout=timeout)

    def suspect(self) -> None:
        self.system.monitor().suspect(self.record.instance_id)

    def check_soon(self) -> None:
        self._check.set()

    def wait_for_agent(self, deadline: float) -> None:
        """Until the agent answers as this instance of this session (``BootError`` else)."""
        next_describe = time.monotonic() + _DESCRIBE_WHILE_BOOTING
        last_error: BaseException | None = None
        iid = self.record.instance_id
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BootError(f"the agent on EC2 instance {iid} ({self.host}) did not answer "
                                f"within the boot timeout ({self.system.boot_timeout:g}s); "
                                f"last error: {last_error}")
            if self.lost is not None:
                raise BootError(f"EC2 instance {iid} ended while it booted: {self.lost}")
            if self._stop.is_set():
                raise BootError(f"EC2 instance {iid} was terminated while it booted")
            try:
                ident = self.call("Agent.identity", timeout=min(10.0, max(0.5, left)))
                break
            except ProtocolError as exc:  # the user-data's stand-in answers (user_data)
                text = str(exc)
                if WANTS_WHEEL_MARK in text:
                    self.send_own_wheel(deadline)
                    continue
                if BOOT_FAILED_MARK not in text:
                    raise
                lines = text.split(BOOT_FAILED_MARK, 1)[1].strip("\n").splitlines()
                last = next((ln.strip() for ln in reversed(lines) if ln.strip()), "")
                raise BootError(
                    f"the bootstrap of EC2 instance {iid} failed before its agent started: "
                    f"{last}\n  its last output lines:\n"
                    + "".join(f"    {ln}\n" for ln in lines)) from None
            except (NetworkError, OSError, TimeoutError) as exc:
                last_error = exc
            if time.monotonic() >= next_describe:
                self.suspect()  # a dead instance fails its boot now, not at the deadline
                next_describe = time.monotonic() + _DESCRIBE_WHILE_BOOTING
            time.sleep(min(_AGENT_POLL, max(0.0, deadline - time.monotonic())))
        if ident.get("instance_id") != iid or ident.get("session") != self.system.session_id:
            raise BootError(f"at {self.host} answers the agent of instance "
                            f"{ident.get('instance_id')} (session {ident.get('session')}), "
                            f"not of {iid} (session {self.system.session_id}): a recycled "
                            f"address; the machine is not used")
        log.info("ec2: the agent on %s (%s) answered %.1fs after launch", iid, self.host,
                 time.monotonic() - self.launched_at)

    def send_own_wheel(self, deadline: float) -> None:
        """Send the driver's own bigexec (``OwnWheel``) to the stand-in that waits for it."""
        wheel = OwnWheel.build()
        ctx = self.system.agent_client().ssl_context
        conn = http.client.HTTPSConnection(
            self.host, self.system.options.agent_port, context=ctx,
            timeout=max(5.0, min(120.0, deadline - time.monotonic())))
        try:
            conn.request("PUT", f"{WHEEL_PATH}{wheel.filename}", body=wheel.data,
                         headers={"Content-Type": "application/octet-stream"})
            answer = conn.getresponse()
            text = answer.read(4096).decode("utf-8", "replace")
        finally:
            conn.close()
        if answer.status != 200:
            raise BootError(f"EC2 instance {self.record.instance_id} refused the driver's "
                            f"bigexec wheel: HTTP {answer.status}: {text.strip()}")
        log.info("ec2: sent the driver's bigexec (%s, %d KiB) to %s", wheel.filename,
                 len(wheel.data) >> 10, self.record.instance_id)

    def renew_credentials(self) -> None:
        """Give the agent a fresh leaf of its own (renewed by the heartbeat before it
        expires)."""
        creds = self.system.agent_credentials(self.record.instance_id)
        self.call("Agent.renew_credentials", (creds.ca_pem, creds.cert_pem, creds.key_pem),
                  timeout=30.0)
        self.credentials_renew_at = time.monotonic() + self.system.renew_after

    def start_heartbeat(self) -> None:
        threading.Thread(target=self._heartbeat, daemon=True,
                         name=f"bigexec-ec2-heartbeat-{self.record.instance_id}").start()

    def _heartbeat(self) -> None:
        cfg = self.system.keepalive
        while not self._stop.is_set():
            try:
                beat = self.call("Agent.heartbeat", (cfg.lease,), timeout=cfg.rpc_timeout)
            except Exception as exc:
                if self._stop.is_set():
                    return
                log.debug("the heartbeat of %s failed: %s", self.record.instance_id, exc)
                self.suspect()
            else:
                statuses = beat.get("workers") or {}
                for m in list(self.machines):
                    code = statuses.get(m.worker_id) if m.worker_id else None
                    if code is not None:
                        m.worker_exited(int(code))
                if beat.get("notice"):
                    self.interrupted(beat["notice"])
                if time.monotonic() >= self.credentials_renew_at:
                    try:
                        self.renew_credentials()
                    except Exception as exc:
                        log.warning("ec2: renewing the certificate of the agent on %s failed "
                                    "(retrying): %s", self.record.instance_id, exc)
            self._check.wait(cfg.period)
            self._check.clear()

    def interrupted(self, notice: Mapping[str, Any]) -> None:
        when = notice.get("time") or "soon"
        self.lose(MachineLost(
            f"EC2 gave spot instance {self.record.instance_id} an interruption notice "
            f"({notice.get('action', 'terminate')} at {when}): its machine is given up now "
            f"and its unfinished work runs elsewhere"))

    def lose(self, reason: BaseException) -> None:
        if self.lost is None:
            self.lost = reason
        for m in list(self.machines):
            if not m.ended:
                m.instance_lost(reason)

    def stop(self) -> None:
        self._stop.set()
        self._check.set()
