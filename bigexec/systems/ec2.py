"""The AWS side of the ``ec2`` system: options, launching, tags, leases, user-data, sweeping
and noticing dead instances, all through boto3 (imported only when an API is first used, so
``import bigexec`` never needs it; install it with ``pip install bigexec[ec2]``).

What runs where::

    driver                                           EC2
    ──────                                           ───
    Ec2Options (keywords over BIGEXEC_EC2_*)
    Ec2Instances.launch(session, machines,
      user_data, lease_until)  ── RunInstances ──>   ceil(machines / procs_per_instance)
        spot first; capacity errors: the next          instances, tagged at launch, IMDSv2
        alternative; then on-demand unless             required, shutdown = terminate
        spot_only; throttling: jittered backoff
        under one deadline
    renew_lease(ids, until)   ── CreateTags ────>    bigexec-lease-until = epoch seconds
    DeadInstanceMonitor.suspect(id): batched, at most one DescribeInstances per interval
    terminate(ids) at shutdown; sweep() from anywhere: every instance of a session whose
    newest lease tag lies in the past is terminated

The lease tag: ``bigexec-lease-until`` holds the end of the driver's lease as whole epoch
seconds (UTC). The driver sets it at launch and renews it on all its instances while it lives
(one CreateTags call for up to 1,000 instances); the agent on each instance enforces the same
lease by powering off. ``sweep`` is for what both missed (a driver killed before its agents
came up, an agent that never started): it treats a session as lapsed when the newest
``bigexec-lease-until`` among its live instances is older than ``now - grace``; an instance of
bigexec's with no readable lease tag counts as lapsed once it is an hour old.

User-data: ``render_user_data`` writes a ``#cloud-config`` document that puts the agent's
bootstrap document at ``/run/bigexec/agent.json`` (mode 0600) and runs the install, then
``python3 -m bigexec.agent --bootstrap /run/bigexec/agent.json`` from the new environment.
EC2 limits user-data to 16 KB (16,384 bytes) in raw form, before base64 (Amazon EC2 User
Guide, "Work with instance user data"); boto3 base64-encodes it itself, so the raw bytes are
what is checked: gzip (which cloud-init reads) is used only when the plain text does not fit.
"""

from __future__ import annotations

import base64
import getpass
import gzip
import json
import logging
import math
import os
import random
import shlex
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from .. import __version__

__all__ = ["AGENT_DOCUMENT_PATH", "CAPACITY_ERRORS", "DEAD_STATES", "DEFAULT_AMI_PARAMETER",
           "ENV_PREFIX", "LEASE_TAG", "USER_DATA_LIMIT", "DeadInstanceMonitor",
           "Ec2CapacityError", "Ec2Instances", "Ec2Options", "Ec2Throttled", "InstallPlan",
           "InstanceRecord", "PinnedRequirements", "Wheelhouse", "render_user_data"]

log = logging.getLogger(__name__)

ENV_PREFIX = "BIGEXEC_EC2_"
#: A stock Ubuntu LTS (python3 and cloud-init included), published by Canonical through SSM.
DEFAULT_AMI_PARAMETER = (
    "/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id")
SESSION_TAG = "bigexec-session"
OWNER_TAG = "bigexec-owner"
VERSION_TAG = "bigexec-version"
PROGRAM_TAG = "bigexec-program"
LEASE_TAG = "bigexec-lease-until"
AGENT_DOCUMENT_PATH = "/run/bigexec/agent.json"
#: EC2's limit on user-data, in raw bytes before base64.
USER_DATA_LIMIT = 16384
#: States in which an instance will never serve again (or not without someone starting it).
DEAD_STATES = frozenset({"shutting-down", "terminated", "stopping", "stopped"})
LIVE_STATES = ("pending", "running", "stopping", "stopped", "shutting-down")
#: Errors that mean "no room for this type, zone or market now": the next alternative is tried.
CAPACITY_ERRORS = frozenset({
    "InsufficientInstanceCapacity", "InsufficientCapacity", "InsufficientHostCapacity",
    "InsufficientReservedInstanceCapacity", "InsufficientFreeAddressesInSubnet",
    "SpotMaxPriceTooLow", "MaxSpotInstanceCountExceeded", "InstanceLimitExceeded",
    "VcpuLimitExceeded", "Unsupported",
})
#: Errors that mean "ask again later": retried with backoff under the call's deadline.
THROTTLE_ERRORS = frozenset({
    "RequestLimitExceeded", "Throttling", "ThrottlingException", "RequestThrottled",
    "ServiceUnavailable", "Unavailable", "InternalError",
})
#: AWS accepts up to 1,000 ids in one call; filters take up to 200 values.
BATCH = 200
UNTAGGED_LAPSE = 3600.0


# ── options ───────────────────────────────────────────────────────────────────────────────

def _text(value: str) -> str:
    return value.strip()


def _words(value: str) -> tuple[str, ...]:
    return tuple(w.strip() for w in value.split(",") if w.strip())


def _flag(value: str) -> bool:
    word = value.strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {value!r} (use 1/0, true/false, yes/no, on/off)")


def _positive(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError(f"not a positive integer: {value!r}")
    return number


def _tag_pairs(value: str) -> dict[str, str]:
    tags = {}
    for pair in _words(value):
        key, sep, val = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"not KEY=VALUE: {pair!r}")
        tags[key.strip()] = val.strip()
    return tags


#: How each BIGEXEC_EC2_<NAME> variable's text becomes the option's value.
_CONVERSIONS: dict[str, Callable[[str], Any]] = {
    "instance_type": _text, "region": _text, "market": _text, "spot_only": _flag,
    "alternatives": _words, "subnet": _text, "security_groups": _words,
    "instance_profile": _text, "key_name": _text, "root_volume_gib": _positive, "ami": _text,
    "procs_per_instance": _positive, "tags": _tag_pairs, "endpoint_url": _text,
}


@dataclass(frozen=True)
class Ec2Options:
    """Every option of the ``ec2`` system. ``None`` means "not set": boto3's own configuration
    (profile, ``AWS_*`` variables, the profile's region) or the documented default applies.

    ``alternatives`` lists other instance types and/or subnets (``subnet-...``) to try, in
    order, when the first choice has no capacity. ``from_env`` reads ``BIGEXEC_EC2_<NAME>``
    (upper case), keywords overriding (a keyword or variable that is None or empty counts as
    not set): lists are comma-separated, ``tags`` is ``k=v,k2=v2``, ``spot_only`` is 1/0,
    true/false, yes/no or on/off, ``root_volume_gib`` and ``procs_per_instance`` are positive
    integers, the rest is text as given.
    """

    instance_type: str = "c6i.xlarge"
    region: str | None = None
    market: str = "spot"
    spot_only: bool = False
    alternatives: tuple[str, ...] = ()
    subnet: str | None = None
    security_groups: tuple[str, ...] = ()
    instance_profile: str | None = None
    key_name: str | None = None
    root_volume_gib: int = 30
    ami: str | None = None
    procs_per_instance: int | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    endpoint_url: str | None = None

    def __post_init__(self) -> None:
        if self.market not in ("spot", "on-demand"):
            raise ValueError(f"market must be 'spot' or 'on-demand', not {self.market!r}")
        if not self.instance_type:
            raise ValueError("instance_type must not be empty")
        for name in ("root_volume_gib", "procs_per_instance"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        for name in ("alternatives", "security_groups"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise ValueError(f"{name} must be a sequence of strings, not one string")
            object.__setattr__(self, name, tuple(value))
        object.__setattr__(self, "tags", dict(self.tags))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **options: Any) -> Ec2Options:
        """The options from keyword arguments over ``BIGEXEC_EC2_<NAME>`` variables; a bad
        variable raises ValueError naming it."""
        environ = os.environ if environ is None else environ
        known = {f.name for f in fields(cls)}
        unknown = set(options) - known
        if unknown:
            raise TypeError(f"unknown ec2 option(s): {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {}
        for name in sorted(known):
            variable = ENV_PREFIX + name.upper()
            if options.get(name) is not None:  # None: not set by the caller
                values[name] = options[name]
            elif environ.get(variable, "").strip():  # an empty variable is not set either
                try:
                    values[name] = _CONVERSIONS[name](environ[variable])
                    cls(**{name: values[name]})  # what the dataclass refuses names it too
                except ValueError as exc:
                    raise ValueError(f"{variable}={environ[variable]!r}: {exc}") from None
        return cls(**values)

    def candidates(self) -> list[tuple[str, str | None]]:
        """(instance type, subnet) pairs in the order they are tried."""
        types = [self.instance_type] + [a for a in self.alternatives
                                        if not a.startswith("subnet-")]
        subnets = [self.subnet] + [a for a in self.alternatives if a.startswith("subnet-")]
        return [(t, s) for t in types for s in subnets]


# ── launching, describing, terminating ───────────────────────────────────────────────────

class InstanceRecord(NamedTuple):
    """One instance as the EC2 API describes it."""

    instance_id: str
    private_ip: str | None
    instance_type: str
    market: str            # "spot" or "on-demand"
    vcpus: int | None
    state: str
    state_reason: str      # StateReason.Code (empty when none)
    session: str | None
    lease_until: float | None
    launch_time: float | None


class Ec2CapacityError(RuntimeError):
    """No instance could be launched on any market, type or subnet the options allow."""


class Ec2Throttled(RuntimeError):
    """EC2 kept throttling (or kept failing transiently) until the operation's deadline."""


#: botocore's exceptions for a request that never got an answer: retried like throttling.
_TRANSIENT_EXCEPTIONS = frozenset({
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
    "ConnectionClosedError"})


def _transient(exc: BaseException) -> str | None:
    """Why ``exc`` is worth retrying (its error code or class name), or None."""
    code = _error_code(exc)
    if code in THROTTLE_ERRORS:
        return code
    if type(exc).__name__ in _TRANSIENT_EXCEPTIONS:
        return type(exc).__name__
    return None


def _error_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return response.get("Error", {}).get("Code")
    return None


def _vcpus_of(item: Mapping[str, Any]) -> int | None:
    cpu = item.get("CpuOptions") or {}
    if "CoreCount" in cpu:
        return int(cpu["CoreCount"]) * int(cpu.get("ThreadsPerCore", 1))
    return None


def _record(item: Mapping[str, Any], vcpus: int | None = None) -> InstanceRecord:
    tags = {t["Key"]: t["Value"] for t in item.get("Tags", ())}
    lease: float | None
    try:
        lease = float(tags[LEASE_TAG])
    except (KeyError, ValueError):
        lease = None
    launched = item.get("LaunchTime")
    return InstanceRecord(
        instance_id=item["InstanceId"], private_ip=item.get("PrivateIpAddress"),
        instance_type=item.get("InstanceType", ""),
        market="spot" if item.get("InstanceLifecycle") == "spot" else "on-demand",
        vcpus=vcpus if vcpus is not None else _vcpus_of(item),
        state=item.get("State", {}).get("Name", ""),
        state_reason=item.get("StateReason", {}).get("Code", ""),
        session=tags.get(SESSION_TAG), lease_until=lease,
        launch_time=launched.timestamp() if launched is not None else None)


def _chunks(items: Sequence[str], size: int = BATCH) -> Iterable[list[str]]:
    for start in range(0, len(items), size):
        yield list(items[start:start + size])


class Ec2Instances:
    """bigexec's instances in one account and region: launch, renew leases, describe,
    terminate, list and sweep. Every call retries throttling with jittered exponential
    backoff (``backoff`` seconds doubling up to ``max_backoff``; also a request that got no
    answer) until ``deadline`` seconds have passed since the operation began, then raises
    Ec2Throttled. boto3's own retries are turned off for this client (whatever
    ``AWS_MAX_ATTEMPTS`` says) so that one deadline bounds everything; the rest of boto3's
    configuration (profile, credentials, region) is its own.

    ``client``/``ssm_client`` stand in for the boto3 clients (tests); ``sleep`` and ``clock``
    for time.
    """

    def __init__(self, options: Ec2Options, *, client: Any = None, ssm_client: Any = None,
                 deadline: float = 120.0, backoff: float = 0.5, max_backoff: float = 10.0,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.options = options
        self._client = client
        self._ssm = ssm_client
        self._deadline = deadline
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._sleep = sleep
        self._clock = clock
        self._wall = wall_clock
        self._lock = threading.Lock()
        self._vcpus: dict[str, int] = {}
        self._root_devices: dict[str, str] = {}
        self._ami: str | None = options.ami

    # boto3, lazily, with only what the user set
    def _make_client(self, service: str) -> Any:
        # (no type information ships with them)
        import boto3  # type: ignore[import-untyped, unused-ignore]
        from botocore.config import Config  # type: ignore[import-untyped, unused-ignore]

        session = boto3.session.Session(region_name=self.options.region)
        kwargs: dict[str, Any] = {"config": Config(retries={"total_max_attempts": 1})}
        if self.options.endpoint_url:
            kwargs["endpoint_url"] = self.options.endpoint_url
        return session.client(service, **kwargs)

    @property
    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = self._make_client("ec2")
            return self._client

    def _ssm_client(self) -> Any:
        with self._lock:
            if self._ssm is None:
                self._ssm = self._make_client("ssm")
            return self._ssm

    def call(self, operation: str, *, until: float | None = None, client: Any = None,
             **params: Any) -> Any:
        """``client.<operation>(**params)``, retrying throttling until ``until`` (a ``clock``
        time; default: ``deadline`` from now)."""
        until = self._clock() + self._deadline if until is None else until
        method = getattr(client if client is not None else self.client, operation)
        delay = self._backoff
        while True:
            try:
                return method(**params)
            except Exception as exc:
                why = _transient(exc)
                if why is None:
                    raise
                # jitter: many drivers throttled together spread out
                wait = random.uniform(delay / 2, delay)
                if self._clock() + wait > until:
                    raise Ec2Throttled(
                        f"EC2 {operation} still throttled ({why}) when the "
                        f"{self._deadline:.0f} s deadline ran out") from exc
                log.info("EC2 %s throttled (%s); retrying in %.2f s", operation, why, wait)
                self._sleep(wait)
                delay = min(delay * 2, self._max_backoff)

    def ami(self) -> str:
        """The AMI: the option, else the stock Ubuntu LTS from its public SSM parameter."""
        if self._ami is None:
            answer = self.call("get_parameter", client=self._ssm_client(),
                               Name=DEFAULT_AMI_PARAMETER)
            self._ami = answer["Parameter"]["Value"]
        return self._ami

    def vcpus(self, instance_type: str) -> int:
        if instance_type not in self._vcpus:
            answer = self.call("describe_instance_types", InstanceTypes=[instance_type])
            self._vcpus[instance_type] = int(
                answer["InstanceTypes"][0]["VCpuInfo"]["DefaultVCpus"])
        return self._vcpus[instance_type]

    def procs_per_instance(self, instance_type: str | None = None) -> int:
        """Machines (worker processes) per instance: the option, else the type's vCPUs."""
        if self.options.procs_per_instance is not None:
            return self.options.procs_per_instance
        return self.vcpus(instance_type or self.options.instance_type)

    def instances_for(self, machines: int, instance_type: str | None = None) -> int:
        return math.ceil(machines / self.procs_per_instance(instance_type))

    def _root_device(self, ami: str) -> str:
        if ami not in self._root_devices:
            images = self.call("describe_images", ImageIds=[ami])["Images"]
            self._root_devices[ami] = (images[0].get("RootDeviceName") if images else None
                                       ) or "/dev/xvda"
        return self._root_devices[ami]

    def _tags(self, session: str, lease_until: float) -> list[dict[str, str]]:
        program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
        try:
            owner = getpass.getuser()
        except Exception:  # no user name in this environment (e.g. a container's uid)
            owner = str(os.getuid()) if hasattr(os, "getuid") else "unknown"
        tags = {"Name": f"bigexec {program} {session[:12]} ({owner})"[:255],
                SESSION_TAG: session, OWNER_TAG: owner, VERSION_TAG: __version__,
                PROGRAM_TAG: program[:255], LEASE_TAG: str(math.ceil(lease_until))}
        tags.update(self.options.tags)
        return [{"Key": k, "Value": v} for k, v in tags.items()]

    def run_params(self, session: str, count: int, user_data: bytes, lease_until: float,
                   instance_type: str, subnet: str | None, market: str, *,
                   at_least: int | None = None) -> dict[str, Any]:
        """The RunInstances request for ``count`` instances: all or none of them, or as many
        as EC2 has room for, from ``at_least`` up."""
        opts = self.options
        ami = self.ami()
        tags = self._tags(session, lease_until)
        params: dict[str, Any] = {
            "ImageId": ami, "InstanceType": instance_type,
            "MinCount": count if at_least is None else at_least, "MaxCount": count,
            "UserData": user_data,  # boto3 base64-encodes it
            "InstanceInitiatedShutdownBehavior": "terminate",
            "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled",
                                # 2 hops: a worker in a container can still reach IMDS
                                "HttpPutResponseHopLimit": 2},
            "BlockDeviceMappings": [{"DeviceName": self._root_device(ami), "Ebs": {
                "VolumeSize": opts.root_volume_gib, "VolumeType": "gp3",
                "DeleteOnTermination": True}}],
            "TagSpecifications": [{"ResourceType": "instance", "Tags": tags},
                                  {"ResourceType": "volume", "Tags": tags}],
        }
        if subnet:
            params["SubnetId"] = subnet
        if opts.security_groups:
            params["SecurityGroupIds"] = list(opts.security_groups)
        if opts.instance_profile:
            key = "Arn" if opts.instance_profile.startswith("arn:") else "Name"
            params["IamInstanceProfile"] = {key: opts.instance_profile}
        if opts.key_name:
            params["KeyName"] = opts.key_name
        if market == "spot":
            params["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": {
                # one-time, terminated on interruption: the scheduler reruns its tasks
                "SpotInstanceType": "one-time",
                "InstanceInterruptionBehavior": "terminate"}}
        return params

    def markets(self) -> list[str]:
        if self.options.market == "on-demand":
            return ["on-demand"]
        return ["spot"] if self.options.spot_only else ["spot", "on-demand"]

    def launch(self, session: str, machines: int, user_data: bytes,
               lease_until: float) -> list[InstanceRecord]:
        """Instances for ``machines`` worker processes, one RunInstances request per batch:
        spot first (unless the market is on-demand), each (type, subnet) candidate in turn on
        capacity errors, then on-demand for what spot could not fill unless ``spot_only``.
        Each candidate is asked for all its instances at once (MinCount = MaxCount); refused
        for capacity, it is asked once more for as many as it has room for (MinCount 1: real
        EC2 then fills part), and the rest goes on to the next choice. Returns what was
        launched (fewer than needed is logged); none at all raises Ec2CapacityError with
        every refusal."""
        if machines <= 0:
            return []
        until = self._clock() + self._deadline
        remaining = machines
        launched: list[InstanceRecord] = []
        refusals: list[str] = []
        for market in self.markets():
            for instance_type, subnet in self.options.candidates():
                if remaining <= 0:
                    break
                procs = self.procs_per_instance(instance_type)
                count = math.ceil(remaining / procs)
                for at_least in ([None, 1] if count > 1 else [None]):
                    params = self.run_params(session, count, user_data, lease_until,
                                             instance_type, subnet, market, at_least=at_least)
                    try:
                        answer = self.call("run_instances", until=until, **params)
                    except Exception as exc:
                        code = _error_code(exc)
                        if code not in CAPACITY_ERRORS:
                            raise
                        refusals.append(f"{market} {instance_type} x{params['MinCount']} in "
                                        f"{subnet or 'any subnet'}: {code}")
                        log.info("EC2 refused %d %s %s instance(s) (%s)", params["MinCount"],
                                 market, instance_type, code)
                        continue
                    vcpus = self.vcpus(instance_type)  # (cached: one call per type)
                    got = [_record(item, vcpus) for item in answer["Instances"]]
                    launched.extend(got)
                    remaining -= len(got) * procs
                    break
        if not launched:
            raise Ec2CapacityError("no EC2 instance could be launched: " + "; ".join(refusals))
        if remaining > 0:
            log.warning("EC2 launched instances for %d of %d machines: %s",
                        machines - remaining, machines, "; ".join(refusals))
        return launched

    def renew_lease(self, ids: Sequence[str], lease_until: float) -> None:
        """Move the lease tag of ``ids`` to ``lease_until`` (epoch seconds)."""
        for chunk in _chunks(ids, 1000):
            self.call("create_tags", Resources=chunk,
                      Tags=[{"Key": LEASE_TAG, "Value": str(math.ceil(lease_until))}])

    def describe(self, ids: Sequence[str]) -> list[InstanceRecord]:
        """The instances among ``ids`` that EC2 still knows (a filter, not InstanceIds, so
        that one long-gone id does not fail the whole batch)."""
        out = []
        for chunk in _chunks(ids):
            out.extend(self._describe([{"Name": "instance-id", "Values": chunk}]))
        return out

    def _describe(self, filters: list[dict[str, Any]]) -> list[InstanceRecord]:
        out: list[InstanceRecord] = []
        params: dict[str, Any] = {"Filters": filters}
        while True:
            page = self.call("describe_instances", **params)
            for reservation in page.get("Reservations", ()):
                out.extend(_record(item) for item in reservation.get("Instances", ()))
            params["NextToken"] = page.get("NextToken")
            if not params["NextToken"]:
                return out

    def terminate(self, ids: Sequence[str]) -> None:
        for chunk in _chunks(ids, 1000):
            self.call("terminate_instances", InstanceIds=chunk)

    def list_instances(self, session: str | None = None) -> list[InstanceRecord]:
        """bigexec's instances not yet terminated: all sessions', or one session's."""
        tag = ({"Name": f"tag:{SESSION_TAG}", "Values": [session]} if session is not None
               else {"Name": "tag-key", "Values": [SESSION_TAG]})
        return self._describe([tag, {"Name": "instance-state-name",
                                     "Values": list(LIVE_STATES)}])

    def lapsed(self, now: float | None = None, grace: float = 60.0) -> list[InstanceRecord]:
        """Instances of sessions whose newest lease ended more than ``grace`` s before now."""
        now = self._wall() if now is None else now
        sessions: dict[str, list[InstanceRecord]] = {}
        for record in self.list_instances():
            if record.state not in ("shutting-down", "terminated"):
                sessions.setdefault(record.session or "", []).append(record)
        out = []
        for records in sessions.values():
            leases = [r.lease_until for r in records if r.lease_until is not None]
            if leases:
                gone = max(leases) + grace < now
            else:
                gone = all(r.launch_time is not None and r.launch_time + UNTAGGED_LAPSE < now
                           for r in records)
            if gone:
                out.extend(records)
        return out

    def sweep(self, now: float | None = None, grace: float = 60.0) -> list[str]:
        """Terminate every instance of a session whose lease lapsed; returns their ids."""
        ids = [r.instance_id for r in self.lapsed(now, grace)]
        if ids:
            self.terminate(ids)
        return ids


# ── user-data ────────────────────────────────────────────────────────────────────────────

VENV = "/opt/bigexec/venv"
BOOT_LOG = "/var/log/bigexec-boot.log"


class InstallPlan(Protocol):
    """How an instance gets an environment with bigexec and the driver's distributions:
    ``shell(venv)`` is POSIX shell that leaves a virtualenv at ``venv``."""

    def shell(self, venv: str) -> str: ...


@dataclass(frozen=True)
class PinnedRequirements:
    """Install pinned requirements (``bigexec==X``, ``numpy==Y``, ...) from a package index:
    the real-EC2 path (the instance has the internet)."""

    requirements: tuple[str, ...]
    index_url: str | None = None

    def shell(self, venv: str) -> str:
        pip = [f"{venv}/bin/python", "-m", "pip", "install", "--isolated", "-q"]
        if self.index_url:
            pip += ["--index-url", self.index_url]
        # stock Ubuntu lacks ensurepip: install python3-venv when the plain venv fails
        return "\n".join([
            f"python3 -m venv {shlex.quote(venv)} || {{ apt-get update -q && "
            f"apt-get install -y -q python3-venv && python3 -m venv {shlex.quote(venv)}; }}",
            shlex.join(pip + list(self.requirements)),
        ])


@dataclass(frozen=True)
class Wheelhouse:
    """Install from a directory of wheels (``location``: a path on the instance, or an
    ``http(s)://`` URL of a tar archive of one) with no index: the offline path. The
    wheelhouse must hold a pip wheel, which runs pip without ensurepip."""

    location: str
    requirements: tuple[str, ...] = ("bigexec",)

    def shell(self, venv: str) -> str:
        lines = []
        where = self.location
        if where.startswith(("http://", "https://")):
            fetch = ("import sys, urllib.request as u; "
                     "sys.stdout.buffer.write(u.urlopen(sys.argv[1]).read())")
            lines.append(f"mkdir -p /opt/bigexec/wheels && python3 -c {shlex.quote(fetch)} "
                         f"{shlex.quote(where)} | tar -x -C /opt/bigexec/wheels")
            where = "/opt/bigexec/wheels"
        quoted = shlex.quote(where)
        lines += [
            f"python3 -m venv --without-pip {shlex.quote(venv)}",
            f"{shlex.quote(venv)}/bin/python \"$(ls {quoted}/pip-*.whl | head -n 1)\"/pip "
            f"install --isolated -q --no-index --find-links {quoted} "
            + shlex.join(self.requirements),
        ]
        return "\n".join(lines)


def _boot_script(install: InstallPlan, poweroff_on_failure: int) -> str:
    agent = [f"{VENV}/bin/python3", "-m", "bigexec.agent", "--bootstrap", AGENT_DOCUMENT_PATH]
    return "\n".join([
        "set -e",
        f"exec >>{BOOT_LOG} 2>&1",
        # a boot that fails leaves no orphan even when the driver is gone
        f"trap 'echo bigexec: bootstrap failed; shutdown -h +{poweroff_on_failure}' EXIT",
        install.shell(VENV),
        "trap - EXIT",
        # the agent runs on after cloud-init's final stage ends
        f"setsid nohup {shlex.join(agent)} >>{BOOT_LOG} 2>&1 </dev/null &",
    ])


def render_user_data(agent_document: bytes, install: InstallPlan, *,
                     poweroff_on_failure_minutes: int = 5) -> bytes:
    """The user-data for an instance: a ``#cloud-config`` that writes ``agent_document``
    (the agent's bootstrap JSON) to /run/bigexec/agent.json with mode 0600, installs with
    ``install`` and starts the agent. JSON is YAML, so the document is written as JSON.
    Gzipped when the plain text exceeds EC2's 16,384-byte limit; ValueError when even that
    does not fit."""
    config = {
        "write_files": [{"path": AGENT_DOCUMENT_PATH, "permissions": "0600",
                         "owner": "root:root", "encoding": "b64",
                         "content": base64.b64encode(agent_document).decode("ascii")}],
        "runcmd": [["sh", "-c", _boot_script(install, poweroff_on_failure_minutes)]],
    }
    plain = ("#cloud-config\n" + json.dumps(config, indent=1) + "\n").encode()
    if len(plain) <= USER_DATA_LIMIT:
        return plain
    packed = gzip.compress(plain, mtime=0)
    if len(packed) <= USER_DATA_LIMIT:
        return packed
    raise ValueError(
        f"EC2 user-data is limited to {USER_DATA_LIMIT} bytes before base64; this one is "
        f"{len(plain)} bytes ({len(packed)} gzipped): ship large files after boot instead")


# ── noticing dead instances ──────────────────────────────────────────────────────────────

class DeadInstanceMonitor:
    """Learns, from the EC2 API, which suspected instances are dead. ``suspect(id)`` (e.g. when
    a keepalive fails) returns at once; a thread of the monitor's own batches the suspects
    and calls ``describe`` (``Ec2Instances.describe``) at most once per ``interval`` seconds.
    An instance found in shutting-down, terminated, stopping or stopped, or unknown to EC2,
    is reported once through ``on_dead(instance_id, state, reason)``; others are dropped
    until suspected again."""

    def __init__(self, describe: Callable[[list[str]], list[InstanceRecord]],
                 on_dead: Callable[[str, str, str], None], *, interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._describe = describe
        self._on_dead = on_dead
        self._interval = interval
        self._clock = clock
        self._cond = threading.Condition()
        self._pending: dict[str, None] = {}
        self._reported: set[str] = set()
        self._closed = False
        self._last_call = -math.inf
        self.calls = 0
        self._thread = threading.Thread(target=self._run, name="bigexec-ec2-monitor",
                                        daemon=True)
        self._thread.start()

    def suspect(self, instance_id: str) -> None:
        with self._cond:
            if instance_id in self._reported or self._closed:
                return
            self._pending[instance_id] = None
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def __enter__(self) -> DeadInstanceMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _next_batch(self) -> list[str] | None:
        with self._cond:
            while True:
                if self._closed:
                    return None
                wait = self._last_call + self._interval - self._clock()
                if self._pending and wait <= 0:
                    batch = list(self._pending)
                    self._pending.clear()
                    self._last_call = self._clock()
                    self.calls += 1
                    return batch
                self._cond.wait(wait if self._pending else None)

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                records = {r.instance_id: r for r in self._describe(batch)}
            except Exception:
                log.exception("DescribeInstances for %d suspected instance(s) failed; "
                              "asking again", len(batch))
                with self._cond:
                    for instance_id in batch:
                        self._pending.setdefault(instance_id, None)
                continue
            for instance_id in batch:
                record = records.get(instance_id)
                if record is None:
                    state, reason = "terminated", "unknown to EC2"
                elif record.state in DEAD_STATES:
                    state, reason = record.state, record.state_reason
                else:
                    continue
                with self._cond:
                    if instance_id in self._reported:
                        continue
                    self._reported.add(instance_id)
                log.info("EC2 instance %s is %s (%s)", instance_id, state, reason or "no reason")
                try:
                    self._on_dead(instance_id, state, reason)
                except Exception:
                    log.exception("the dead-instance callback failed for %s", instance_id)
