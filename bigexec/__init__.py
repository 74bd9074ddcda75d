"""bigexec: an ad-hoc cluster of machines from a driver program.

    with bigexec.start("local") as b:
        machines = b.start(4, services={"PI": CirclePI()})
        for m in machines:
            m.wait(bigexec.RUNNING)
        futures = [m.submit("PI.sample", 10**6) for m in machines]
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from .context import Context
from .dialer import Dialer
from .errors import (
    BigexecError,
    BootError,
    BrokenCluster,
    MachineLost,
    MachineStopped,
    NetworkError,
    ProtocolError,
    RemoteError,
    UnknownMethodError,
    WorkerLostError,
)
from .machine import RUNNING, STARTING, STOPPED, UNSTARTED, Machine, State
from .progress import progress
from .rpc.wire import Stream
from .session import B, start
from .systems import KeepaliveConfig, MachineHandle, System, register_system

# A library leaves output to the application: without logging set up, bigexec's records go
# nowhere rather than to logging's last-resort stderr handler.
logging.getLogger(__name__).addHandler(logging.NullHandler())

if TYPE_CHECKING:
    from .executor import Executor
    from .pool import Pool


def __getattr__(name: str) -> Any:
    # Executor and Pool load on first use: a worker process imports this package too, and
    # their modules (multiprocessing.pool among them) would only slow every machine's boot.
    if name == "Executor":
        from .executor import Executor
        return Executor
    if name == "Pool":
        from .pool import Pool
        return Pool
    raise AttributeError(f"module 'bigexec' has no attribute {name!r}")


__all__ = [
    "B",
    "BigexecError",
    "BootError",
    "BrokenCluster",
    "Context",
    "Dialer",
    "Executor",
    "KeepaliveConfig",
    "Machine",
    "MachineHandle",
    "MachineLost",
    "MachineStopped",
    "NetworkError",
    "Pool",
    "ProtocolError",
    "RUNNING",
    "RemoteError",
    "STARTING",
    "STOPPED",
    "State",
    "Stream",
    "System",
    "UNSTARTED",
    "UnknownMethodError",
    "WorkerLostError",
    "__version__",
    "progress",
    "register_system",
    "start",
]
