"""The package's shape: every module imports alone, imports form no cycle, and modules talk
through public seams (no reads of another module's private names)."""

from __future__ import annotations

import ast
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "bigexec"

#: Private names of other projects that bigexec uses on purpose, and why.
FOREIGN_PRIVATES = {
    "_current_frames": "sys: the only way to see other threads' stacks (documented)",
    "_getframe": "sys: a caller's frame (documented)",
    "_exit": "os: end a worker without running atexit hooks (documented)",
    "_asdict": "NamedTuple's public API",
    "_fields": "NamedTuple's public API",
    "_replace": "NamedTuple's public API",
    "_make": "NamedTuple's public API",
    "_PyBytes_Resize": "codec: CPython's C API, to grow a receive buffer in place",
}
#: cloudpickle's internals that namespaces.py rebuilds functions and classes with, per module.
FOREIGN_MODULE_PRIVATES = {"bigexec/namespaces.py": {"_cp"}}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(name: str, path: Path, *, annotations: bool) -> set[str]:
    """The bigexec modules that module ``name`` imports, at any depth of its code (function
    bodies included); ``annotations``: also those under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test) and not annotations:
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "bigexec":
                    found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "bigexec":
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    found.add(sub if sub in MODULES else target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    found.discard(name)
    return {m for m in found if m in MODULES}


def _graph(annotations: bool) -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        # A module's own packages are imported before it: an edge into one of them is no
        # dependency of the module's (and the package __init__ re-exports sit above all).
        graph[name] = {m for m in _imports(name, path, annotations=annotations)
                       if not (name.startswith(m + ".") and MODULES[m].name == "__init__.py")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected group of modules (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return groups


def test_imports_form_no_cycle_even_inside_functions_or_for_annotations():
    assert _cycles(_graph(annotations=True)) == []


def test_the_graph_sees_a_cycle_when_there_is_one():
    # the checker itself: a cycle planted in a copy of the graph is found
    graph = _graph(annotations=False)
    graph["bigexec.errors"] = graph["bigexec.errors"] | {"bigexec.session"}
    assert any("bigexec.errors" in c and "bigexec.session" in c for c in _cycles(graph))


def test_the_layers_run_one_way():
    # the core never reaches up into what observes it, nor into the systems that use it
    graph = _graph(annotations=False)
    core = ["bigexec.machine", "bigexec.dialer", "bigexec.session", "bigexec.worker",
            "bigexec.supervisor"]
    for low in core + ["bigexec.observe"]:
        assert "bigexec.debug" not in _reach(graph, low) or low == "bigexec.session", low
    for low in ["bigexec.machine", "bigexec.dialer", "bigexec.observe", "bigexec.debug"]:
        assert not any(m.startswith("bigexec.systems.local") or m == "bigexec.systems.threads"
                       for m in _reach(graph, low)), low
    assert "bigexec.scheduler" not in _reach(graph, "bigexec.session")


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in graph[todo.pop()]:
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


@pytest.mark.timeout(300)
def test_every_module_imports_alone():
    def load(name: str) -> tuple[str, int, str]:
        proc = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True,
                              text=True, timeout=120)
        return name, proc.returncode, proc.stderr[-2000:]

    with ThreadPoolExecutor(4) as ex:
        # (``__main__`` runs the command line: importing it is running it)
        names = sorted(m for m in MODULES if not m.endswith(".__main__"))
        failed = [r for r in ex.map(load, names) if r[1] != 0]
    assert failed == []


def _private_reads(path: Path) -> list[tuple[int, str]]:
    """``x._name`` reads in a module where ``_name`` is defined in none of that module's
    code (so it belongs to another module), ``x`` being anything but ``self`` or ``cls``."""
    tree = ast.parse(path.read_text())
    own: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            own.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            own.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            own.add(node.id)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            own.add(node.target.id)
        elif isinstance(node, (ast.Assign,)):
            for t in node.targets:
                if isinstance(t, ast.Tuple):
                    own.update(e.id for e in t.elts if isinstance(e, ast.Name))
        elif isinstance(node, ast.ClassDef):
            own.add(node.name)
    for node in ast.walk(tree):  # __slots__ names are the class's own attributes
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__slots__" for t in node.targets):
            own.update(e.value for e in ast.walk(node.value)
                       if isinstance(e, ast.Constant) and isinstance(e.value, str))
    rel = path.relative_to(PACKAGE.parent) if path.is_relative_to(PACKAGE.parent) else path
    foreign_bases = FOREIGN_MODULE_PRIVATES.get(str(rel), set())
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                and not node.attr.startswith("__")):
            continue
        base = node.value
        if isinstance(base, ast.Name) and base.id in ("self", "cls"):
            continue
        if isinstance(base, ast.Name) and base.id in foreign_bases:
            continue
        if node.attr in own or node.attr in FOREIGN_PRIVATES:
            continue
        found.append((node.lineno, ast.unparse(node)))
    return found


def test_no_module_reads_another_modules_private_names():
    found = {str(p.relative_to(PACKAGE.parent)): r for p in MODULES.values()
             if (r := _private_reads(p))}
    assert found == {}


def test_the_private_name_check_sees_a_reach_in(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f(machine):\n    return machine._handle\n\n"
                      "class C:\n    def g(self, other):\n        self._x = 1\n"
                      "        return other._x\n")
    assert _private_reads(sample) == [(2, "machine._handle")]
