"""Services: the objects a machine holds and whose public methods can be called remotely.

A service is any object cloudpickle can ship. On the machine, ``ServiceRegistry`` maps
``"Name.method"`` to the bound method; public means "no leading underscore", and ``init`` is the
set-up hook, not a remote method. A method that takes a parameter named ``ctx`` gets the call's
``Context``. Calls run concurrently, one thread per connection, so services must be thread-safe.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable
from typing import Any

from .errors import UnknownMethodError

__all__ = ["ServiceRegistry", "public_methods"]


def public_methods(obj: Any) -> list[str]:
    """The names of ``obj``'s remotely callable methods."""
    out = []
    for name in dir(type(obj)):
        if name.startswith("_") or name == "init":
            continue
        attr = getattr(obj, name, None)
        if callable(attr) and (inspect.ismethod(attr) or inspect.isbuiltin(attr)
                               or inspect.isroutine(attr)):
            out.append(name)
    return sorted(out)


def _wants_ctx(fn: Callable[..., Any]) -> bool:
    try:
        return "ctx" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class ServiceRegistry:
    """The services registered on one machine, by name."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._services: dict[str, Any] = {}
        self._methods: dict[str, tuple[Callable[..., Any], bool]] = {}

    def add(self, name: str, service: Any) -> bool:
        """Register ``service`` as ``name``; False (and nothing done) if the name is taken."""
        if not name.isidentifier():
            raise ValueError(f"service name {name!r} is not an identifier")
        with self._lock:
            if name in self._services:
                return False
            self._services[name] = service
            return True

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._services)

    def get(self, name: str) -> Any:
        with self._lock:
            return self._services[name]

    def resolve(self, qualname: str) -> tuple[Callable[..., Any], bool]:
        """The bound method for ``"Service.method"`` and whether it takes ``ctx``."""
        hit = self._methods.get(qualname)
        if hit is not None:
            return hit
        service_name, _, method = qualname.partition(".")
        with self._lock:
            service = self._services.get(service_name)
            known = sorted(self._services)
        if service is None:
            raise UnknownMethodError(
                f"no service {service_name!r} on this machine; services: {', '.join(known)}"
            )
        methods = public_methods(service)
        if method not in methods:
            raise UnknownMethodError(
                f"service {service_name!r} has no method {method!r}; "
                f"methods: {', '.join(methods) or '(none)'}"
            )
        fn = getattr(service, method)
        hit = (fn, _wants_ctx(fn))
        self._methods[qualname] = hit
        return hit
