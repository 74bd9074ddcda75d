"""The Supervisor: the service every machine runs, registered as ``"Supervisor"``.

The driver uses it to boot a machine (``ping``, ``info``, ``register``), to hold its lease
(``keepalive``), to renew its certificate (``renew_credentials``), to stop it (``shutdown``),
to cancel calls (``cancel``) and to look inside it (``memory``, ``disk``, ``load``,
``metrics``). Its methods are ordinary service methods, so a user can call them too:
``m.call("Supervisor.info")``.
"""

from __future__ import annotations

import os
import platform
import socket
import sys
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

import cloudpickle

from . import __version__, tls
from .rpc import codec

if TYPE_CHECKING:
    from .context import Context
    from .dialer import Dialer
    from .rpc.server import Server
    from .service import ServiceRegistry

__all__ = ["Supervisor", "SupervisedMachine"]


class SupervisedMachine(Protocol):
    """What the Supervisor needs of the machine it runs on (``worker.MachineRuntime`` is it)."""

    system_name: str
    maxprocs: int
    environ: Mapping[str, str]
    registry: ServiceRegistry
    server: Server
    session: Dialer
    keepalives: int
    credential_renewals: int

    def extend_lease(self, lease: float) -> None: ...

    def lease_remaining(self) -> float: ...

    def renew_credentials(self, server: tls.Credentials, client: tls.Credentials) -> None: ...

    def exit(self, code: int) -> None: ...


class Supervisor:
    """Boot, lease, inspection and shutdown of the machine it runs on."""

    def __init__(self, runtime: SupervisedMachine) -> None:
        self._runtime = runtime
        self._booted = time.time()
        self._process: Any = None  # psutil.Process of this machine's process, made once

    # --- boot ---------------------------------------------------------------------------

    def ping(self, seq: int = 0) -> int:
        """Echo ``seq``: the machine is up and serving."""
        return seq

    def info(self) -> dict[str, Any]:
        """What this machine is: Python, platform, process and capacity."""
        return {
            "python_version": platform.python_version(),
            "python_implementation": platform.python_implementation(),
            "version_info": tuple(sys.version_info[:3]),
            "platform": platform.platform(),
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "bigexec_version": __version__,
            "cloudpickle_version": cloudpickle.__version__,
            "cpu_count": os.cpu_count() or 1,
            "maxprocs": self._runtime.maxprocs,
            "booted": self._booted,
            "system": self._runtime.system_name,
        }

    def register(self, name: str, blob: bytes) -> bool:
        """Unpickle a service, register it as ``name`` and run its ``init(b)`` hook.

        Returns False when ``name`` was already registered (nothing is run again).
        """
        registry = self._runtime.registry
        if name in registry.names():
            return False
        service = codec.loads(blob)
        init = getattr(service, "init", None)
        if callable(init):
            init(self._runtime.session)
        registry.add(name, service)
        return True

    def getenv(self, name: str, default: str | None = None) -> str | None:
        """The machine's value of environment variable ``name``."""
        return self._runtime.environ.get(name, default)

    # --- lease --------------------------------------------------------------------------

    def keepalive(self, lease: float) -> dict[str, Any]:
        """Extend this machine's life by ``lease`` seconds from now.

        A machine whose lease lapses exits on its own: no worker outlives its driver.
        """
        self._runtime.extend_lease(lease)
        return {"next": lease}

    def renew_credentials(self, pem: bytes) -> bool:
        """Use the credentials in ``pem`` (``tls.machine_credentials_to_pem``: the server's,
        then the client's) for new connections, served and made; the driver sends them before
        the old ones expire."""
        self._runtime.renew_credentials(*tls.machine_credentials_from_pem(pem))
        return True

    def shutdown(self, delay: float = 0.0, message: str = "") -> None:
        """Exit the machine ``delay`` seconds after replying, printing ``message`` last."""
        def later() -> None:
            time.sleep(delay)
            try:
                if message:
                    print(message, flush=True)
            except (OSError, ValueError):  # nobody is reading any more
                pass
            finally:
                self._runtime.exit(0)
        threading.Thread(target=later, name="bigexec-shutdown", daemon=True).start()

    def cancel(self, call_id: str) -> bool:
        """Cancel the running call ``call_id``: its ``ctx`` reports cancelled."""
        return self._runtime.server.cancel(call_id)

    # --- inspection ---------------------------------------------------------------------

    def memory(self) -> dict[str, Any]:
        import psutil  # here, not at the top: every machine's boot would pay for it

        vm = psutil.virtual_memory()
        rss = psutil.Process().memory_info().rss
        return {"total": vm.total, "available": vm.available, "used": vm.used,
                "percent": vm.percent, "process_rss": rss}

    def disk(self, path: str | None = None) -> dict[str, Any]:
        import tempfile

        import psutil

        du = psutil.disk_usage(path or tempfile.gettempdir())
        return {"path": path or tempfile.gettempdir(), "total": du.total, "used": du.used,
                "free": du.free, "percent": du.percent}

    def process(self) -> dict[str, Any]:
        """This machine's own process: CPU seconds used so far (user + system, all threads),
        resident memory, threads. The driver turns successive readings into CPU %."""
        import psutil

        if self._process is None:
            self._process = psutil.Process()
        with self._process.oneshot():
            cpu = self._process.cpu_times()
            return {"pid": self._process.pid, "cpu_seconds": cpu.user + cpu.system,
                    "rss": self._process.memory_info().rss,
                    "threads": self._process.num_threads(), "time": time.time()}

    def load(self) -> dict[str, float]:
        one, five, fifteen = os.getloadavg()
        return {"load1": one, "load5": five, "load15": fifteen}

    def metrics(self) -> dict[str, Any]:
        """A snapshot of this machine's counters: RPC per method (served and made), calls
        running, lease, and whatever its services report (``_bigexec_metrics()``)."""
        rt = self._runtime
        services: dict[str, Any] = {}
        for name in rt.registry.names():
            report = getattr(rt.registry.get(name), "_bigexec_metrics", None)
            if callable(report):
                try:
                    services[name] = report()
                except Exception as exc:  # a broken report must not hide the others
                    services[name] = {"error": repr(exc)}
        served = rt.server.stats.snapshot()
        return {
            "uptime": time.time() - self._booted,
            "lease_remaining": rt.lease_remaining(),
            "keepalives": rt.keepalives,
            "credential_renewals": rt.credential_renewals,
            "running_calls": rt.server.running_calls(),
            "rpc": {"served": served, "served_total": rt.server.stats.totals(),
                    "made": rt.session.client.stats.snapshot()},
            "services": services,
        }

    def status(self) -> dict[str, Any]:
        """Everything the driver's status page shows of this machine, in one call."""
        out: dict[str, Any] = {"info": self.info(), "metrics": self.metrics()}
        for name in ("memory", "disk", "load", "process"):
            try:
                out[name] = getattr(self, name)()
            except Exception as exc:
                out[name] = {"error": repr(exc)}
        return out

    # --- profiling ----------------------------------------------------------------------

    def profile(self, seconds: float = 30.0, builtins: bool = True,
                ctx: Context | None = None) -> bytes:
        """Profile this machine with yappi (CPU clock, all threads) for ``seconds``; return
        the profile in ``pstats`` format. ``builtins`` keeps C functions (lock methods among
        them) as entries of their own, as cProfile does."""
        from . import profiling

        return profiling.cpu_profile(seconds, builtins=builtins,
                                     stop=ctx.cancel_event if ctx is not None else None)

    def sample(self, seconds: float = 30.0, ctx: Context | None = None) -> dict[str, int]:
        """Sample this machine's on-CPU stacks for ``seconds``: collapsed stack -> count."""
        from . import profiling

        return profiling.sample_stacks(seconds, stop=ctx.cancel_event if ctx is not None else None)

    def threads(self) -> str:
        """The stacks of every thread of this machine's process, as text."""
        from . import profiling

        return profiling.thread_stacks()
