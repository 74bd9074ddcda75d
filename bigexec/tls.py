"""SSL contexts for bigexec's mutual TLS, built from PEM credentials.

Kept apart from ``authority`` so that workers, which only load credentials the driver issued,
never import ``cryptography``.

``ssl`` loads a private key only from a path. Where Linux's ``memfd_create`` exists the key goes
to an anonymous in-memory file, loaded through ``/proc/self/fd``: it never touches a disk and
vanishes with the process, however the process dies. Elsewhere it goes to a 0600 temporary file
named ``bigexec-<pid>-XXXX.pem`` that is unlinked at once; should the process be killed in that
instant, ``remove_stale_key_files`` (run when an ``Authority`` is made) removes what is left.
"""

from __future__ import annotations

import glob
import os
import re
import socket
import ssl
import tempfile
from collections.abc import Callable
from typing import Any

__all__ = ["CREDENTIALS_END", "Credentials", "client_context", "machine_credentials_from_pem",
           "machine_credentials_to_pem", "peer_name", "remove_stale_key_files",
           "server_context"]

#: Ends the credentials a driver writes on a worker's stdin (which then stays open).
CREDENTIALS_END = b"-----END BIGEXEC CREDENTIALS-----\n"


class Credentials:
    """A leaf certificate and key, plus the CA certificate that vouches for it (all PEM)."""

    __slots__ = ("ca_pem", "cert_pem", "key_pem")

    def __init__(self, ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> None:
        self.ca_pem = ca_pem
        self.cert_pem = cert_pem
        self.key_pem = key_pem

    def to_pem(self) -> bytes:
        """One PEM bundle: CA certificate, leaf certificate, leaf key."""
        return self.ca_pem + self.cert_pem + self.key_pem

    @classmethod
    def from_pem(cls, data: bytes) -> Credentials:
        blocks = _pem_blocks(data)
        certs = [b for b in blocks if b"CERTIFICATE" in b.split(b"\n", 1)[0]]
        keys = [b for b in blocks if b"PRIVATE KEY" in b.split(b"\n", 1)[0]]
        if len(certs) != 2 or len(keys) != 1:
            raise ValueError("credentials must hold a CA certificate, a leaf certificate and a key")
        return cls(certs[0], certs[1], keys[0])


def machine_credentials_to_pem(server: Credentials, client: Credentials) -> bytes:
    """A machine's two identities in one bundle: the one it serves with, then the one it calls
    other machines with."""
    return server.to_pem() + client.to_pem()


def machine_credentials_from_pem(data: bytes) -> tuple[Credentials, Credentials]:
    """The (server, client) credentials of ``machine_credentials_to_pem``; a single bundle (as
    drivers before separate usages sent) serves as both."""
    blocks = _pem_blocks(data)
    if len(blocks) == 6:
        return Credentials.from_pem(b"".join(blocks[:3])), Credentials.from_pem(
            b"".join(blocks[3:]))
    creds = Credentials.from_pem(data)
    return creds, creds


def _load_chain(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    memfd_create: Callable[..., int] | None = getattr(os, "memfd_create", None)
    if memfd_create is not None and os.path.isdir("/proc/self/fd"):
        try:
            fd = memfd_create("bigexec-credentials", getattr(os, "MFD_CLOEXEC", 0))
        except OSError:  # e.g. forbidden by a seccomp filter: fall back to a file
            pass
        else:
            try:
                view = memoryview(cert_pem + key_pem)
                while view:
                    view = view[os.write(fd, view):]
                ctx.load_cert_chain(f"/proc/self/fd/{fd}")
            finally:
                os.close(fd)
            return
    # The pid in the name lets a later session tell a dead process's leftover from a live one's.
    fd, path = tempfile.mkstemp(prefix=f"bigexec-{os.getpid()}-", suffix=".pem")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(cert_pem + key_pem)
        ctx.load_cert_chain(path)
    finally:
        os.unlink(path)


_KEY_FILE = re.compile(r"bigexec-(\d+)-[^/]*\.pem\Z")


def remove_stale_key_files(directory: str | None = None) -> list[str]:
    """Remove the key files that processes of ours killed while loading a key left in
    ``directory`` (default: the temporary directory); return their paths.

    Only ``bigexec-<pid>-*.pem`` files owned by this user whose pid no longer runs are removed.
    """
    directory = tempfile.gettempdir() if directory is None else directory
    removed = []
    for path in glob.glob(os.path.join(glob.escape(directory), "bigexec-*-*.pem")):
        m = _KEY_FILE.search(path)
        if m is None:
            continue
        try:
            if os.lstat(path).st_uid != os.geteuid() or _pid_alive(int(m.group(1))):
                continue
            os.unlink(path)
        except OSError:  # gone already, or not ours to remove
            continue
        removed.append(path)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's process
        return True
    except OverflowError:
        return False
    return True


def peer_name(sock: socket.socket) -> str | None:
    """The common name of the certificate a TLS peer presented (None: none, or not TLS)."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    try:
        cert: dict[str, Any] = sock.getpeercert() or {}
    except (ValueError, OSError):
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def server_context(creds: Credentials) -> ssl.SSLContext:
    """A server context that requires a client certificate from the credentials' CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, creds.cert_pem, creds.key_pem)
    ctx.load_verify_locations(cadata=creds.ca_pem.decode("ascii"))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(creds: Credentials) -> ssl.SSLContext:
    """A client context that presents the leaf and verifies the server's chain and name."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, creds.cert_pem, creds.key_pem)
    ctx.load_verify_locations(cadata=creds.ca_pem.decode("ascii"))
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _pem_blocks(data: bytes) -> list[bytes]:
    out: list[bytes] = []
    current: list[bytes] = []
    for line in data.splitlines(keepends=True):
        if line.startswith(b"-----BEGIN "):
            current = [line]
        elif line.startswith(b"-----END ") and current:
            current.append(line)
            out.append(b"".join(current))
            current = []
        elif current:
            current.append(line)
    return out
