"""A system written against the bootstrap protocol alone, as a new backend would be.

It uses only public seams: ``System`` and ``MachineHandle`` (``bigexec.systems.base``), the
protocol's ``WorkerSpec`` and ``MachineOutput`` (``bigexec.systems.bootstrap``), and
``python -m bigexec.worker``. It differs from ``local`` where a remote backend would: the
worker announces its address in its output (no extra descriptor: an ssh session or an agent
carries output only), the output travels over one pipe read by a generic line pump, and the
driver learns of a death from a watcher thread that feeds ``mark_dead``/``report_lost``.
Nothing in ``Machine``, the scheduler or the other systems knows it exists.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from typing import Any

from bigexec.authority import Authority
from bigexec.errors import BootError, MachineLost
from bigexec.systems.base import MachineHandle, System
from bigexec.systems.bootstrap import MachineOutput, Versions, WorkerSpec
from bigexec.worker import describe_exit


class PipeHandle(MachineHandle):
    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        super().__init__()
        self.proc = proc
        self.output = MachineOutput(f"pipe {proc.pid}")
        self._pump = threading.Thread(target=self.output.pump,
                                      args=(iter(proc.stdout.readline, b""),), daemon=True)
        self._pump.start()
        threading.Thread(target=self._watch, daemon=True).start()

    def log_label(self, label: str) -> None:
        self.output.label = label

    def address(self, timeout: float) -> str:
        addr = self.output.announced(timeout)
        if addr is None:
            self.kill()
            code = self.proc.poll()
            raise self.output.boot_error(f"pid {self.proc.pid}",
                                         f"{describe_exit(code)} before it listened")
        self.output.mark_listening(addr.split("://", 1)[-1])
        return addr

    def _watch(self) -> None:
        code = self.proc.wait()
        self.output.wait_ended(5.0)
        if self.output.listening:
            why: BaseException = MachineLost(f"machine {self.output.label} {describe_exit(code)}")
        else:
            why = self.output.boot_error(f"pid {self.proc.pid}",
                                         f"{describe_exit(code)} before it listened")
        self.report_lost(why)

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass

    def wait_stopped(self, timeout: float) -> bool:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return self.output.wait_ended(timeout)


class PipeSystem(System):
    """Workers as child processes told everything by their spec; options: ``versions``
    (what the driver claims to run, to see a worker refuse it)."""

    name = "pipe"
    inherits_environment = True
    default_boot_timeout = 60.0

    def __init__(self, *, versions: Versions | None = None, **options: Any) -> None:
        super().__init__(**options)
        self.authority = Authority()
        self.versions = versions or Versions.here()
        self.handles: list[PipeHandle] = []

    def credentials_authority(self) -> Authority:
        return self.authority

    def start(self, count: int, env: Mapping[str, str]) -> list[MachineHandle]:
        environ = self.machine_environment(env)
        environ["PYTHONPATH"] = os.pathsep.join(p or os.getcwd() for p in sys.path)
        environ["PYTHONUNBUFFERED"] = "1"
        out: list[MachineHandle] = []
        for _ in range(count):
            identity = self.new_machine_identity()
            spec = WorkerSpec(system=self.name, lease=max(self.keepalive.lease, self.boot_timeout),
                              credentials=self.machine_credentials(identity),
                              versions=self.versions)
            proc = subprocess.Popen([sys.executable, "-m", "bigexec.worker"],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, env=environ,
                                    start_new_session=True)
            assert proc.stdin is not None
            proc.stdin.write(spec.encode())
            proc.stdin.flush()
            handle = PipeHandle(proc)
            handle.identity = identity
            self.handles.append(handle)
            out.append(handle)
        return out

    def shutdown(self) -> None:
        for h in self.handles:
            h.kill()
            h.proc.wait()
            for pipe in (h.proc.stdin, h.proc.stdout):
                if pipe is not None:
                    try:
                        pipe.close()
                    except OSError:
                        pass


__all__ = ["BootError", "PipeHandle", "PipeSystem"]
