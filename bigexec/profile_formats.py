"""Profiles as data: merging them and writing them out in the formats tools read.

Pure functions over finished profiles; nothing here runs a profiler.

- A CPU profile travels as a pstats file's bytes (what :func:`bigexec.profiling.cpu_profile`
  returns): :func:`merge_pstats` loads and adds such profiles into one ``pstats.Stats``,
  :func:`pstats_bytes` writes one back, :func:`to_text` renders a table and
  :func:`to_callgrind` the format KCachegrind opens.
- Stack samples travel as ``{"outer;...;inner": count}`` (what
  :func:`bigexec.stacks.sample_stacks` returns): :func:`merge_collapsed` adds them and
  :func:`collapsed_text` writes the collapsed format of ``flamegraph.pl`` and speedscope,
  :func:`to_speedscope` speedscope's own file format (and :mod:`bigexec.flamegraph` draws
  them as a page).
"""

from __future__ import annotations

import json
import marshal
import pstats
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

__all__ = [
    "CallerStats",
    "FuncKey",
    "FunctionStats",
    "SPEEDSCOPE_SCHEMA",
    "collapsed_text",
    "frame_parts",
    "is_builtin",
    "merge_collapsed",
    "merge_pstats",
    "pstats_bytes",
    "stats_table",
    "to_callgrind",
    "to_speedscope",
    "to_text",
]

# (filename, first line, function name): the key of a function in a pstats table. Builtins are
# ("~", 0, "<built-in method ...>"), as cProfile writes them.
FuncKey = tuple[str, int, str]

# A pstats table as marshal'd in a pstats file: {function: (cc, nc, tt, ct, {caller: (nc, cc,
# tt, ct)})}. The positions are pstats' format; read rows through FunctionStats/CallerStats.
StatsTable = dict[FuncKey, tuple[int, int, float, float, dict[FuncKey, tuple[int, int, float,
                                                                            float]]]]


class FunctionStats(NamedTuple):
    """One function's row of a pstats table, in pstats' order."""

    primitive_calls: int  # calls that were not recursive
    calls: int
    own_time: float  # seconds in the function itself ("tottime")
    cumulative_time: float  # seconds including its callees ("cumtime")
    callers: dict[FuncKey, tuple[int, int, float, float]]  # read each with CallerStats


class CallerStats(NamedTuple):
    """What one caller's calls added to a function's row, in pstats' order (calls first)."""

    calls: int
    primitive_calls: int
    own_time: float
    cumulative_time: float


def stats_table(stats: pstats.Stats) -> StatsTable:
    """The table a ``pstats.Stats`` holds, ``{function: row}``."""
    # typeshed leaves the attribute out, but it is the table every pstats user reads.
    table: StatsTable = stats.stats  # type: ignore[attr-defined]
    return table


def is_builtin(key: FuncKey) -> bool:
    """Whether ``key`` names a C function (cProfile's ``("~", 0, name)``)."""
    return key[0] == "~" and key[1] == 0


# --- pstats ----------------------------------------------------------------------------------


class _Loaded:
    """What pstats.Stats accepts besides a path: an object with ``create_stats`` and ``stats``."""

    def __init__(self, stats: StatsTable) -> None:
        self.stats = stats

    def create_stats(self) -> None:
        pass


def _load(blob: bytes) -> StatsTable:
    try:
        stats = marshal.loads(blob)
    except (EOFError, ValueError, TypeError) as e:
        raise ValueError(f"not a pstats profile: {e}") from None
    if not isinstance(stats, dict):
        raise ValueError(f"not a pstats profile: a marshal'd {type(stats).__name__}")
    return stats


def merge_pstats(blobs: Sequence[bytes]) -> pstats.Stats:
    """Merge profiles in the pstats file format into one Stats.

    Calls and times of the same function (same file, line and name) are summed, as
    ``pstats.Stats.add`` does. Raises ValueError on an empty sequence or a blob that is not
    a pstats profile.
    """
    if not blobs:
        raise ValueError("merge_pstats needs at least one profile")
    merged = pstats.Stats()
    for blob in blobs:
        stats = _load(blob)
        if stats:  # pstats.Stats refuses an empty profile (nothing ran during the window)
            # pstats loads any object with create_stats() and stats; typeshed names only the
            # profilers' classes.
            merged.add(pstats.Stats(_Loaded(stats)))  # type: ignore[arg-type]
    return merged


def pstats_bytes(stats: pstats.Stats) -> bytes:
    """``stats`` in the pstats file format (what ``Stats.dump_stats`` writes), as bytes."""
    return marshal.dumps(stats_table(stats))


def _func_label(key: FuncKey) -> str:
    # As pstats prints functions: builtins as {name}, others as file:line(name).
    filename, line, name = key
    if is_builtin(key):
        if name.startswith("<") and name.endswith(">"):
            return "{" + name[1:-1] + "}"
        return name
    return f"{filename}:{line}({name})"


# to_text's sort names, pstats' spellings included, and the FunctionStats field each sorts by.
_SORT_FIELDS = {
    "tottime": "own_time", "time": "own_time",
    "cumtime": "cumulative_time", "cumulative": "cumulative_time",
    "ncalls": "calls", "calls": "calls",
    "pcalls": "primitive_calls",
}


def to_text(stats: pstats.Stats, limit: int = 30, sort: str = "tottime") -> str:
    """A plain-text table of the top ``limit`` functions, sorted by ``sort``.

    ``sort`` is ``"tottime"`` (own time), ``"cumtime"`` (time including callees), ``"ncalls"``
    or ``"pcalls"`` (primitive, i.e. non-recursive, calls); pstats' names ``"time"``,
    ``"cumulative"`` and ``"calls"`` work too. ``limit <= 0`` lists every function. The first
    line gives the total CPU seconds of the profile (the sum of the functions' own times).
    """
    if sort not in _SORT_FIELDS:
        raise ValueError(f"sort must be one of {sorted(_SORT_FIELDS)}, not {sort!r}")
    field = _SORT_FIELDS[sort]
    table = {key: FunctionStats(*row) for key, row in stats_table(stats).items()}
    rows = sorted(table.items(), key=lambda kv: (-getattr(kv[1], field), _func_label(kv[0])))
    total = sum(row.own_time for row in table.values())
    calls = sum(row.calls for row in table.values())
    prims = sum(row.primitive_calls for row in table.values())
    shown = rows if limit <= 0 else rows[:limit]
    lines = [
        f"total {total:.3f} CPU seconds, {calls} calls ({prims} primitive), "
        f"{len(rows)} functions",
        f"ordered by {sort}, top {len(shown)}",
        "",
        f"{'ncalls':>12} {'tottime':>9} {'percall':>9} {'cumtime':>9} {'percall':>9} {'%own':>6}"
        "  filename:lineno(function)",
    ]
    for key, row in shown:
        cc, nc, tt, ct = row.primitive_calls, row.calls, row.own_time, row.cumulative_time
        ncalls = str(nc) if nc == cc else f"{nc}/{cc}"
        own_per = f"{tt / nc:9.6f}" if nc else " " * 9
        cum_per = f"{ct / cc:9.6f}" if cc else " " * 9
        share = 100.0 * tt / total if total else 0.0
        lines.append(f"{ncalls:>12} {tt:9.6f} {own_per} {ct:9.6f} {cum_per} {share:5.1f}%"
                     f"  {_func_label(key)}")
    return "\n".join(lines) + "\n"


# --- callgrind -------------------------------------------------------------------------------


def to_callgrind(stats: pstats.Stats) -> str:
    """``stats`` in the callgrind format that KCachegrind and QCachegrind open.

    Costs are integer microseconds (``events: Microseconds``). Each function has a ``fl=``
    (file) and ``fn=`` block with its own cost on the line of its definition; each function
    it called follows as ``cfl=``/``cfn=``/``calls=`` and the inclusive cost of those calls,
    taken from pstats' callers data. Names use callgrind's ``(id)`` compression.
    """
    table = {key: FunctionStats(*row) for key, row in stats_table(stats).items()}
    # Callers missing from the table (a filtered profile) still need a block of their own.
    functions = set(table)
    callees: dict[FuncKey, dict[FuncKey, CallerStats]] = {}
    for callee, row in table.items():
        for caller, edge in row.callers.items():
            functions.add(caller)
            callees.setdefault(caller, {})[callee] = CallerStats(*edge)

    file_ids: dict[str, int] = {}
    func_ids: dict[FuncKey, int] = {}

    def file_ref(filename: str) -> str:
        if filename in file_ids:
            return f"({file_ids[filename]})"
        file_ids[filename] = len(file_ids) + 1
        return f"({file_ids[filename]}) {filename}"

    def func_ref(key: FuncKey) -> str:
        if key in func_ids:
            return f"({func_ids[key]})"
        func_ids[key] = len(func_ids) + 1
        # The line is part of the name: callgrind tells functions apart by name only, and
        # two functions of one file may share a name (nested functions, lambdas).
        name = key[2] if is_builtin(key) else f"{key[2]}:{key[1]}"
        return f"({func_ids[key]}) {name}"

    def micros(seconds: float) -> int:
        return max(0, round(seconds * 1e6))

    body: list[str] = []
    total = 0
    for key in sorted(functions):
        own = micros(table[key].own_time) if key in table else 0
        total += own
        body.append(f"fl={file_ref(key[0])}")
        body.append(f"fn={func_ref(key)}")
        body.append(f"{key[1]} {own}")
        for callee, edge in sorted(callees.get(key, {}).items()):
            body.append(f"cfl={file_ref(callee[0])}")
            body.append(f"cfn={func_ref(callee)}")
            body.append(f"calls={max(1, int(edge.calls))} {callee[1]}")
            body.append(f"{key[1]} {micros(edge.cumulative_time)}")
        body.append("")
    header = [
        "# callgrind format",
        "version: 1",
        "creator: bigexec.profiling",
        "positions: line",
        "events: Microseconds",
        f"summary: {total}",
        "",
    ]
    return "\n".join(header + body)


# --- collapsed stacks ------------------------------------------------------------------------


def merge_collapsed(profiles: Sequence[dict[str, int]]) -> dict[str, int]:
    """Add stack samples together: the count of each stack is the sum over ``profiles``."""
    total: Counter[str] = Counter()
    for profile in profiles:
        total.update(profile)
    return dict(total)


def collapsed_text(counts: dict[str, int]) -> str:
    """Stack counts as ``stack count`` lines sorted by stack: flamegraph.pl and speedscope input.
    """
    return "".join(f"{stack} {n}\n" for stack, n in sorted(counts.items()) if n > 0)


# --- speedscope ------------------------------------------------------------------------------

#: The schema a speedscope file names (speedscope's file format).
SPEEDSCOPE_SCHEMA = "https://www.speedscope.app/file-format-schema.json"

# A sampled frame's label, as bigexec.stacks writes it: "function (file.py:12)".
_FRAME_LABEL = re.compile(r"(?P<name>.*) \((?P<file>[^()]*):(?P<line>\d+)\)")


def frame_parts(label: str) -> tuple[str, str | None, int | None]:
    """A sampled frame's label ``"function (file.py:12)"`` as (function, file, line); a label
    of another shape is all name: ``(label, None, None)``."""
    m = _FRAME_LABEL.fullmatch(label)
    if m is None:
        return label, None, None
    return m["name"], m["file"], int(m["line"])


def to_speedscope(profiles: Mapping[str, dict[str, int]], seconds_per_sample: float,
                  name: str = "bigexec profile", exporter: str = "bigexec") -> str:
    """Stack samples in speedscope's file format (JSON), one profile per entry of
    ``profiles`` (its name -> collapsed stack -> count), frames shared among them.

    Each profile is of type ``"sampled"``: the samples are counts of whole stacks with no
    order in time, which is what a sampled profile holds (an ``"evented"`` one needs the time
    of every call and return). Each distinct stack is one sample, weighed in seconds
    (``count * seconds_per_sample``), so a profile's weights add up to its CPU time and
    speedscope's views show seconds. Raises ValueError for a ``seconds_per_sample`` that is
    not positive.
    """
    if not seconds_per_sample > 0:
        raise ValueError(f"seconds_per_sample must be > 0, not {seconds_per_sample!r}")
    frames: list[dict[str, Any]] = []
    index: dict[str, int] = {}

    def frame(label: str) -> int:
        i = index.get(label)
        if i is None:
            fn, file, line = frame_parts(label)
            entry: dict[str, Any] = {"name": fn}
            if file is not None:
                entry["file"] = file
                entry["line"] = line
            i = index[label] = len(frames)
            frames.append(entry)
        return i

    out = []
    for profile_name, counts in profiles.items():
        samples, weights = [], []
        for stack, n in sorted(counts.items()):
            if n <= 0:
                continue
            samples.append([frame(f) for f in stack.split(";")] if stack else [])
            weights.append(n * seconds_per_sample)
        out.append({"type": "sampled", "name": profile_name, "unit": "seconds",
                    "startValue": 0, "endValue": sum(weights),
                    "samples": samples, "weights": weights})
    document: dict[str, Any] = {"$schema": SPEEDSCOPE_SCHEMA, "shared": {"frames": frames},
                                "profiles": out, "name": name, "exporter": exporter}
    if out:
        document["activeProfileIndex"] = 0
    return json.dumps(document)
