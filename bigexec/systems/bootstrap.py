"""The bootstrap protocol: how a system turns a fresh worker process into a machine.

    driver: the system's module                 worker: python -m bigexec.worker
    ───────────────────────────                 ─────────────────────────────────
    WorkerSpec(system, lease, maxprocs,
      listen/advertised host, credentials
      for the advertised host, the driver's
      Versions)
        ── spec.encode() over the system's ──>  read_spec(): versions differ from its own:
           channel: stdin on ``local`` (stdin     print why, exit EXIT_VERSION_MISMATCH
           then stays open: the lifeline);       else listen on (listen_host, port 0)
           user-data or an agent elsewhere
    handle.address() <── announcement line ───  "bigexec-worker-listening https://HOST:PORT":
        (a pipe on local: ``announce_fd``;       the advertised address, which the driver and
         else the worker's output)               the other machines use
    MachineOutput <──── output, line by line ─  stdout and stderr (a pipe on local; a stream
        prefixed with the machine's address,     over RPC from an agent elsewhere)
        boot noise held back, the last lines
        kept for a BootError
    handle.mark_dead(why) <── the system's own word: a child's exit status, an agent's report,
        the cloud API's instance state; ``died()`` answers from it and never asks anyone
    handle.report_lost(why) ── the machine died unexpectedly: the session stops it at once

A system implements this in one module (see ``local`` and ``threads``): it starts workers,
delivers each its ``WorkerSpec``, turns the announcement into ``MachineHandle.address``, feeds
the worker's output to a ``MachineOutput`` and its death to ``mark_dead``/``report_lost``.
Nothing in ``Machine``, the scheduler or the other systems changes for a new one.

Credentials: the spec carries the machine's server certificate (issued for the advertised
host, so the system must know it when it issues, as ``local`` does) and its client
certificate, each with the CA *certificate*, never the CA's key. They travel in memory (stdin)
wherever the channel allows it. Versions: the worker refuses a driver whose Python (major.minor),
bigexec or cloudpickle differ from its own, since pickled code needs all three to agree, and
the driver checks the same from ``Supervisor.info`` (``check_versions``) for systems that send
no spec, each naming both sides.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import cloudpickle

from .. import __version__, logsink, tls
from ..errors import BootError

__all__ = ["ANNOUNCE_PREFIX", "EXIT_VERSION_MISMATCH", "SPEC_END", "MachineOutput", "Versions",
           "WorkerSpec", "check_versions", "format_address", "parse_announcement",
           "read_spec", "version_refusal"]

#: Starts the line in which a worker announces the address it serves at.
ANNOUNCE_PREFIX = "bigexec-worker-listening "
#: Ends a spec on its channel (which may stay open after it: the lifeline).
SPEC_END = tls.CREDENTIALS_END
#: Exit status of a worker that refused its driver's versions (its last line says which).
EXIT_VERSION_MISMATCH = 5
_MAGIC = b"bigexec-worker-spec 1\n"
_MAX_SPEC_BYTES = 1 << 20


class Versions(NamedTuple):
    """What pickled code needs a driver and its machines to agree on."""

    python: str  # major.minor: pickles of code objects change between minor versions
    bigexec: str
    cloudpickle: str

    @classmethod
    def here(cls) -> Versions:
        return cls(f"{sys.version_info[0]}.{sys.version_info[1]}", __version__,
                   cloudpickle.__version__)

    def describe(self) -> str:
        return f"Python {self.python}, bigexec {self.bigexec}, cloudpickle {self.cloudpickle}"

    def mismatch(self, machine: Versions, where: str = "the machine") -> str | None:
        """What differs between these (the driver's) and ``machine``'s versions, in words that
        name both sides; None when they agree."""
        differ = [name for name, a, b in zip(self._fields, self, machine, strict=True) if a != b]
        if not differ:
            return None
        return (f"{where} runs {machine.describe()} but the driver runs {self.describe()}; "
                f"pickled code needs the same {', '.join(differ)} on both sides")


def check_versions(info: dict[str, Any], where: str) -> None:
    """Raise ``BootError`` if the machine that reported ``info`` (``Supervisor.info``) runs
    other versions than this driver. A machine that does not report one is not judged on it."""
    here = Versions.here()
    theirs = Versions(
        ".".join(str(p) for p in tuple(info.get("version_info", ()))[:2]) or here.python,
        str(info.get("bigexec_version", here.bigexec)),
        str(info.get("cloudpickle_version", here.cloudpickle)),
    )
    problem = here.mismatch(theirs, where)
    if problem is not None:
        raise BootError(problem)


def format_address(host: str, port: int) -> str:
    """The ``https://host:port`` address of a machine serving on ``port`` at ``host``."""
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


def parse_announcement(line: str) -> str | None:
    """The address in a worker's announcement line; None if ``line`` is not one."""
    if not line.startswith(ANNOUNCE_PREFIX):
        return None
    addr = line[len(ANNOUNCE_PREFIX):].strip()
    return addr if addr.startswith(("https://", "http://")) else None


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker is told at boot. ``encode`` and ``decode`` it on any channel."""

    system: str
    #: Seconds the worker lives without a keepalive (its first lease covers its boot).
    lease: float
    maxprocs: int = 1
    #: The address the worker binds; ``advertise_host`` (default: the same) is the one the
    #: driver and other machines reach it at, and the one its server certificate names.
    listen_host: str = "127.0.0.1"
    advertise_host: str | None = None
    #: The port it binds: 0 (the default) lets the kernel choose, so there is no free-port
    #: race; a system whose firewall opens known ports (``ec2``'s security group) names one.
    listen_port: int = 0
    #: The machine's (server, client) credentials; None serves plain HTTP.
    credentials: tuple[tls.Credentials, tls.Credentials] | None = field(default=None,
                                                                         repr=False)
    #: The driver's versions: the worker refuses to serve a driver whose versions differ.
    versions: Versions = field(default_factory=Versions.here)
    #: A descriptor the worker writes its announcement to (inherited from the system);
    #: None: the worker prints it on stdout, for channels that carry output only.
    announce_fd: int | None = None

    def __post_init__(self) -> None:
        if not self.lease > 0:
            raise ValueError(f"lease must be positive, not {self.lease!r}")
        if not isinstance(self.maxprocs, int) or self.maxprocs < 1:
            raise ValueError(f"maxprocs must be a positive int, not {self.maxprocs!r}")
        if (isinstance(self.listen_port, bool) or not isinstance(self.listen_port, int)
                or not 0 <= self.listen_port < 65536):
            raise ValueError(f"listen_port must be an int in 0..65535, not {self.listen_port!r}")

    @property
    def host(self) -> str:
        """The host the machine is reached at."""
        return self.advertise_host or self.listen_host

    def address(self, port: int) -> str:
        return format_address(self.host, port)

    def encode(self) -> bytes:
        """The spec as bytes: a header, the settings as one JSON line, the credentials' PEM,
        then ``SPEC_END``."""
        settings = {"system": self.system, "lease": self.lease, "maxprocs": self.maxprocs,
                    "listen_host": self.listen_host, "advertise_host": self.advertise_host,
                    "listen_port": self.listen_port, "versions": self.versions._asdict(),
                    "announce_fd": self.announce_fd}
        pem = (tls.machine_credentials_to_pem(*self.credentials)
               if self.credentials is not None else b"")
        return _MAGIC + json.dumps(settings).encode() + b"\n" + pem + SPEC_END

    @classmethod
    def decode(cls, data: bytes) -> WorkerSpec:
        """The spec ``encode`` wrote (``SPEC_END`` optional); ``ValueError`` for anything else."""
        if not data.startswith(_MAGIC):
            raise ValueError("not a bigexec worker spec (a bigexec driver starts workers)")
        if data.endswith(SPEC_END):
            data = data[: -len(SPEC_END)]
        line, _, pem = data[len(_MAGIC):].partition(b"\n")
        try:
            settings = json.loads(line)
            versions = Versions(**settings.pop("versions"))
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"a bigexec worker spec with bad settings: {exc}") from None
        creds = tls.machine_credentials_from_pem(pem) if pem.strip() else None
        return cls(credentials=creds, versions=versions, **settings)


def read_spec(fd: int) -> WorkerSpec:
    """Read a spec from descriptor ``fd`` up to ``SPEC_END``, leaving the descriptor open
    (on ``local`` it is the lifeline). Raw reads: a thread that later blocks on the same
    descriptor must not sit inside a buffered reader, or the interpreter aborts at exit."""
    data = b""
    while SPEC_END not in data:
        chunk = os.read(fd, 65536)
        if not chunk:
            break  # the driver died, or wrote no end: decode says what is wrong
        data += chunk
        if len(data) > _MAX_SPEC_BYTES:
            raise ValueError(f"a bigexec worker spec over {_MAX_SPEC_BYTES} bytes")
    end = data.find(SPEC_END)
    return WorkerSpec.decode(data if end < 0 else data[: end + len(SPEC_END)])


def version_refusal(spec: WorkerSpec) -> str | None:
    """Why a worker must refuse ``spec``'s driver (its versions), or None."""
    return spec.versions.mismatch(Versions.here(), f"this machine ({platform.node()})")


class MachineOutput:
    """A worker's output on its way to the driver's stderr, whatever carries it.

    Each line goes out prefixed with the machine's label (its address once known) through
    ``logsink``, so that a stderr nobody reads never blocks the worker. Lines before the worker
    listens are boot noise (interpreter start-up): held back unless ``show_boot``, and the
    last ``keep`` of them are kept, so that a boot failure quotes them (``boot_error``). An
    announcement line is taken out of the output: ``address`` returns it.
    """

    def __init__(self, label: str, *, show_boot: bool = False, keep: int = 20) -> None:
        self.label = label
        self._boot_lines: deque[str] = deque(maxlen=keep)
        self._listening = False
        self._printing = show_boot
        self._announced = threading.Event()
        self._addr: str | None = None
        self._ended = threading.Event()

    @property
    def listening(self) -> bool:
        return self._listening

    def mark_listening(self, label: str | None = None) -> None:
        """The worker serves: print its lines from now on, under ``label`` if given."""
        if label is not None:
            self.label = label
        self._listening = True
        self._printing = True

    def line(self, text: str) -> None:
        """One line of the worker's output (with or without its newline)."""
        if not text.endswith("\n"):
            text += "\n"
        addr = parse_announcement(text)
        if addr is not None and self._addr is None:
            self._addr = addr
            self._announced.set()
            return
        if not self._listening:
            self._boot_lines.append(text)
        if self._printing:
            logsink.stderr_sink().put(f"{self.label}: {text}")

    def pump(self, lines: Iterator[bytes]) -> None:
        """Feed every line of ``lines`` (a pipe's, a stream's) until it ends, then ``end``."""
        try:
            for raw in lines:
                self.line(raw.decode("utf-8", "replace"))
        finally:
            self.end()

    def end(self) -> None:
        """The output is over (the worker's end of the channel closed)."""
        self._ended.set()
        self._announced.set()  # nobody waits for an announcement that cannot come

    def wait_ended(self, timeout: float) -> bool:
        return self._ended.wait(timeout)

    def announced(self, timeout: float) -> str | None:
        """The address announced in the output, waiting up to ``timeout``; None if the output
        ended without one or the time ran out."""
        self._announced.wait(timeout)
        return self._addr

    def flush(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the lines given so far to reach stderr."""
        logsink.stderr_sink().flush(timeout)

    def boot_error(self, who: str, what: str) -> BootError:
        """``BootError`` for a worker ``who`` that ``what`` (e.g. "exited with status 1 before
        it listened"): it names the worker's last output line and quotes the lines before."""
        lines = [line.rstrip("\n") for line in self._boot_lines]
        last = next((line.strip() for line in reversed(lines) if line.strip()), "")
        msg = f"worker {who} {what}"
        if last:
            msg += f": {last}"
            msg += "\n  its last output lines:\n" + "".join(f"    {line}\n" for line in lines)
        else:
            msg += " (it printed nothing)"
        return BootError(msg.rstrip("\n"))
