"""The ec2 end-to-end test world: moto's EC2 API plus instances that boot their user-data for
real, each in its own network namespace, on this one machine.

    host (this pytest process)
    ├── hub namespace <prefix>          no default route: a stray connect fails at once
    │     lo 127.0.0.1:PORT             moto's EC2+SSM API (served by this process)
    │     br0 10.200.0.1/24             the subnet's "router"
    │     the driver (run_driver, in_hub)
    └── per instance <prefix>-i<n>      eth0 = moto's private IP, default route via br0
          lo 169.254.169.254:80         its own IMDSv2 (fake_imds, served by this process)
          its user-data's runcmd, in a private mount namespace where /run, /opt and
          /var/log are the instance's own directories, PATH with python3 = this interpreter
          and a `shutdown` that asks the hypervisor to power the instance off

A hypervisor thread watches moto's backend (in-process) for instances in the world's subnet
and boots each; a power-off ends the instance as EC2 does (its processes killed, its state
terminated or stopped by its shutdown behaviour, reason Client.InstanceInitiatedShutdown, its
namespace deleted); so does a termination through the API or ``kill_instance``.

THE NETWORK RULE: traffic goes only to loopback and to addresses in namespaces made here. An
instance outside the world's subnet is never booted (moto would have invented its address).
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import grp
import gzip
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from fake_imds import FakeImds, InstanceMetadata
from moto_ec2 import (
    ACCOUNT,
    CREDENTIALS,
    REGION,
    MotoEc2,
    bind_server,
    boto3,
    create_network,
    reset_backends,
    throttled_app,
)

# the fixtures are "ec2_world" and "wheelhouse": import ec2_world_fixture and
# wheelhouse_fixture into a test module to use them
__all__ = ["BuiltWheelhouse", "Ec2World", "Instance", "build_wheelhouse", "ec2_world_fixture",
           "in_namespace", "parse_user_data", "running_world", "unavailable_reason",
           "wheelhouse_fixture"]

ROOT = Path(__file__).resolve().parent.parent
BRIDGE_IP = "10.200.0.1"
PREFIX_LEN = 24
METADATA_IP = "169.254.169.254"
#: The directories each instance has of its own (host paths stay untouched).
PRIVATE_DIRS = ("/run", "/opt", "/var/log")
BOOT_LOG = "/var/log/bigexec-boot.log"
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


# ── namespaces ───────────────────────────────────────────────────────────────────────────

def unavailable_reason() -> str | None:
    """Why this machine cannot host the world (None: it can; CI, as root, always can)."""
    if sys.platform != "linux":
        return "the ec2 world needs Linux network namespaces"
    if os.geteuid() != 0:
        return "the ec2 world needs root (network and mount namespaces, veth, bridge)"
    for tool in ("ip", "unshare", "mount"):
        if shutil.which(tool) is None:
            return f"the ec2 world needs `{tool}` (iproute2, util-linux)"
    probe = f"bxwprobe{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"network namespaces are unavailable: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def _enter(namespace: str) -> None:
    fd = os.open(f"/var/run/netns/{namespace}", os.O_RDONLY)
    try:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {namespace}: {os.strerror(err)}")
    finally:
        os.close(fd)


def in_namespace(namespace: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in a new thread that entered ``namespace``'s network: every
    socket it makes (a listener, a boto3 or RPC connection) lives there, also after the
    thread ends. The rest of this process stays in the host's namespace."""
    result: list[Any] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            _enter(namespace)
            result.append(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: B036 (handed to the caller)
            failure.append(exc)

    thread = threading.Thread(target=run, name=f"in-{namespace}", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def namespace_pids(namespace: str) -> list[int]:
    """The processes whose network namespace is ``namespace`` (never this one)."""
    done = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True)
    return [int(p) for p in done.stdout.split() if p.isdigit() and int(p) != os.getpid()]


def _kill_namespace_processes(namespace: str, rounds: int = 50) -> None:
    """SIGKILL everything in ``namespace`` until nothing is left (a fork may race a round)."""
    for _ in range(rounds):
        pids = namespace_pids(namespace)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)


def _delete_namespace(namespace: str) -> None:
    _kill_namespace_processes(namespace)
    subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


def _listening(port: int) -> bool:
    """Whether something listens on TCP ``port`` in the calling thread's namespace."""
    for table in ("/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    return True
    return False


# ── user-data: the #cloud-config subset bigexec writes ───────────────────────────────────

@dataclass(frozen=True)
class FileToWrite:
    path: str
    content: bytes
    permissions: int = 0o644
    owner: str = "root:root"
    append: bool = False


@dataclass(frozen=True)
class CloudConfig:
    write_files: tuple[FileToWrite, ...]
    runcmd: tuple[str, ...]  # shell lines, as cloud-init's runcmd script holds them


_FILE_KEYS = {"path", "content", "encoding", "permissions", "owner", "append"}


def parse_user_data(raw: bytes) -> CloudConfig:
    """The ``#cloud-config`` in ``raw`` (gzipped or not); ValueError for anything outside
    the subset bigexec writes (the world would rather fail than ignore a directive)."""
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    text = raw.decode("utf-8")
    if not text.startswith("#cloud-config"):
        raise ValueError(f"user-data is not #cloud-config: {text[:40]!r}")
    body = text.split("\n", 1)[1] if "\n" in text else ""
    try:
        config = json.loads(body)  # bigexec writes JSON (a subset of YAML)
    except ValueError:
        import yaml  # moto needs PyYAML, so the test environment has it

        config = yaml.safe_load(body)
    if not isinstance(config, dict):
        raise ValueError("the #cloud-config is not a mapping")
    unknown = set(config) - {"write_files", "runcmd"}
    if unknown:
        raise ValueError(f"the world does not interpret #cloud-config keys {sorted(unknown)}")
    files = []
    for entry in config.get("write_files") or []:
        extra = set(entry) - _FILE_KEYS
        if extra:
            raise ValueError(f"write_files entry with keys the world ignores: {sorted(extra)}")
        content = entry.get("content", "")
        encoding = entry.get("encoding", "text/plain")
        data = content.encode() if isinstance(content, str) else bytes(content)
        if encoding in ("b64", "base64"):
            data = base64.b64decode(data)
        elif encoding in ("gz+b64", "gzip+base64", "gz+base64", "gzip+b64"):
            data = gzip.decompress(base64.b64decode(data))
        elif encoding != "text/plain":
            raise ValueError(f"write_files encoding {encoding!r} is not interpreted")
        files.append(FileToWrite(path=entry["path"], content=data,
                                 permissions=int(str(entry.get("permissions", "0644")), 8),
                                 owner=entry.get("owner", "root:root"),
                                 append=bool(entry.get("append", False))))
    commands = []
    for command in config.get("runcmd") or []:
        if isinstance(command, list):
            commands.append(shlex.join(str(a) for a in command))
        elif isinstance(command, str):
            commands.append(command)
        else:
            raise ValueError(f"runcmd entry {command!r} is neither a list nor a string")
    return CloudConfig(tuple(files), tuple(commands))


# ── the wheelhouse ───────────────────────────────────────────────────────────────────────

@dataclass(frozen=True)
class BuiltWheelhouse:
    """A directory of wheels: bigexec from this checkout, its runtime dependencies and pip,
    for this interpreter."""

    path: Path
    seconds: float
    wheels: tuple[str, ...]


def build_wheelhouse(target: Path) -> BuiltWheelhouse:
    """Build it with pip, from a copy of the checkout (so no build/ is left in the tree)."""
    started = time.monotonic()
    source = target.parent / f"{target.name}-source"
    source.mkdir(parents=True)
    shutil.copytree(ROOT / "bigexec", source / "bigexec",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(target),
         str(source), "pip"], capture_output=True, text=True, timeout=600)
    shutil.rmtree(source, ignore_errors=True)
    if done.returncode != 0:
        raise RuntimeError(f"pip wheel failed: {done.stderr[-3000:]}")
    wheels = tuple(sorted(p.name for p in target.glob("*.whl")))
    return BuiltWheelhouse(target, time.monotonic() - started, wheels)


@pytest.fixture(scope="session", name="wheelhouse")
def wheelhouse_fixture(tmp_path_factory: pytest.TempPathFactory) -> BuiltWheelhouse:
    """The session's wheelhouse (built once, about 4-6 s)."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    return build_wheelhouse(tmp_path_factory.mktemp("wheelhouse") / "wheels")


# ── instances ────────────────────────────────────────────────────────────────────────────

@dataclass
class Instance:
    """One booted instance."""

    id: str
    ip: str
    namespace: str
    #: Its own directory: run/, opt/, var-log/ (its /run, /opt, /var/log), bin/, logs.
    dir: Path
    imds: FakeImds = field(repr=False)
    booted_at: float  # time.time() when its runcmd started
    boot: subprocess.Popen[bytes] | None = None
    #: None while it runs; else "terminated" or "stopped" and why.
    ended: str | None = None
    reason: str | None = None
    listening_at: dict[int, float] = field(default_factory=dict)
    _ending: bool = False
    _shutdown_seen: int = 0
    _poweroff_at: float | None = None
    gone: threading.Event = field(default_factory=threading.Event, repr=False)

    def host_path(self, path: str) -> Path:
        """Where the instance's ``path`` (under /run, /opt or /var/log) is on the host."""
        path = os.path.normpath(path)  # no ../ out of the instance's directories
        for private in PRIVATE_DIRS:
            if path == private or path.startswith(private + "/"):
                return self.dir / private.strip("/").replace("/", "-") / path[
                    len(private):].lstrip("/")
        raise ValueError(f"{path} is not in the instance's own directories {PRIVATE_DIRS}")

    @property
    def boot_log(self) -> str:
        """/var/log/bigexec-boot.log on the instance."""
        try:
            return self.host_path(BOOT_LOG).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def console(self) -> str:
        """What the runcmd script printed outside the boot log (cloud-init's output)."""
        try:
            return (self.dir / "cloud-init-output.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def shutdown_requests(self) -> list[str]:
        """The argument lines of every ``shutdown`` run on the instance."""
        try:
            return (self.dir / "shutdown-requests").read_text().splitlines()
        except FileNotFoundError:
            return []

    def timings(self) -> dict[str, float]:
        """Seconds from the runcmd's start, read from what the boot left on its disk: the
        venv made, the install done (the last dist-info RECORD), the agent listening (when
        the world saw it, see ``Ec2World.wait_listening``)."""
        venv = self.host_path("/opt/bigexec/venv")
        out: dict[str, float] = {}
        with contextlib.suppress(FileNotFoundError):  # venv writes its activate scripts last
            out["venv"] = (venv / "bin" / "activate").stat().st_mtime - self.booted_at
        records = [p.stat().st_mtime for p in venv.glob("lib/python*/site-packages/*/RECORD")]
        if records:
            out["installed"] = max(records) - self.booted_at
        for port, when in self.listening_at.items():
            out[f"listening:{port}"] = when - self.booted_at
        return out


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    argv: tuple[str, ...]


def _base_python() -> str:
    """This interpreter outside its virtualenv (the instances' python3: the workers must run
    the driver's minor version)."""
    v = sys.version_info
    candidates = [Path(sys.base_prefix) / "bin" / f"python{v.major}.{v.minor}",
                  Path(getattr(sys, "_base_executable", "") or sys.executable)]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate.resolve())
    raise RuntimeError(f"cannot find the base interpreter of {sys.executable}")


_SHUTDOWN = """#!/bin/sh
# the world's shutdown: records the request; the hypervisor powers the instance off
printf '%s\\n' "$*" >> {requests}
"""


class Ec2World:
    """The running world (see the module's diagram). Made by ``running_world``."""

    def __init__(self, workdir: Path, *, minute_seconds: float = 1.0) -> None:
        self.workdir = workdir
        self.prefix = f"bxw{uuid.uuid4().hex[:6]}"
        self.hub = self.prefix
        self.minute_seconds = minute_seconds
        self.instances: dict[str, Instance] = {}
        #: Instances the world refused to boot, and why (e.g. outside the subnet).
        self.refused: dict[str, str] = {}
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._count = 0
        self._drivers: list[subprocess.Popen[Any]] = []
        self._server: Any = None
        self._server_thread: threading.Thread | None = None
        self._hypervisor: threading.Thread | None = None
        self.python = _base_python()
        for private in PRIVATE_DIRS:
            if self.python.startswith(private + "/") or str(workdir).startswith(private + "/"):
                raise RuntimeError(f"{self.python} or {workdir} lies under {private}, which "
                                   f"each instance has of its own")
        self.port = 0
        self.cloud: MotoEc2
        self.subnet_id = ""
        #: An AMI of moto's, also published as the default Ubuntu AMI's SSM parameter.
        self.ami = ""

    # --- the hub and moto -----------------------------------------------------------------

    def _start(self) -> None:
        _ip("netns", "add", self.hub)
        _ip("-n", self.hub, "link", "set", "lo", "up")
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.hub, "addr", "add", f"{BRIDGE_IP}/{PREFIX_LEN}", "dev", "br0")
        _ip("-n", self.hub, "link", "set", "br0", "up")
        throttle = throttled_app()
        self._server = in_namespace(self.hub, bind_server, throttle)
        self.port = self._server.server_port
        self._server_thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
            name="moto-in-hub", daemon=True)
        self._server_thread.start()
        url = f"http://127.0.0.1:{self.port}"
        vpc, subnet = self.in_hub(lambda: create_network(self.client()))
        self.cloud = MotoEc2(endpoint_url=url, subnet_id=subnet, vpc_id=vpc, throttle=throttle)
        self.subnet_id = subnet
        from bigexec.systems.ec2.options import AMI_PARAMETERS

        self.ami = self.in_hub(lambda: self.client().describe_images(
            Owners=["amazon"])["Images"][0]["ImageId"])
        for parameter in sorted(set(AMI_PARAMETERS.values())):  # the stock images EC2 has
            self.cloud.publish_ubuntu_ami(parameter, self.ami)
        self._hypervisor = threading.Thread(target=self._watch, name="hypervisor",
                                            daemon=True)
        self._hypervisor.start()

    @property
    def endpoint_url(self) -> str:
        """moto's URL, valid inside the hub only."""
        return f"http://127.0.0.1:{self.port}"

    def client(self, service: str = "ec2") -> Any:
        """A boto3 client for moto; call it through ``in_hub`` (its connections are made by
        the calling thread, and moto listens in the hub only)."""
        return boto3.session.Session(region_name=REGION, **CREDENTIALS).client(
            service, endpoint_url=self.endpoint_url)

    def in_hub(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` from a thread in the hub (as a driver would run)."""
        return in_namespace(self.hub, fn, *args, **kwargs)

    def driver_env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("AWS_", "BIGEXEC_EC2_")) and k.lower() not in (
                   "http_proxy", "https_proxy", "all_proxy", "no_proxy")}
        env.update({key.upper(): value for key, value in CREDENTIALS.items()})
        env.update({
            "AWS_DEFAULT_REGION": REGION,
            "AWS_CONFIG_FILE": "/nonexistent/bigexec-test-aws-config",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/bigexec-test-aws-creds",
            "AWS_EC2_METADATA_DISABLED": "true",
            "BIGEXEC_EC2_ENDPOINT_URL": self.endpoint_url,
            "BIGEXEC_EC2_SUBNET": self.subnet_id,
            "BIGEXEC_EC2_REGION": REGION,
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH")) if p),
        })
        env.update(extra or {})
        return env

    def run_driver(self, argv: Sequence[str], env: Mapping[str, str] | None = None,
                   **popen: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in the hub with the driver's environment (dummy AWS credentials,
        BIGEXEC_EC2_* naming moto and the subnet, plus ``env``); killed when the world ends."""
        popen.setdefault("start_new_session", True)
        proc = subprocess.Popen(["ip", "netns", "exec", self.hub, *argv],
                                env=self.driver_env(env), **popen)
        with self._lock:
            self._drivers.append(proc)
        return proc

    # --- the hypervisor -------------------------------------------------------------------

    def _backend(self) -> Any:
        from moto.ec2.models import ec2_backends

        return ec2_backends[ACCOUNT][REGION]

    def _watch(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self._tick()
            except Exception as exc:  # keep the world up; tests see it in errors
                said = f"hypervisor: {type(exc).__name__}: {exc}"
                with self._lock:
                    if said not in self.errors:  # once, not once a tick
                        self.errors.append(said)

    def _tick(self) -> None:
        try:
            vms = list(self._backend().all_instances())
        except RuntimeError:  # moto's server threads changed a dict under us: next tick
            return
        for vm in vms:
            with self._lock:
                known = vm.id in self.instances or vm.id in self.refused
                booted = self.instances.get(vm.id)
            if not known and vm.state in ("pending", "running"):
                self._boot_safely(vm)
            elif booted is not None and booted.ended is None and vm.state not in (
                    "pending", "running"):  # terminated or stopped through the API
                self._end(booted, vm.state, vm.state_reason.code or None)
        with self._lock:
            running = [i for i in self.instances.values() if i.ended is None]
        for instance in running:
            self._check_shutdown(instance)
            if instance.boot is not None:
                instance.boot.poll()  # reap the runcmd script

    def _boot_safely(self, vm: Any) -> None:
        if vm.subnet_id != self.subnet_id or not vm.private_ip_address:
            with self._changed:
                self.refused[vm.id] = (f"outside the world's subnet ({vm.subnet_id}, "
                                       f"{vm.private_ip_address}): never given an address")
                self._changed.notify_all()
            return
        try:
            self._boot(vm)
        except Exception as exc:
            with self._changed:
                self.refused[vm.id] = f"boot failed: {type(exc).__name__}: {exc}"
                self.errors.append(f"{vm.id}: {self.refused[vm.id]}")
                self._changed.notify_all()

    def _boot(self, vm: Any) -> None:
        self._count += 1
        n = self._count
        namespace = f"{self.prefix}-i{n}"
        home = self.workdir / vm.id
        for sub in ("run", "opt", "var-log", "bin"):
            (home / sub).mkdir(parents=True)
        (home / "bin" / "python3").symlink_to(self.python)
        shutdown = home / "bin" / "shutdown"
        shutdown.write_text(_SHUTDOWN.format(
            requests=shlex.quote(str(home / "shutdown-requests"))))
        shutdown.chmod(0o755)
        _ip("netns", "add", namespace)
        try:
            self._wire(namespace, f"v{n}", vm.private_ip_address)
            imds = in_namespace(namespace, FakeImds, InstanceMetadata(
                instance_id=vm.id, private_ip=vm.private_ip_address,
                instance_type=vm.instance_type, image_id=vm.image_id, region=REGION,
                availability_zone=vm.availability_zone or "", account_id=ACCOUNT),
                METADATA_IP, 80).start()
        except BaseException:
            _delete_namespace(namespace)
            raise
        instance = Instance(id=vm.id, ip=vm.private_ip_address, namespace=namespace,
                            dir=home, imds=imds, booted_at=time.time())
        try:
            self._run_user_data(instance, self._user_data(vm))
        except Exception as exc:  # the instance is up, as EC2 leaves one whose boot failed
            (home / "cloud-init-output.log").write_text(f"world: user-data not run: {exc}\n")
            raise
        finally:  # booted once its files are written and its runcmd runs
            with self._changed:
                self.instances[vm.id] = instance
                self._changed.notify_all()

    def _wire(self, namespace: str, veth: str, ip: str) -> None:
        _ip("-n", namespace, "link", "set", "lo", "up")
        _ip("-n", namespace, "addr", "add", f"{METADATA_IP}/32", "dev", "lo")
        _ip("-n", self.hub, "link", "add", veth, "type", "veth", "peer", "name", "eth0",
            "netns", namespace)
        _ip("-n", self.hub, "link", "set", veth, "master", "br0")
        _ip("-n", self.hub, "link", "set", veth, "up")
        _ip("-n", namespace, "addr", "add", f"{ip}/{PREFIX_LEN}", "dev", "eth0")
        _ip("-n", namespace, "link", "set", "eth0", "up")
        _ip("-n", namespace, "route", "add", "default", "via", BRIDGE_IP)

    @staticmethod
    def _user_data(vm: Any) -> bytes:
        data = vm.user_data
        if data is None:
            return b""
        if isinstance(data, list):  # older moto kept a list of base64 strings
            data = data[0]
        encoded = data.as_bytes() if hasattr(data, "as_bytes") else str(data).encode()
        return base64.b64decode(encoded)

    def _run_user_data(self, instance: Instance, raw: bytes) -> None:
        if not raw:
            return  # a plain instance: up, with nothing to run
        config = parse_user_data(raw)
        for f in config.write_files:
            target = instance.host_path(f.path)  # only the instance's own directories
            target.parent.mkdir(parents=True, exist_ok=True)
            flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if f.append else os.O_TRUNC)
            fd = os.open(target, flags, f.permissions)
            with os.fdopen(fd, "wb") as out:
                out.write(f.content)
            os.chmod(target, f.permissions)
            user, _, group = f.owner.partition(":")
            os.chown(target, pwd.getpwnam(user).pw_uid, grp.getgrnam(group or user).gr_gid)
        mounts = " && ".join(
            f"mount --bind {shlex.quote(str(instance.host_path(p)))} {p}" for p in PRIVATE_DIRS)
        script = instance.dir / "runcmd.sh"
        script.write_text("\n".join(config.runcmd) + "\n")
        env = {"PATH": f"{instance.dir / 'bin'}:/usr/local/sbin:/usr/local/bin:/usr/sbin:"
                       "/usr/bin:/sbin:/bin",
               "HOME": "/root", "LANG": "C.UTF-8"}
        console = open(instance.dir / "cloud-init-output.log", "ab")
        with console:
            instance.boot = subprocess.Popen(
                ["ip", "netns", "exec", instance.namespace, "unshare", "--mount",
                 "--propagation", "private", "sh", "-c",
                 f"{mounts} && exec sh {shlex.quote(str(script))}"],
                stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT, env=env,
                start_new_session=True, cwd="/")

    def _check_shutdown(self, instance: Instance) -> None:
        try:  # complete lines only: the fake shutdown may be writing one
            requests = (instance.dir / "shutdown-requests").read_text().split("\n")[:-1]
        except FileNotFoundError:
            return
        for line in requests[instance._shutdown_seen:]:
            args = line.split()
            if "-c" in args:
                instance._poweroff_at = None
                continue
            delay = next((int(a[1:]) for a in args if re.fullmatch(r"\+\d+", a)), 0)
            when = time.monotonic() + delay * self.minute_seconds
            if instance._poweroff_at is None or when < instance._poweroff_at:
                instance._poweroff_at = when
        instance._shutdown_seen = len(requests)
        if instance._poweroff_at is not None and time.monotonic() >= instance._poweroff_at:
            self._power_off(instance)

    def _power_off(self, instance: Instance) -> None:
        """As EC2 does when the OS powers off: by the shutdown behaviour, terminated or
        stopped, reason Client.InstanceInitiatedShutdown."""
        vm = self._backend().get_instance(instance.id)
        state = ("terminated" if vm.instance_initiated_shutdown_behavior == "terminate"
                 else "stopped")
        reason = "Client.InstanceInitiatedShutdown"

        def mark() -> None:
            from moto.ec2.models.instances import StateReason

            if state == "terminated":
                vm.terminate()
            else:
                vm.stop()
            vm.state_reason = StateReason(f"{reason}: Instance initiated shutdown", reason)

        self._end(instance, state, reason, mark)

    def _end(self, instance: Instance, state: str, reason: str | None,
             mark: Callable[[], None] | None = None) -> None:
        """Kill the instance's processes, then ``mark`` it in moto (so that a driver that
        sees it ended finds it gone), then delete its namespace. Once per instance: the
        hypervisor and a test may race to end it."""
        with self._lock:
            if instance._ending:
                return
            instance._ending = True
        _kill_namespace_processes(instance.namespace)
        if instance.boot is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                instance.boot.wait(5)
        if mark is not None:
            mark()
        instance.imds.close()
        _delete_namespace(instance.namespace)
        with self._changed:
            instance.ended, instance.reason = state, reason
            instance.gone.set()
            self._changed.notify_all()

    # --- what tests use -------------------------------------------------------------------

    def wait_booted(self, count: int, timeout: float = 30.0) -> list[Instance]:
        """The first ``count`` instances the world booted, once it has."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self.instances) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(self.instances)} of {count} instances booted "
                                       f"in {timeout}s; refused {self.refused}, errors "
                                       f"{self.errors}")
                self._changed.wait(left)
            return list(self.instances.values())[:count]

    def wait_listening(self, instance_id: str, port: int, timeout: float = 60.0) -> float:
        """Wait until something listens on ``port`` in the instance (read from its
        namespace's TCP table: no packet sent); seconds since its runcmd started."""
        instance = self.instances[instance_id]
        deadline = time.monotonic() + timeout
        while not in_namespace(instance.namespace, _listening, port):
            if instance.ended or time.monotonic() > deadline:
                raise TimeoutError(
                    f"{instance_id}: nothing listened on :{port} after {timeout}s (ended: "
                    f"{instance.ended}); boot log:\n{instance.boot_log[-3000:]}\nconsole:\n"
                    f"{instance.console[-2000:]}")
            time.sleep(0.05)
        instance.listening_at.setdefault(port, time.time())
        return instance.listening_at[port] - instance.booted_at

    def wait_gone(self, instance_id: str, timeout: float = 60.0) -> Instance:
        instance = self.instances[instance_id]
        if not instance.gone.wait(timeout):
            raise TimeoutError(f"{instance_id} still runs after {timeout}s; shutdown "
                               f"requests {instance.shutdown_requests}; boot log:\n"
                               f"{instance.boot_log[-3000:]}")
        return instance

    def interrupt(self, instance_id: str) -> dict[str, str]:
        """Post a spot interruption notice on the instance's metadata service."""
        return self.instances[instance_id].imds.interrupt()

    def kill_instance(self, instance_id: str,
                      reason: str = "Server.SpotInstanceTermination") -> None:
        """End the instance as EC2 itself would: its processes gone, terminated in moto with
        ``reason``, its namespace deleted."""
        self._end(self.instances[instance_id], "terminated", reason,
                  lambda: self.cloud.kill(instance_id, reason))

    def processes(self, instance_id: str) -> list[ProcessInfo]:
        """What runs on the instance (empty once it is gone)."""
        instance = self.instances[instance_id]
        if instance.gone.is_set():
            return []
        found = []
        for pid in namespace_pids(instance.namespace):
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                found.append(ProcessInfo(pid, tuple(a.decode(errors="replace")
                                                    for a in argv if a)))
        return found

    def namespaces(self) -> list[str]:
        """The world's namespaces that exist now, sorted (the hub first)."""
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        return sorted(line.split()[0] for line in listed.splitlines()
                      if line.split() and line.split()[0].startswith(self.prefix))

    # --- teardown -------------------------------------------------------------------------

    def _close(self) -> None:
        self._stop.set()
        if self._hypervisor is not None:
            self._hypervisor.join(30)
        with self._lock:
            drivers = list(self._drivers)
        for proc in drivers:
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        for instance in list(self.instances.values()):
            if instance.ended is None:
                with contextlib.suppress(Exception):
                    self._end(instance, "terminated", "world ended")
            instance.imds.close()
        if self._server is not None:
            if self._server_thread is not None:
                self._server.shutdown()
                self._server_thread.join(10)
            self._server.server_close()
        for namespace in self.namespaces():  # the hub, and anything a failure left
            _delete_namespace(namespace)
        reset_backends()


@contextlib.contextmanager
def running_world(workdir: Path | None = None, **options: Any) -> Iterator[Ec2World]:
    """The world, torn down on the way out however the test ends: processes, namespaces,
    moto's server and backends, and ``workdir`` (a new temp dir when None)."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    made = workdir is None
    root = Path(tempfile.mkdtemp(prefix="bigexec-world-")) if made else Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    world = Ec2World(root, **options)
    try:
        world._start()
        yield world
    finally:
        world._close()
        if made:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(name="ec2_world")
def ec2_world_fixture(tmp_path: Path) -> Iterator[Ec2World]:
    """A fresh world per test (its instance dirs under the test's tmp_path)."""
    with running_world(tmp_path / "world") as world:
        yield world
