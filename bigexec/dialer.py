"""Dialers: what reaches machines it does not own. The base of every session.

    Dialer ── dial(addr) ──> Machine (not owned: no lease, pinged to notice it going away)
      ├── Client: connection pools, shared by every machine it reaches
      └── CallPool: the threads that run ``Machine.submit`` calls

A machine's services get one (``init(b)``, ``ctx.b``): it can call the other machines of the
cluster (``b.dial(m.addr)``) but owns nothing, so it cannot start machines. The driver's
session, ``B`` (``bigexec.session``), is a dialer that also starts and owns machines on a
system.
"""

from __future__ import annotations

import ssl
import threading
from typing import Any

from .callpool import CallPool
from .machine import STOPPED, Machine
from .rpc.client import Client
from .systems.base import KeepaliveConfig, System

__all__ = ["DIAL_BOOT_TIMEOUT", "Dialer"]

#: How long a dialed machine may take to answer its first ping, without a system to say.
DIAL_BOOT_TIMEOUT = 60.0


class Dialer:
    """Reaches machines by address over ``client_ssl`` (None: plain TCP); owns none of them.

    A context manager; leaving the block shuts it down (forgets the machines it dialed).
    """

    #: Liveness settings of the pings to dialed machines.
    keepalive: KeepaliveConfig = KeepaliveConfig()

    def __init__(self, client_ssl: ssl.SSLContext | None = None) -> None:
        self._client = Client(client_ssl)
        self._call_pool = CallPool()
        self._dial_lock = threading.Lock()
        self._dialed: dict[str, Machine] = {}
        self._shut = False

    @property
    def system(self) -> System | None:
        """The system this dialer starts machines on: None, it starts none."""
        return None

    @property
    def client(self) -> Client:
        """The RPC client the machines reached through this share (its ``stats`` count every
        call)."""
        return self._client

    @property
    def call_pool(self) -> CallPool:
        """The threads that run ``Machine.submit`` calls of these machines."""
        return self._call_pool

    @property
    def closed(self) -> bool:
        """Whether ``shutdown`` has begun."""
        return self._shut

    @property
    def max_concurrent_calls(self) -> int:
        """How many ``Machine.submit`` calls run at once (default 32); more wait their turn,
        in order. Calls that wait for one another (a barrier) need at least as many.
        Settable."""
        return self._call_pool.max_threads

    @max_concurrent_calls.setter
    def max_concurrent_calls(self, n: int) -> None:
        self._call_pool.max_threads = n

    def renew_client_ssl(self, ctx: ssl.SSLContext | None = None) -> None:
        """Use ``ctx`` for new connections (pooled ones stay as they are); without one,
        nothing changes (a session that holds a system renews from it: see ``B``)."""
        if ctx is not None:
            self._client.ssl_context = ctx

    def __enter__(self) -> Dialer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} dialed={len(self.dialed_machines())}>"

    def dial(self, addr: str) -> Machine:
        """A machine this session does not own, at ``addr`` (e.g. ``m.addr`` of another).

        No lease is held on it and ``shutdown`` leaves it running; it is pinged to notice
        when it goes away.
        """
        if self._shut:
            raise RuntimeError("this bigexec session is shut down")
        with self._dial_lock:
            m = self._dialed.get(addr)
            if m is not None and m.state < STOPPED:
                return m
            m = self._dialed[addr] = Machine(self, owned=False, addr=addr)
        system = self.system
        m.start_boot(system.boot_timeout if system is not None else DIAL_BOOT_TIMEOUT)
        return m

    def dialed_machines(self) -> list[Machine]:
        """The machines ``dial`` gave, the stopped among them included."""
        with self._dial_lock:
            return list(self._dialed.values())

    def known_machines(self) -> list[Machine]:
        """Every machine this tracks: here, the dialed ones."""
        return self.dialed_machines()

    def shutdown(self, timeout: float = 20.0) -> None:
        """Forget the dialed machines (never stopped: they are not ours) and close the
        connections. Idempotent."""
        if self._begin_shutdown():
            self._let_go()

    def _begin_shutdown(self) -> bool:
        """Mark this shut down; False if it was already."""
        with self._dial_lock:
            if self._shut:
                return False
            self._shut = True
            return True

    def _let_go(self) -> None:
        """Forget the dialed machines, close the client and the call pool."""
        for m in self.dialed_machines():
            m.shutdown()  # a dialed machine is only let go of
        self._client.close()
        self._call_pool.close()
