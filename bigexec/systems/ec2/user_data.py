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

__all__ = ["AGENT_DOCUMENT_PATH", "BOOT_FAILED_MARK", "BOOT_LOG", "STAND_IN_PATH",
           "USER_DATA_LIMIT", "VENV", "WANTS_WHEEL_MARK", "WHEEL_PATH", "InstallPlan",
           "PinnedRequirements", "Wheelhouse", "render_user_data"]

log = logging.getLogger("bigexec.systems.ec2")

AGENT_DOCUMENT_PATH = "/run/bigexec/agent.json"
#: EC2's limit on user-data, in raw bytes before base64.
USER_DATA_LIMIT = 16384


VENV = "/opt/bigexec/venv"
BOOT_LOG = "/var/log/bigexec-boot.log"


class InstallPlan(Protocol):
    """How an instance gets an environment with bigexec and the driver's distributions:
    ``shell(venv)`` is POSIX shell that leaves a virtualenv at ``venv`` and ``pip(venv)`` the
    command that runs pip there. With ``driver_wheel`` the plan installs bigexec's
    dependencies only, and bigexec is the driver's own (``OwnWheel``), sent after boot."""

    @property
    def driver_wheel(self) -> bool: ...

    def shell(self, venv: str) -> str: ...

    def pip(self, venv: str) -> str: ...


@dataclass(frozen=True)
class PinnedRequirements:
    """Install pinned requirements (``bigexec==X``, ``numpy==Y``, ...) from a package index:
    the real-EC2 path (the instance has the internet)."""

    requirements: tuple[str, ...]
    index_url: str | None = None
    driver_wheel: bool = False

    @classmethod
    def from_driver(cls, extra: Iterable[str] = (), index_url: str | None = None, *,
                    driver_wheel: bool = True) -> PinnedRequirements:
        """bigexec's dependencies at the versions the driver has, and ``extra`` (a bare name
        gets the driver's version of it, when installed); bigexec itself is the driver's own
        (``driver_wheel``), else the driver's version from the index."""
        names: list[str] = []
        for line in importlib.metadata.requires("bigexec") or ():
            if "extra ==" in line.replace('"', "").replace("'", ""):
                continue  # an extra's (tests, benchmarks): not what the workers need
            found = _NAME.match(line)
            if found:
                names.append(found.group(0))
        pinned = [] if driver_wheel else [f"bigexec=={__version__}"]
        pinned += [p for p in map(_pin, names) if p]
        for requirement in extra:
            pinned.append(_pin(requirement, keep=True) or requirement)
        return cls(tuple(dict.fromkeys(pinned)), index_url, driver_wheel)

    def pip(self, venv: str) -> str:
        return f"{shlex.quote(venv)}/bin/python -m pip"

    def shell(self, venv: str) -> str:
        pip = [f"{venv}/bin/python", "-m", "pip", "install", "--isolated", "-q"]
        if self.index_url:
            pip += ["--index-url", self.index_url]
        # stock Ubuntu lacks ensurepip: install python3-venv when the plain venv fails
        lines = [
            f"python3 -m venv {shlex.quote(venv)} || {{ apt-get update -q && "
            f"apt-get install -y -q python3-venv && python3 -m venv {shlex.quote(venv)}; }}",
        ]
        if self.requirements:
            lines.append(shlex.join(pip + list(self.requirements)))
        return "\n".join(lines)


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
    #: bigexec is the driver's own, sent after boot (``requirements`` then name its
    #: dependencies, not bigexec).
    driver_wheel: bool = False

    def _where(self) -> str:
        if self.location.startswith(("http://", "https://")):
            return "/opt/bigexec/wheels"
        return self.location

    def pip(self, venv: str) -> str:
        # pip runs from its own wheel: the venv has none (no ensurepip needed)
        return (f"{shlex.quote(venv)}/bin/python "
                f"\"$(ls {shlex.quote(self._where())}/pip-*.whl | head -n 1)\"/pip")

    def shell(self, venv: str) -> str:
        lines = []
        if self.location.startswith(("http://", "https://")):
            fetch = ("import sys, urllib.request as u; "
                     "sys.stdout.buffer.write(u.urlopen(sys.argv[1]).read())")
            lines.append(f"mkdir -p /opt/bigexec/wheels && python3 -c {shlex.quote(fetch)} "
                         f"{shlex.quote(self.location)} | tar -x -C /opt/bigexec/wheels")
        quoted = shlex.quote(self._where())
        lines.append(f"python3 -m venv --without-pip {shlex.quote(venv)}")
        if self.requirements:
            lines.append(f"{self.pip(venv)} install --isolated -q --no-index --find-links "
                         f"{quoted} " + shlex.join(self.requirements))
        return "\n".join(lines)


#: Where the user-data puts the stand-in (``_STAND_IN``).
STAND_IN_PATH = "/run/bigexec/stand-in.py"
#: The first line of the stand-in's answers: a boot that failed, and one that waits for the
#: driver's own bigexec.
BOOT_FAILED_MARK = "bigexec-boot-failed"
WANTS_WHEEL_MARK = "bigexec-wants-wheel"
#: Where the driver puts its wheel (``PUT`` with the wheel's file name after it).
WHEEL_PATH = "/bigexec-wheel/"
_WHEEL_DIR = "/run/bigexec/wheel"

# What answers on the agent's port while there is no agent, standard library only, with the
# agent's certificate, to clients of the session's CA only:
#   report: a boot that failed (an install that failed) says why: every request gets the boot
#           log's last lines, until the power-off;
#   wheel:  the driver sends its own bigexec (``OwnWheel``): a PUT of the wheel is kept and
#           the stand-in exits; any other request is told so; past the document's first
#           lease it gives up (exit 1: the boot fails, and says so).
_STAND_IN = """\
import json, os, socket, ssl, sys, tempfile, time
mode, port, log, doc_path = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
doc = json.load(open(doc_path))
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.verify_mode = ssl.CERT_REQUIRED
ctx.load_verify_locations(cadata=doc["ca_pem"])
fd, path = tempfile.mkstemp(dir=os.path.dirname(doc_path))
os.write(fd, (doc["cert_pem"] + doc["key_pem"]).encode())
os.close(fd)
ctx.load_cert_chain(path)
os.unlink(path)
server = socket.create_server(("0.0.0.0", port))
server.settimeout(1.0)
until = time.monotonic() + float(doc["lease"])
def reply(c, status, text):
    c.sendall(b"HTTP/1.1 %s\\r\\nContent-Type: text/plain\\r\\nContent-Length: %d\\r\\n"
              b"Connection: close\\r\\n\\r\\n" % (status, len(text)) + text)
while mode == "report" or time.monotonic() < until:
    try:
        raw, _ = server.accept()
    except socket.timeout:
        continue
    try:
        raw.settimeout(30)
        with ctx.wrap_socket(raw, server_side=True) as c:
            data = b""
            while b"\\r\\n\\r\\n" not in data and len(data) < 65536:
                chunk = c.recv(4096)
                if not chunk:
                    break
                data += chunk
            head, _, body = data.partition(b"\\r\\n\\r\\n")
            lines = head.split(b"\\r\\n")
            want = 0
            for line in lines[1:]:
                if line.lower().startswith(b"content-length:"):
                    want = int(line.split(b":")[1])
            while len(body) < want:
                chunk = c.recv(min(want - len(body), 1 << 20))
                if not chunk:
                    break
                body += chunk
            words = lines[0].split()
            name = words[1].decode().rpartition("/")[2] if len(words) > 1 else ""
            if (mode == "wheel" and words[:1] == [b"PUT"] and len(body) == want
                    and name.startswith("bigexec-") and name.endswith(".whl")
                    and "/" not in name and WHEEL_PATH in words[1].decode()):
                os.makedirs(sys.argv[5], exist_ok=True)
                with open(os.path.join(sys.argv[5], name), "wb") as f:
                    f.write(body)
                reply(c, b"200 OK", b"kept\\n")
                sys.exit(0)
            if mode == "wheel":
                reply(c, b"503 Service Unavailable", b"%s\\n" % WANTS.encode())
                continue
            with open(log, "rb") as f:
                tail = b"".join(f.readlines()[-40:])
            reply(c, b"503 Service Unavailable", b"%s\\n" % FAILED.encode() + tail)
    except Exception:
        pass
print("bigexec: the driver sent no bigexec wheel within the first lease")
sys.exit(1)
"""


def _stand_in(mode: str, port: int) -> list[str]:
    args = ["python3", STAND_IN_PATH, mode, str(port), BOOT_LOG, AGENT_DOCUMENT_PATH]
    return args + ([_WHEEL_DIR] if mode == "wheel" else [])


def _boot_script(install: InstallPlan, poweroff_on_failure: int, port: int) -> str:
    agent = [f"{VENV}/bin/python3", "-m", "bigexec.agent", "--bootstrap", AGENT_DOCUMENT_PATH]
    on_failure = (f"echo bigexec: bootstrap failed; shutdown -h +{poweroff_on_failure}; "
                  f"setsid {shlex.join(_stand_in('report', port))} </dev/null >/dev/null "
                  f"2>&1 &")
    lines = [
        "set -e",
        f"exec >>{BOOT_LOG} 2>&1",
        # a boot that fails says why, and leaves no orphan even when the driver is gone
        f"trap {shlex.quote(on_failure)} EXIT",
        install.shell(VENV),
    ]
    if install.driver_wheel:  # the driver's own bigexec, sent once the install is done
        lines += [shlex.join(_stand_in("wheel", port)),
                  f"{install.pip(VENV)} install --isolated -q --no-index --no-deps "
                  f"{_WHEEL_DIR}/bigexec-*.whl"]
    lines += [
        "trap - EXIT",
        # the agent runs on after cloud-init's final stage ends
        f"setsid nohup {shlex.join(agent)} >>{BOOT_LOG} 2>&1 </dev/null &",
    ]
    return "\n".join(lines)


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
    stand_in = (_STAND_IN.replace("WANTS.encode()", repr(WANTS_WHEEL_MARK.encode()))
                .replace("FAILED.encode()", repr(BOOT_FAILED_MARK.encode()))
                .replace("WHEEL_PATH in", f"{WHEEL_PATH!r} in"))
    config = {
        "write_files": [{"path": AGENT_DOCUMENT_PATH, "permissions": "0600",
                         "owner": "root:root", "encoding": "b64",
                         "content": base64.b64encode(agent_document).decode("ascii")},
                        {"path": STAND_IN_PATH, "permissions": "0700",
                         "owner": "root:root", "encoding": "b64",
                         "content": base64.b64encode(stand_in.encode()).decode("ascii")}],
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
