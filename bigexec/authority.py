"""The certificate authority behind bigexec's mutual TLS.

Each session owns one CA (ECDSA P-256, made with ``cryptography``). The CA's private key stays in
the driver's memory unless the caller asks for a persistent authority file, which is written
with mode 0600 (and loaded only if no one else can read it or own it). Every certificate
has one usage, and every party its own name:

* the driver holds a *client* certificate (CLIENT_AUTH only), CN "bigexec driver";
* each machine holds a *server* certificate (SERVER_AUTH only, the machine's names as subject
  alternative names) and a *client* certificate (CLIENT_AUTH only) for when its services call
  other machines, both with CN "machine <n>", ``n`` unique in the authority's life.

So:

* servers accept only clients holding a client certificate from the session's CA, and know
  their name (``tls.peer_name``);
* clients verify the server's chain, its usage *and* its name against that CA (unlike Go's
  Bigmachine, whose clients skip verification): a machine's client certificate, the driver's,
  cannot pass for a server;
* no worker ever holds the CA key.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import itertools
import os
import secrets
import stat
from collections.abc import Iterable
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .tls import Credentials, _pem_blocks, remove_stale_key_files

__all__ = ["DRIVER_NAME", "Authority", "Credentials", "Usage"]

_CA_LIFETIME = _dt.timedelta(days=3650)
_SKEW = _dt.timedelta(minutes=1)

#: What a leaf certificate may be used for: serving, calling, or (as before usages were
#: separate) both.
Usage = Literal["server", "client", "both"]
_USAGES: dict[str, list[x509.ObjectIdentifier]] = {
    "server": [ExtendedKeyUsageOID.SERVER_AUTH],
    "client": [ExtendedKeyUsageOID.CLIENT_AUTH],
    "both": [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
}
#: The common name of the driver's client certificate.
DRIVER_NAME = "bigexec driver"


class Authority:
    """A certificate authority.

    ``Authority()`` is ephemeral: it lives in memory only. ``Authority(path)`` loads the CA from
    ``path``, or creates it there (mode 0600) when the file does not exist. A CA file that
    another user owns, or that group or others may read or write, is refused (``ValueError``):
    whoever can read it can mint certificates every machine of the CA trusts.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = os.fspath(path) if path is not None else None
        self._machines = itertools.count(1)
        # A session starts here: clear what killed processes of ours left of their keys.
        remove_stale_key_files()
        if self.path is not None and os.path.exists(self.path):
            self._load(self._read_private_file(self.path))
            return
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bigexec CA")])
        now = _dt.datetime.now(_dt.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _SKEW)
            .not_valid_after(now + _CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True,
                    content_commitment=False, key_encipherment=False, data_encipherment=False,
                    key_agreement=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        self._key = key
        self._cert = cert
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        if self.path is not None:
            pem = self.cert_pem + self._key_pem(key)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(pem)

    @staticmethod
    def _read_private_file(path: str) -> bytes:
        # fstat of the descriptor read, not stat of the path: the file checked is the file read.
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if st.st_uid != os.geteuid():
                raise ValueError(
                    f"{path}: the CA file is owned by uid {st.st_uid}, not by this user "
                    f"(uid {os.geteuid()}); refusing to trust it. Make your own, or "
                    f"chown {os.geteuid()} {path}"
                )
            mode = stat.S_IMODE(st.st_mode)
            if mode & 0o077:
                raise ValueError(
                    f"{path}: the CA file has mode {mode:04o}: group or others may read or "
                    f"change it, and whoever reads it can impersonate any machine. "
                    f"Run: chmod 600 {path}"
                )
            return f.read()

    def _load(self, data: bytes) -> None:
        blocks = _pem_blocks(data)
        certs = [b for b in blocks if b"CERTIFICATE" in b.split(b"\n", 1)[0]]
        keys = [b for b in blocks if b"PRIVATE KEY" in b.split(b"\n", 1)[0]]
        if len(certs) != 1 or len(keys) != 1:
            raise ValueError(f"{self.path}: expected one certificate and one private key")
        self._cert = x509.load_pem_x509_certificate(certs[0])
        key = serialization.load_pem_private_key(keys[0], password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{self.path}: the CA key must be an elliptic-curve key")
        self._key = key
        self.cert_pem = certs[0]

    @staticmethod
    def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def issue(
        self,
        common_name: str = "bigexec",
        ttl: _dt.timedelta = _dt.timedelta(days=7),
        ips: Iterable[str] = (),
        dns: Iterable[str] = (),
        *,
        usage: Usage = "both",
    ) -> Credentials:
        """Issue a leaf certificate for ``usage``: TLS "server" or "client" authentication, or
        "both" (the default, for callers from before usages were separate)."""
        try:
            purposes = _USAGES[usage]
        except KeyError:
            raise ValueError(f"usage must be one of {', '.join(_USAGES)}, not {usage!r}") from None
        key = ec.generate_private_key(ec.SECP256R1())
        now = _dt.datetime.now(_dt.timezone.utc)
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(int.from_bytes(secrets.token_bytes(16), "big") >> 1)
            .not_valid_before(now - _SKEW)
            .not_valid_after(now + ttl)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(purposes),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        return Credentials(
            self.cert_pem, cert.public_bytes(serialization.Encoding.PEM), self._key_pem(key)
        )

    def issue_driver(self, ttl: _dt.timedelta = _dt.timedelta(days=7)) -> Credentials:
        """The driver's client credentials (CN ``DRIVER_NAME``)."""
        return self.issue(DRIVER_NAME, ttl, usage="client")

    def new_machine_name(self) -> str:
        """"machine <n>", with ``n`` new in this authority's life."""
        return f"machine {next(self._machines)}"

    def issue_machine(
        self,
        ips: Iterable[str] = (),
        dns: Iterable[str] = (),
        ttl: _dt.timedelta = _dt.timedelta(days=7),
        name: str | None = None,
    ) -> tuple[Credentials, Credentials]:
        """A machine's (server, client) credentials, both named ``name`` (by default a new
        ``new_machine_name()``; a renewal keeps the machine's); the server certificate carries
        ``ips`` and ``dns``."""
        name = name or self.new_machine_name()
        return (self.issue(name, ttl, ips, dns, usage="server"),
                self.issue(name, ttl, usage="client"))

    def verify(self, cert_pem: bytes) -> bool:
        """Whether ``cert_pem`` was signed by this CA and is valid now."""
        cert = x509.load_pem_x509_certificate(cert_pem)
        try:
            cert.verify_directly_issued_by(self._cert)
        except (ValueError, TypeError, InvalidSignature):  # another issuer, key type, signature
            return False
        now = _dt.datetime.now(_dt.timezone.utc)
        return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc
