"""SSL contexts for bigexec's mutual TLS, built from PEM credentials.

Kept apart from ``authority`` so that workers, which only load credentials the driver issued,
never import ``cryptography``.
"""

from __future__ import annotations

import os
import ssl
import tempfile

__all__ = ["CREDENTIALS_END", "Credentials", "server_context", "client_context"]

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


def _load_chain(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    # ssl can only load a key from a file: use a private one and unlink it at once.
    fd, path = tempfile.mkstemp(prefix="bigexec-", suffix=".pem")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(cert_pem + key_pem)
        ctx.load_cert_chain(path)
    finally:
        os.unlink(path)


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
