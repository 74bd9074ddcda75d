"""The ``ec2`` system: machines in worker processes on EC2 instances, one agent per instance.

    driver (Ec2System)                                 instance (user-data, then the agent)
    ──────────────────                                 ────────────────────────────────────
    start(n): n Ec2Machine handles at once; a boot thread per start call:
      launch ceil(n / procs) instances ─ RunInstances ─> cloud-init writes the agent's document
        (one user-data for the batch: the agent's        (the CA's certificate, a leaf for
        leaf names "bigexec-agent", not an address,      "bigexec-agent" and its key), installs
        since none is known before launch)               bigexec, starts python -m bigexec.agent
      per instance: Agent.identity until it answers ──> the instance-id cookie: an agent of
        (CA-verified TLS; the cookie says which          another instance (a recycled IP) or
        instance answered)                               session is refused
      per machine: credentials for the instance's
        address, then Agent.start_worker(spec, env) ──> a worker process on agent_port + 1 + k
      handle.address(): Agent.address(worker) ──────>  its announcement (or a BootError quoting
                                                        its last lines)
      output pump: Agent.output(worker) stream ────>  its lines ──> MachineOutput (prefixed)
    heartbeat thread per instance, every keepalive period:
      Agent.heartbeat(lease) ───────────────────────>  holds the agent's lease (lapsed: the agent
        <── worker exit statuses: mark_dead/report_lost   kills its workers and powers off,
        <── a spot interruption notice: the machines      which terminates the instance)
            are reported lost at once, their tasks rerun elsewhere, before the instance goes
      a failed heartbeat or keepalive ──> DeadInstanceMonitor.suspect: batched, rate-limited
        DescribeInstances; a dead instance's machines are reported lost with its state reason
    lease thread: the bigexec-lease-until tag of every live instance, renewed (for ``sweep``)
    an instance whose machines have all ended is terminated; shutdown (and interpreter exit)
    terminates the rest

Nothing in the core knows of EC2: this module implements the ``System``/``MachineHandle``
protocol of ``systems.base`` and ``systems.bootstrap`` with the pieces of this package.
"""

from __future__ import annotations

import atexit
import datetime
import http.client
import importlib.util
import inspect
import logging
import math
import secrets
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

from ... import tls
from ...agent.document import AgentDocument
from ...authority import Authority
from ...errors import BootError, MachineLost, NetworkError, ProtocolError
from ...rpc.client import Client
from ...worker import describe_exit
from ..base import KeepaliveConfig, MachineHandle, System
from ..bootstrap import MachineOutput, WorkerSpec, format_address
from ..code_bundle import CodeBundle
from ..own_wheel import OwnWheel
from .instances import Ec2Instances, InstanceRecord
from .monitor import DeadInstanceMonitor
from .options import Ec2Options
from .user_data import (
    BOOT_FAILED_MARK,
    WANTS_WHEEL_MARK,
    WHEEL_PATH,
    InstallPlan,
    PinnedRequirements,
    Wheelhouse,
    render_user_data,
)

__all__ = ["AGENT_NAME", "Ec2Machine", "Ec2System"]

log = logging.getLogger("bigexec.systems.ec2")

#: The name every agent's certificate carries (its address is unknown when it is issued).
AGENT_NAME = "bigexec-agent"
_SYSTEM_OPTIONS = frozenset(inspect.signature(System.__init__).parameters) - {"self"}
_LEASE_TAG_PERIOD = 60.0  # seconds between renewals of the instances' lease tags
_BOOT_OUTPUT_LINES = 20
_AGENT_POLL = 1.0  # seconds between tries to reach an agent that is not up yet
_DESCRIBE_WHILE_BOOTING = 15.0  # seconds between looks at an instance whose agent is silent
_LAUNCH_LEAF_SLACK = 600.0  # seconds the launch's agent leaf outlives the boot timeout
_EXIT_STATUS_WAIT = 5.0  # seconds a worker whose output ended may take to be reaped


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

    def __init__(self, system: Ec2System, index: int) -> None:
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
        self._instance: _Instance | None = None
        self._worker_id: str | None = None
        self._ended = threading.Event()  # the worker is gone, or the instance is
        self._created = time.monotonic()

    # --- placing the machine (the system's boot thread) ----------------------------------

    def attach(self, instance: _Instance, worker_id: str) -> None:
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
        log.info("ec2: machine %s on %s listening, %.1fs after its start", addr,
                 instance.record.instance_id, time.monotonic() - self._created)
        return str(addr)

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


class _Placement(NamedTuple):
    slot: int
    machine: Ec2Machine
    env: dict[str, str]
    bundle: CodeBundle | None


class _Instance:
    """One launched instance: its agent, its worker slots and machines, its heartbeat."""

    def __init__(self, system: Ec2System, record: InstanceRecord, host: str,
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
        self._pending: list[_Placement] = []  # placed, its worker not asked for yet
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
        self._pending.append(_Placement(slot, machine, env, bundle))
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
        deadline = deadline or time.monotonic() + self.system.boot_timeout
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

    def fail_pending(self, err: BaseException) -> list[Ec2Machine]:
        with self.system.lock:
            pending, self._pending = self._pending, []
        for p in pending:
            p.machine.fail(err)
        return [p.machine for p in pending]

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
                    + "".join(f"    {ln}\n" for ln in lines)).with_traceback(None) from None
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
                    code = statuses.get(m._worker_id) if m._worker_id else None
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


class Ec2System(System):
    """Machines on EC2 instances (see the module's picture): ``procs_per_instance`` worker
    processes on each, started and watched by the instance's agent.

    Options: every ``Ec2Options`` field (also from ``BIGEXEC_EC2_*`` variables), ``install``
    (an ``InstallPlan``: default a ``Wheelhouse`` when ``wheelhouse`` is set, else
    ``PinnedRequirements.from_driver``), ``boot_logs`` and those of every system
    (``boot_timeout``, the keepalive settings, ``cert_lifetime``, ``env_allow``).
    """

    name = "ec2"
    inherits_environment = False  # other hosts: only what env_allow lets through
    default_keepalive = KeepaliveConfig(period=10.0, lease=120.0, timeout=60.0,
                                        rpc_timeout=20.0)
    default_boot_timeout = 600.0

    def __init__(self, *, install: InstallPlan | None = None, boot_logs: bool = False,
                 instances: Ec2Instances | None = None, **options: Any) -> None:
        base = {k: options.pop(k) for k in list(options) if k in _SYSTEM_OPTIONS}
        super().__init__(**base)
        self.options = Ec2Options.from_env(**options)
        if instances is None and importlib.util.find_spec("boto3") is None:
            raise ImportError("the ec2 system calls EC2 through boto3, which is not "
                              "installed: pip install 'bigexec[ec2]'")
        self.instances = instances or Ec2Instances(self.options)
        if install is None:
            install = (Wheelhouse(self.options.wheelhouse) if self.options.wheelhouse
                       else PinnedRequirements.from_driver(self.options.requirements,
                                                           self.options.index_url))
        self.install = install
        self.boot_logs = boot_logs
        #: This driver's session: in every instance's tags and every agent's document.
        self.session_id = f"bx-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"
        self.authority = Authority()  # in memory only: its key never leaves this process
        self.lock = threading.RLock()
        self._instances: dict[str, _Instance] = {}
        self._machines = 0
        self._monitor: DeadInstanceMonitor | None = None
        self._agent_client: Client | None = None
        self._agent_client_until = 0.0
        self._closed = threading.Event()
        threading.Thread(target=self._renew_lease_tags, name="bigexec-ec2-lease",
                         daemon=True).start()
        atexit.register(self.shutdown)

    def credentials_authority(self) -> Authority:
        return self.authority

    # --- what the machines and instances use ---------------------------------------------

    def agent_client(self) -> Client:
        """The driver's client for agents: CA-verified TLS without a name check (an agent's
        certificate names ``AGENT_NAME``; ``Agent.identity`` says which instance answers)."""
        with self.lock:
            now = time.monotonic()
            if self._agent_client is None or now >= self._agent_client_until:
                ctx = tls.client_context(self.authority.issue_driver(ttl=self._ttl()))
                ctx.check_hostname = False
                if self._agent_client is None:
                    self._agent_client = Client(ctx, connect_timeout=10.0)
                else:
                    self._agent_client.ssl_context = ctx
                self._agent_client_until = now + self.renew_after
            return self._agent_client

    def agent_credentials(self, instance_id: str | None) -> tls.Credentials:
        """A server leaf for an agent: of one instance, or (None) of a whole launch's. The
        launch's travels in the user-data, which the account's users may read: it lives
        only as long as a boot may last, since each agent gets its own once it answers."""
        ttl = self._ttl() if instance_id else min(self._ttl(), datetime.timedelta(
            seconds=self.boot_timeout + _LAUNCH_LEAF_SLACK))
        return self.authority.issue(f"agent {instance_id or self.session_id}", ttl,
                                    dns=[AGENT_NAME], usage="server")

    def monitor(self) -> DeadInstanceMonitor:
        with self.lock:
            if self._monitor is None:
                self._monitor = DeadInstanceMonitor(self.instances.describe,
                                                    self._instance_dead)
            return self._monitor

    def _instance_dead(self, instance_id: str, state: str, reason: str) -> None:
        with self.lock:
            instance = self._instances.get(instance_id)
        if instance is not None:
            instance.terminated = True
            instance.stop()
            instance.lose(MachineLost(f"EC2 instance {instance_id} is {state}"
                                      f" ({reason or 'no reason given'})"))

    def machine_ended(self, machine: Ec2Machine) -> None:
        """A machine ended: an instance none of whose machines runs any more is terminated."""
        with self.lock:
            instance = self._instances.get(machine.instance_id or "")
            idle = (instance is not None and not instance.terminated
                    and all(m.ended for m in instance.machines))
            if idle:
                assert instance is not None
                instance.terminated = True
        if idle and instance is not None and not self._closed.is_set():
            instance.stop()
            self._terminate([instance.record.instance_id], "all its machines ended")

    def _terminate(self, ids: Sequence[str], why: str) -> None:
        if not ids:
            return
        try:
            self.instances.terminate(ids)
            log.info("ec2: terminated %s (%s)", " ".join(ids), why)
        except Exception:
            log.exception("ec2: terminating %s failed: bigexec ec2 sweep ends them once "
                          "their lease tag lapses", " ".join(ids))

    # --- System ---------------------------------------------------------------------------

    def start(self, count: int, env: Mapping[str, str]) -> list[MachineHandle]:
        """The machines go to free worker slots of this session's instances first (booted or
        booting); the rest to instances launched for them."""
        if self._closed.is_set():
            raise RuntimeError("the ec2 system was shut down")
        environ = self.machine_environment(env)
        bundle = CodeBundle.of_driver()  # the driver's own modules, as they are now
        ready: list[_Instance] = []
        with self.lock:
            first = self._machines
            self._machines += count
            handles = [Ec2Machine(self, first + i) for i in range(count)]
            rest = list(handles)
            for instance in self._instances.values():
                for slot in instance.free_slots():
                    if not rest:
                        break
                    if instance.place(slot, rest.pop(0), environ, bundle):
                        ready.append(instance)
        for instance in dict.fromkeys(ready):
            threading.Thread(target=instance.start_workers, daemon=True,
                             name=f"bigexec-ec2-place-{instance.record.instance_id}").start()
        if rest:
            threading.Thread(target=self._launch, args=(rest, environ, bundle), daemon=True,
                             name="bigexec-ec2-launch").start()
        return list(handles)

    def _host_of(self, record: InstanceRecord) -> str | None:
        choice = self.options.address
        public = record.public_ip
        if choice == "public" or (choice == "auto" and public):
            return public
        return record.private_ip

    def _launch(self, handles: list[Ec2Machine], env: dict[str, str],
                bundle: CodeBundle | None) -> None:
        t0 = time.monotonic()
        deadline = t0 + self.boot_timeout
        try:
            per = self.instances.procs_per_instance()
            leaf = self.agent_credentials(None)
            document = AgentDocument(session=self.session_id,
                                     lease=self.boot_timeout + self.keepalive.lease,
                                     credentials=leaf, instance_id=None,
                                     port=self.options.agent_port)
            user_data = render_user_data(document.to_json(), self.install)
            log.info("ec2: requesting %d %s instance(s) for %d machine(s)",
                     math.ceil(len(handles) / per), self.options.instance_type, len(handles))
            records = self.instances.launch(self.session_id, len(handles), user_data,
                                            time.time() + self._lease_tag_span())
        except BaseException as exc:
            for h in handles:
                h.fail(BootError(f"no EC2 instance could be launched: {exc}"))
            return
        log.info("ec2: %d instance(s) launched in %.1fs: %s", len(records),
                 time.monotonic() - t0, " ".join(r.instance_id for r in records))
        waiting = list(handles)
        for record in records:
            procs = self.options.procs_per_instance or record.vcpus or per
            host = self._host_of(record)
            if host is None or not waiting:
                self._terminate([record.instance_id], "no address" if waiting else "not used")
                continue
            instance = _Instance(self, record, host, procs)
            with self.lock:
                self._instances[record.instance_id] = instance
                for slot in range(min(procs, len(waiting))):
                    instance.place(slot, waiting.pop(0), env, bundle)
            threading.Thread(target=instance.boot, args=(deadline,), daemon=True,
                             name=f"bigexec-ec2-boot-{record.instance_id}").start()
        for h in waiting:
            h.fail(BootError(f"EC2 launched instances for only {len(handles) - len(waiting)} "
                             f"of {len(handles)} machines (no capacity for the rest)"))

    def start_worker(self, instance: _Instance, p: _Placement) -> None:
        """Ask ``instance``'s agent for the worker of placement ``p``."""
        record = instance.record
        ips = tuple(dict.fromkeys(
            ip for ip in (instance.host, record.private_ip, record.public_ip) if ip))
        identity = self.new_machine_identity()
        creds = self.machine_credentials(identity, ips=ips, dns=())
        spec = WorkerSpec(system=self.name, lease=max(self.keepalive.lease, self.boot_timeout),
                          listen_host="0.0.0.0", advertise_host=instance.host,
                          listen_port=self.options.agent_port + 1 + p.slot, credentials=creds)
        worker_id = instance.call(
            "Agent.start_worker",
            (spec.encode(), p.env, p.bundle.digest if p.bundle is not None else None),
            timeout=30.0)
        p.machine.identity, p.machine.cert_names = identity, (ips, ())
        p.machine.attach(instance, worker_id)

    def boot_failed(self, instance: _Instance, err: BaseException) -> None:
        """``instance`` never came up: its machines fail, and it is terminated."""
        instance.fail_pending(err)
        instance.stop()
        with self.lock:
            already, instance.terminated = instance.terminated, True
        if not already:  # (the session's end may have terminated it already)
            self._terminate([instance.record.instance_id], "its boot failed")

    # --- leases and the end ---------------------------------------------------------------

    def _lease_tag_span(self) -> float:
        return max(self.keepalive.lease, 3 * _LEASE_TAG_PERIOD)

    def _live_ids(self) -> list[str]:
        with self.lock:
            return [i for i, inst in self._instances.items() if not inst.terminated]

    def _renew_lease_tags(self) -> None:
        while not self._closed.wait(_LEASE_TAG_PERIOD):
            ids = self._live_ids()
            if not ids:
                continue
            try:
                self.instances.renew_lease(ids, time.time() + self._lease_tag_span())
            except Exception as exc:
                log.warning("ec2: renewing the lease tags of %d instance(s) failed: %s",
                            len(ids), exc)

    def shutdown(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        atexit.unregister(self.shutdown)
        with self.lock:
            instances = list(self._instances.values())
            live = [i.record.instance_id for i in instances if not i.terminated]
            for i in instances:
                i.terminated = True
        for i in instances:
            i.stop()
        self._terminate(live, "the session ended")
        with self.lock:
            monitor, self._monitor = self._monitor, None
            client = self._agent_client
        if monitor is not None:
            monitor.close()
        if client is not None:
            client.close()

    def instance_ids(self) -> list[str]:
        """The instances this system launched that it has not terminated."""
        return self._live_ids()
