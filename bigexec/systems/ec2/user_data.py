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

__all__ = ["AGENT_DOCUMENT_PATH", "BOOT_LOG", "USER_DATA_LIMIT", "VENV", "InstallPlan",
           "PinnedRequirements", "Wheelhouse", "render_user_data"]

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


def _boot_script(install: InstallPlan, poweroff_on_failure: int) -> str:
    agent = [f"{VENV}/bin/python3", "-m", "bigexec.agent", "--bootstrap", AGENT_DOCUMENT_PATH]
    return "\n".join([
        "set -e",
        f"exec >>{BOOT_LOG} 2>&1",
        # a boot that fails leaves no orphan even when the driver is gone
        f"trap 'echo bigexec: bootstrap failed; shutdown -h +{poweroff_on_failure}' EXIT",
        install.shell(VENV),
        "trap - EXIT",
        # the agent runs on after cloud-init's final stage ends
        f"setsid nohup {shlex.join(agent)} >>{BOOT_LOG} 2>&1 </dev/null &",
    ])


def render_user_data(agent_document: bytes, install: InstallPlan, *,
                     poweroff_on_failure_minutes: int = 5) -> bytes:
    """The user-data for an instance: a ``#cloud-config`` that writes ``agent_document``
    (the agent's bootstrap JSON) to /run/bigexec/agent.json with mode 0600, installs with
    ``install`` and starts the agent. JSON is YAML, so the document is written as JSON.
    Gzipped when the plain text exceeds EC2's 16,384-byte limit; ValueError when even that
    does not fit."""
    config = {
        "write_files": [{"path": AGENT_DOCUMENT_PATH, "permissions": "0600",
                         "owner": "root:root", "encoding": "b64",
                         "content": base64.b64encode(agent_document).decode("ascii")}],
        "runcmd": [["sh", "-c", _boot_script(install, poweroff_on_failure_minutes)]],
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
