"""The ``local`` system: each machine is a ``python -m bigexec.worker`` process on this host.

    driver                                   worker process
    ──────                                   ──────────────
    Popen(start_new_session) ── stdin ─────> its WorkerSpec (``systems.bootstrap``: settings,
                                             credentials, the driver's versions), then
                                             nothing: stdin stays open as a lifeline
    os.pipe() read end   <──── announce_fd: "bigexec-worker-listening https://HOST:PORT"
    log pump thread      <──── stdout+stderr, line by line ──> MachineOutput: the driver's
                                  stderr, prefixed (through ``logsink``: a stderr nobody
                                  reads never blocks it)
    waiter thread: process exit ──> mark_dead, then report_lost: machine STOPPED at once,
                   err says how it died (a lapsed lease, a signal, a status); what is left
                   of its process group is killed

This module is the bootstrap protocol's reference implementation: a new system does what it
does, its own way, and nothing else in bigexec changes.

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
import select
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Mapping
from typing import IO, Any

from ..authority import Authority
from ..errors import BootError, MachineLost
from ..worker import describe_exit
from .base import KeepaliveConfig, MachineHandle, System
from .bootstrap import MachineOutput, WorkerSpec, parse_announcement

__all__ = ["LocalSystem"]

_SHOW_BOOT_LOGS_AFTER = 5  # consecutive boot failures
_BOOT_OUTPUT_LINES = 20  # of a worker that failed to boot, quoted in its BootError


def _kill_group(pgid: int) -> None:
    """SIGKILL what is left of a worker's process group (the processes its tasks started)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:  # nobody left
        pass


class _LocalHandle(MachineHandle):
    def __init__(self, proc: subprocess.Popen[bytes], announce_fd: int, boot_logs: bool,
                 system: LocalSystem) -> None:
        super().__init__()
        self._system = system
        self.proc = proc
        self.maxprocs = 1
        self._announce_fd = announce_fd
        self._addr: str | None = None
        self.output = MachineOutput(f"pid {proc.pid}", show_boot=boot_logs,
                                    keep=_BOOT_OUTPUT_LINES)
        self._pump = threading.Thread(target=self._pump_output, name=f"bigexec-log-{proc.pid}",
                                      daemon=True)
        self._pump.start()
        self._waiter = threading.Thread(target=self._wait, name=f"bigexec-wait-{proc.pid}",
                                        daemon=True)
        self._waiter.start()
        _lifelines.add(self)

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
        deadline = time.monotonic() + timeout
        data = b""
        try:
            while not data.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0:
                    self.kill()
                    raise self._boot_error(f"did not listen within {timeout}s")
                poller = select.poll()  # select() fails on descriptors past 1024
                poller.register(self._announce_fd, select.POLLIN)
                if not poller.poll(left * 1000):
                    continue
                chunk = os.read(self._announce_fd, 512)
                if not chunk:
                    code = self._wait_code(5.0)
                    self.output.wait_ended(5.0)
                    raise self._boot_error(f"{describe_exit(code)} before it listened")
                data += chunk
        finally:
            os.close(self._announce_fd)
            self._announce_fd = -1
        addr = parse_announcement(data.decode("utf-8", "replace"))
        if addr is None:
            self.kill()
            raise self._boot_error(f"announced no address but {data[:80]!r}")
        self._addr = addr
        self.output.mark_listening(addr.split("://", 1)[-1])
        return addr

    def _boot_error(self, what: str) -> BootError:
        return self.output.boot_error(f"pid {self.proc.pid}", what)

    def _exit_reason(self, code: int | None) -> BaseException:
        if not self.output.listening:
            return self._boot_error(f"{describe_exit(code)} before it listened")
        lease = self._system.keepalive.lease
        return MachineLost(f"machine {self.output.label} {describe_exit(code, lease)}")

    def _pump_output(self) -> None:
        # Always drain, or a chatty worker blocks on a full pipe.
        out: IO[bytes] = self.proc.stdout  # type: ignore[assignment]
        try:
            self.output.pump(iter(out.readline, b""))
        finally:
            out.close()

    def _wait_code(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def _wait(self) -> None:
        code = self.proc.wait()
        # The worker kills its group as it exits, but not when it was killed: sweep. Its pid
        # cannot name another group meanwhile: a pid is not reused while its group has members.
        _kill_group(self.proc.pid)
        self.close_lifeline()
        if not self.output.listening:
            self.output.wait_ended(1.0)  # its last lines say why
        self.mark_dead(self._exit_reason(code))  # died() knows from now on
        self.output.wait_ended(10.0)  # the last lines first, then the news
        self.output.flush(1.0)  # unless stderr is stuck
        self.report_lost(self._exit_reason(code))
        self._system._forget(self)  # gone: nothing is left for the system to end

    def kill(self) -> None:
        if self.proc.poll() is None:
            # the worker leads its own group (start_new_session): end what its tasks started too
            _kill_group(self.proc.pid)
        self.close_lifeline()

    def close_lifeline(self) -> None:
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:  # it died with unread data in the pipe
            pass

    def wait_stopped(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        if self._wait_code(timeout) is None:
            return False
        ended = self.output.wait_ended(max(0.0, deadline - time.monotonic()))
        self.output.flush(max(0.0, min(1.0, deadline - time.monotonic())))
        return ended


_lifelines: weakref.WeakSet[_LocalHandle] = weakref.WeakSet()


def _close_lifelines_in_child() -> None:
    # A forked child must not hold its parent's machines alive after the parent is gone. The
    # descriptor is pointed at /dev/null rather than closed: the pipe's file object still owns
    # it and will close it some day, which must not hit a descriptor reused meanwhile.
    try:
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    try:
        for h in list(_lifelines):
            try:
                if h.proc.stdin is not None and not h.proc.stdin.closed:
                    os.dup2(null, h.proc.stdin.fileno(), inheritable=False)
            except (OSError, ValueError):
                pass
    finally:
        os.close(null)


os.register_at_fork(after_in_child=_close_lifelines_in_child)


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
        environ.update(
            BIGEXEC_SYSTEM=self.name,  # what bigexec.start() picks in a service
            PYTHONUNBUFFERED="1",
            PYTHONPATH=os.pathsep.join(dict.fromkeys(p for p in path if p)),
        )
        return environ

    def start(self, count: int, env: Mapping[str, str]) -> list[MachineHandle]:
        handles: list[MachineHandle] = []
        for _ in range(count):
            identity = self.new_machine_identity()
            names = self._cert_names()
            creds = self.machine_credentials(identity, ips=names[0], dns=names[1])
            assert creds is not None
            r, w = os.pipe()
            spec = WorkerSpec(system=self.name,
                              lease=max(self.keepalive.lease, self.boot_timeout),
                              listen_host=self.host, credentials=creds, announce_fd=w)
            try:
                proc = subprocess.Popen(
                    [self.python, "-m", "bigexec.worker"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    pass_fds=(w,),
                    env=self._environment(env),
                    # its own session and process group: ^C in the driver's terminal is the
                    # driver's to handle, and the group holds whatever its tasks start
                    start_new_session=True,
                )
            except BaseException:
                os.close(r)
                raise
            finally:
                os.close(w)
            assert proc.stdin is not None
            try:
                proc.stdin.write(spec.encode())
                proc.stdin.flush()
            except OSError:
                pass  # it died at once; address() reports how
            # Boot noise is shown when asked for, or when boots keep failing.
            show = self.boot_logs or self.boot_failures >= _SHOW_BOOT_LOGS_AFTER
            handle = _LocalHandle(proc, r, show, self)
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
