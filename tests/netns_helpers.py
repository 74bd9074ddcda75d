"""Network namespaces for tests that need a second "host" (root and iproute2 only).

Every address lives on a veth pair between namespaces the test made (or the test's own
namespace): traffic to it never leaves this machine. Everything is torn down when the
``with`` ends, also when the test fails; processes left in a namespace are killed first.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator

__all__ = ["available", "linked_namespace", "reason"]

reason = "needs root and iproute2 (`ip netns`) for a second host"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def available() -> bool:
    """Whether this process may make network namespaces (CI, as root, always may)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    name = f"bxprobe{uuid.uuid4().hex[:6]}"
    ok = subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return ok


def delete_namespace(ns: str) -> None:
    """Kill what runs in ``ns``, then delete it (its veth ends go with it)."""
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                          text=True).stdout.split()
    for pid in pids:
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@contextlib.contextmanager
def linked_namespace(near_ip: str, far_ip: str, prefix_len: int = 30,
                     near_ns: str | None = None) -> Iterator[dict[str, str]]:
    """A new namespace ("far", holding ``far_ip``) joined by a veth pair to ``near_ns`` (a
    namespace of the caller's, or this process's own when None), whose end holds
    ``near_ip``. Neither end gets a default route. Yields the names: ``far``, ``near_if``,
    ``far_if``."""
    tag = uuid.uuid4().hex[:6]
    far, near_if, far_if = f"bxf{tag}", f"bxn{tag}", f"bxr{tag}"
    near = ["-n", near_ns] if near_ns else []
    _ip("netns", "add", far)
    try:
        _ip("-n", far, "link", "set", "lo", "up")
        _ip("link", "add", near_if, "type", "veth", "peer", "name", far_if)
        _ip("link", "set", far_if, "netns", far)
        if near_ns:
            _ip("link", "set", near_if, "netns", near_ns)
        _ip(*near, "addr", "add", f"{near_ip}/{prefix_len}", "dev", near_if)
        _ip(*near, "link", "set", near_if, "up")
        _ip("-n", far, "addr", "add", f"{far_ip}/{prefix_len}", "dev", far_if)
        _ip("-n", far, "link", "set", far_if, "up")
        yield {"far": far, "near_if": near_if, "far_if": far_if}
    finally:
        if not near_ns:  # our own end: deleting the far namespace takes the pair, but be sure
            subprocess.run(["ip", "link", "del", near_if], capture_output=True)
        delete_namespace(far)


@contextlib.contextmanager
def namespace() -> Iterator[str]:
    """A new, empty namespace with loopback up (a hub for a driver with no default route)."""
    name = f"bxh{uuid.uuid4().hex[:6]}"
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        delete_namespace(name)
