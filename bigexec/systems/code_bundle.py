"""The driver's own modules, for machines on other hosts: ``CodeBundle``.

    driver                                         another host (an ec2 agent)
    ──────                                         ───────────────────────────
    CodeBundle.of_driver(): every module the
      driver imported from a directory of its own
      (its script's, the working directory,
      PYTHONPATH: not an installed environment,
      not the standard library, not bigexec)
      ──> a zip of those top-level modules and
      packages (sources only, in a fixed order
      with fixed timestamps: the same code gives
      the same digest)
    has_bundle(digest)? ─────────────────────────> cached by digest: sent once per host
    put_bundle(digest, zip) ─────────────────────> checked against the digest, kept
    start_worker(..., bundle=digest) ────────────> the zip first on the worker's PYTHONPATH
                                                   (zipimport): pickles that name the
                                                   driver's modules import there too

Installed distributions travel another way (the system's install plan pins them), and so does
bigexec itself; the driver's ``__main__`` needs neither, since cloudpickle sends what it
defines by value.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import site
import sys
import sysconfig
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

__all__ = ["MAX_BUNDLE_BYTES", "CodeBundle", "stable_zip"]

log = logging.getLogger("bigexec.systems")

#: A bundle larger than this is refused (data belongs in calls and streams, not in code).
MAX_BUNDLE_BYTES = 256 << 20
_ALWAYS_LEFT_OUT = frozenset({"__main__", "bigexec"})
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)  # zip's epoch: timestamps do not change the digest


def stable_zip(files: Iterable[tuple[str, bytes]]) -> bytes:
    """A zip of ``files`` (name, bytes), in their order, with fixed timestamps and modes:
    the same files give the same bytes, so a digest names the content."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files:
            info = zipfile.ZipInfo(name, _FIXED_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, data)
    return buffer.getvalue()


def _installed_roots() -> list[Path]:
    """Directories whose modules are installed (or the standard library): never bundled."""
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    roots.update(sysconfig.get_paths().values())
    try:
        roots.update(site.getsitepackages())
    except AttributeError:  # some virtualenvs' site module lacks it
        pass
    user_site = site.getusersitepackages() if site.ENABLE_USER_SITE else None
    if user_site:
        roots.add(user_site)
    return [Path(r).resolve() for r in roots if r]


def _inside(path: Path, roots: Iterable[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def _own_roots(paths: Iterable[str], installed: list[Path]) -> list[Path]:
    """The entries of ``paths`` (``sys.path``) that are the driver's own directories."""
    out: list[Path] = []
    for entry in paths:
        p = Path(entry or os.getcwd()).resolve()
        if p.is_dir() and not _inside(p, installed) and p not in out:
            out.append(p)
    return out


def _sources(top: Path) -> list[Path]:
    """The Python sources of a top-level module (a file) or package (a directory)."""
    if top.is_file():
        return [top]
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and d != "__pycache__")
        found.extend(Path(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    return found


@dataclass(frozen=True)
class CodeBundle:
    """A zip of the driver's own modules, and its sha256 digest (hex)."""

    data: bytes
    digest: str
    #: The top-level module and package names it holds.
    names: tuple[str, ...]

    @classmethod
    def of_modules(cls, modules: Mapping[str, ModuleType | None], paths: Iterable[str],
                   ) -> CodeBundle | None:
        """The bundle of the ``modules`` (``sys.modules``) that were imported from the
        driver's own directories among ``paths`` (``sys.path``); None when there are none."""
        installed = _installed_roots()
        roots = _own_roots(paths, installed)
        tops: dict[str, tuple[Path, Path]] = {}  # name -> (root, top-level file or dir)
        for name, module in list(modules.items()):
            top_name = name.partition(".")[0]
            if top_name in _ALWAYS_LEFT_OUT or top_name in tops or module is None:
                continue
            file = getattr(module, "__file__", None)
            if not file or not file.endswith(".py"):
                continue  # built in, compiled, or a namespace package without a file
            path = Path(file).resolve()
            for root in roots:  # the entry the module was imported from: its name fits
                if root not in path.parents or _inside(path, installed):
                    continue
                first = path.relative_to(root).parts[0]
                if first in (top_name, f"{top_name}.py"):
                    tops[top_name] = (root, root / first)
                    break
        if not tops:
            return None
        data = stable_zip(
            (source.relative_to(root).as_posix(), source.read_bytes())
            for root, top in (tops[name] for name in sorted(tops)) for source in _sources(top))
        if len(data) > MAX_BUNDLE_BYTES:
            raise ValueError(
                f"the driver's own modules ({', '.join(sorted(tops))}) make a "
                f"{len(data) >> 20} MiB bundle, over {MAX_BUNDLE_BYTES >> 20} MiB: install "
                f"large packages on the machines instead (the system's requirements)")
        return cls(data, hashlib.sha256(data).hexdigest(), tuple(sorted(tops)))

    @classmethod
    def of_driver(cls) -> CodeBundle | None:
        """The bundle of this process's own imported modules."""
        return cls.of_modules(sys.modules, sys.path)

    @staticmethod
    def check(digest: str, data: bytes) -> None:
        """Raise ValueError unless ``data`` is a zip whose sha256 is ``digest``."""
        if hashlib.sha256(data).hexdigest() != digest:
            raise ValueError("the code bundle does not match its digest")
        if not zipfile.is_zipfile(io.BytesIO(data)):
            raise ValueError("the code bundle is not a zip file")
