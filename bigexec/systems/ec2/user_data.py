"""The user-data an ``ec2`` instance boots with: cloud-init that writes the agent's bootstrap
document, installs bigexec (``InstallPlan``: pinned requirements or a wheelhouse) and starts
the agent, within EC2's 16 KB limit (``render_user_data``).
"""

from __future__ import annotations

import base64
import gzip
import importlib.metadata
import json
import logging
import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from ... import __version__

__all__ = ["AGENT_DOCUMENT_PATH", "BOOT_FAILED_MARK", "BOOT_LOG", "BOOT_REPORTER_PATH",
           "USER_DATA_LIMIT", "VENV", "InstallPlan", "PinnedRequirements", "Wheelhouse",
           "render_user_data"]

log = logging.getLogger("bigexec.systems.ec2")

AGENT_DOCUMENT_PATH = "/run/bigexec/agent.json"
#: EC2's limit on user-data, in raw bytes before base64.
USER_DATA_LIMIT = 16384


VENV = "/opt/bigexec/venv"
BOOT_LOG = "/var/log/bigexec-boot.log"


class InstallPlan(Protocol):
    """How an instance gets an environment with bigexec and the driver's distributions:
    ``shell(venv)`` is POSIX shell that leaves a virtualenv at ``venv``."""

    def shell(self, venv: str) -> str: ...


@dataclass(frozen=True)
class PinnedRequirements:
    """Install pinned requirements (``bigexec==X``, ``numpy==Y``, ...) from a package index:
    the real-EC2 path (the instance has the internet)."""

    requirements: tuple[str, ...]
    index_url: str | None = None

    @classmethod
    def from_driver(cls, extra: Iterable[str] = (), index_url: str | None = None,
                    ) -> PinnedRequirements:
        """bigexec at the driver's version, its dependencies at the versions the driver has,
        and ``extra`` (a bare name gets the driver's version of it, when installed)."""
        names: list[str] = []
        for line in importlib.metadata.requires("bigexec") or ():
            if "extra ==" in line.replace('"', "").replace("'", ""):
                continue  # an extra's (tests, benchmarks): not what the workers need
            found = _NAME.match(line)
            if found:
                names.append(found.group(0))
        pinned = [f"bigexec=={__version__}"] + [p for p in map(_pin, names) if p]
        for requirement in extra:
            pinned.append(_pin(requirement, keep=True) or requirement)
        return cls(tuple(dict.fromkeys(pinned)), index_url)

    def shell(self, venv: str) -> str:
        pip = [f"{venv}/bin/python", "-m", "pip", "install", "--isolated", "-q"]
        if self.index_url:
            pip += ["--index-url", self.index_url]
        # stock Ubuntu lacks ensurepip: install python3-venv when the plain venv fails
        return "\n".join([
            f"python3 -m venv {shlex.quote(venv)} || {{ apt-get update -q && "
            f"apt-get install -y -q python3-venv && python3 -m venv {shlex.quote(venv)}; }}",
            shlex.join(pip + list(self.requirements)),
        ])


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _pin(requirement: str, keep: bool = False) -> str | None:
    """``name==<the driver's version>`` for a bare name that is installed here; a requirement
    with a version or marker is kept as it is (``keep``) or left out."""
    requirement = requirement.strip()
    found = _NAME.fullmatch(requirement)
    if not found:
        return requirement if keep else None
    try:
        return f"{requirement}=={importlib.metadata.version(requirement)}"
    except importlib.metadata.PackageNotFoundError:
        return requirement if keep else None


@dataclass(frozen=True)
class Wheelhouse:
    """Install from a directory of wheels (``location``: a path on the instance, or an
    ``http(s)://`` URL of a tar archive of one) with no index: the offline path. The
    wheelhouse must hold a pip wheel, which runs pip without ensurepip."""

    location: str
    requirements: tuple[str, ...] = ("bigexec",)

    def shell(self, venv: str) -> str:
        lines = []
        where = self.location
        if where.startswith(("http://", "https://")):
            fetch = ("import sys, urllib.request as u; "
                     "sys.stdout.buffer.write(u.urlopen(sys.argv[1]).read())")
            lines.append(f"mkdir -p /opt/bigexec/wheels && python3 -c {shlex.quote(fetch)} "
                         f"{shlex.quote(where)} | tar -x -C /opt/bigexec/wheels")
            where = "/opt/bigexec/wheels"
        quoted = shlex.quote(where)
        lines += [
            f"python3 -m venv --without-pip {shlex.quote(venv)}",
            f"{shlex.quote(venv)}/bin/python \"$(ls {quoted}/pip-*.whl | head -n 1)\"/pip "
            f"install --isolated -q --no-index --find-links {quoted} "
            + shlex.join(self.requirements),
        ]
        return "\n".join(lines)


#: Where the user-data puts the boot-failure reporter.
BOOT_REPORTER_PATH = "/run/bigexec/boot-failed.py"
#: The first line of what the reporter answers, whatever it is asked.
BOOT_FAILED_MARK = "bigexec-boot-failed"

# A boot that fails before the agent runs (an install that fails) still tells the driver why:
# this stand-in, standard library only, serves the boot log's last lines on the agent's port,
# with the agent's certificate, to clients of the session's CA only, until the power-off.
_BOOT_REPORTER = """\
import json, os, socket, ssl, sys, tempfile
port, log, doc = int(sys.argv[1]), sys.argv[2], json.load(open(sys.argv[3]))
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.verify_mode = ssl.CERT_REQUIRED
ctx.load_verify_locations(cadata=doc["ca_pem"])
fd, path = tempfile.mkstemp(dir=os.path.dirname(sys.argv[3]))
os.write(fd, (doc["cert_pem"] + doc["key_pem"]).encode())
os.close(fd)
ctx.load_cert_chain(path)
os.unlink(path)
server = socket.create_server(("0.0.0.0", port))
while True:
    raw, _ = server.accept()
    try:
        raw.settimeout(10)
        with ctx.wrap_socket(raw, server_side=True) as c:
            data = b""
            while b"\\r\\n\\r\\n" not in data and len(data) < 65536:
                chunk = c.recv(4096)
                if not chunk:
                    break
                data += chunk
            head, _, body = data.partition(b"\\r\\n\\r\\n")
            for line in head.split(b"\\r\\n"):
                if line.lower().startswith(b"content-length:"):
                    want = int(line.split(b":")[1]) - len(body)
                    while want > 0:
                        chunk = c.recv(min(want, 65536))
                        if not chunk:
                            break
                        want -= len(chunk)
            with open(log, "rb") as f:
                tail = b"".join(f.readlines()[-40:])
            text = b"%s\\n" % MARK.encode() + tail
            c.sendall(b"HTTP/1.1 503 Service Unavailable\\r\\nContent-Type: text/plain\\r\\n"
                      b"Content-Length: %d\\r\\nConnection: close\\r\\n\\r\\n" % len(text) + text)
    except Exception:
        pass
"""


def _boot_script(install: InstallPlan, poweroff_on_failure: int, port: int) -> str:
    agent = [f"{VENV}/bin/python3", "-m", "bigexec.agent", "--bootstrap", AGENT_DOCUMENT_PATH]
    reporter = ["python3", BOOT_REPORTER_PATH, str(port), BOOT_LOG, AGENT_DOCUMENT_PATH]
    on_failure = (f"echo bigexec: bootstrap failed; shutdown -h +{poweroff_on_failure}; "
                  f"setsid {shlex.join(reporter)} </dev/null >/dev/null 2>&1 &")
    return "\n".join([
        "set -e",
        f"exec >>{BOOT_LOG} 2>&1",
        # a boot that fails says why, and leaves no orphan even when the driver is gone
        f"trap {shlex.quote(on_failure)} EXIT",
        install.shell(VENV),
        "trap - EXIT",
        # the agent runs on after cloud-init's final stage ends
        f"setsid nohup {shlex.join(agent)} >>{BOOT_LOG} 2>&1 </dev/null &",
    ])


def render_user_data(agent_document: bytes, install: InstallPlan, *,
                     poweroff_on_failure_minutes: int = 5, port: int | None = None) -> bytes:
    """The user-data for an instance: a ``#cloud-config`` that writes ``agent_document``
    (the agent's bootstrap JSON) to /run/bigexec/agent.json with mode 0600, installs with
    ``install`` and starts the agent. JSON is YAML, so the document is written as JSON.
    ``port`` (default: the document's) is where a boot that fails reports why.
    Gzipped when the plain text exceeds EC2's 16,384-byte limit; ValueError when even that
    does not fit."""
    if port is None:
        try:
            port = int(json.loads(agent_document)["port"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"not an agent document with a port: {exc}") from None
    reporter = _BOOT_REPORTER.replace("MARK.encode()", repr(BOOT_FAILED_MARK.encode()))
    config = {
        "write_files": [{"path": AGENT_DOCUMENT_PATH, "permissions": "0600",
                         "owner": "root:root", "encoding": "b64",
                         "content": base64.b64encode(agent_document).decode("ascii")},
                        {"path": BOOT_REPORTER_PATH, "permissions": "0700",
                         "owner": "root:root", "encoding": "b64",
                         "content": base64.b64encode(reporter.encode()).decode("ascii")}],
        "runcmd": [["sh", "-c", _boot_script(install, poweroff_on_failure_minutes, port)]],
    }
    plain = ("#cloud-config\n" + json.dumps(config, indent=1) + "\n").encode()
    if len(plain) <= USER_DATA_LIMIT:
        return plain
    packed = gzip.compress(plain, mtime=0)
    if len(packed) <= USER_DATA_LIMIT:
        return packed
    raise ValueError(
        f"EC2 user-data is limited to {USER_DATA_LIMIT} bytes before base64; this one is "
        f"{len(plain)} bytes ({len(packed)} gzipped): ship large files after boot instead")
