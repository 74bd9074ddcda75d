"""The machine side: what runs inside every machine, and ``python -m bigexec.worker``.

    driver                                    machine (MachineRuntime)
    ──────                                    ────────────────────────
    start process ── WorkerSpec on stdin ───> check versions, load TLS credentials, bind
                                              port 0 (no free-port race)
                  <── announcement ──────────  the advertised address (``announce_fd``, or
                                              stdout): see ``systems.bootstrap``
    Supervisor.ping/info/register ─────────> Server ─> ServiceRegistry ─> services
    Supervisor.keepalive every period ─────> extend the lease
    Supervisor.renew_credentials(pem) ─────> new TLS contexts for new connections
                                              watchdog: lease lapsed ─> exit(EXIT_LEASE_LAPSED)
                                              lifeline: stdin EOF ─> exit(EXIT_DRIVER_GONE)
    Supervisor.shutdown ───────────────────> print the last lines, exit(0)

A ``local`` worker leads its own process group (the driver starts it in a new session), and
however it exits it first kills the other members of that group: processes its tasks started
(a ``subprocess.Popen`` in a task) do not outlive it, nor therefore the driver.

``MachineRuntime`` is the same object on every system: the ``threads`` system runs it in the
driver's process (its ``exit`` closes the server instead of ending the process), the ``local``
system runs it in a ``python -m bigexec.worker`` subprocess. The user's ``__main__`` is never
re-run: services and their code arrive pickled.
"""

from __future__ import annotations

import logging
import os
import signal
import ssl
import sys
import threading
import time
from collections.abc import Callable, Mapping

from . import namespaces as ns_mod
from . import tls
from .dialer import Dialer
from .rpc.faults import ENV as FAULTS_ENV
from .rpc.faults import FaultInjector
from .rpc.server import Server
from .service import ServiceRegistry
from .supervisor import Supervisor
from .systems import bootstrap

__all__ = ["EXIT_DRIVER_GONE", "EXIT_LEASE_LAPSED", "EXIT_VERSION_MISMATCH", "MachineRuntime",
           "describe_exit", "main"]

log = logging.getLogger("bigexec.worker")

#: Exit status of a worker whose lease lapsed (the driver's keepalives stopped arriving).
EXIT_LEASE_LAPSED = 3
#: Exit status of a worker whose lifeline (stdin) reached EOF: the driver process is gone.
EXIT_DRIVER_GONE = 4
#: Exit status of a worker that refused its driver's versions (``systems.bootstrap``).
EXIT_VERSION_MISMATCH = bootstrap.EXIT_VERSION_MISMATCH


def describe_exit(code: int | None, lease: float | None = None) -> str:
    """How a worker that ended with status ``code`` (negative: killed by that signal) ended,
    in words that complete "machine X ..."; ``lease`` is the one it held, if known."""
    if code is None:
        return "is still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name} ({code})"
    if code == EXIT_LEASE_LAPSED:
        return (f"exited (status {code}) because its lease lapsed: the driver's keepalives did "
                f"not arrive for {lease:g}s" if lease is not None else
                f"exited (status {code}) because its lease lapsed")
    if code == EXIT_DRIVER_GONE:
        return f"exited (status {code}) because its lifeline to the driver closed"
    if code == EXIT_VERSION_MISMATCH:
        return f"exited (status {code}) because it runs other versions than the driver"
    return f"exited with status {code}"


class MachineRuntime:
    """A machine: RPC server, service registry, Supervisor, lease and watchdog."""

    def __init__(
        self,
        *,
        system_name: str,
        exit: Callable[[int], None],
        lease: float,
        server_ssl: ssl.SSLContext | None = None,
        client_ssl: ssl.SSLContext | None = None,
        maxprocs: int = 1,
        environ: Mapping[str, str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        advertise_host: str | None = None,
        mark_logs: bool = False,
        namespaces: ns_mod.Namespaces | None = None,
    ) -> None:
        self.system_name = system_name
        self.maxprocs = maxprocs
        self.environ: Mapping[str, str] = os.environ if environ is None else environ
        self.registry = ServiceRegistry()
        self.server = Server(self.registry, ssl_context=server_ssl, host=host, port=port,
                             advertise_host=advertise_host, log_label="" if mark_logs else None)
        self.server.faults = FaultInjector.from_spec(self.environ.get(FAULTS_ENV),
                                                     salt=str(self.server.port))
        #: What the machine's services call other machines with (``init(b)``, ``ctx.b``).
        self.session = Dialer(client_ssl)
        self.server.session = self.session
        #: The namespaces of this machine (see ``bigexec.namespaces``): its own unless given
        #: (a ``local`` machine, alone in its process, uses the process's).
        self.namespaces = ns_mod.Namespaces() if namespaces is None else namespaces
        self.server.namespaces = self.namespaces
        self.registry.add("Supervisor", Supervisor(self))
        self.keepalives = 0
        self._exit_fn = exit
        self._lock = threading.Lock()
        self._lease = lease
        self._deadline = time.monotonic() + lease
        self._stopped = threading.Event()
        self._exited = False
        #: The status this machine exits with, once ``exit`` was called.
        self.exit_code: int | None = None
        #: How many times the driver renewed this machine's TLS credentials.
        self.credential_renewals = 0

    @classmethod
    def from_spec(cls, spec: bootstrap.WorkerSpec, *, exit: Callable[[int], None],
                  environ: Mapping[str, str] | None = None, mark_logs: bool = False,
                  namespaces: ns_mod.Namespaces | None = None) -> MachineRuntime:
        """The machine that ``spec`` describes (see ``systems.bootstrap``)."""
        server_ssl = client_ssl = None
        if spec.credentials is not None:
            served, calling = spec.credentials
            server_ssl = tls.server_context(served)
            client_ssl = tls.client_context(calling)
        return cls(system_name=spec.system, exit=exit, lease=spec.lease,
                   server_ssl=server_ssl, client_ssl=client_ssl, maxprocs=spec.maxprocs,
                   environ=environ, host=spec.listen_host, port=spec.listen_port,
                   advertise_host=spec.advertise_host, mark_logs=mark_logs, namespaces=namespaces)

    @property
    def addr(self) -> str:
        """The address the machine is reached at (its advertised host)."""
        return self.server.addr

    def start(self) -> str:
        addr = self.server.start()
        threading.Thread(target=self._watchdog, name="bigexec-watchdog", daemon=True).start()
        return addr

    def extend_lease(self, lease: float) -> None:
        with self._lock:
            self._lease = lease
            self._deadline = time.monotonic() + lease
            self.keepalives += 1

    def renew_credentials(self, server: tls.Credentials, client: tls.Credentials) -> None:
        """Serve with ``server`` and call other machines with ``client`` from now on: new
        connections get them, connections already open stay as they are."""
        if self.server.ssl_context is None:
            raise RuntimeError("this machine serves without TLS: it has no credentials to renew")
        server_ssl = tls.server_context(server)
        client_ssl = tls.client_context(client)
        self.server.ssl_context = server_ssl
        self.session.renew_client_ssl(client_ssl)
        with self._lock:
            self.credential_renewals += 1

    def lease_remaining(self) -> float:
        with self._lock:
            return self._deadline - time.monotonic()

    def exit(self, code: int) -> None:
        """End this machine (once): stop serving, then the system's exit."""
        with self._lock:
            if self._exited:
                return
            self._exited = True
            self.exit_code = code
        self._stopped.set()
        try:
            self.server.close()
            self.session.shutdown()
            self.namespaces.close()
        finally:
            self._exit_fn(code)

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    def abandon(self, why: str, code: int) -> None:
        """The driver is gone: say why (if anyone still reads our stderr) and exit ``code``."""
        try:
            print(f"bigexec: {why}; exiting", file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass
        self.exit(code)

    def _watchdog(self) -> None:
        while not self._stopped.is_set():
            left = self.lease_remaining()
            if left <= 0:
                with self._lock:
                    lease = self._lease
                self.abandon(f"lease lapsed {-left:.1f}s ago: the driver's keepalives did not "
                             f"arrive for {lease:g}s", EXIT_LEASE_LAPSED)
                return
            self._stopped.wait(min(1.0, max(0.05, left / 2)))


def _kill_process_group() -> None:
    """Kill the other members of our process group: what our tasks started must not outlive
    us. Only when we lead the group (the driver started us in a session of our own): a worker
    started by hand shares its group with processes that are not its own."""
    me = os.getpid()
    if os.getpgrp() != me:
        return
    try:
        import psutil

        for _ in range(3):  # a member may fork while we look: look again
            members = []
            for pid in psutil.pids():
                try:
                    if pid != me and os.getpgid(pid) == me:
                        members.append(pid)
                except OSError:  # gone meanwhile
                    pass
            if not members:
                return
            for pid in members:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
    except Exception:  # exiting matters more than a last sweep; the driver sweeps too
        pass


def _exit_process(code: int) -> None:
    _kill_process_group()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a driver that died took the pipe's other end
            pass
    os._exit(code)


def _watch_lifeline(fd: int, runtime: MachineRuntime) -> None:
    """The driver holds our stdin open while it lives: EOF means it is gone."""
    try:
        while os.read(fd, 4096):
            pass
    except OSError:
        pass
    if not runtime.stopped:
        runtime.abandon("the driver is gone (stdin closed)", EXIT_DRIVER_GONE)


def _announce(spec: bootstrap.WorkerSpec, addr: str) -> None:
    line = f"{bootstrap.ANNOUNCE_PREFIX}{addr}\n"
    if spec.announce_fd is None:
        print(line, end="", flush=True)
        return
    os.write(spec.announce_fd, line.encode())
    os.close(spec.announce_fd)


def main() -> None:
    """Entry point of a machine process: its ``WorkerSpec`` arrives on stdin, which then
    stays open as the lifeline (see ``systems.bootstrap``)."""
    stdin = sys.stdin.fileno()
    if os.isatty(stdin):
        sys.exit("bigexec.worker is started by a bigexec driver, not by hand")
    logging.basicConfig(level=os.environ.get("BIGEXEC_LOG_LEVEL", "WARNING"),
                        format="%(levelname)s %(name)s: %(message)s")
    spec = bootstrap.read_spec(stdin)
    refusal = bootstrap.version_refusal(spec)
    if refusal is not None:
        print(f"bigexec: {refusal}", file=sys.stderr, flush=True)
        _exit_process(EXIT_VERSION_MISMATCH)
    runtime = MachineRuntime.from_spec(spec, exit=_exit_process,
                                       namespaces=ns_mod.process_namespaces())
    runtime.start()
    _announce(spec, spec.address(runtime.server.port))
    signal.signal(signal.SIGTERM, lambda *_: runtime.exit(0))
    threading.Thread(target=_watch_lifeline, args=(stdin, runtime), daemon=True,
                     name="bigexec-lifeline").start()
    while not runtime.wait(3600):
        pass
    # Whichever thread called exit() ends the process with its status; this one must not
    # return meanwhile, or the interpreter would exit with status 0.
    _exit_process(runtime.exit_code if runtime.exit_code is not None else 1)


if __name__ == "__main__":
    main()
