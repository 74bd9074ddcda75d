"""The agent's bootstrap document: what the instance's user-data hands the agent.

The driver's system writes it (as UTF-8 JSON, ``AgentDocument.to_json``) into the user-data,
which puts it at ``/run/bigexec/agent.json``; the agent reads it once and deletes the file
(``read_and_delete``), so the leaf's key does not stay on the disk. It carries the CA's
*certificate* only: the agent, and every worker it starts, can prove who they are and check
who calls, but can issue nothing. A document holding any private key other than the leaf's
own is refused.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from .. import tls

__all__ = ["DEFAULT_PATH", "DEFAULT_PORT", "DEFAULT_POWEROFF", "AgentDocument",
           "check_agent_credentials"]

#: Where the user-data writes the document.
DEFAULT_PATH = "/run/bigexec/agent.json"
#: The port the agent serves on unless the document says otherwise.
DEFAULT_PORT = 443
#: The command that powers the instance off (with shutdown behaviour "terminate": ends it).
DEFAULT_POWEROFF = ("shutdown", "-h", "now")
_MAX_BYTES = 1 << 20
_KEYS = {"session", "instance_id", "port", "lease", "ca_pem", "cert_pem", "key_pem",
         "poweroff"}


@dataclass(frozen=True)
class AgentDocument:
    """The settings and credentials of one instance's agent."""

    #: The driver's session id (the instances' tag names it too).
    session: str
    #: Seconds the agent lives without a keepalive; the first lease covers the boot.
    lease: float
    #: The CA's certificate, the agent's leaf certificate and the leaf's key (PEM).
    credentials: tls.Credentials = field(repr=False)
    #: None: the agent asks the instance metadata service (``agent.imds``).
    instance_id: str | None = None
    port: int = DEFAULT_PORT
    poweroff: tuple[str, ...] = DEFAULT_POWEROFF

    def __post_init__(self) -> None:
        if not self.session or not isinstance(self.session, str):
            raise ValueError(f"session must be a non-empty str, not {self.session!r}")
        if (isinstance(self.lease, bool) or not isinstance(self.lease, (int, float))
                or not math.isfinite(self.lease) or self.lease <= 0):
            raise ValueError(f"lease must be a positive number of seconds, not {self.lease!r}")
        if self.instance_id is not None and (not isinstance(self.instance_id, str)
                                             or not self.instance_id):
            raise ValueError(f"instance_id must be a non-empty str or null, not "
                             f"{self.instance_id!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not (
                0 <= self.port < 65536):
            raise ValueError(f"port must be an int in 0..65535, not {self.port!r}")
        if not self.poweroff or not all(isinstance(a, str) for a in self.poweroff):
            raise ValueError(f"poweroff must be a non-empty list of str, not {self.poweroff!r}")
        check_agent_credentials(self.credentials)

    def to_json(self) -> bytes:
        """The document as the user-data carries it."""
        c = self.credentials
        return json.dumps({
            "session": self.session, "instance_id": self.instance_id, "port": self.port,
            "lease": self.lease, "ca_pem": c.ca_pem.decode("ascii"),
            "cert_pem": c.cert_pem.decode("ascii"), "key_pem": c.key_pem.decode("ascii"),
            "poweroff": list(self.poweroff),
        }).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> AgentDocument:
        """The document ``to_json`` wrote; ``ValueError`` saying what is wrong otherwise."""
        if len(data) > _MAX_BYTES:
            raise ValueError(f"an agent document over {_MAX_BYTES} bytes")
        try:
            obj: Any = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ValueError(f"the agent document is not UTF-8 JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise ValueError("the agent document must be a JSON object")
        unknown = sorted(set(obj) - _KEYS)
        if unknown:
            raise ValueError(f"the agent document has unknown keys: {', '.join(unknown)}")
        missing = sorted({"session", "lease", "ca_pem", "cert_pem", "key_pem"} - set(obj))
        if missing:
            raise ValueError(f"the agent document lacks: {', '.join(missing)}")
        pems = []
        for key in ("ca_pem", "cert_pem", "key_pem"):
            if not isinstance(obj[key], str):
                raise ValueError(f"{key} must be a PEM str")
            pems.append(obj[key].encode("ascii", "replace"))
        poweroff = obj.get("poweroff", list(DEFAULT_POWEROFF))
        if not isinstance(poweroff, list):
            raise ValueError(f"poweroff must be a list of str, not {poweroff!r}")
        return cls(session=obj["session"], lease=obj["lease"],
                   credentials=tls.Credentials(*pems), instance_id=obj.get("instance_id"),
                   port=obj.get("port", DEFAULT_PORT), poweroff=tuple(poweroff))

    @classmethod
    def read_and_delete(cls, path: str | os.PathLike[str]) -> AgentDocument:
        """Read the document at ``path`` and delete the file, whether or not it is valid: it
        holds a private key, which must not outlive the agent's start on the disk."""
        try:
            with open(path, "rb") as f:
                data = f.read(_MAX_BYTES + 1)
        finally:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        return cls.from_json(data)


def check_agent_credentials(creds: tls.Credentials) -> None:
    """The CA entry holds certificates only, the leaf one certificate and its key: an agent
    never holds the CA's key. ValueError otherwise."""
    def kinds(pem: bytes) -> list[str]:  # the BEGIN line of each PEM block
        return [line.strip().decode("ascii", "replace") for line in pem.splitlines()
                if line.startswith(b"-----BEGIN ")]

    ca = kinds(creds.ca_pem)
    if not ca or any("CERTIFICATE" not in k for k in ca):
        raise ValueError("ca_pem must hold the CA's certificate and nothing else (never its "
                         "key: the agent issues no certificates)")
    if kinds(creds.cert_pem) != ["-----BEGIN CERTIFICATE-----"]:
        raise ValueError("cert_pem must hold exactly the agent's leaf certificate")
    key = kinds(creds.key_pem)
    if len(key) != 1 or "PRIVATE KEY" not in key[0]:
        raise ValueError("key_pem must hold exactly the leaf certificate's private key")
