"""Machines: the driver's view of one worker process and the calls made to it.

State machine (monotonic: a machine never goes back)::

    UNSTARTED ──> STARTING ──> RUNNING ──> STOPPED
                      └────────────────────────^   boot failed (err says why)

    boot thread:      address ─> ping ─> info ─> register services ─> RUNNING, all within
                      one ``boot_timeout`` (a service's ``init`` included); past it the boot
                      fails with a ``BootError`` naming the phase, and the machine is killed
    keepalive thread: from the first ping on, renew the lease every period; after
                      ``keepalive.timeout`` seconds of failures ─> STOPPED. On TLS systems
                      it also renews the machine's certificate (``System.renew_after``) and
                      the driver's client context before they expire
    system:           process died (local waiter, threads kill) ─> STOPPED at once

Entering STOPPED aborts every call in flight on the machine: each fails at once with
``MachineStopped`` whose cause is ``err``. Calls made after that fail the same way. An orderly
``shutdown`` stops a machine with ``err`` None.

``submit`` returns a plain ``concurrent.futures.Future`` that stays *pending* until the reply
arrives, so ``Future.cancel()`` keeps working while the call runs remotely: it fails the
future with ``CancelledError`` at once and cancels the remote method's ``ctx``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, InvalidStateError
from enum import IntEnum
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from . import tls
from .errors import BootError, MachineLost, MachineStopped, NetworkError
from .rpc.client import CallHandle, PendingCall, PreparedCall, new_call_id
from .rpc.wire import Stream
from .systems import bootstrap

if TYPE_CHECKING:
    from .callpool import CallPool
    from .rpc.client import Client
    from .systems.base import KeepaliveConfig, MachineHandle, System

__all__ = ["Machine", "Backoff", "SessionLink", "State", "UNSTARTED", "STARTING", "RUNNING",
           "STOPPED"]

log = logging.getLogger("bigexec.machine")


class State(IntEnum):
    """A machine's life; states only move forward."""

    UNSTARTED = 0
    STARTING = 1
    RUNNING = 2
    STOPPED = 3


UNSTARTED, STARTING, RUNNING, STOPPED = (
    State.UNSTARTED, State.STARTING, State.RUNNING, State.STOPPED
)

_PING_RPC_TIMEOUT = 10.0
_REMOTE_CANCEL_TIMEOUT = 5.0
_SHUTDOWN_RPC_TIMEOUT = 5.0
_DEATH_GRACE = 1.0  # how long a transport error waits for the system to confirm a death


class SessionLink(Protocol):
    """What a machine needs of the session it belongs to (``B`` and the machine side's
    ``Dialer`` are two): the RPC client and call pool its calls go through, and the system
    and liveness settings of its boot and lease."""

    @property
    def client(self) -> Client: ...

    @property
    def call_pool(self) -> CallPool: ...

    @property
    def system(self) -> System | None: ...

    @property
    def keepalive(self) -> KeepaliveConfig: ...

    def renew_client_ssl(self, ctx: Any = None) -> None: ...


class Backoff(NamedTuple):
    """Waits between retries: ``first``, then each ``factor`` times longer, at most ``most``."""

    first: float
    most: float
    factor: float


class Machine:
    """One machine of a session, owned (started by it) or dialed.

    Attributes: ``addr``, ``hostname``, ``maxprocs``, ``owned``, ``info`` (what the machine's
    Supervisor reported), ``state``, ``err``, ``keepalive_reply_times``, ``next_keepalive``.
    """

    #: ``retry_call``'s waits between attempts.
    retry_backoff = Backoff(first=1.0, most=5.0, factor=1.5)

    def __init__(self, b: SessionLink, *, owned: bool, addr: str = "",
                 handle: MachineHandle | None = None,
                 services: list[tuple[str, bytes]] | None = None) -> None:
        self._b = b
        # The session's client and call pool, held here: they are fixed for the session's
        # life, and a call looks them up twice or more (one attribute read, not a property).
        self._client = b.client
        self._call_pool = b.call_pool
        self.owned = owned
        self.addr = addr
        self.hostname = ""
        self.maxprocs = 1
        self.info: dict[str, Any] = {}
        self._handle = handle
        self._services = services or []
        self._cond = threading.Condition()
        self._state = UNSTARTED
        self._err: BaseException | None = None
        self._inflight: set[CallHandle] = set()
        self._stop_event = threading.Event()
        self._replies: deque[float] = deque(maxlen=10)
        self._stop_callbacks: list[Any] = []
        self._state_callbacks: list[tuple[State, Callable[[Machine], Any]]] = []
        self._stopping = False
        #: Wall-clock time (``time.time()``) until which the machine's lease runs, if owned.
        self.next_keepalive: float | None = None
        # When the credentials the system issued it with (just now) are due for renewal.
        system = b.system
        self._renew_at: float | None = None
        if owned and system is not None and system.credentials_authority() is not None:
            self._renew_at = time.monotonic() + system.renew_after
        #: How many times the driver renewed this machine's certificate.
        self.credential_renewals = 0

    def __repr__(self) -> str:
        return f"<Machine {self.addr or '(no address yet)'} {self._state.name}>"

    @property
    def session(self) -> SessionLink:
        """The session this machine belongs to."""
        return self._b

    @property
    def handle(self) -> MachineHandle | None:
        """What the system knows of this machine (None for a dialed one)."""
        return self._handle

    @property
    def instance_id(self) -> str | None:
        """The cloud instance the machine runs on (``ec2``); None elsewhere."""
        return self._handle.instance_id if self._handle is not None else None

    def died(self, grace: float = 0.0) -> BaseException | None:
        """Why the machine is known dead, if its system says it is (waiting up to ``grace``
        seconds for word of it); None for one alive, or dialed (no system watches it)."""
        if not self.owned or self._handle is None:
            return None
        return self._handle.died(grace)

    # --- state ---------------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def err(self) -> BaseException | None:
        """Why the machine stopped (None while it runs, and after an orderly shutdown)."""
        return self._err

    @property
    def keepalive_reply_times(self) -> list[float]:
        """Round-trip seconds of the last (up to 10) successful keepalives, oldest first."""
        return list(self._replies)

    def wait(self, state: State, timeout: float | None = None) -> bool:
        """Block until the machine reaches ``state`` or a later one; False on timeout.

        ``wait(RUNNING)`` also returns when the machine stopped instead: check ``err``.
        """
        with self._cond:
            return self._cond.wait_for(lambda: self._state >= state, timeout)

    def _set_state(self, state: State) -> bool:
        with self._cond:
            if state <= self._state:
                return False
            self._state = state
            self._cond.notify_all()
        self._run_state_callbacks()
        return True

    def _run_state_callbacks(self) -> None:
        with self._cond:
            due = [cb for s, cb in self._state_callbacks if s <= self._state]
            self._state_callbacks = [(s, cb) for s, cb in self._state_callbacks
                                     if s > self._state]
        for cb in due:
            try:
                cb(self)
            except Exception:
                log.exception("a machine state callback failed")

    def on_state(self, state: State, callback: Callable[[Machine], Any]) -> None:
        """Have ``callback(machine)`` called once, when the machine reaches ``state`` or a
        later one (now, if it has), in the thread that moved it there.

        As with ``wait``, ``on_state(RUNNING, cb)`` also fires for a machine that stopped
        without running: ``err`` says why.
        """
        with self._cond:
            if self._state < state:
                self._state_callbacks.append((state, callback))
                return
        callback(self)

    def _stop(self, err: BaseException | None, *, kill: bool = True) -> None:
        if self._stopping:  # an orderly shutdown: whatever failed on the way is no error
            err = None
        with self._cond:
            if self._state == STOPPED:
                return
            self._state = STOPPED
            self._err = err
            inflight = list(self._inflight)
            self._cond.notify_all()
        self._stop_event.set()
        for h in inflight:
            h.abort(MachineStopped(self.addr, err))
        if err is not None:
            if not isinstance(err, CancelledError):  # cancel() is deliberate: no news
                log.warning("machine %s stopped: %s", self.addr or "(booting)", err)
            if kill and self.owned and self._handle is not None:
                self._handle.kill()  # a machine we gave up on must not live on
        self._run_state_callbacks()
        with self._cond:  # called once: let go of them (and of what they hold)
            callbacks, self._stop_callbacks = self._stop_callbacks, []
        for cb in callbacks:
            try:
                cb(self)
            except Exception:
                log.exception("a machine stop callback failed")

    def on_stop(self, callback: Callable[[Machine], Any]) -> None:
        """Have ``callback(machine)`` called once the machine stops (now, if it has)."""
        with self._cond:
            if self._state != STOPPED:
                self._stop_callbacks.append(callback)
                return
        callback(self)

    # --- boot and lease (driver threads) -------------------------------------------------

    def start_boot(self, boot_timeout: float) -> None:
        """Boot the machine in a thread of its own (its session does, once): within
        ``boot_timeout`` it is RUNNING, or STOPPED with ``err`` saying why."""
        name = "bigexec-boot" if self.owned else "bigexec-dial"
        threading.Thread(target=self._boot, args=(boot_timeout,), daemon=True,
                         name=name).start()

    def _boot(self, boot_timeout: float) -> None:
        self._set_state(STARTING)
        deadline = time.monotonic() + boot_timeout
        try:
            if self._handle is not None:
                self._handle.on_lost(lambda why: self._stop(why, kill=False))
                self.addr = self._handle.address(max(0.001, deadline - time.monotonic()))
                self._handle.log_label(self.addr.split("://", 1)[-1])
            self._ping_until(deadline, boot_timeout)
            if self.owned:
                threading.Thread(target=self._keepalive_loop, daemon=True,
                                 name=f"bigexec-keepalive-{self.addr}").start()
            self.info = self._boot_call("Supervisor.info", deadline)
            self.hostname = self.info.get("hostname", "")
            self.maxprocs = int((self._handle and self._handle.maxprocs)
                                or self.info.get("maxprocs", 1))
            if self.owned:
                bootstrap.check_versions(self.info, f"machine {self.addr}")
            services, self._services = self._services, []  # registered once: not kept
            for name, blob in services:
                # one deadline for the whole boot: a service's init (an executor's
                # initializer) has what is left of it
                left = deadline - time.monotonic()
                try:
                    if left <= 0:
                        raise TimeoutError("no time was left of the boot")
                    self._call_raw("Supervisor.register", (name, blob), {}, left)
                except BaseException as exc:
                    if isinstance(exc, TimeoutError) and not hasattr(exc, "remote_traceback"):
                        what = (f"service {name!r} init did not finish within "
                                f"boot_timeout={boot_timeout:g}s on machine {self.addr}")
                    else:
                        what = (f"service {name!r} failed to start on machine {self.addr}: "
                                f"{type(exc).__name__}: {exc}")
                    err = BootError(what)
                    err.service = name
                    raise err from exc
        except BaseException as exc:
            if not isinstance(exc, (BootError, MachineLost)):
                wrapped = BootError(f"machine {self.addr or '(no address)'} failed to boot: "
                                    f"{type(exc).__name__}: {exc}")
                wrapped.__cause__ = exc
                exc = wrapped
            if self._handle is not None and not isinstance(exc, MachineLost):
                died = self._handle.died(0.2)
                if died is not None:
                    exc.__context__ = died
            self._stop(exc)
            return
        self._set_state(RUNNING)
        if not self.owned:
            self._ping_loop()

    def _ping_until(self, deadline: float, boot_timeout: float) -> None:
        wait = 0.01
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BootError(f"machine {self.addr} did not answer pings within "
                                f"boot_timeout={boot_timeout:g}s")
            try:
                self._call_raw("Supervisor.ping", (0,), {}, min(_PING_RPC_TIMEOUT, left))
                return
            except (NetworkError, TimeoutError) as exc:
                if self._handle is not None:
                    died = self._handle.died()
                    if died is not None:
                        raise died from None
                elif not self.owned and isinstance(exc, NetworkError):
                    # a dialed address serves already, or never will (refused, unreachable):
                    # fail now with the transport's word, rather than sit in STARTING
                    raise MachineLost(f"cannot reach machine {self.addr}: {exc}") from exc
                if self._stop_event.wait(min(wait, max(0.0, deadline - time.monotonic()))):
                    raise BootError(f"machine {self.addr} stopped while booting") from None
                wait = min(wait * 2, 1.0)

    def _boot_call(self, method: str, deadline: float) -> Any:
        left = max(0.001, deadline - time.monotonic())
        return self._call_raw(method, (), {}, min(_PING_RPC_TIMEOUT, left))

    def _keepalive_loop(self) -> None:
        cfg = self._b.system.keepalive  # type: ignore[union-attr]
        failing_since: float | None = None
        while not self._stop_event.is_set():
            t0 = time.monotonic()
            try:
                self._call_raw("Supervisor.keepalive", (cfg.lease,), {}, cfg.rpc_timeout)
            except Exception as exc:
                if self._stop_event.is_set():
                    return
                now = time.monotonic()
                failing_since = failing_since or t0
                if self._handle is not None:
                    self._handle.keepalive_failed()
                died = self._handle.died() if self._handle is not None else None
                if died is not None:
                    self._stop(died)
                    return
                if now - failing_since >= cfg.timeout:
                    self._stop(MachineLost(
                        f"keepalive to {self.addr} failed for {now - failing_since:.1f}s "
                        f"(budget {cfg.timeout}s): {exc}"))
                    return
                self._stop_event.wait(min(1.0, cfg.period))
                continue
            failing_since = None
            self._replies.append(time.monotonic() - t0)
            self.next_keepalive = time.time() + cfg.lease
            self._b.renew_client_ssl()
            wait = cfg.period
            if self._renew_at is not None:
                if time.monotonic() >= self._renew_at:
                    self._renew_credentials(cfg.rpc_timeout)
                wait = min(wait, max(0.05, self._renew_at - time.monotonic()))
            self._stop_event.wait(wait)

    def _renew_credentials(self, timeout: float) -> None:
        """Hand the machine a fresh certificate; a failure is retried at the next keepalive
        (a third of the old one's life is left for that)."""
        system = self._b.system
        creds = (system.renewed_machine_credentials(self._handle)
                 if system is not None and self._handle is not None else None)
        if creds is None:
            self._renew_at = None
            return
        try:
            self._call_raw("Supervisor.renew_credentials",
                           (tls.machine_credentials_to_pem(*creds),), {}, timeout)
        except Exception as exc:
            if not self._stop_event.is_set():
                log.warning("renewing the certificate of machine %s failed (retrying): %s",
                            self.addr, exc)
            return
        self.credential_renewals += 1
        self._renew_at = time.monotonic() + system.renew_after  # type: ignore[union-attr]

    def _ping_loop(self) -> None:
        cfg = self._b.keepalive
        failing_since: float | None = None
        while not self._stop_event.wait(cfg.period):
            self._b.renew_client_ssl()
            t0 = time.monotonic()
            try:
                self._call_raw("Supervisor.ping", (0,), {}, cfg.rpc_timeout)
            except Exception as exc:
                failing_since = failing_since or t0
                if time.monotonic() - failing_since >= cfg.timeout:
                    self._stop(MachineLost(f"pings to {self.addr} failed: {exc}"))
                    return
                continue
            failing_since = None
            self._replies.append(time.monotonic() - t0)

    # --- calls ---------------------------------------------------------------------------

    def _call_raw(self, method: str, args: tuple, kwargs: dict, timeout: float | None) -> Any:
        """A call that ignores the machine's state (boot, keepalive)."""
        return self._client.call(self.addr, method, args, kwargs, timeout=timeout)

    def _call(self, method: str, prepared: PreparedCall, timeout: float | None, call_id: str,
              handle: CallHandle) -> Any:
        return self.finish_call(self.begin_call(method, prepared, timeout, call_id, handle))

    def begin_call(self, method: str, prepared: PreparedCall, timeout: float | None, call_id: str,
               handle: CallHandle) -> PendingCall:
        """Send a call's request; ``finish_call`` reads the reply, maybe in another thread
        (the scheduler's direct calls: see ``bigexec.direct``).

        ``timeout`` counts from now and covers waiting for a booting machine too."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._state < RUNNING:
            if not self.wait(RUNNING, timeout):
                raise TimeoutError(f"{method}: machine {self.addr or '(booting)'} did not start "
                                   f"within the call's timeout of {timeout}s")
        with self._cond:
            if self._state == STOPPED:
                raise MachineStopped(self.addr, self._err)
            self._inflight.add(handle)
        try:
            return self._client.begin(self.addr, method, prepared, timeout=timeout,
                                         call_id=call_id, handle=handle, deadline=deadline)
        except BaseException as exc:
            self._untrack(handle)
            err = self._failed(exc, call_id, handle)
            if err is exc:
                raise
            raise err from exc

    def reply_buffered(self, p: PendingCall, timeout: float) -> bool:
        """Whether ``finish_call(p)`` can read the whole reply without waiting (see
        ``Client.reply_buffered``)."""
        return self._client.reply_buffered(p, timeout)

    def finish_call(self, p: PendingCall) -> Any:
        handle = p.handle
        assert handle is not None
        streaming = False
        try:
            result = self._client.finish(p)
            if isinstance(result, Stream):
                # the machine may still stop mid-stream: keep the call abortable till the end
                streaming = True
                result.add_done_callback(lambda clean: self._untrack(handle))
            return result
        except BaseException as exc:
            err = self._failed(exc, p.call_id, handle)
            if err is exc:
                raise
            raise err from exc
        finally:
            if not streaming:
                self._untrack(handle)

    def _failed(self, exc: BaseException, call_id: str, handle: CallHandle) -> BaseException:
        """What a call that failed with ``exc`` raises: a lost machine's calls raise
        ``MachineStopped``; a timed-out call is cancelled on the machine too. What the remote
        method raised (a nested call's ``NetworkError`` or ``TimeoutError``) is its outcome,
        as it is: it says nothing of this machine."""
        if hasattr(exc, "remote_traceback"):
            return exc
        if isinstance(exc, TimeoutError):
            if handle.aborted is None:
                self._remote_cancel(call_id)
        elif isinstance(exc, NetworkError):
            died = self._handle.died(_DEATH_GRACE) if self.owned and self._handle else None
            if died is not None:
                self._stop(died)
            if self._state == STOPPED:
                return MachineStopped(self.addr, self._err)
        return exc

    def _untrack(self, handle: CallHandle) -> None:
        with self._cond:
            self._inflight.discard(handle)

    def _remote_cancel(self, call_id: str) -> None:
        def cancel() -> None:
            try:
                self._call_raw("Supervisor.cancel", (call_id,), {}, _REMOTE_CANCEL_TIMEOUT)
            except Exception as exc:  # best effort: the machine may be gone
                log.debug("cancelling call %s on %s failed: %s", call_id, self.addr, exc)
        if self._state < STOPPED:
            self._call_pool.submit(cancel, bounded=False)  # never behind the calls it ends

    def call(self, method: str, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        """Call ``"Service.method"`` on this machine and return its result.

        ``timeout`` (seconds) travels with the call: past it the caller gets ``TimeoutError``
        and the remote method's ``ctx`` is cancelled. A machine that is still starting is
        waited for. Raises the remote exception, ``MachineStopped``, ``NetworkError``, or
        ``TypeError`` (before sending anything) for an argument that cannot be pickled.
        """
        prepared = self._client.prepare(args, kwargs)
        return self._call(method, prepared, timeout, new_call_id(), CallHandle())

    def submit(self, method: str, *args: Any, timeout: float | None = None,
               **kwargs: Any) -> Future:
        """Like ``call``, but return at once with a ``concurrent.futures.Future``.

        The future stays pending until the reply arrives; ``cancel()`` on it therefore always
        succeeds before then, and also cancels the remote method's ``ctx``.
        """
        prepared = self._client.prepare(args, kwargs)  # unpicklable: raise here
        fut: Future = Future()
        handle = CallHandle()
        call_id = new_call_id()
        started = threading.Event()

        def run() -> None:
            if fut.cancelled():
                return
            started.set()
            try:
                result = self._call(method, prepared, timeout, call_id, handle)
            except BaseException as exc:
                try:
                    fut.set_exception(exc)
                except InvalidStateError:  # cancelled meanwhile
                    pass
            else:
                try:
                    fut.set_result(result)
                except InvalidStateError:
                    if hasattr(result, "close"):
                        result.close()

        def on_done(f: Future) -> None:
            if f.cancelled() and started.is_set():
                handle.abort(CancelledError(f"{method} cancelled"))
                self._remote_cancel(call_id)

        fut.add_done_callback(on_done)
        self._call_pool.submit(run)
        return fut

    def retry_call(self, method: str, *args: Any, timeout: float | None = None,
                   **kwargs: Any) -> Any:
        """``call``, retrying transport errors (``NetworkError``) with exponential backoff.

        Gives up when ``timeout`` (overall) runs out or the machine stops. Only use it for
        methods that are safe to run twice: a transport error can hide a call that ran.
        """
        first, most, factor = self.retry_backoff
        deadline = None if timeout is None else time.monotonic() + timeout
        wait = first
        prepared = self._client.prepare(args, kwargs)
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"{method} on {self.addr}: retries ran out of time")
            try:
                return self._call(method, prepared, left, new_call_id(), CallHandle())
            except NetworkError:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left < wait:
                    raise
                if prepared.stream is not None:  # a stream is read once: it cannot be sent again
                    raise
                if self._stop_event.wait(wait):
                    raise MachineStopped(self.addr, self._err) from None
                wait = min(wait * factor, most)

    # --- ending --------------------------------------------------------------------------

    def shutdown(self, timeout: float = 20.0) -> None:
        """Stop the machine: ask it to exit, wait for its last log lines, then mark it STOPPED.

        Returns within ``timeout`` seconds: a machine that has not exited by the last part
        of it (a tenth, at most a second) is killed then. On a machine this session does not
        own it only stops tracking it.
        """
        if self._state == STOPPED:
            return
        if not self.owned or self._handle is None:
            self._stop(None)
            return
        deadline = time.monotonic() + timeout
        kill_at = deadline - min(1.0, timeout / 10)  # room left to kill and reap it in time
        self._stopping = True
        self._handle.expect_exit()
        self._stop_event.set()  # no more keepalives
        if not self.addr:  # still booting, nothing to ask
            self._handle.kill()
        else:
            try:
                self._call_raw("Supervisor.shutdown", (0.0, ""), {},
                               max(0.001, min(_SHUTDOWN_RPC_TIMEOUT, kill_at - time.monotonic())))
            except Exception as exc:
                log.debug("shutdown of %s: %s", self.addr, exc)
        if not self._handle.wait_stopped(max(0.0, kill_at - time.monotonic())):
            self._handle.kill()
            self._handle.wait_stopped(max(0.0, deadline - time.monotonic()))
        self._stop(None)

    def cancel(self) -> None:
        """Stop tracking the machine now: calls in flight fail with ``MachineStopped``.

        An owned machine's process is killed rather than left to wait for its lease.
        """
        self._stop(CancelledError("machine cancelled"))
        if self.owned and self._handle is not None:
            self._handle.wait_stopped(5.0)  # killed: gone in moments, its last lines with it
