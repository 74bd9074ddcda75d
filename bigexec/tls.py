"""SSL contexts for bigexec's mutual TLS, built from PEM credentials.

Kept apart from ``authority`` so that workers, which only load credentials the driver issued,
never import ``cryptography``.
"""

from __future__ import annotations

import os
import ssl
import tempfile

__all__ = ["server_context", "client_context"]


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


def server_context(creds) -> ssl.SSLContext:
    """A server context that requires a client certificate from the credentials' CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, creds.cert_pem, creds.key_pem)
    ctx.load_verify_locations(cadata=creds.ca_pem.decode("ascii"))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(creds) -> ssl.SSLContext:
    """A client context that presents the leaf and verifies the server's chain and name."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, creds.cert_pem, creds.key_pem)
    ctx.load_verify_locations(cadata=creds.ca_pem.decode("ascii"))
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
