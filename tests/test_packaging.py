"""What ``pip install bigexec`` brings: the core dependencies only, and a package that works
with nothing more. A feature that needs another package (boto3 for ``ec2``, tqdm for a
progress bar) imports it when it is used, and its extra names it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "bigexec"
# the import name of each distribution that may be imported at a module's top level
_IMPORT_NAMES = {"cloudpickle": "cloudpickle", "cryptography": "cryptography",
                 "psutil": "psutil", "yappi": "yappi", "tomli": "tomli"}


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _distribution(requirement: str) -> str:
    name = requirement
    for stop in "<>=!~;[ ":
        name = name.split(stop)[0]
    return name.strip().lower()


def _top_level_imports(tree: ast.Module) -> set[str]:
    """The modules imported at a module's top level, or in a top-level ``try`` or ``if``
    (that is, when the module is imported), not inside a function."""
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                found.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
            elif isinstance(node, ast.If):
                if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)

    visit(tree.body)
    return found


def test_core_dependencies_are_the_ones_the_package_imports_when_imported():
    core = {_distribution(r) for r in _project()["dependencies"]}
    assert core <= set(_IMPORT_NAMES), f"name the import of {core - set(_IMPORT_NAMES)}"
    allowed = {_IMPORT_NAMES[d] for d in core} | set(sys.stdlib_module_names) | {"bigexec"}
    strays = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        extra = _top_level_imports(tree) - allowed
        if extra:
            strays[str(path.relative_to(ROOT))] = sorted(extra)
    # an import here would make every user install that package: move it into the function
    # that needs it, and put its distribution in an extra
    assert not strays, strays
    # nothing is both in the core and in an extra, and the extras the docs promise exist
    extras = _project()["optional-dependencies"]
    assert {"ec2"} <= set(extras)
    for name in ("ec2",):
        assert not {_distribution(r) for r in extras[name]} & core


def test_the_package_and_its_command_work_without_any_extra():
    # boto3, requests and tqdm are installed in the test environment: hide them, as a plain
    # `pip install bigexec` would not have them
    code = (
        "import sys\n"
        "for name in ('boto3', 'botocore', 'requests', 'tqdm'):\n"
        "    sys.modules[name] = None\n"
        "import bigexec, bigexec.cli, bigexec.systems.ec2, bigexec.debug, bigexec.observe\n"
        "with bigexec.Executor(2, system='threads') as ex:\n"
        "    assert sum(ex.map(abs, range(-10, 0))) == 55\n"
        "sys.exit(bigexec.cli.main(['--version']))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("bigexec "), done.stdout
