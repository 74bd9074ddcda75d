"""Durations and sizes as people read them: one formatter for every table, page and log line.

``duration(42.0)`` is ``"42 s"`` on a page and ``duration(42.0, compact=True)`` is ``"42s"`` in
a terminal table whose columns are split at spaces; both switch units at the same points, so
the status page, the ``bigexec`` command and progress lines agree on what they show.
"""

from __future__ import annotations

import math

__all__ = ["duration", "size"]

# (below this many seconds, divide by, unit, compact unit, decimals)
_DURATION_UNITS = (
    (1.0, 0.001, "ms", "ms", 1),
    (120.0, 1.0, "s", "s", 1),
    (7200.0, 60.0, "min", "m", 1),
    (172800.0, 3600.0, "h", "h", 1),
    (math.inf, 86400.0, "d", "d", 1),
)


def duration(seconds: float, compact: bool = False) -> str:
    """``seconds`` as a short duration: ``850.0 ms``, ``42.0 s``, ``17.5 min``, ``3.5 h``,
    ``2.0 d``; ``compact`` gives whole numbers below an hour and no space (``42s``, ``17m``,
    ``3.5h``), for tables. A negative duration keeps its sign; NaN and infinity are ``-``."""
    if not math.isfinite(seconds):
        return "-"
    sign, seconds = ("-", -seconds) if seconds < 0 else ("", seconds)
    for below, unit_seconds, unit, short, decimals in _DURATION_UNITS:
        if seconds < below:
            value = seconds / unit_seconds
            if compact:
                digits = 0 if unit in ("ms", "s", "min") else decimals
                return f"{sign}{value:.{digits}f}{short}"
            return f"{sign}{value:.{decimals}f} {unit}"
    raise AssertionError("unreachable: the last unit has no bound")


def size(n: float) -> str:
    """``n`` bytes in binary units: ``512 B``, ``1.5 KiB``, ``3.2 GiB``."""
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
    step = 0
    while abs(n) >= 1024 and step < len(units) - 1:
        n /= 1024
        step += 1
    return f"{n:.0f} B" if step == 0 else f"{n:.1f} {units[step]}"
