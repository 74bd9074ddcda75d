"""bigexec.profile_graph: yappi's per-thread stats summed into a pstats table."""

from __future__ import annotations

import marshal
import sys
from types import SimpleNamespace

import pytest

from bigexec.profile_formats import CallerStats, FunctionStats, merge_pstats, to_text
from bigexec.profile_graph import CallGraph, StackFrame

F = ("m.py", 1, "f")
G = ("m.py", 5, "g")
H = ("m.py", 9, "h")
LEN = ("~", 0, "<built-in method builtins.len>")


def stat(module: str, lineno: int, name: str, ncall: int, tsub: float, ttot: float, *,
         builtin: bool = False, nactualcall: int | None = None, children=()):
    """A stand-in for a yappi function stat (or child stat): the attributes CallGraph reads."""
    return SimpleNamespace(module=module, lineno=lineno, name=name, ncall=ncall, tsub=tsub,
                           ttot=ttot, builtin=builtin,
                           nactualcall=ncall if nactualcall is None else nactualcall,
                           children=list(children))


def thread_with_a_callback():
    """f calls len 3 times, h once; len calls back g twice (a key function, say)."""
    return [
        stat("m.py", 1, "f", 1, 0.5, 2.0,
             children=[stat("builtins", 0, "len", 3, 0.3, 1.0, builtin=True)]),
        stat("m.py", 9, "h", 1, 0.1, 0.3,
             children=[stat("builtins", 0, "len", 1, 0.1, 0.2, builtin=True)]),
        stat("builtins", 0, "len", 4, 0.4, 1.2, builtin=True,
             children=[stat("m.py", 5, "g", 2, 0.6, 0.6)]),
        stat("m.py", 5, "g", 2, 0.6, 0.6),
    ]


def rows(graph: CallGraph) -> dict:
    return {key: FunctionStats(*row) for key, row in graph.table().items()}


def test_builtins_fold_into_their_callers_and_callbacks_hang_from_the_busiest():
    graph = CallGraph()
    booked = graph.add_thread(thread_with_a_callback(), keep_builtins=False)
    # What yappi booked for the thread counts the builtin's own time too.
    assert booked == pytest.approx(0.5 + 0.1 + 0.4 + 0.6)
    table = rows(graph)
    assert set(table) == {F, G, H}
    assert table[F].own_time == pytest.approx(0.5 + 0.3)
    assert table[H].own_time == pytest.approx(0.1 + 0.1)
    # g was called by len, whose busiest caller is f (3 calls against h's 1).
    assert {k: CallerStats(*e) for k, e in table[G].callers.items()} == {
        F: CallerStats(2, 2, pytest.approx(0.6), pytest.approx(0.6))}


def test_builtins_kept_are_entries_of_their_own():
    graph = CallGraph()
    graph.add_thread(thread_with_a_callback(), keep_builtins=True)
    table = rows(graph)
    assert table[LEN] == FunctionStats(4, 4, 0.4, 1.2, table[LEN].callers)
    assert {k: CallerStats(*e).calls for k, e in table[LEN].callers.items()} == {F: 3, H: 1}
    assert table[F].own_time == pytest.approx(0.5)
    assert list(table[G].callers) == [LEN]


def test_threads_add_up():
    graph = CallGraph()
    graph.add_thread(thread_with_a_callback(), keep_builtins=True)
    graph.add_thread(thread_with_a_callback(), keep_builtins=True)
    table = rows(graph)
    assert (table[LEN].primitive_calls, table[LEN].calls) == (8, 8)
    assert table[G].own_time == pytest.approx(1.2)
    assert CallerStats(*table[LEN].callers[F]).calls == 6


def test_a_running_frame_without_a_finished_call_is_one_call():
    graph = CallGraph()
    graph.add_thread([stat("m.py", 1, "f", 1, 0.2, 0.2, nactualcall=0)], keep_builtins=True)
    assert rows(graph)[F].primitive_calls == 1


def test_builtin_names_lose_addresses():
    graph = CallGraph()
    graph.add_thread([stat("random", 0, "<function Random.seed at 0x7f00deadbeef>", 1, 0.1,
                           0.1, builtin=True),
                      stat("builtins", 0, "sorted", 1, 0.1, 0.1, builtin=True)],
                     keep_builtins=True)
    assert set(rows(graph)) == {("~", 0, "<function Random.seed>"),
                                ("~", 0, "<built-in method builtins.sorted>")}


def test_charge_books_own_time_to_the_innermost_frame_and_inclusive_time_once():
    graph = CallGraph()
    # f -> g -> f: the recursion's inclusive time is counted once, as pstats does.
    graph.charge([StackFrame(F, None), StackFrame(G, None), StackFrame(F, None)], 1.0)
    table = rows(graph)
    assert table[F][:4] == (1, 1, 1.0, 1.0)  # a frame in flight is one call
    assert table[G][:4] == (1, 1, 0.0, 1.0)
    assert table[G].callers == {F: (1, 1, 0.0, 1.0)}
    assert table[F].callers == {G: (1, 1, 1.0, 0.0)}


def test_charge_finds_methods_under_yappis_class_name():
    graph = CallGraph()
    graph.add_thread([stat("m.py", 10, "Worker.run", 1, 0.1, 0.1)], keep_builtins=True)
    graph.charge([StackFrame(("m.py", 10, "run"), None)], 0.5)
    table = rows(graph)
    assert set(table) == {("m.py", 10, "Worker.run")}
    assert table["m.py", 10, "Worker.run"].own_time == pytest.approx(0.6)


def test_charge_names_a_live_method_frame_after_its_class():
    class Worker:
        def run(self):
            return sys._getframe()

    frame = Worker().run()
    code = frame.f_code
    graph = CallGraph()
    graph.charge([StackFrame((code.co_filename, code.co_firstlineno, code.co_name), frame)], 0.5)
    assert [key[2] for key in rows(graph)] == ["Worker.run"]


def test_table_is_a_pstats_profile():
    graph = CallGraph()
    graph.add_thread(thread_with_a_callback(), keep_builtins=False)
    graph.charge([StackFrame(F, None), StackFrame(H, None)], 0.25)
    stats = merge_pstats([marshal.dumps(graph.table())])
    assert len(stats.stats) == 3
    assert to_text(stats).splitlines()[4].endswith("m.py:1(f)")
