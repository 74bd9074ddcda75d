"""Sessions: ``B`` owns the machines it starts on one system.

    driver program ── bigexec.start(system) ──> B ── system.start(n) ──> MachineHandles
                                                │
                                                ├── per machine: boot thread, keepalive thread
                                                ├── Client: connection pools, shared by all
                                                └── call pool: threads that run ``submit``s

``B`` is a ``Dialer`` (``bigexec.dialer``: reaching machines by address) that also starts and
owns machines. Several sessions may live in one process. Every session still open at
interpreter exit is shut down by an ``atexit`` hook, so a driver that forgets ``shutdown``
leaves no worker behind. What observes a session (the status views of ``bigexec.observe``, a
debug server) depends on it, never the other way: a debug server closes with its session
through ``on_shutdown``.
"""

from __future__ import annotations

import atexit
import logging
import os
import pstats
import ssl
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .config import load_config
from .dialer import Dialer
from .machine import STOPPED, Machine
from .rpc import codec
from .systems import KeepaliveConfig, System, make_system

__all__ = ["B", "start"]

log = logging.getLogger("bigexec")

#: How many stopped machines a session keeps for its status page.
STOPPED_MACHINES_KEPT = 16


_sessions: weakref.WeakSet[B] = weakref.WeakSet()


def _forget_sessions_in_child() -> None:
    # A forked child (a multiprocessing worker, say) inherits the parent's sessions as copies:
    # they are not its own to shut down at exit.
    _sessions.clear()


os.register_at_fork(after_in_child=_forget_sessions_in_child)


@atexit.register
def _shutdown_all() -> None:
    for b in list(_sessions):
        try:
            b.shutdown()
        except Exception:
            log.exception("shutting down a bigexec session at exit failed")


class B(Dialer):
    """A cluster session on one system. Use ``bigexec.start`` to make one.

    ``B`` is a context manager; leaving the block shuts it down.
    """

    def __init__(self, system: System) -> None:
        super().__init__(system.client_ssl())
        self._system = system
        #: Liveness settings for this session's machines.
        self.keepalive: KeepaliveConfig = system.keepalive
        self._lock = threading.Lock()
        self._owned: list[Machine] = []  # started and not yet stopped
        # The last few owned machines that stopped, for the status page (why they stopped);
        # older ones are let go, so that a pool replacing machines does not grow.
        self._stopped: deque[Machine] = deque(maxlen=STOPPED_MACHINES_KEPT)
        #: Named callables whose dicts join the driver's metrics (the schedulers add theirs).
        self._metric_sources: dict[str, Callable[[], dict[str, Any]]] = {}
        self._shutdown_hooks: list[Callable[[], Any]] = []
        _sessions.add(self)

    @property
    def system(self) -> System:
        """The system this session starts its machines on."""
        return self._system

    def renew_client_ssl(self, ctx: ssl.SSLContext | None = None) -> None:
        """Use ``ctx`` for the session's new connections (pooled ones stay as they are).

        Without ``ctx``: the system's current driver context, renewed when its certificate
        is due (see ``System.client_ssl``); the keepalive threads call this as they go.
        """
        super().renew_client_ssl(ctx if ctx is not None else self._system.client_ssl())

    def __repr__(self) -> str:
        return f"<B {self._system.name} machines={len(self._owned)}>"

    def __enter__(self) -> B:
        return self

    # --- machines ------------------------------------------------------------------------

    def start(self, n: int, services: Mapping[str, Any] | None = None,
              env: Mapping[str, str] | None = None) -> list[Machine]:
        """Start ``n`` machines running ``services`` (name -> object), with extra ``env``.

        Returns at once; the machines boot in the background (``m.wait(RUNNING)``, or for a
        progress bar over all of them ``bigexec.progress(machines).wait()``). Every
        service is pickled first, so an unpicklable one raises ``TypeError`` here and no
        machine is started.
        """
        if self.closed:
            raise RuntimeError("this bigexec session is shut down")
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"the number of machines must be a positive int, not {n!r}")
        blobs: list[tuple[str, bytes]] = []
        for name, service in (services or {}).items():
            if not isinstance(name, str) or not name.isidentifier() or name == "Supervisor":
                raise ValueError(f"bad service name {name!r}: use an identifier other than "
                                 f"'Supervisor'")
            try:
                blobs.append((name, codec.dumps_bytes(service)))
            except codec.EncodeError as exc:
                raise TypeError(f"service {name!r} cannot be pickled: {exc}") from exc
        env = dict(env or {})
        for k, v in env.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError("env must map str to str")
        self.renew_client_ssl()  # a driver idle for days still reaches new machines
        handles = self._system.start(n, env)
        machines = [Machine(self, owned=True, handle=h, services=blobs) for h in handles]
        with self._lock:
            closed = self.closed
            if not closed:
                self._owned.extend(machines)
        if closed:  # shut down while we were starting them: they must not live on
            for h in handles:
                h.kill()
            raise RuntimeError("this bigexec session is shut down")
        for m in machines:
            m.on_stop(self._forget)
            m.start_boot(self._system.boot_timeout)
        return machines

    def _forget(self, m: Machine) -> None:
        """An owned machine stopped: keep it among the recently stopped only."""
        with self._lock:
            if m in self._owned:
                self._owned.remove(m)
                self._stopped.append(m)

    def machines(self) -> list[Machine]:
        """The machines this session started that have not stopped."""
        with self._lock:
            return [m for m in self._owned if m.state < STOPPED]

    def known_machines(self) -> list[Machine]:
        """Every machine the session tracks: those it started that have not stopped, the
        last ``STOPPED_MACHINES_KEPT`` that did (their ``err`` says why), and the dialed."""
        with self._lock:
            mine = list(self._stopped) + list(self._owned)
        return mine + self.dialed_machines()

    def add_metrics_source(self, name: str, source: Callable[[], dict[str, Any]]) -> None:
        """Have ``source()``'s dict appear under ``name`` in the driver's ``metrics()``."""
        with self._lock:
            self._metric_sources[name] = source

    def remove_metrics_source(self, name: str) -> None:
        with self._lock:
            self._metric_sources.pop(name, None)

    def metrics_sources(self) -> dict[str, Callable[[], dict[str, Any]]]:
        """The sources ``add_metrics_source`` gave, by name (a copy)."""
        with self._lock:
            return dict(self._metric_sources)

    def on_shutdown(self, callback: Callable[[], Any]) -> None:
        """Have ``callback()`` called as the session shuts down, before its machines stop
        (what observes the session, a debug server, ends with it)."""
        with self._lock:
            if not self.closed:
                self._shutdown_hooks.append(callback)
                return
        callback()

    # --- looking inside ------------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        """One dict per machine: state, address, uptime, keepalives, memory, disk, load,
        tasks, RPC counts, and why stopped machines stopped."""
        from . import observe  # here: a worker, which imports this module, never needs it

        return observe.status(self)

    def metrics(self) -> dict[str, Any]:
        """Counters of the driver and of every running machine, and their totals."""
        from . import observe  # here: a worker, which imports this module, never needs it

        return observe.metrics(self)

    def profile(self, seconds: float = 30.0, machines: list[Machine] | None = None,
                include_driver: bool = False) -> pstats.Stats:
        """Profile the machines (default: all running ones) with yappi for ``seconds`` and
        merge their profiles into one ``pstats.Stats``; ``include_driver`` adds this process.
        """
        from . import observe  # here: a worker, which imports this module, never needs it

        return observe.profile(self, seconds, machines, include_driver)

    def serve_debug(self, port: int = 3333, host: str = "127.0.0.1",
                    allow_remote: bool = False) -> Any:
        """Start the debug HTTP server (status page, profiles, metrics, stacks) and return it;
        its ``url`` says where, and its ``login_url`` carries its ``token``: every page needs
        the token when the server is reachable from other hosts, and profiles do for
        loopback clients of another user. Loopback only unless ``allow_remote``; port 0
        picks one. Called again, returns the same server; it closes as the session shuts
        down."""
        from . import debug  # here: the HTTP server's modules are not every worker's to load

        return debug.serve(self, port, host, allow_remote)

    # --- ending --------------------------------------------------------------------------

    def shutdown(self, timeout: float = 20.0) -> None:
        """Stop every owned machine, waiting up to ``timeout`` for their last log lines
        (machines not gone by then are killed: see ``Machine.shutdown``).

        Dialed machines are only forgotten, never stopped. Idempotent.
        """
        deadline = time.monotonic() + timeout
        if not self._begin_shutdown():
            return
        with self._lock:
            owned = list(self._owned)
            hooks, self._shutdown_hooks = self._shutdown_hooks, []
        _sessions.discard(self)
        for hook in hooks:
            try:
                hook()
            except Exception:
                log.exception("a bigexec session's shutdown hook failed")
        live = [m for m in owned if m.state < STOPPED]
        if live:
            # all at once: each gets what is left of the one deadline when its turn comes
            with ThreadPoolExecutor(max_workers=min(256, len(live))) as ex:
                list(ex.map(lambda m: m.shutdown(max(0.0, deadline - time.monotonic())), live))
        self._let_go()
        self._system.shutdown()


def start(system: str | System | None = None, **options: Any) -> B:
    """Start a session on ``system``: ``"threads"``, ``"local"`` or a ``System`` instance.

    Without one, ``BIGEXEC_SYSTEM`` names it, else the config file's top-level ``system``
    (``bigexec.config``), else ``"local"``. ``options`` go to the system:
    ``keepalive`` (a ``KeepaliveConfig``) or ``keepalive_period``, ``keepalive_lease``,
    ``keepalive_timeout``, ``keepalive_rpc_timeout``, ``boot_timeout``, and the system's own.

    ``BIGEXEC_DEBUG_ADDR`` (``host:port``) gives every session started here a debug server
    (see ``B.serve_debug``): the first on that port, each further one while it is taken (a
    second session in the process, an ``Executor`` inside ``with bigexec.start()``) on the
    next free port above it. The URL each one got is printed on stderr.
    """
    if isinstance(system, System):
        if options:
            raise TypeError("options go to the System's constructor when you pass an instance")
        return B(system)
    if system is not None and not isinstance(system, str):
        raise TypeError(f"system must be a name or a System, not {type(system).__name__}")
    name = system or os.environ.get("BIGEXEC_SYSTEM") or load_config().system or "local"
    debug_addr = os.environ.get("BIGEXEC_DEBUG_ADDR")
    from . import debug  # here: the HTTP server's modules are not every worker's to load

    debug_at = debug.parse_addr(debug_addr) if debug_addr else None  # bad: fail before a session
    b = B(make_system(name, **options))
    if debug_at is not None:
        debug.serve_on_free_port(b, *debug_at)
    return b
