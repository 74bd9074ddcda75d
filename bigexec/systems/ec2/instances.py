"""Launching, describing, tagging and terminating the ``ec2`` system's instances (boto3).

Spot first; on a capacity error the next alternative (type, subnet); then on-demand unless
``spot_only``. Throttling and unanswered requests are retried with jittered backoff under one
deadline. The lease tag and ``sweep``: see the package's docstring.
"""

from __future__ import annotations

import getpass
import logging
import math
import os
import random
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from ... import __version__
from .options import Ec2Options, default_ami_parameter

__all__ = ["BATCH", "CAPACITY_ERRORS", "DEAD_STATES", "LEASE_TAG", "LIVE_STATES", "OWNER_TAG",
           "PROGRAM_TAG", "SESSION_TAG", "THROTTLE_ERRORS", "UNTAGGED_LAPSE", "VERSION_TAG",
           "Ec2CapacityError", "Ec2Instances", "Ec2Throttled", "InstanceRecord"]

log = logging.getLogger("bigexec.systems.ec2")

SESSION_TAG = "bigexec-session"
OWNER_TAG = "bigexec-owner"
VERSION_TAG = "bigexec-version"
PROGRAM_TAG = "bigexec-program"
LEASE_TAG = "bigexec-lease-until"
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
    public_ip: str | None = None


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
        launch_time=launched.timestamp() if launched is not None else None,
        public_ip=item.get("PublicIpAddress"))


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
        import boto3
        from botocore.config import Config

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
        """The AMI: the option, else the stock image whose python3 is the driver's Python
        (``default_ami_parameter``), from its public SSM parameter."""
        if self._ami is None:
            answer = self.call("get_parameter", client=self._ssm_client(),
                               Name=default_ami_parameter())
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
