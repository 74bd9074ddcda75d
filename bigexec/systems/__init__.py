"""Systems: where machines come from. ``threads``, ``local`` and ``ec2`` ship with bigexec.

``make_system(name, **options)`` builds one by name; ``register_system`` adds a backend.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from .base import KeepaliveConfig, MachineHandle, System

__all__ = ["KeepaliveConfig", "MachineHandle", "System", "make_system", "register_system",
           "system_names"]

_REGISTRY: dict[str, str | Callable[..., System]] = {
    "threads": "bigexec.systems.threads:ThreadsSystem",
    "local": "bigexec.systems.local:LocalSystem",
    "ec2": "bigexec.systems.ec2.system:Ec2System",
}


def register_system(name: str, factory: Callable[..., System]) -> None:
    """Make ``factory(**options)`` available as ``bigexec.start(name, **options)``."""
    _REGISTRY[name] = factory


def system_names() -> list[str]:
    return sorted(_REGISTRY)


def make_system(name: str, **options: Any) -> System:
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown bigexec system {name!r}; known systems: {', '.join(system_names())}"
        ) from None
    if isinstance(factory, str):
        module, _, attr = factory.partition(":")
        factory = getattr(importlib.import_module(module), attr)
    return factory(**options)
