"""The agent itself: its workers, its lease and watchdog, and the "Agent" service.

    driver                                     agent (this module, on the instance)
    ──────                                     ────────────────────────────────────
    Agent.identity() ────────────────────────> instance id, session, versions: the cookie a
                                               driver checks so a recycled IP never answers
                                               for another instance
    Agent.has_bundle(digest) / put_bundle ───> the driver's own modules (``CodeBundle``),
                                               kept in the bundle directory by digest
    Agent.start_worker(spec, env, bundle) ───> a WorkerProcess: id at once (env: the variables
                                               the driver sends, over the agent's own; the
                                               bundle first on its PYTHONPATH)
    Agent.address(id, timeout) ──────────────> its announced address, or a BootError quoting
                                               its last lines
    Agent.output(id) ────────────────────────> a Stream of its output lines
    Agent.status(id) / Agent.kill(id)
    Agent.renew_credentials(ca, cert, key) ──> the agent serves new connections with them:
                                               its own leaf, given once it is up (the
                                               user-data's is shared by a launch), then
                                               again before each expires
    Agent.keepalive(lease) ──────────────────> extends the agent's lease
    Agent.heartbeat(lease) ──────────────────> the same, and in the answer: every worker's
                                               status and the spot interruption notice, if
                                               the metadata service gave one (polled every
                                               few seconds by the agent's notice thread)
                                               watchdog: lease lapsed (the driver is gone) ─>
                                               kill every worker, run the poweroff command
                                               once (with shutdown behaviour "terminate",
                                               powering off ends the instance)

After the lapse the agent refuses new workers and keepalives: its instance is going away.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from .. import __version__, tls
from ..systems.bootstrap import WorkerSpec
from ..systems.code_bundle import CodeBundle
from .document import check_agent_credentials
from .workers import WorkerProcess

__all__ = ["Agent", "AgentService", "LeaseLapsed"]

log = logging.getLogger("bigexec.agent")

_POWEROFF_TIMEOUT = 60.0


class LeaseLapsed(RuntimeError):
    """The agent's lease lapsed: its workers are gone and its instance powers off."""


class Agent:
    """An instance's workers, under one lease held by the driver."""

    def __init__(self, *, session: str, instance_id: str, lease: float,
                 poweroff: Sequence[str], python: str = sys.executable,
                 run: Callable[[Sequence[str]], int] | None = None,
                 notices: Callable[[], dict[str, Any] | None] | None = None,
                 notice_period: float = 5.0, bundles: str | None = None) -> None:
        self.session = session
        self.instance_id = instance_id
        self.python = python
        self.poweroff_command = tuple(poweroff)
        self._run = run or _run_poweroff
        self._lock = threading.Lock()
        self._workers: dict[str, WorkerProcess] = {}
        self._ids = itertools.count(1)
        self._deadline = time.monotonic() + lease
        self._lapsed = threading.Event()
        self._stop = threading.Event()
        #: The poweroff command's exit status, once it ran.
        self.poweroff_status: int | None = None
        self._notices = notices
        #: Where code bundles are kept (None: in a directory of the agent's own, made at
        #: the first bundle).
        self.bundle_dir = bundles
        self._notice_period = notice_period
        #: The interruption notice EC2 gave for this instance, once it gave one.
        self.notice: dict[str, Any] | None = None
        #: Called with new server credentials (``renew_credentials``): the agent's server
        #: takes them for new connections.
        self.on_credentials: Callable[[tls.Credentials], None] | None = None

    # --- workers ------------------------------------------------------------------------------

    # --- code bundles -------------------------------------------------------------------

    def _bundle_path(self, digest: str) -> str:
        if not (len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
            raise ValueError(f"a bundle digest is 64 hex digits, not {digest[:80]!r}")
        with self._lock:
            if self.bundle_dir is None:
                self.bundle_dir = tempfile.mkdtemp(prefix="bigexec-bundles-")
            return os.path.join(self.bundle_dir, f"{digest}.zip")

    def has_bundle(self, digest: str) -> bool:
        return os.path.exists(self._bundle_path(digest))

    def put_bundle(self, digest: str, data: bytes) -> None:
        path = self._bundle_path(digest)
        CodeBundle.check(digest, data)
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        part = f"{path}.{os.getpid()}.{threading.get_ident()}.part"
        with open(part, "wb") as f:
            f.write(data)
        os.replace(part, path)  # whole or not at all, for a worker that starts meanwhile

    def start_worker(self, spec: WorkerSpec, env: Mapping[str, str] | None = None,
                     bundle: str | None = None) -> str:
        """Start a worker on ``spec`` with the agent's environment plus ``env`` and the
        code bundle ``bundle`` (a digest given to ``put_bundle``) first on its path; its
        id."""
        environ = {**os.environ, **(env or {})}
        if bundle is not None:
            path = self._bundle_path(bundle)
            if not os.path.exists(path):
                raise LookupError(f"no code bundle {bundle[:12]}... on this instance: "
                                  f"put_bundle it first")
            environ["PYTHONPATH"] = os.pathsep.join(
                p for p in (path, environ.get("PYTHONPATH", "")) if p)
        with self._lock:
            if self._lapsed.is_set():
                raise LeaseLapsed("the agent's lease lapsed: it starts no more workers")
            worker_id = f"w{next(self._ids)}"
            self._workers[worker_id] = WorkerProcess(worker_id, spec, python=self.python,
                                                     env=environ)
        return worker_id

    def statuses(self) -> dict[str, int | None]:
        """Every worker's exit status (None while it runs)."""
        with self._lock:
            workers = dict(self._workers)
        return {wid: w.status() for wid, w in workers.items()}

    def worker(self, worker_id: str) -> WorkerProcess:
        with self._lock:
            found = self._workers.get(worker_id)
        if found is None:
            raise LookupError(f"no worker {worker_id!r} on instance {self.instance_id}")
        return found

    def worker_ids(self) -> list[str]:
        with self._lock:
            return list(self._workers)

    def kill_all(self, wait: float = 10.0) -> None:
        with self._lock:
            workers = list(self._workers.values())
        for w in workers:
            w.kill()
        deadline = time.monotonic() + wait
        for w in workers:
            w.wait(max(0.0, deadline - time.monotonic()))

    # --- lease --------------------------------------------------------------------------------

    def keepalive(self, lease: float) -> float:
        if isinstance(lease, bool) or not isinstance(lease, (int, float)) or not (
                math.isfinite(lease) and lease > 0):
            raise ValueError(f"lease must be a positive number of seconds, not {lease!r}")
        with self._lock:
            if self._lapsed.is_set():
                raise LeaseLapsed("the agent's lease lapsed: its workers are gone and its "
                                  "instance is powering off")
            self._deadline = time.monotonic() + lease
        return float(lease)

    def lease_remaining(self) -> float:
        with self._lock:
            return self._deadline - time.monotonic()

    @property
    def lapsed(self) -> bool:
        return self._lapsed.is_set()

    def start_watchdog(self) -> None:
        threading.Thread(target=self._watchdog, name="bigexec-agent-watchdog",
                         daemon=True).start()
        if self._notices is not None:
            threading.Thread(target=self._watch_notices, name="bigexec-agent-notices",
                             daemon=True).start()

    def _watch_notices(self) -> None:
        assert self._notices is not None
        while not self._stop.is_set() and self.notice is None:
            try:
                notice = self._notices()
            except Exception as exc:  # the metadata service hiccuped: ask again
                log.debug("asking for a spot interruption notice failed: %s", exc)
                notice = None
            if notice is not None:
                log.warning("EC2 gave this instance an interruption notice: %s", notice)
                self.notice = notice
                return
            self._stop.wait(self._notice_period)

    def _watchdog(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                left = self._deadline - time.monotonic()
                if left <= 0:
                    self._lapsed.set()  # under the lock: no keepalive slips in after this
            if left <= 0:
                self._power_off(-left)
                return
            self._stop.wait(min(1.0, max(0.05, left / 2)))

    def _power_off(self, late: float) -> None:
        log.warning("the driver's lease lapsed %.1fs ago: killing %d workers, then powering "
                    "off with %s", late, len(self.worker_ids()), " ".join(self.poweroff_command))
        self.kill_all()
        self.poweroff_status = self._run(self.poweroff_command)
        if self.poweroff_status != 0:
            log.error("the poweroff command %s exited with status %s: this instance stays up "
                      "until it is terminated (bigexec ec2 sweep finds it)",
                      list(self.poweroff_command), self.poweroff_status)

    def close(self) -> None:
        """Stop the watchdog and kill the workers (the agent is ending, not the instance)."""
        self._stop.set()
        self.kill_all()


def _run_poweroff(command: Sequence[str]) -> int:
    try:
        return subprocess.run(list(command), stdin=subprocess.DEVNULL,
                              timeout=_POWEROFF_TIMEOUT).returncode
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.error("the poweroff command %s failed: %s", list(command), exc)
        return -1


class AgentService:
    """The "Agent" service the driver calls (see the module's diagram)."""

    def __init__(self, agent: Agent) -> None:
        self._agent = agent

    def identity(self) -> dict[str, Any]:
        """Who answers: the instance-id cookie, the session, and what the agent runs."""
        a = self._agent
        return {"instance_id": a.instance_id, "session": a.session,
                "bigexec_version": __version__,
                "python": ".".join(str(p) for p in sys.version_info[:3]),
                "cpu_count": os.cpu_count() or 1}

    def has_bundle(self, digest: str) -> bool:
        """Whether the code bundle of this digest is here already."""
        return self._agent.has_bundle(digest)

    def put_bundle(self, digest: str, data: bytes) -> None:
        """Keep the code bundle ``data`` (a zip whose sha256 is ``digest``)."""
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"a code bundle is bytes, not {type(data).__name__}")
        self._agent.put_bundle(digest, bytes(data))

    def start_worker(self, spec: bytes, env: Mapping[str, str] | None = None,
                     bundle: str | None = None) -> str:
        """Start a worker with this ``WorkerSpec`` (encoded), extra environment ``env``
        (over the agent's own) and the code bundle ``bundle`` (a digest); its id, at once."""
        if not isinstance(spec, (bytes, bytearray)):
            raise TypeError(f"spec must be an encoded WorkerSpec (bytes), not "
                            f"{type(spec).__name__}")
        if env is not None and not (isinstance(env, Mapping) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in env.items())):
            raise TypeError("env must map str to str")
        return self._agent.start_worker(WorkerSpec.decode(bytes(spec)), env, bundle)

    def address(self, worker_id: str, timeout: float = 60.0) -> str:
        """The worker's announced address; ``BootError`` with its last lines if it died or
        stayed silent first."""
        return self._agent.worker(worker_id).address(timeout)

    def output(self, worker_id: str) -> Iterator[bytes]:
        """The worker's output lines (stdout and stderr), from its start, as a stream that
        ends when its output ends."""
        return self._agent.worker(worker_id).lines()

    def status(self, worker_id: str) -> int | None:
        """None while the worker runs, else its exit status (negative: the signal)."""
        return self._agent.worker(worker_id).status()

    def kill(self, worker_id: str) -> None:
        """SIGKILL the worker and whatever its tasks started."""
        self._agent.worker(worker_id).kill()

    def workers(self) -> list[str]:
        """The ids of the workers this agent started, running or not."""
        return self._agent.worker_ids()

    def keepalive(self, lease: float) -> float:
        """Hold the agent for ``lease`` more seconds; returns the lease granted."""
        return self._agent.keepalive(lease)

    def renew_credentials(self, ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> bool:
        """Serve new connections with this leaf (the CA's certificate, the leaf's, its key);
        connections open now keep theirs."""
        creds = tls.Credentials(bytes(ca_pem), bytes(cert_pem), bytes(key_pem))
        check_agent_credentials(creds)
        if self._agent.on_credentials is None:
            raise RuntimeError("this agent cannot take new credentials")
        self._agent.on_credentials(creds)
        return True

    def heartbeat(self, lease: float) -> dict[str, Any]:
        """``keepalive``, answering with what the driver watches: {"lease": granted,
        "workers": {id: exit status or None}, "notice": EC2's interruption notice or None}."""
        granted = self._agent.keepalive(lease)
        return {"lease": granted, "workers": self._agent.statuses(),
                "notice": self._agent.notice}
