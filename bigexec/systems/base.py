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

What environment a machine gets is the system's policy (``System.inherits_environment``): on
this host (``threads``, ``local``) a machine runs as the driver's user and inherits the driver's
whole environment; a machine on another host gets only what ``machine_environment`` lets
through, so that the driver's cloud credentials do not travel to every worker.
"""

from __future__ import annotations

import datetime
import fnmatch
import os
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

__all__ = ["CREDENTIAL_PATTERNS", "DEFAULT_CERT_LIFETIME", "RENEW_FRACTION", "KeepaliveConfig",
           "MachineHandle", "System"]

#: How long the leaf certificates a system issues live, in seconds, unless ``cert_lifetime``.
DEFAULT_CERT_LIFETIME = 7 * 24 * 3600.0
#: The part of a leaf's lifetime after which it is renewed: a third of it is left to renew in.
RENEW_FRACTION = 2 / 3
#: Variables that hold credentials (cloud providers' and the usual tokens and secrets). A remote
#: machine gets one only if ``env_allow`` names it exactly, never through a wildcard.
CREDENTIAL_PATTERNS: tuple[str, ...] = (
    "AWS_*", "GOOGLE_*", "GCLOUD_*", "CLOUDSDK_*", "AZURE_*", "ARM_*", "ALIBABA_CLOUD_*",
    "DIGITALOCEAN_*", "HCLOUD_*", "*SECRET*", "*TOKEN", "*TOKEN_*", "*PASSWORD*", "*PASSWD*",
    "*CREDENTIAL*", "*API_KEY*", "*ACCESS_KEY*", "*PRIVATE_KEY*",
)


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
    """What a system knows of one machine it started (see ``bootstrap`` for the protocol).

    A system implements ``address``, ``kill`` and ``wait_stopped``. It learns of a death its
    own way (a child's exit, an agent, a cloud API) and says so with ``mark_dead`` (what
    ``died`` answers from then on) and ``report_lost`` (the session stops the machine at
    once, unless the driver asked it to exit). ``died`` never asks anyone: it is called on
    a failed call's path, where a cloud API round trip has no place.
    """

    #: Concurrency the machine offers, if the system decides it (else the machine reports it).
    maxprocs: int | None = None
    #: The cloud instance the machine runs on, on systems that have them (None elsewhere).
    instance_id: str | None = None

    def __init__(self) -> None:
        self._lost_callback: Callable[[BaseException], None] | None = None
        self._expect_exit = threading.Event()
        self._dead = threading.Event()
        self._death: BaseException | None = None
        self._death_lock = threading.Lock()
        #: The machine's name in its certificates (``System.new_machine_identity``), and the
        #: (ips, dns) names its server certificate carries; None on a system without TLS.
        self.identity: str | None = None
        self.cert_names: tuple[tuple[str, ...], tuple[str, ...]] = (("127.0.0.1",),
                                                                     ("localhost",))

    @abstractmethod
    def address(self, timeout: float) -> str:
        """Block until the machine serves, then return its ``https://host:port`` address
        (the one it announced: see ``bootstrap``).

        Raise ``BootError`` if it never will (the process died, the instance failed).
        """

    @abstractmethod
    def kill(self) -> None:
        """End the machine at once, without asking it."""

    @abstractmethod
    def wait_stopped(self, timeout: float) -> bool:
        """After an orderly shutdown request, wait until the machine is gone and its last log
        lines have reached the driver. False on timeout."""

    def boot_phase(self) -> str | None:
        """What the machine's boot is doing now, in a few words, for the status page (say,
        ``"waiting for an EC2 instance"``); None when the system does not say or the boot is
        over."""
        return None

    def died(self, grace: float = 0.0) -> BaseException | None:
        """If the machine is known dead (waiting up to ``grace`` seconds for word of it),
        why; else None. Answers from ``mark_dead``: it never asks the machine or a cloud."""
        if grace > 0:
            self._dead.wait(grace)
        return self._death

    def mark_dead(self, reason: BaseException) -> None:
        """The system learned that the machine is gone, and why (the first word stays)."""
        with self._death_lock:
            if self._death is None:
                self._death = reason
        self._dead.set()

    def report_lost(self, reason: BaseException) -> None:
        """The machine is gone (``mark_dead``); unless the driver asked it to exit, its
        session is told (``on_lost``) and stops it at once."""
        self.mark_dead(reason)
        if self._expect_exit.is_set():
            return
        cb = self._lost_callback
        if cb is not None:
            cb(self._death or reason)

    @property
    def exit_expected(self) -> bool:
        """Whether the driver asked the machine to exit (``expect_exit``)."""
        return self._expect_exit.is_set()

    def expect_exit(self) -> None:
        """The driver asked the machine to exit: its exit is not a failure."""
        self._expect_exit.set()

    def on_lost(self, callback: Callable[[BaseException], None]) -> None:
        """Have ``callback(reason)`` called when the machine dies unexpectedly."""
        self._lost_callback = callback

    def log_label(self, label: str) -> None:  # noqa: B027 - optional hook
        """The driver tells the handle how to prefix the machine's log lines."""

    def keepalive_failed(self) -> None:  # noqa: B027 - optional hook
        """A keepalive to the machine failed. A system that can ask elsewhere whether the
        machine's host is gone (a cloud API) starts asking now; it must not block."""


class System(ABC):
    """A backend that provides machines: ``threads``, ``local``, ``ec2``.

    Options every system takes: the keepalive settings, ``boot_timeout``, and ``env_allow``
    (names or patterns of the driver's environment variables that machines of a system that
    does not ``inherits_environment`` get; see ``machine_environment``).
    """

    name: ClassVar[str]
    #: Whether machines get the driver's whole environment (plus ``env``). True only for
    #: systems whose machines run on this host as this user; a remote system leaves it False.
    inherits_environment: ClassVar[bool] = False
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
        env_allow: Iterable[str] = (),
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
        if isinstance(env_allow, str):
            env_allow = (env_allow,)
        #: Names or ``fnmatch`` patterns of the driver's variables that remote machines get.
        self.env_allow: tuple[str, ...] = tuple(env_allow)

    @abstractmethod
    def start(self, count: int, env: Mapping[str, str]) -> list[MachineHandle]:
        """Launch ``count`` machines with extra environment ``env``; do not wait for them.

        A machine's environment is ``machine_environment(env)``: a remote system must send
        that and nothing else."""

    def machine_environment(self, env: Mapping[str, str],
                            source: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment to give a machine: ``env`` (given to ``start``) over what it takes
        from ``source`` (default ``os.environ``, the driver's).

        A system that ``inherits_environment`` takes all of ``source``. Any other takes only
        bigexec's own ``BIGEXEC_*`` settings and the variables ``env_allow`` matches, and
        never a credential (``CREDENTIAL_PATTERNS``) unless ``env_allow`` names it exactly.
        """
        source = os.environ if source is None else source
        if self.inherits_environment:
            return {**source, **env}
        exact = {p for p in self.env_allow if not any(c in p for c in "*?[")}
        patterns = [p for p in self.env_allow if p not in exact]
        out: dict[str, str] = {}
        for key, value in source.items():
            if key in exact or key.startswith("BIGEXEC_"):
                out[key] = value
            elif any(fnmatch.fnmatchcase(key, p) for p in patterns) and not any(
                fnmatch.fnmatchcase(key.upper(), c) for c in CREDENTIAL_PATTERNS
            ):
                out[key] = value
        out.update(env)
        return out

    # --- credentials ---------------------------------------------------------------------

    def credentials_authority(self) -> Authority | None:
        """The CA that vouches for this system's machines and driver (None: plain TCP)."""
        return None

    @property
    def renew_after(self) -> float:
        """Seconds after which a leaf this system issued is replaced by a fresh one."""
        return self.cert_lifetime * RENEW_FRACTION

    def _required_authority(self) -> Authority:
        authority = self.credentials_authority()
        if authority is None:
            raise RuntimeError(f"the {self.name} system has no certificate authority")
        return authority

    def _ttl(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=self.cert_lifetime)

    def new_machine_identity(self) -> str:
        """A name for a machine about to start, unique in this system's CA ("machine <n>"):
        its certificates carry it, and the servers it calls name it in what they log."""
        return self._required_authority().new_machine_name()

    def machine_credentials(self, identity: str, *, ips: Iterable[str] = ("127.0.0.1",),
                            dns: Iterable[str] = ("localhost",),
                            ) -> tuple[tls.Credentials, tls.Credentials] | None:
        """Fresh (server, client) credentials for machine ``identity``, living
        ``cert_lifetime`` seconds; None when the system has no TLS. The server certificate
        names the machine's addresses: loopback by default, for machines on this host."""
        if self.credentials_authority() is None:
            return None
        return self._required_authority().issue_machine(ips=ips, dns=dns, ttl=self._ttl(),
                                               name=identity)

    def renewed_machine_credentials(self, handle: MachineHandle,
                                    ) -> tuple[tls.Credentials, tls.Credentials] | None:
        """Fresh credentials for the running machine of ``handle``, under the same identity
        and names (see ``MachineHandle.identity`` and ``MachineHandle.cert_names``)."""
        if handle.identity is None:
            return None
        ips, dns = handle.cert_names
        return self.machine_credentials(handle.identity, ips=ips, dns=dns)

    def client_ssl(self) -> ssl.SSLContext | None:
        """The driver's TLS client context for new connections to this system's machines
        (None: plain TCP): a fresh one once ``renew_after`` seconds of the last have passed."""
        if self.credentials_authority() is None:
            return None
        with self._client_lock:
            now = time.monotonic()
            if self._client_ctx is None or now >= self._client_renew_at:
                creds = self._required_authority().issue_driver(ttl=self._ttl())
                self._client_ctx = tls.client_context(creds)
                self._client_renew_at = now + self.renew_after
            return self._client_ctx

    def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Release what the system holds (credentials, temp files); machines are gone by now."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"
