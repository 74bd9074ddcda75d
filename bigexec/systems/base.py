"""The System interface: what a backend must do to give bigexec machines.

A system starts machine processes somewhere and hands back one ``MachineHandle`` per machine.
Everything else (pinging, registering services, keepalives, calls, shutdown) is done by the
driver over RPC and is the same on every system. That keeps the interface small enough for a
backend whose machines boot slowly on other hosts (``ec2``): ``address`` may block for minutes,
``died`` may only know what the cloud API says, and ``client_ssl`` is all the driver needs to
reach them.

Credentials (systems with TLS): a system that has a certificate authority returns it from
``credentials_authority``; every leaf it issues lives ``cert_lifetime`` seconds (a System
option, 7 days by default) and is renewed when ``renew_after`` of them have passed: the
driver's client context by ``client_ssl`` (for new connections; pooled ones stay), each
machine's by its keepalive thread, which hands the machine a fresh leaf from
``machine_credentials`` over RPC. Machines never see the CA's key.
"""

from __future__ import annotations

import datetime
import ssl
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

from .. import tls

if TYPE_CHECKING:
    from ..authority import Authority

__all__ = ["DEFAULT_CERT_LIFETIME", "RENEW_FRACTION", "KeepaliveConfig", "MachineHandle",
           "System"]

#: How long the leaf certificates a system issues live, in seconds, unless ``cert_lifetime``.
DEFAULT_CERT_LIFETIME = 7 * 24 * 3600.0
#: The part of a leaf's lifetime after which it is renewed: a third of it is left to renew in.
RENEW_FRACTION = 2 / 3


@dataclass(frozen=True)
class KeepaliveConfig:
    """How the driver holds its machines' leases.

    Every ``period`` seconds the driver renews each owned machine's lease for ``lease``
    seconds; a machine whose lease lapses exits by itself. Each renewal may take
    ``rpc_timeout`` seconds; when renewals have failed for ``timeout`` seconds the driver
    declares the machine stopped and fails every call in flight on it.
    """

    period: float = 5.0
    lease: float = 60.0
    timeout: float = 30.0
    rpc_timeout: float = 10.0

    def __post_init__(self) -> None:
        for name in ("period", "lease", "timeout", "rpc_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"keepalive {name} must be positive")
        if self.lease <= self.period:
            raise ValueError("the keepalive lease must be longer than its period")


class MachineHandle(ABC):
    """What a system knows of one machine it started."""

    #: Concurrency the machine offers, if the system decides it (else the machine reports it).
    maxprocs: int | None = None

    def __init__(self) -> None:
        self._lost_callback: Callable[[BaseException], None] | None = None
        self._expect_exit = threading.Event()

    @abstractmethod
    def address(self, timeout: float) -> str:
        """Block until the machine serves, then return its ``https://host:port`` address.

        Raise ``BootError`` if it never will (the process died, the instance failed).
        """

    @abstractmethod
    def died(self, grace: float = 0.0) -> BaseException | None:
        """If the machine is known dead (waiting up to ``grace`` seconds), why; else None."""

    @abstractmethod
    def kill(self) -> None:
        """End the machine at once, without asking it."""

    @abstractmethod
    def wait_stopped(self, timeout: float) -> bool:
        """After an orderly shutdown request, wait until the machine is gone and its last log
        lines have reached the driver. False on timeout."""

    def expect_exit(self) -> None:
        """The driver asked the machine to exit: its exit is not a failure."""
        self._expect_exit.set()

    def on_lost(self, callback: Callable[[BaseException], None]) -> None:
        """Have ``callback(reason)`` called when the machine dies unexpectedly."""
        self._lost_callback = callback

    def _report_lost(self, reason: BaseException) -> None:
        if self._expect_exit.is_set():
            return
        cb = self._lost_callback
        if cb is not None:
            cb(reason)

    def log_label(self, label: str) -> None:  # noqa: B027 - optional hook
        """The driver tells the handle how to prefix the machine's log lines."""


class System(ABC):
    """A backend that provides machines: ``threads``, ``local``, ``ec2``."""

    name: ClassVar[str]
    default_keepalive: ClassVar[KeepaliveConfig] = KeepaliveConfig()
    default_boot_timeout: ClassVar[float] = 120.0

    def __init__(
        self,
        *,
        keepalive: KeepaliveConfig | None = None,
        boot_timeout: float | None = None,
        keepalive_period: float | None = None,
        keepalive_lease: float | None = None,
        keepalive_timeout: float | None = None,
        keepalive_rpc_timeout: float | None = None,
        cert_lifetime: float | None = None,
    ) -> None:
        cfg = keepalive or self.default_keepalive
        overrides: dict[str, Any] = {
            k: v
            for k, v in (("period", keepalive_period), ("lease", keepalive_lease),
                         ("timeout", keepalive_timeout), ("rpc_timeout", keepalive_rpc_timeout))
            if v is not None
        }
        self.keepalive = replace(cfg, **overrides) if overrides else cfg
        self.boot_timeout = self.default_boot_timeout if boot_timeout is None else boot_timeout
        self.cert_lifetime = DEFAULT_CERT_LIFETIME if cert_lifetime is None else cert_lifetime
        if self.cert_lifetime <= 0:
            raise ValueError("cert_lifetime must be positive")
        self._client_lock = threading.Lock()
        self._client_ctx: ssl.SSLContext | None = None
        self._client_renew_at = 0.0

    @abstractmethod
    def start(self, count: int, env: Mapping[str, str]) -> list[MachineHandle]:
        """Launch ``count`` machines with extra environment ``env``; do not wait for them."""

    # --- credentials ---------------------------------------------------------------------

    def credentials_authority(self) -> Authority | None:
        """The CA that vouches for this system's machines and driver (None: plain TCP)."""
        return None

    @property
    def renew_after(self) -> float:
        """Seconds after which a leaf this system issued is replaced by a fresh one."""
        return self.cert_lifetime * RENEW_FRACTION

    def issue_credentials(self, common_name: str, *, ips: Iterable[str] = (),
                          dns: Iterable[str] = ()) -> tls.Credentials:
        """A fresh leaf from ``credentials_authority()``, living ``cert_lifetime`` seconds."""
        authority = self.credentials_authority()
        if authority is None:
            raise RuntimeError(f"the {self.name} system has no certificate authority")
        return authority.issue(common_name, ttl=datetime.timedelta(seconds=self.cert_lifetime),
                               ips=ips, dns=dns)

    def machine_credentials(self, handle: MachineHandle | None = None) -> tls.Credentials | None:
        """Fresh credentials for a machine (``handle``: one that runs, to renew them); None
        when the system has no TLS. Machines on this host are named by loopback; a system
        whose machines live elsewhere names them by what the handle knows."""
        if self.credentials_authority() is None:
            return None
        return self.issue_credentials("machine", ips=["127.0.0.1"], dns=["localhost"])

    def client_ssl(self) -> ssl.SSLContext | None:
        """The driver's TLS client context for new connections to this system's machines
        (None: plain TCP): a fresh one once ``renew_after`` seconds of the last have passed."""
        if self.credentials_authority() is None:
            return None
        with self._client_lock:
            now = time.monotonic()
            if self._client_ctx is None or now >= self._client_renew_at:
                self._client_ctx = tls.client_context(self.issue_credentials("driver"))
                self._client_renew_at = now + self.renew_after
            return self._client_ctx

    def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Release what the system holds (credentials, temp files); machines are gone by now."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"
