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

Nothing in the core knows of EC2: this module and ``instance`` (an instance's agent and its
machines) implement the ``System``/``MachineHandle`` protocol of ``systems.base`` and
``systems.bootstrap`` with the pieces of this package.
"""

from __future__ import annotations

import atexit
import datetime
import importlib.util
import inspect
import logging
import math
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ... import tls
from ...agent.document import AgentDocument
from ...authority import Authority
from ...errors import BootError, MachineLost
from ...rpc.client import Client
from ..base import KeepaliveConfig, MachineHandle, System
from ..bootstrap import WorkerSpec
from ..code_bundle import CodeBundle
from .instance import Ec2Machine, InstanceAgent, Placement
from .instances import Ec2Instances, InstanceRecord
from .monitor import DeadInstanceMonitor
from .options import Ec2Options
from .user_data import InstallPlan, PinnedRequirements, Wheelhouse, render_user_data

__all__ = ["AGENT_NAME", "Ec2Machine", "Ec2System"]

log = logging.getLogger("bigexec.systems.ec2")

#: The name every agent's certificate carries (its address is unknown when it is issued).
AGENT_NAME = "bigexec-agent"
_SYSTEM_OPTIONS = frozenset(inspect.signature(System.__init__).parameters) - {"self"}
_LEASE_TAG_PERIOD = 60.0  # seconds between renewals of the instances' lease tags
_LAUNCH_LEAF_SLACK = 600.0  # seconds the launch's agent leaf outlives the boot timeout


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
        self._instances: dict[str, InstanceAgent] = {}
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
        ready: list[InstanceAgent] = []
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
            instance = InstanceAgent(self, record, host, procs)
            with self.lock:
                self._instances[record.instance_id] = instance
                for slot in range(min(procs, len(waiting))):
                    instance.place(slot, waiting.pop(0), env, bundle)
            threading.Thread(target=instance.boot, args=(deadline,), daemon=True,
                             name=f"bigexec-ec2-boot-{record.instance_id}").start()
        for h in waiting:
            h.fail(BootError(f"EC2 launched instances for only {len(handles) - len(waiting)} "
                             f"of {len(handles)} machines (no capacity for the rest)"))

    def start_worker(self, instance: InstanceAgent, p: Placement) -> None:
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

    def boot_failed(self, instance: InstanceAgent, err: BaseException) -> None:
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
