"""Which session an Executor or Pool runs in, and whether it owns (starts and stops) it."""

from __future__ import annotations

from typing import Any

from .machine import Machine
from .session import B, start

__all__ = ["session_for"]


def session_for(b: B | None, machines: list[Machine] | None, system: str | None,
                system_options: dict[str, Any]) -> tuple[B, bool]:
    """The session an Executor or Pool runs in, and whether it owns it (starts and stops it):
    a new one on ``system``, or the given ``b``, or that of the given ``machines``."""
    if b is None and not machines:
        return start(system, **system_options), True
    if system is not None or system_options:
        raise TypeError("system and its options are for a new session; not with b= or "
                        "machines=")
    if b is not None:
        return b, False
    assert machines  # b is None, so machines were given
    session = machines[0].session
    if not isinstance(session, B):  # a machine dialed from inside a worker, say
        raise TypeError("machines= takes machines of a driver's session (bigexec.start)")
    return session, False
