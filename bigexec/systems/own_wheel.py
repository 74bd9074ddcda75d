"""The running bigexec as a wheel, for machines on other hosts: ``OwnWheel``.

A machine must run the driver's exact bigexec (pickled code names its modules, and a worker
refuses other versions). A package index has released versions only; a driver run from a
checkout, an editable install or a patched copy has code no index has. So the driver sends
its own: this module packs the ``bigexec`` package the driver imported (its files as they are
on disk, ``__pycache__`` left out) into a pure-Python wheel (``py3-none-any``), with the
metadata pip needs and a RECORD of every file's digest. The same files give the same bytes
(fixed timestamps, sorted), so the digest names the code.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from .code_bundle import stable_zip

__all__ = ["OwnWheel"]

_PACKAGE = Path(__file__).resolve().parent.parent  # bigexec/


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return f"sha256={digest.decode('ascii')}"


def _requires() -> list[str]:
    try:
        return list(importlib.metadata.requires("bigexec") or ())
    except importlib.metadata.PackageNotFoundError:  # run from a checkout on sys.path
        return []


@dataclass(frozen=True)
class OwnWheel:
    """A wheel of the running bigexec: its file name, its bytes and their sha256 (hex)."""

    filename: str
    data: bytes
    digest: str

    @classmethod
    @functools.lru_cache(maxsize=1)
    def build(cls) -> OwnWheel:
        """The wheel of the bigexec this process runs (built once per process)."""
        version = __version__
        dist_info = f"bigexec-{version}.dist-info"
        files: list[tuple[str, bytes]] = []
        for dirpath, dirnames, filenames in os.walk(_PACKAGE):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__"
                                 and not d.startswith("."))
            for name in sorted(filenames):
                if name.endswith((".pyc", ".pyo")):
                    continue
                path = Path(dirpath, name)
                files.append((path.relative_to(_PACKAGE.parent).as_posix(), path.read_bytes()))
        metadata = "\n".join(["Metadata-Version: 2.1", "Name: bigexec", f"Version: {version}",
                              *(f"Requires-Dist: {r}" for r in _requires()), ""])
        files += [
            (f"{dist_info}/METADATA", metadata.encode()),
            (f"{dist_info}/WHEEL", b"Wheel-Version: 1.0\nGenerator: bigexec\n"
                                   b"Root-Is-Purelib: true\nTag: py3-none-any\n"),
            (f"{dist_info}/entry_points.txt",
             b"[console_scripts]\nbigexec = bigexec.cli:main\n"),
        ]
        record = "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data in files)
        files.append((f"{dist_info}/RECORD", (record + f"{dist_info}/RECORD,,\n").encode()))
        data = stable_zip(files)
        return cls(f"bigexec-{version}-py3-none-any.whl", data,
                   hashlib.sha256(data).hexdigest())
