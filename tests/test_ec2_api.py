"""The AWS side of the ``ec2`` system against a real EC2/SSM API server (moto, on loopback):
what RunInstances records, spot and on-demand fallback, capacity and throttling errors, the
user-data limit, terminate, list and sweep, and the dead-instance monitor.

No test here connects to an instance's address: only to the API server on 127.0.0.1."""

from __future__ import annotations

import base64
import gzip
import json
import sys
import threading
import time

import pytest
from moto_ec2 import MotoEc2, is_loopback, moto_cloud, refusal

from bigexec import __version__
from bigexec.systems import ec2
from bigexec.systems.ec2 import (
    AGENT_DOCUMENT_PATH,
    DEFAULT_AMI_PARAMETER,
    LEASE_TAG,
    USER_DATA_LIMIT,
    DeadInstanceMonitor,
    Ec2CapacityError,
    Ec2Instances,
    Ec2Options,
    Ec2Throttled,
    PinnedRequirements,
    Wheelhouse,
    default_ami_parameter,
    render_user_data,
)

DOCUMENT = json.dumps({"session": "s-1", "instance_id": None, "port": 443, "lease": 300.0,
                       "ca_pem": "CA", "cert_pem": "CERT", "key_pem": "KEY",
                       "poweroff": ["shutdown", "-h", "now"]}).encode()


@pytest.fixture
def cloud(monkeypatch):
    with moto_cloud(monkeypatch) as api_server:
        yield api_server


def some_ami(cloud: MotoEc2) -> str:
    return cloud.client().describe_images(Owners=["amazon"])["Images"][0]["ImageId"]


def instances(cloud: MotoEc2, **options) -> tuple[Ec2Instances, object]:
    """An Ec2Instances over its own recorded client, with the test subnet."""
    opts = Ec2Options(**{"instance_type": "c6i.4xlarge", "subnet": cloud.subnet_id,
                         "endpoint_url": cloud.endpoint_url, **options})
    client = cloud.client()
    cloud.record_calls(client)
    return Ec2Instances(opts, client=client, ssm_client=cloud.client("ssm")), client


def run_calls(cloud: MotoEc2) -> list[dict]:
    return [params for name, params in cloud.calls if name == "RunInstances"]


# ── options ───────────────────────────────────────────────────────────────────────────────

def test_options_come_from_variables_with_keywords_overriding():
    env = {"BIGEXEC_EC2_INSTANCE_TYPE": "m6i.large", "BIGEXEC_EC2_SPOT_ONLY": "yes",
           "BIGEXEC_EC2_ALTERNATIVES": "m5.large, subnet-b ,", "BIGEXEC_EC2_TAGS": "team=x,a=b",
           "BIGEXEC_EC2_SECURITY_GROUPS": "sg-1,sg-2", "BIGEXEC_EC2_ROOT_VOLUME_GIB": "64",
           "BIGEXEC_EC2_PROCS_PER_INSTANCE": "3", "BIGEXEC_EC2_MARKET": "on-demand"}
    opts = Ec2Options.from_env(env, market="spot", subnet="subnet-a")
    assert opts.instance_type == "m6i.large" and opts.spot_only is True
    assert opts.market == "spot"  # the keyword wins
    assert opts.alternatives == ("m5.large", "subnet-b")
    assert opts.tags == {"team": "x", "a": "b"}
    assert opts.security_groups == ("sg-1", "sg-2")
    assert (opts.root_volume_gib, opts.procs_per_instance) == (64, 3)
    assert opts.region is None and opts.ami is None and opts.endpoint_url is None
    # a keyword left at None is "not set": the variable still counts
    assert Ec2Options.from_env(env, instance_type=None).instance_type == "m6i.large"
    blank = Ec2Options.from_env({"BIGEXEC_EC2_REGION": " ", "BIGEXEC_EC2_INSTANCE_TYPE": ""})
    assert (blank.region, blank.instance_type) == (None, Ec2Options().instance_type)
    assert opts.candidates() == [("m6i.large", "subnet-a"), ("m6i.large", "subnet-b"),
                                 ("m5.large", "subnet-a"), ("m5.large", "subnet-b")]


@pytest.mark.parametrize("name, value", [
    ("BIGEXEC_EC2_SPOT_ONLY", "maybe"), ("BIGEXEC_EC2_ROOT_VOLUME_GIB", "0"),
    ("BIGEXEC_EC2_PROCS_PER_INSTANCE", "four"), ("BIGEXEC_EC2_MARKET", "reserved"),
    ("BIGEXEC_EC2_TAGS", "novalue"),
])
def test_a_bad_variable_is_named(name, value):
    with pytest.raises(ValueError, match=name):
        Ec2Options.from_env({name: value})


def test_unknown_options_and_bad_keywords_are_refused():
    with pytest.raises(TypeError, match="instance_tipe"):
        Ec2Options.from_env({}, instance_tipe="x")
    with pytest.raises(ValueError, match="market"):
        Ec2Options(market="cheap")
    with pytest.raises(ValueError, match="security_groups"):
        Ec2Options(security_groups="sg-1")


def test_boto3_configuration_is_honoured_when_the_region_is_not_set(cloud, monkeypatch):
    import socket

    assert socket.socket.connect.__name__ == "guarded"  # the fixture's loopback-only net
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-north-1")
    api = Ec2Instances(Ec2Options(endpoint_url=cloud.endpoint_url))
    assert api.client.meta.region_name == "eu-north-1"
    assert api.client.meta.endpoint_url == cloud.endpoint_url
    api = Ec2Instances(Ec2Options(region="ap-south-1", endpoint_url=cloud.endpoint_url))
    assert api.client.meta.region_name == "ap-south-1"


# ── launching ────────────────────────────────────────────────────────────────────────────

def test_launch_records_every_parameter_in_one_request(cloud):
    ami = some_ami(cloud)
    cloud.publish_ubuntu_ami(default_ami_parameter(), ami)
    cloud.client("iam").create_instance_profile(InstanceProfileName="bigexec-role")
    api, client = instances(cloud, tags={"team": "infra"}, security_groups=(
        client_sg := cloud.client().create_security_group(
            GroupName="bigexec", Description="t", VpcId=cloud.vpc_id)["GroupId"],),
        key_name="k1", instance_profile="bigexec-role", root_volume_gib=40)
    user_data = render_user_data(DOCUMENT, Wheelhouse("/opt/wheels"))
    lease_until = time.time() + 300
    records = api.launch("session-abc", 20, user_data, lease_until)  # 16 vCPUs: 2 instances

    assert len(run_calls(cloud)) == 1
    assert len(records) == 2
    assert {r.market for r in records} == {"spot"}
    assert {r.vcpus for r in records} == {16}
    assert all(r.private_ip.startswith("10.200.0.") for r in records)
    ids = [r.instance_id for r in records]
    found = client.describe_instances(InstanceIds=ids)["Reservations"]
    items = [i for res in found for i in res["Instances"]]
    assert len(items) == 2
    for item in items:
        assert item["ImageId"] == ami  # resolved through the public SSM parameter
        assert item["InstanceType"] == "c6i.4xlarge"
        assert item["SubnetId"] == cloud.subnet_id
        assert "PublicIpAddress" not in item
        assert item["InstanceLifecycle"] == "spot"
        assert item["MetadataOptions"]["HttpTokens"] == "required"
        assert item["KeyName"] == "k1"
        assert [g["GroupId"] for g in item["SecurityGroups"]] == [client_sg]
        tags = {t["Key"]: t["Value"] for t in item["Tags"]}
        assert tags["bigexec-session"] == "session-abc"
        assert tags["bigexec-version"] == __version__
        assert tags["bigexec-owner"] and tags["bigexec-program"]
        assert tags["team"] == "infra"
        assert "session-abc" in tags["Name"]
        assert float(tags[LEASE_TAG]) >= lease_until
        attr = client.describe_instance_attribute(
            InstanceId=item["InstanceId"], Attribute="userData")
        assert base64.b64decode(attr["UserData"]["Value"]) == user_data
        shutdown = client.describe_instance_attribute(
            InstanceId=item["InstanceId"], Attribute="instanceInitiatedShutdownBehavior")
        assert shutdown["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"
    sent = run_calls(cloud)[0]
    root = client.describe_images(ImageIds=[ami])["Images"][0]["RootDeviceName"]
    assert sent["BlockDeviceMappings"] == [{"DeviceName": root, "Ebs": {
        "VolumeSize": 40, "VolumeType": "gp3", "DeleteOnTermination": True}}]
    assert sent["IamInstanceProfile"] == {"Name": "bigexec-role"}
    assert (sent["MinCount"], sent["MaxCount"]) == (2, 2)


def test_procs_per_instance_defaults_to_the_types_vcpus(cloud):
    api, _ = instances(cloud, ami=some_ami(cloud))
    assert api.procs_per_instance() == 16
    assert api.instances_for(64) == 4 and api.instances_for(65) == 5
    api, _ = instances(cloud, ami=some_ami(cloud), procs_per_instance=4)
    assert api.instances_for(9) == 3


def test_spot_capacity_refused_falls_back_to_on_demand(cloud):
    api, client = instances(cloud, ami=some_ami(cloud))
    cloud.inject(client, "RunInstances", lambda p: refusal("InsufficientInstanceCapacity")
                    if "InstanceMarketOptions" in p else None)
    records = api.launch("s", 16, b"#cloud-config\n{}", time.time() + 60)
    assert [r.market for r in records] == ["on-demand"]
    sent = run_calls(cloud)
    assert ["InstanceMarketOptions" in p for p in sent] == [True, False]
    item = client.describe_instances(InstanceIds=[records[0].instance_id])[
        "Reservations"][0]["Instances"][0]
    assert "InstanceLifecycle" not in item


def test_what_spot_cannot_fill_goes_on_demand(cloud):
    # spot has room for part of the batch only: refused all at once, then filled in part
    # (moto launches MinCount instances where EC2 launches up to MaxCount), the rest on-demand
    api, client = instances(cloud, ami=some_ami(cloud), procs_per_instance=1)
    cloud.inject(client, "RunInstances", lambda p: refusal("InsufficientInstanceCapacity")
                 if "InstanceMarketOptions" in p and p["MinCount"] > 1 else None)
    records = api.launch("s", 3, b"x", time.time() + 60)
    assert sorted(r.market for r in records) == ["on-demand", "on-demand", "spot"]
    assert [(p["MinCount"], p["MaxCount"], "InstanceMarketOptions" in p)
            for p in run_calls(cloud)] == [(3, 3, True), (1, 3, True), (2, 2, False)]


def test_capacity_errors_move_to_the_listed_alternatives_before_on_demand(cloud):
    api, client = instances(cloud, ami=some_ami(cloud), alternatives=("m5.large",),
                            procs_per_instance=2)
    cloud.inject(client, "RunInstances", lambda p: refusal("SpotMaxPriceTooLow")
                    if p["InstanceType"] == "c6i.4xlarge" else None)
    records = api.launch("s", 4, b"x", time.time() + 60)
    assert [(r.instance_type, r.market) for r in records] == [("m5.large", "spot")] * 2
    assert {r.vcpus for r in records} == {2}  # the type's, though procs_per_instance is set
    assert [(p["InstanceType"], p["MinCount"]) for p in run_calls(cloud)] == [
        ("c6i.4xlarge", 2), ("c6i.4xlarge", 1), ("m5.large", 2)]


def test_spot_only_never_launches_on_demand(cloud):
    api, client = instances(cloud, ami=some_ami(cloud), spot_only=True)
    cloud.inject(client, "RunInstances",
                    lambda p: refusal("MaxSpotInstanceCountExceeded"))
    with pytest.raises(Ec2CapacityError, match="MaxSpotInstanceCountExceeded"):
        api.launch("s", 1, b"x", time.time() + 60)
    assert len(run_calls(cloud)) == 1
    assert cloud.client().describe_instances()["Reservations"] == []


def test_other_errors_are_not_taken_for_capacity(cloud):
    api, client = instances(cloud, ami=some_ami(cloud))
    cloud.inject(client, "RunInstances", lambda p: refusal("InvalidParameterValue"))
    with pytest.raises(Exception, match="InvalidParameterValue"):
        api.launch("s", 1, b"x", time.time() + 60)
    assert len(run_calls(cloud)) == 1


def test_throttling_backs_off_with_jitter_and_then_launches(cloud):
    waits: list[float] = []
    api, client = instances(cloud, ami=some_ami(cloud))
    api = Ec2Instances(api.options, client=client, sleep=waits.append, backoff=1.0,
                       max_backoff=4.0)
    throttles = iter(range(5))
    cloud.inject(client, "RunInstances",
                    lambda p: refusal("RequestLimitExceeded", 503)
                    if next(throttles, None) is not None else None)
    records = api.launch("s", 1, b"x", time.time() + 60)
    assert len(records) == 1
    assert len(run_calls(cloud)) == 6
    caps = [1.0, 2.0, 4.0, 4.0, 4.0]
    assert len(waits) == 5
    assert all(cap / 2 <= w <= cap for w, cap in zip(waits, caps, strict=True))
    assert any(w != cap for w, cap in zip(waits, caps, strict=True))  # jittered


def test_a_request_that_got_no_answer_is_retried_like_throttling(cloud):
    from botocore.exceptions import EndpointConnectionError

    waits: list[float] = []
    api, client = instances(cloud, ami=some_ami(cloud))
    api = Ec2Instances(api.options, client=client, sleep=waits.append)
    failures = iter(range(2))

    def answer(params):
        if next(failures, None) is not None:
            raise EndpointConnectionError(endpoint_url=cloud.endpoint_url)
        return None

    cloud.inject(client, "DescribeInstanceTypes", answer)
    assert api.vcpus("c6i.4xlarge") == 16
    assert len(waits) == 2


def test_throttling_over_http_is_retried_by_bigexec_not_by_boto3(cloud):
    # the client Ec2Instances makes itself, from boto3's configuration (the fixture's
    # AWS_* variables) and the endpoint; the server answers 503 RequestLimitExceeded 3 times
    waits: list[float] = []
    api = Ec2Instances(Ec2Options(endpoint_url=cloud.endpoint_url), sleep=waits.append)
    cloud.throttle.pending["DescribeInstanceTypes"] = 3
    assert api.vcpus("c6i.4xlarge") == 16
    assert cloud.throttle.seen["DescribeInstanceTypes"] == 4  # no retry hidden in boto3
    assert len(waits) == 3


def test_throttling_gives_up_at_the_deadline(cloud):
    now = [0.0]
    api, client = instances(cloud, ami=some_ami(cloud))
    api = Ec2Instances(api.options, client=client, deadline=30.0, backoff=1.0,
                       max_backoff=8.0, clock=lambda: now[0],
                       sleep=lambda s: now.__setitem__(0, now[0] + s))
    cloud.inject(client, "RunInstances", lambda p: refusal("RequestLimitExceeded", 503))
    with pytest.raises(Ec2Throttled, match="throttled.*deadline"):
        api.launch("s", 1, b"x", time.time() + 60)
    assert now[0] <= 30.0
    assert now[0] > 30.0 - 8.0  # it waited out most of the deadline, not one try
    assert cloud.client().describe_instances()["Reservations"] == []


# ── user-data ────────────────────────────────────────────────────────────────────────────

def test_user_data_writes_the_document_privately_and_starts_the_agent():
    data = render_user_data(DOCUMENT, PinnedRequirements(("bigexec==1.0", "numpy==2.0")))
    assert data.startswith(b"#cloud-config\n")
    config = json.loads(data.split(b"\n", 1)[1])
    written, reporter = config["write_files"]
    assert written["path"] == AGENT_DOCUMENT_PATH == "/run/bigexec/agent.json"
    assert written["permissions"] == "0600"
    assert base64.b64decode(written["content"]) == DOCUMENT
    # a boot that fails says why: a stand-in serves the boot log on the agent's port (443)
    assert reporter["path"] == "/run/bigexec/stand-in.py"
    compile(base64.b64decode(reporter["content"]), "stand-in.py", "exec")
    script = config["runcmd"][0][2]
    assert "pip install --isolated -q bigexec==1.0 numpy==2.0" in script
    assert "-m bigexec.agent --bootstrap /run/bigexec/agent.json" in script
    assert "/run/bigexec/stand-in.py report 443 /var/log/bigexec-boot.log" in script
    assert "stand-in.py wheel" not in script  # bigexec comes from the index here
    yaml = pytest.importorskip("yaml")
    assert yaml.safe_load(data) == config  # cloud-init reads YAML: JSON is YAML


def test_the_default_plan_installs_the_dependencies_and_takes_the_drivers_own_bigexec():
    plan = PinnedRequirements.from_driver(["numpy"])
    assert plan.driver_wheel
    assert not any(r.startswith("bigexec") for r in plan.requirements)
    assert any(r.startswith("cloudpickle==") for r in plan.requirements)
    script = json.loads(render_user_data(DOCUMENT, plan).split(b"\n", 1)[1])["runcmd"][0][2]
    wait, install = (line for line in script.splitlines() if "wheel" in line)
    assert wait.startswith("python3 /run/bigexec/stand-in.py wheel 443 ")
    assert "pip install --isolated -q --no-index --no-deps /run/bigexec/wheel/bigexec-*.whl" \
        in install
    assert script.index("stand-in.py wheel") < script.index("-m bigexec.agent")
    pinned = PinnedRequirements.from_driver(driver_wheel=False)
    assert f"bigexec=={__version__}" in pinned.requirements and not pinned.driver_wheel


def test_a_wheelhouse_installs_with_no_index():
    script = json.loads(render_user_data(DOCUMENT, Wheelhouse("/srv/wheels")).split(
        b"\n", 1)[1])["runcmd"][0][2]
    assert "--no-index --find-links /srv/wheels bigexec" in script
    assert "venv --without-pip" in script


def test_user_data_over_the_limit_is_gzipped_and_then_refused():
    import random

    compressible = json.dumps({"pad": "a" * 20000}).encode()
    packed = render_user_data(compressible, Wheelhouse("/w"), port=443)
    assert len(packed) <= USER_DATA_LIMIT
    assert gzip.decompress(packed).startswith(b"#cloud-config\n")
    noise = random.Random(1).randbytes(20000)  # base64 then gzip: about 20,000 bytes
    with pytest.raises(ValueError, match="16384 bytes"):
        render_user_data(noise, Wheelhouse("/w"), port=443)


def test_a_real_agent_document_fits_plainly_and_carries_no_ca_key(tmp_path):
    from bigexec.authority import Authority

    authority = Authority(tmp_path / "ca.pem")  # the file holds the CA's key too
    ca_key = (tmp_path / "ca.pem").read_bytes().split(authority.cert_pem)[1].strip()
    assert b"PRIVATE KEY" in ca_key
    leaf = authority.issue("machine 1", ips=["10.200.0.4"], usage="server")
    document = json.dumps({
        "session": "0123456789abcdef", "instance_id": None, "port": 443, "lease": 600.0,
        "ca_pem": leaf.ca_pem.decode(), "cert_pem": leaf.cert_pem.decode(),
        "key_pem": leaf.key_pem.decode(), "poweroff": ["shutdown", "-h", "now"]}).encode()
    pins = tuple(f"package-number-{n}==1.{n}.0" for n in range(40))
    data = render_user_data(document, PinnedRequirements(("bigexec==0.1.0",) + pins))
    assert data.startswith(b"#cloud-config")  # not gzipped: readable in the console
    assert len(data) < USER_DATA_LIMIT // 2
    written = base64.b64decode(json.loads(data.split(b"\n", 1)[1])["write_files"][0]["content"])
    assert written == document
    body = ca_key.splitlines()[1]
    assert body not in written and body not in data


# ── terminate, list, sweep ───────────────────────────────────────────────────────────────

def test_terminate_and_describe(cloud):
    api, _ = instances(cloud, ami=some_ami(cloud), procs_per_instance=1)
    ids = [r.instance_id for r in api.launch("s", 3, b"x", time.time() + 60)]
    assert {r.state for r in api.describe(ids)} == {"running"}
    api.terminate(ids[:2])
    states = {r.instance_id: r.state for r in api.describe(ids)}
    assert states == {ids[0]: "terminated", ids[1]: "terminated", ids[2]: "running"}
    assert [r.instance_id for r in api.list_instances("s")] == [ids[2]]


def test_sweep_terminates_only_sessions_whose_lease_lapsed(cloud):
    api, _ = instances(cloud, ami=some_ami(cloud), procs_per_instance=1)
    now = time.time()
    old = [r.instance_id for r in api.launch("old", 2, b"x", now - 600)]
    live = [r.instance_id for r in api.launch("live", 1, b"x", now - 600)]
    api.renew_lease(live, now + 600)  # the live driver renews; the dead one did not
    other = cloud.client().run_instances(ImageId=api.ami(), MinCount=1, MaxCount=1,
                                            SubnetId=cloud.subnet_id)["Instances"]
    assert {r.session for r in api.list_instances()} == {"old", "live"}
    assert sorted(api.sweep(now=now)) == sorted(old)
    states = {r.instance_id: r.state for r in api.describe(old + live)}
    assert states == {old[0]: "terminated", old[1]: "terminated", live[0]: "running"}
    assert api.describe([other[0]["InstanceId"]])[0].state == "running"  # not bigexec's
    assert api.sweep(now=now) == []


# ── the dead-instance monitor ────────────────────────────────────────────────────────────

def test_the_monitor_reports_a_dead_instance_once_with_its_reason(cloud):
    api, _ = instances(cloud, ami=some_ami(cloud), procs_per_instance=1)
    ids = [r.instance_id for r in api.launch("s", 3, b"x", time.time() + 60)]
    cloud.kill(ids[0], "Server.SpotInstanceTermination")
    cloud.stop(ids[1])
    reports: list[tuple[str, str, str]] = []
    seen = threading.Event()

    def on_dead(instance_id, state, reason):
        reports.append((instance_id, state, reason))
        if len(reports) == 2:
            seen.set()

    with DeadInstanceMonitor(api.describe, on_dead, interval=0.05) as monitor:
        for instance_id in ids:
            monitor.suspect(instance_id)
        assert seen.wait(30)
        for instance_id in ids:  # suspected again: nothing new to say
            monitor.suspect(instance_id)
        deadline = time.monotonic() + 30
        while monitor.calls < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)
    assert sorted(reports) == sorted([(ids[0], "terminated", "Server.SpotInstanceTermination"),
                                      (ids[1], "stopped", "Client.UserInitiatedShutdown")])


def test_the_monitor_never_blocks_and_holds_its_rate_limit():
    release = threading.Event()
    batches: list[tuple[float, list[str]]] = []

    def describe(ids):
        batches.append((time.monotonic(), list(ids)))
        release.wait(30)
        return []  # unknown to EC2: long gone

    reports: list[str] = []
    with DeadInstanceMonitor(describe, lambda i, s, r: reports.append(i),
                             interval=0.3) as monitor:
        start = time.monotonic()
        monitor.suspect("i-1")
        while not batches and time.monotonic() < start + 30:
            time.sleep(0.01)
        t0 = time.monotonic()
        for n in range(200):  # describe is stuck: suspect still returns at once
            monitor.suspect(f"i-{n % 7}")
        assert time.monotonic() - t0 < 5
        release.set()
        while len(reports) < 7 and time.monotonic() < start + 30:
            time.sleep(0.01)
    assert sorted(reports) == sorted(f"i-{n}" for n in range(7))
    assert len(batches) == 2  # one for i-1, one for everything suspected meanwhile
    assert batches[1][0] - batches[0][0] >= 0.3 - 0.01
    assert sorted(batches[1][1]) == sorted(f"i-{n}" for n in range(7))


class CountingClient:
    """A stand-in EC2 client that answers every call empty and remembers its arguments."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []

    def __getattr__(self, operation):
        def call(**params):
            self.calls.append((operation, params))
            return {"Reservations": []}
        return call


def test_describe_and_terminate_batch_their_ids():
    client = CountingClient()
    api = Ec2Instances(Ec2Options(), client=client)
    ids = [f"i-{n:08x}" for n in range(2500)]
    assert api.describe(ids) == []
    api.terminate(ids)
    api.renew_lease(ids, 10.0)
    sizes = [(op, len(p.get("InstanceIds") or p.get("Resources")
                      or p["Filters"][0]["Values"])) for op, p in client.calls]
    assert sizes == ([("describe_instances", 200)] * 12 + [("describe_instances", 100)]
                     + [("terminate_instances", 1000)] * 2 + [("terminate_instances", 500)]
                     + [("create_tags", 1000)] * 2 + [("create_tags", 500)])


def test_the_network_guard_knows_loopback_from_the_rest():
    assert is_loopback(("127.0.0.1", 443)) and is_loopback(("::1", 443, 0, 0))
    assert is_loopback("/run/some.sock") and is_loopback(("localhost", 80))
    assert not is_loopback(("10.200.0.4", 443)) and not is_loopback(("54.1.2.3", 443))
    assert not is_loopback(("169.254.169.254", 80))


def test_the_module_imports_without_boto3():
    import subprocess
    import sys

    code = ("import sys; sys.modules['boto3'] = None; sys.modules['botocore'] = None\n"
            "import bigexec, bigexec.systems.ec2 as e\n"
            "print(e.render_user_data(b'{}', e.Wheelhouse('/w'), port=443)[:13].decode())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "#cloud-config"
    assert ec2.__name__ == "bigexec.systems.ec2"


def test_the_default_image_ships_the_drivers_python():
    assert default_ami_parameter("3.11") == "/aws/service/debian/release/12/latest/amd64"
    assert "ubuntu/server/24.04" in default_ami_parameter("3.12")
    assert "ubuntu/server/22.04" in default_ami_parameter("3.10")
    assert default_ami_parameter("3.13") == "/aws/service/debian/release/13/latest/amd64"
    assert default_ami_parameter("3.99") == DEFAULT_AMI_PARAMETER
    assert default_ami_parameter() == default_ami_parameter(
        f"{sys.version_info[0]}.{sys.version_info[1]}")
