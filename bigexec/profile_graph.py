"""A CPU profile's call graph being summed up: yappi's per-thread stats in, a pstats table out.

:class:`CallGraph` adds the stats of each profiled thread (folding C functions into their
callers when asked), takes the time yappi missed as extra samples of whole stacks
(:meth:`CallGraph.charge`), and gives the result as the table a pstats file holds
(:meth:`CallGraph.table`). :func:`bigexec.profiling.cpu_profile` is its one user.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, NamedTuple

from .profile_formats import FuncKey, StatsTable, is_builtin

__all__ = ["CallGraph", "StackFrame"]

# yappi names some C methods after the Python function they shadow, address included
# ("<function Random.seed at 0x7f...>"): no two processes would agree on that key.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


class StackFrame(NamedTuple):
    """One frame of a stack to charge time to (see :meth:`CallGraph.charge`)."""

    code: FuncKey  # the function as (filename, first line, name)
    frame: FrameType | None  # the live frame if there is one: it tells a method's class


@dataclass
class _Edge:
    """What one caller's calls added to a function: a pstats callers entry, being summed."""

    calls: int = 0
    primitive_calls: int = 0
    own_time: float = 0.0
    cumulative_time: float = 0.0

    def add(self, other: _Edge) -> None:
        self.calls += other.calls
        self.primitive_calls += other.primitive_calls
        self.own_time += other.own_time
        self.cumulative_time += other.cumulative_time

    def frozen(self) -> tuple[int, int, float, float]:
        """In pstats' order: (nc, cc, tt, ct)."""
        return (self.calls, self.primitive_calls, self.own_time, self.cumulative_time)


@dataclass
class _Row:
    """One function of the graph: a pstats row, being summed."""

    primitive_calls: int = 0
    calls: int = 0
    own_time: float = 0.0
    cumulative_time: float = 0.0
    callers: dict[FuncKey, _Edge] = field(default_factory=dict)

    def add(self, other: _Row) -> None:
        self.primitive_calls += other.primitive_calls
        self.calls += other.calls
        self.own_time += other.own_time
        self.cumulative_time += other.cumulative_time
        for key, edge in other.callers.items():
            self.callers.setdefault(key, _Edge()).add(edge)


class CallGraph:
    """The functions of a profile with their calls and times, summed over threads."""

    def __init__(self) -> None:
        self._rows: dict[FuncKey, _Row] = {}
        # (filename, first line) -> the names seen there, in the order they were added: a
        # frame's plain name is matched to yappi's "Class.method" through it.
        self._index: dict[tuple[str, int], list[str]] = {}

    def add_thread(self, func_stats: Collection[Any], keep_builtins: bool) -> float:
        """Add one thread's yappi function stats (a ``YFuncStats``, read twice); returns the own
        time they book, in seconds.

        The returned time counts C functions even when ``keep_builtins`` is false and they are
        folded into their callers: it is what yappi booked for the thread.
        """
        graph = _thread_graph(func_stats)
        booked = sum(row.own_time for row in graph.values())
        if not keep_builtins:
            _fold_builtins(graph)
        for key, row in graph.items():
            if key not in self._rows:
                self._rows[key] = _Row()
                self._index.setdefault(key[:2], []).append(key[2])
            self._rows[key].add(row)
        return booked

    def charge(self, stack: Sequence[StackFrame], seconds: float) -> None:
        """Book ``seconds`` of own time to the last frame of ``stack`` (outermost first), and
        as inclusive time to every frame of it, as one more call where a frame is new."""
        keys = [self._resolve(link.code, link.frame) for link in stack]
        seen: set[FuncKey] = set()
        for i, key in enumerate(keys):
            if key not in self._rows:
                # A frame in flight is one call of its function.
                self._rows[key] = _Row(1, 1, 0.0, 0.0)
                self._index.setdefault(key[:2], []).append(key[2])
            row = self._rows[key]
            innermost = i == len(keys) - 1
            if innermost:
                row.own_time += seconds
            if key not in seen:  # recursion: count inclusive time once, like pstats
                row.cumulative_time += seconds
            if i:
                edge = row.callers.setdefault(keys[i - 1], _Edge(1, 1, 0.0, 0.0))
                if innermost:
                    edge.own_time += seconds
                if key not in seen:
                    edge.cumulative_time += seconds
            seen.add(key)

    def table(self) -> StatsTable:
        """The graph as the tuples a pstats file holds."""
        return {key: (row.primitive_calls, row.calls, row.own_time, row.cumulative_time,
                      {caller: edge.frozen() for caller, edge in row.callers.items()})
                for key, row in self._rows.items()}

    def _resolve(self, code_key: FuncKey, frame: FrameType | None) -> FuncKey:
        """The graph's key for a frame's function: yappi names methods ``Class.method``."""
        filename, line, name = code_key
        for known in self._index.get((filename, line), ()):
            if known == name or known.endswith("." + name):
                return (filename, line, known)
        if (frame is not None and frame.f_code.co_argcount
                and frame.f_code.co_varnames[0] == "self"):
            try:
                owner = frame.f_locals["self"]
                return (filename, line, f"{type(owner).__name__}.{name}")
            except Exception:  # noqa: BLE001 - any odd object: fall back to the plain name
                pass
        return (filename, line, name)


def _stat_key(stat: Any) -> FuncKey:
    """The pstats key of a yappi function (or child) stat."""
    if stat.builtin:
        name = _ADDRESS.sub("", stat.name)
        if not name.startswith("<"):
            name = f"<built-in method {stat.module}.{name}>"
        return ("~", 0, name)
    return (stat.module, stat.lineno, stat.name)


def _thread_graph(func_stats: Collection[Any]) -> dict[FuncKey, _Row]:
    """One thread's yappi stats as ``{key: row}``."""
    graph: dict[FuncKey, _Row] = {}
    for fs in func_stats:
        row = graph.setdefault(_stat_key(fs), _Row())
        # yappi counts no finished call (nactualcall 0) for a frame booked only by a flush or
        # still running; it is one call all the same.
        row.primitive_calls += fs.nactualcall or fs.ncall
        row.calls += fs.ncall
        row.own_time += fs.tsub
        row.cumulative_time += fs.ttot
    for fs in func_stats:
        caller = _stat_key(fs)
        for child in fs.children:
            callee = graph.get(_stat_key(child))
            if callee is None:
                continue
            edge = callee.callers.setdefault(caller, _Edge())
            edge.calls += child.ncall
            edge.primitive_calls += child.nactualcall or child.ncall
            edge.own_time += child.tsub
            edge.cumulative_time += child.ttot
    return graph


def _fold_builtins(graph: dict[FuncKey, _Row]) -> None:
    """Remove C functions, booking their own time to the Python functions that called them."""
    for bkey in [k for k in graph if is_builtin(k)]:
        callers = graph.pop(bkey).callers
        for ckey, edge in callers.items():
            if ckey in graph:
                graph[ckey].own_time += edge.own_time
        # Python functions called back by the builtin (a sort key, a property through getattr)
        # hang from its busiest caller: yappi does not say which caller each callback served.
        main = max(callers, key=lambda k: (callers[k].calls, k)) if callers else None
        for row in graph.values():
            callback = row.callers.pop(bkey, None)
            if callback is None or main is None or main not in graph:
                continue
            row.callers.setdefault(main, _Edge()).add(callback)
