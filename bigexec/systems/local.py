"""The ``local`` system: each machine is a ``python -m bigexec.worker`` process on this host.

    driver                                   worker process
    ──────                                   ──────────────
    WorkerChild (Popen) ─────── stdin ─────> its WorkerSpec (``systems.bootstrap``: settings,
                                             credentials, the driver's versions), then
                                             nothing: stdin stays open as a lifeline
    address(): announcement <── announce_fd: "bigexec-worker-listening https://HOST:PORT"
    output thread        <──── stdout+stderr, line by line ──> MachineOutput: the driver's
                                  stderr, prefixed (through ``logsink``: a stderr nobody
                                  reads never blocks it)
    waiter thread: process exit ──> what is left of its process group is killed, then
                   mark_dead and report_lost: machine STOPPED at once, err says how it
                   died (a lapsed lease, a signal, a status)

This module is the bootstrap protocol's reference implementation: a new system does what it
does, its own way, and nothing else in bigexec changes. The child process itself (its start,
pipes, group, lifeline and exit) is ``systems.worker_child``'s, shared with the ec2 agent;
what is here is what a machine of the driver makes of it.

The worker binds port 0 and reports the port back, so there is no free-port race. Its stdin
stays open for as long as the driver holds the machine: when the driver dies, however it
dies, the worker reads EOF and exits at once, without waiting for its lease to lapse (the
lease still ends a worker whose driver hangs). Forked children of the driver let go of
their copies, so they do not keep it alive. It gets the driver's ``sys.path`` (through
``PYTHONPATH``) so the user's modules import, and the driver's working directory. It never
re-runs the user's ``__main__``. Credentials travel on stdin, so no key touches the disk (see
``bigexec.tls`` for how ``ssl`` loads them). A worker inherits the driver's whole environment,
as any child process does (``System.inherits_environment``): it runs as the same user on the
same host, so it could read it anyway, and services read it through ``Supervisor.getenv``.
Lines the worker prints before it listens (interpreter start-up) are boot noise: they are held
back, and shown only if the machine fails to boot or ``boot_logs=True``. A worker that dies
before it listens fails its machine with a ``BootError`` that quotes its last output lines
(a crash's traceback ends there), at the first failure, whether the driver noticed through
the address pipe or through the process's exit.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

from ..authority import Authority
from ..errors import BootError, MachineLost
from ..worker import describe_exit
from .base import KeepaliveConfig, MachineHandle, System
from .bootstrap import MachineOutput, WorkerSpec
from .worker_child import NoAnnouncement, WorkerChild

__all__ = ["LocalSystem"]

_SHOW_BOOT_LOGS_AFTER = 5  # consecutive boot failures
_BOOT_OUTPUT_LINES = 20  # of a worker that failed to boot, quoted in its BootError


class _LocalHandle(MachineHandle):
    def __init__(self, child: WorkerChild, boot_logs: bool, system: LocalSystem) -> None:
        super().__init__()
        self._system = system
        self.child = child
        self.maxprocs = 1
        self._addr: str | None = None
        self.output = MachineOutput(f"pid {child.pid}", show_boot=boot_logs,
                                    keep=_BOOT_OUTPUT_LINES)
        # Always drain, or a chatty worker blocks on a full pipe.
        child.watch(self.output.pump, self._exited)

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.child.process

    def log_label(self, label: str) -> None:
        self.output.label = label

    def address(self, timeout: float) -> str:
        if self._addr is not None:
            return self._addr
        try:
            addr = self._read_announcement(timeout)
        except BootError:
            self._system.boot_failures += 1
            raise
        self._system.boot_failures = 0
        return addr

    def _read_announcement(self, timeout: float) -> str:
        try:
            addr = self.child.announcement(timeout)
        except TimeoutError:
            self.kill()
            raise self._boot_error(f"did not listen within {timeout}s") from None
        except NoAnnouncement as no:
            if no.closed:
                code = self.child.wait(5.0)
                self.output.wait_ended(5.0)
                raise self._boot_error(f"{describe_exit(code)} before it listened") from None
            self.kill()
            raise self._boot_error(f"announced no address but {no.text[:80]!r}") from None
        self._addr = addr
        self.output.mark_listening(addr.split("://", 1)[-1])
        return addr

    def _boot_error(self, what: str) -> BootError:
        return self.output.boot_error(f"pid {self.child.pid}", what)

    def _exit_reason(self, code: int | None) -> BaseException:
        if not self.output.listening:
            return self._boot_error(f"{describe_exit(code)} before it listened")
        lease = self._system.keepalive.lease
        return MachineLost(f"machine {self.output.label} {describe_exit(code, lease)}")

    def _exited(self, code: int) -> None:
        # (the child swept its process group and closed the lifeline already)
        if not self.output.listening:
            self.output.wait_ended(1.0)  # its last lines say why
        self.mark_dead(self._exit_reason(code))  # died() knows from now on
        self.output.wait_ended(10.0)  # the last lines first, then the news
        self.output.flush(1.0)  # unless stderr is stuck
        self.report_lost(self._exit_reason(code))
        self._system._forget(self)  # gone: nothing is left for the system to end

    def kill(self) -> None:
        # the worker leads its own group: this ends what its tasks started too
        self.child.kill()

    def wait_stopped(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        if self.child.wait(timeout) is None:
            return False
        ended = self.output.wait_ended(max(0.0, deadline - time.monotonic()))
        self.output.flush(max(0.0, min(1.0, deadline - time.monotonic())))
        return ended


class LocalSystem(System):
    """Machines as worker processes on this host, over mutual TLS.

    Options: ``python`` (interpreter, default ``sys.executable``), ``boot_logs`` (show worker
    start-up output), ``authority`` (path of a persistent CA file; default: in memory only),
    ``host`` (the IP address workers listen on and are reached at, default 127.0.0.1: another
    address of this host, or one in a network namespace that ``python`` enters), and those
    of every system (``cert_lifetime``, ``keepalive``, ``boot_timeout``, ...).
    """

    name = "local"
    inherits_environment = True  # a child process, as this user, on this host
    default_keepalive = KeepaliveConfig(period=5.0, lease=60.0, timeout=30.0, rpc_timeout=10.0)
    default_boot_timeout = 60.0

    def __init__(self, *, python: str | None = None, boot_logs: bool = False,
                 authority: str | None = None, host: str = "127.0.0.1",
                 **options: Any) -> None:
        super().__init__(**options)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"host must be an IP address of this host, not {host!r}") from None
        self.host = host
        self.python = python or sys.executable
        self.boot_logs = boot_logs or os.environ.get("BIGEXEC_BOOT_LOGS") == "1"
        self.authority = Authority(authority)
        self._handles: list[_LocalHandle] = []  # of machines not yet exited
        self._handles_lock = threading.Lock()
        #: Boots that failed in a row; past a few, workers' start-up output is shown.
        self.boot_failures = 0

    def credentials_authority(self) -> Authority:
        return self.authority

    def _cert_names(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """What a worker's server certificate names: its address (and localhost on loopback)."""
        loopback = ipaddress.ip_address(self.host).is_loopback
        return (self.host,), (("localhost",) if loopback else ())

    def _environment(self, env: Mapping[str, str]) -> dict[str, str]:
        environ = self.machine_environment(env)
        path = [os.getcwd() if p == "" else p for p in sys.path]
        if environ.get("PYTHONPATH"):
            path.append(environ["PYTHONPATH"])
        # (WorkerChild adds BIGEXEC_SYSTEM, what bigexec.start() picks in a service)
        environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in path if p))
        return environ

    def start(self, count: int, env: Mapping[str, str]) -> list[MachineHandle]:
        handles: list[MachineHandle] = []
        for _ in range(count):
            identity = self.new_machine_identity()
            names = self._cert_names()
            creds = self.machine_credentials(identity, ips=names[0], dns=names[1])
            assert creds is not None
            spec = WorkerSpec(system=self.name,
                              lease=max(self.keepalive.lease, self.boot_timeout),
                              listen_host=self.host, credentials=creds)
            child = WorkerChild(spec, python=self.python, env=self._environment(env), name="local")
            # Boot noise is shown when asked for, or when boots keep failing.
            show = self.boot_logs or self.boot_failures >= _SHOW_BOOT_LOGS_AFTER
            handle = _LocalHandle(child, show, self)
            handle.identity = identity
            handle.cert_names = names
            handles.append(handle)
            with self._handles_lock:
                self._handles.append(handle)
        return handles

    def kill(self, machine: Any) -> None:
        """SIGKILL a machine's process (for tests of failure handling)."""
        machine.handle.kill()

    def _forget(self, handle: _LocalHandle) -> None:
        with self._handles_lock:
            if handle in self._handles:
                self._handles.remove(handle)

    def shutdown(self) -> None:
        with self._handles_lock:
            handles, self._handles = self._handles, []
        for h in handles:
            h.kill()
