"""The running bigexec as a wheel (``systems.own_wheel``): pip installs it, and what it
installs is this bigexec."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import zipfile
from pathlib import Path

import bigexec
from bigexec.systems.own_wheel import OwnWheel


def test_the_wheel_holds_this_bigexec_and_pip_installs_it(tmp_path: Path) -> None:
    wheel = OwnWheel.build()
    assert wheel.filename == f"bigexec-{bigexec.__version__}-py3-none-any.whl"
    assert wheel.digest == hashlib.sha256(wheel.data).hexdigest()
    names = zipfile.ZipFile(io.BytesIO(wheel.data)).namelist()
    assert "bigexec/worker.py" in names and "bigexec/agent/__main__.py" in names
    assert "bigexec/py.typed" in names
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    here = Path(bigexec.__file__).parent
    assert zipfile.ZipFile(io.BytesIO(wheel.data)).read("bigexec/session.py") == (
        here / "session.py").read_bytes()
    path = tmp_path / wheel.filename
    path.write_bytes(wheel.data)
    target = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--isolated", "-q",
                           "--no-index", "--no-deps", "--target", str(target), str(path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = subprocess.run(
        [sys.executable, "-I", "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
         "import bigexec, bigexec.worker; print(bigexec.__version__, bigexec.__file__)",
         str(target)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    version, where = out.stdout.split()
    assert version == bigexec.__version__ and where.startswith(str(target))
    record = (target / f"bigexec-{bigexec.__version__}.dist-info" / "RECORD").read_text()
    assert "bigexec/session.py,sha256=" in record
