"""The driver's own modules travel as a code bundle (``systems.code_bundle``): what goes in,
what stays out, a stable digest, and a worker that imports from it."""

from __future__ import annotations

import importlib
import io
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from bigexec.agent import Agent
from bigexec.systems.bootstrap import WorkerSpec
from bigexec.systems.code_bundle import CodeBundle


def _own_code(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    (root / "mypkg" / "sub").mkdir(parents=True)
    (root / "mypkg" / "__init__.py").write_text("VALUE = 41\n")
    (root / "mypkg" / "sub" / "__init__.py").write_text("")
    (root / "mypkg" / "sub" / "later.py").write_text("def answer():\n    return 42\n")
    (root / "mypkg" / "__pycache__").mkdir()
    (root / "mypkg" / "__pycache__" / "junk.py").write_text("raise SystemExit\n")
    (root / "helper_mod.py").write_text("def twice(x):\n    return 2 * x\n")
    (root / "not_imported.py").write_text("")
    return root


@pytest.fixture
def own_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = _own_code(tmp_path)
    monkeypatch.syspath_prepend(str(root))
    for name in ("mypkg", "helper_mod"):
        importlib.import_module(name)
    yield root
    for name in [n for n in sys.modules if n.split(".")[0] in ("mypkg", "helper_mod")]:
        del sys.modules[name]


def test_the_bundle_holds_the_drivers_own_imported_modules_and_nothing_installed(
        own_code: Path) -> None:
    bundle = CodeBundle.of_modules(sys.modules, [str(own_code), *sys.path])
    assert bundle is not None
    assert {"mypkg", "helper_mod"} <= set(bundle.names)
    for installed in ("bigexec", "cloudpickle", "json", "pytest", "__main__"):
        assert installed not in bundle.names
    files = zipfile.ZipFile(io.BytesIO(bundle.data)).namelist()
    # a package goes whole (its submodules may be imported later, by an unpickled call)
    assert {"mypkg/__init__.py", "mypkg/sub/__init__.py", "mypkg/sub/later.py",
            "helper_mod.py"} <= set(files)
    assert "not_imported.py" not in files and not any("__pycache__" in f for f in files)
    # the same code, the same digest (sent once per host); other code, another
    again = CodeBundle.of_modules(sys.modules, [str(own_code), *sys.path])
    assert again is not None and again.digest == bundle.digest
    (own_code / "helper_mod.py").write_text("def twice(x):\n    return x + x\n")
    changed = CodeBundle.of_modules(sys.modules, [str(own_code), *sys.path])
    assert changed is not None and changed.digest != bundle.digest


def test_a_module_is_bundled_from_the_path_entry_its_name_comes_from(
        own_code: Path) -> None:
    # src/ and its parent are both on the path: the modules were imported from src/
    bundle = CodeBundle.of_modules(sys.modules, [str(own_code.parent), str(own_code)])
    assert bundle is not None and {"mypkg", "helper_mod"} <= set(bundle.names)
    files = zipfile.ZipFile(io.BytesIO(bundle.data)).namelist()
    assert "helper_mod.py" in files and "src/helper_mod.py" not in files


def test_nothing_to_bundle_gives_none() -> None:
    assert CodeBundle.of_modules({"json": sys.modules["json"]}, sys.path) is None


def test_a_process_imports_the_drivers_modules_from_the_bundle(own_code: Path,
                                                                tmp_path: Path) -> None:
    bundle = CodeBundle.of_modules(sys.modules, [str(own_code)])
    assert bundle is not None
    agent = Agent(session="s", instance_id="i-1", lease=60, poweroff=("true",),
                  bundles=str(tmp_path / "bundles"))
    assert not agent.has_bundle(bundle.digest)
    with pytest.raises(ValueError, match="does not match its digest"):
        agent.put_bundle(bundle.digest, bundle.data + b"x")
    with pytest.raises(ValueError, match="64 hex digits"):
        agent.put_bundle("../../etc/passwd", bundle.data)
    agent.put_bundle(bundle.digest, bundle.data)
    assert agent.has_bundle(bundle.digest)
    zip_path = tmp_path / "bundles" / f"{bundle.digest}.zip"
    out = subprocess.run(
        [sys.executable, "-c", "import helper_mod, mypkg.sub.later as l; "
         "print(helper_mod.twice(21), l.answer(), helper_mod.__file__)"],
        env={"PYTHONPATH": str(zip_path), "PATH": "/usr/bin:/bin"}, capture_output=True,
        text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    words = out.stdout.split()
    assert words[:2] == ["42", "42"] and str(zip_path) in words[2]
    with pytest.raises(LookupError, match="put_bundle it first"):
        agent.start_worker(WorkerSpec(system="ec2", lease=10), bundle="0" * 64)
    agent.close()
