"""bigexec: an ad-hoc cluster of machines from a driver program.

    with bigexec.start("local") as b:
        machines = b.start(4, services={"PI": CirclePI()})
        for m in machines:
            m.wait(bigexec.RUNNING)
        futures = [m.submit("PI.sample", 10**6) for m in machines]
"""

from __future__ import annotations

__version__ = "0.1.0"

from .context import Context
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
from .executor import Executor
from .machine import RUNNING, STARTING, STOPPED, UNSTARTED, Machine, State
from .pool import Pool
from .rpc.wire import Stream
from .session import B, start
from .systems import KeepaliveConfig, MachineHandle, System, register_system

__all__ = [
    "B",
    "BigexecError",
    "BootError",
    "BrokenCluster",
    "Context",
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
    "register_system",
    "start",
]
