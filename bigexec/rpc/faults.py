"""An RPC fault injector, for chaos tests: replies that are dropped, cut short or delayed.

    client ── request ──> Server._handle ── runs the method ──> reply
                                                   │
                         FaultInjector.choose(method) ─┤ none      → the reply as it is
                                                   ├ "drop"     → the connection closes, no reply
                                                   ├ "truncate" → part of the reply, then a close
                                                   └ "delay"    → the reply, ``delay_seconds`` late

Faults strike after the method ran, the hardest case for a caller: the work was done and its
reply is lost, so whatever resends it must not duplicate or lose a result. It is off unless
asked for: a machine's server injects faults when its environment has ``BIGEXEC_FAULTS``, e.g.
``BIGEXEC_FAULTS="drop=0.01,truncate=0.01"`` for every machine (``local`` machines inherit the
driver's environment) or ``b.start(n, env={"BIGEXEC_FAULTS": ...})`` for some. Settings:

- ``drop``, ``truncate``, ``delay``: the chance of each fault per call, from 0 to 1;
- ``delay_seconds``: how late a delayed reply is (default 1);
- ``seed``: makes a machine's sequence of faults repeatable (machines mix their port into it,
  so that machines seeded alike do not fail in step);
- ``methods``: which methods suffer, ``|``-separated prefixes of ``Service.method`` names
  (``methods=Tasks.|Echo.add``); by default every method but the Supervisor's, whose
  keepalives decide whether a machine lives (a partition is a different test), and ``*`` for
  all of them.
"""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
from collections import Counter
from typing import Any

from . import wire

__all__ = ["ENV", "FaultInjector", "InjectedFault"]

#: The environment variable a machine reads its fault settings from.
ENV = "BIGEXEC_FAULTS"
KINDS = ("drop", "truncate", "delay")

log = logging.getLogger("bigexec.faults")


class InjectedFault(ConnectionResetError):
    """The connection that the injector broke on purpose (the server closes it quietly)."""


class FaultInjector:
    """Chooses, per call, whether and how to break its reply; thread-safe."""

    def __init__(self, *, drop: float = 0.0, truncate: float = 0.0, delay: float = 0.0,
                 delay_seconds: float = 1.0, seed: int | str | None = None,
                 methods: tuple[str, ...] | None = None) -> None:
        rates = {"drop": drop, "truncate": truncate, "delay": delay}
        for kind, rate in rates.items():
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"fault rate {kind}={rate} is not between 0 and 1")
        if sum(rates.values()) > 1.0:
            raise ValueError(f"fault rates add up to more than 1: {rates}")
        if delay_seconds < 0:
            raise ValueError(f"delay_seconds={delay_seconds} is negative")
        self.rates = rates
        self.delay_seconds = delay_seconds
        self.methods = methods
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        #: How many faults of each kind were injected.
        self.injected: Counter[str] = Counter()

    @classmethod
    def from_spec(cls, spec: str | None, salt: str = "") -> FaultInjector | None:
        """The injector that ``spec`` (``BIGEXEC_FAULTS``'s syntax) describes; None for none.
        ``salt`` is mixed into its seed (a machine passes its port)."""
        if not spec or not spec.strip():
            return None
        options: dict[str, Any] = {}
        for item in spec.split(","):
            name, sep, value = item.strip().partition("=")
            if not sep:
                raise ValueError(f"{ENV}: {item!r} is not name=value")
            try:
                if name in KINDS or name == "delay_seconds":
                    options[name] = float(value)
                elif name == "seed":
                    options[name] = f"{int(value)}:{salt}" if salt else int(value)
                elif name == "methods":
                    options[name] = tuple(p for p in value.split("|") if p)
                else:
                    raise ValueError(f"unknown setting {name!r}; known: "
                                     f"{', '.join((*KINDS, 'delay_seconds', 'seed', 'methods'))}")
            except ValueError as exc:
                raise ValueError(f"{ENV}={spec!r}: {exc}") from None
        return cls(**options)

    def _applies(self, method: str) -> bool:
        if self.methods is None:
            return not method.startswith("Supervisor.")
        return any(p == "*" or method.startswith(p) for p in self.methods)

    def choose(self, method: str) -> str | None:
        """The fault for this call of ``method``: a name from ``KINDS``, or None."""
        if not self._applies(method):
            return None
        with self._lock:
            x = self._random.random()
            for kind in KINDS:
                x -= self.rates[kind]
                if x < 0:
                    self.injected[kind] += 1
                    break
            else:
                return None
        # WARNING, as a chaos run's faults should show wherever the machine's logs go
        log.warning("fault injected: %s the reply of %s", kind, method)
        return kind

    def apply(self, kind: str, sock: socket.socket, size: int | None) -> socket.socket | Any:
        """Carry out fault ``kind`` on the reply about to go out on ``sock``, of ``size``
        bytes with its head (None for a stream): return the socket to send the reply on (a
        delayed one, or one that breaks part-way), or raise ``InjectedFault`` for a dropped
        reply."""
        if kind == "drop":
            raise InjectedFault("bigexec fault injector: reply dropped")
        if kind == "delay":
            time.sleep(self.delay_seconds)
            return sock
        with self._lock:  # a whole reply never gets through: at most all but its last byte
            budget = self._random.randint(1, max(1, (size or 4096) - 1))
        return _CuttingSocket(sock, budget)


class _CuttingSocket:
    """Passes ``budget`` bytes of a reply to the socket, then breaks the connection; a stream
    breaks before its end frame at the latest, so that no reply is ever whole."""

    def __init__(self, sock: socket.socket, budget: int) -> None:
        self._sock = sock
        self._budget = budget

    def sendall(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        if view.nbytes <= self._budget and view[: len(wire.END_FRAME)] != wire.END_FRAME:
            self._budget -= view.nbytes
            self._sock.sendall(view)
            return
        self._sock.sendall(view[: min(self._budget, view.nbytes - 1)])
        self._budget = 0
        raise InjectedFault("bigexec fault injector: reply truncated")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)
