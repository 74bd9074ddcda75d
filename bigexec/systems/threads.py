"""The ``threads`` system: machines that live in the driver's process, for unit tests.

Each machine is a full ``MachineRuntime`` (server, Supervisor, lease, watchdog) on a loopback
port, reached over the same RPC path as any other machine, so services, arguments and replies
are still pickled: code that works here does not break on ``local`` because something was not
picklable. The watchdog never exits the test process: a machine's ``exit`` only closes its
server. ``kill(machine)`` makes a machine vanish as a crash would; ``kill(machine, hang=True)``
makes it stop answering while its connections stay open, as a hung or partitioned host would.

Machines share the process, so ``env`` is not put into ``os.environ``: each machine sees it
through ``Supervisor.getenv`` (an overlay on the process environment).

A machine's port is open to every local user, and what it receives is unpickled in this
process. So machines speak mutual TLS with a CA that lives in this session's memory, as on
``local``: only the driver and the session's machines hold certificates it accepts.
``tls=False`` serves plain HTTP instead and is unsafe: anyone who can reach the port can
run code in the test process. Use it only on a host where every local user is trusted.
"""

from __future__ import annotations

import os
import threading
from collections import ChainMap
from collections.abc import Mapping
from typing import Any

from .. import logs
from ..errors import MachineLost
from ..worker import MachineRuntime, describe_exit
from .base import KeepaliveConfig, MachineHandle, System
from .bootstrap import WorkerSpec

__all__ = ["ThreadsSystem"]


class _ThreadHandle(MachineHandle):
    """A machine of this process. Once its runtime has exited the handle lets go of it, so
    that a retired machine's server, services and threads can be collected."""

    def __init__(self, runtime: MachineRuntime, maxprocs: int, lease: float) -> None:
        super().__init__()
        self.runtime: MachineRuntime | None = runtime
        self.addr = runtime.addr
        self.maxprocs = maxprocs
        self.lease = lease  # the keepalive lease, for the words of a lapse
        self.exit_code: int | None = None
        self.killed = False

    def address(self, timeout: float) -> str:
        return self.addr

    def died(self, grace: float = 0.0) -> BaseException | None:
        # A machine of this process is known dead the moment its runtime begins to exit,
        # before its server drops the connections that a call then fails on: ask the runtime,
        # and never sit out ``grace`` for word that is not in flight.
        known = super().died(0.0)
        if known is not None:
            return known
        runtime = self.runtime
        if runtime is not None and runtime.stopped:
            return self._why(runtime.exit_code)
        return None

    def _why(self, code: int | None) -> MachineLost:
        what = "was killed" if self.killed else describe_exit(code, self.lease)
        return MachineLost(f"machine {self.addr} {what}")

    def exited(self, code: int) -> None:
        """The machine's runtime exited with ``code`` (its ``exit``, called by itself, by
        its lease, or by ``kill``)."""
        self.exit_code = code
        self.runtime = None  # it has stopped serving: nothing of it is needed any more
        self.report_lost(self._why(code))

    def kill(self) -> None:
        runtime = self.runtime
        if runtime is None or runtime.stopped:
            return
        self.killed = True
        runtime.exit(-9)

    def wait_stopped(self, timeout: float) -> bool:
        runtime = self.runtime
        return runtime is None or runtime.wait(timeout)


class ThreadsSystem(System):
    """In-process machines. Options: ``maxprocs`` (default 1); ``tls`` (default True;
    ``tls=False`` is unsafe, see the module's doc); ``authority`` (path of a persistent CA file,
    for sessions that dial each other's machines; default: in memory only)."""

    name = "threads"
    inherits_environment = True  # machines live in this very process
    default_keepalive = KeepaliveConfig(period=1.0, lease=30.0, timeout=5.0, rpc_timeout=2.0)
    default_boot_timeout = 30.0

    def __init__(self, *, tls: bool = True, maxprocs: int = 1, authority: str | None = None,
                 **options: Any) -> None:
        super().__init__(**options)
        if maxprocs < 1:
            raise ValueError("maxprocs must be at least 1")
        self.maxprocs = maxprocs
        self.tls = tls
        self._authority: Any = None
        self._handles: list[_ThreadHandle] = []  # of machines whose runtime still runs
        self._handles_lock = threading.Lock()
        if authority is not None and not tls:
            raise ValueError("authority= is for TLS: it cannot go with tls=False")
        if tls:
            from ..authority import Authority

            self._authority = Authority(authority)

    def credentials_authority(self) -> Any:
        return self._authority

    def start(self, count: int, env: Mapping[str, str]) -> list[MachineHandle]:
        logs.install_machine_marker()
        handles: list[MachineHandle] = []
        for _ in range(count):
            identity = creds = None
            if self._authority is not None:
                identity = self.new_machine_identity()
                creds = self.machine_credentials(identity)
            # The bootstrap protocol's spec, handed over in memory: no process to cross.
            spec = WorkerSpec(system=self.name,
                              lease=max(self.keepalive.lease, self.boot_timeout),
                              maxprocs=self.maxprocs, credentials=creds)
            holder: list[_ThreadHandle] = []

            def exit_fn(code: int, h: list[_ThreadHandle] = holder) -> None:
                self._exited(h[0], code)

            runtime = MachineRuntime.from_spec(
                spec,
                exit=exit_fn,
                # machine_environment's policy as an overlay, not a copy: the machine shares
                # this process's environment and sees its later changes.
                environ=ChainMap(dict(env), os.environ),
                mark_logs=True,  # machines share our log handlers: say whose records are whose
            )
            handle = _ThreadHandle(runtime, self.maxprocs, self.keepalive.lease)
            handle.identity = identity
            holder.append(handle)
            runtime.start()
            handles.append(handle)
            with self._handles_lock:
                self._handles.append(handle)
        return handles

    def _exited(self, handle: _ThreadHandle, code: int) -> None:
        with self._handles_lock:
            if handle in self._handles:
                self._handles.remove(handle)
        handle.exited(code)

    def kill(self, machine: Any, *, hang: bool = False) -> None:
        """Make ``machine`` vanish as a crashed machine would (``hang``: stop answering)."""
        handle = machine.handle
        if not isinstance(handle, _ThreadHandle):
            raise ValueError(f"{machine!r} is not a machine of this threads system")
        runtime = handle.runtime
        if hang and runtime is not None:
            runtime.server.freeze()
        else:
            handle.kill()

    def shutdown(self) -> None:
        with self._handles_lock:
            handles = list(self._handles)
        for h in handles:
            runtime = h.runtime
            if runtime is not None and not runtime.stopped:
                h.expect_exit()
                runtime.exit(0)
