"""The ec2 test world (tests/ec2_world.py) proven with bigexec's real agent, before any
``Ec2System`` uses it: instances launched through moto boot their user-data for real, learn
their ids from their own metadata service, answer the driver over mutual TLS, and end as EC2
ends them. The first tests need no namespaces (the metadata server and the user-data parser).
"""

from __future__ import annotations

import base64
import errno
import gzip
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from ec2_world import (
    BuiltWheelhouse,
    Ec2World,
    Instance,
    ec2_world_fixture,  # noqa: F401 (the ec2_world fixture)
    in_namespace,
    parse_user_data,
    running_world,
    wheelhouse_fixture,  # noqa: F401 (the wheelhouse fixture)
)
from fake_imds import FakeImds, InstanceMetadata

from bigexec import tls
from bigexec.agent import AgentDocument, imds
from bigexec.authority import Authority
from bigexec.rpc.client import Client
from bigexec.systems.ec2.options import DEFAULT_AMI_PARAMETER
from bigexec.systems.ec2.user_data import AGENT_DOCUMENT_PATH, Wheelhouse, render_user_data

AGENT_PORT = 7100
PRIVATE_KEY = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY"
                         rb"-----\n?", re.S)


def agent_user_data(ca: Authority, wheels: Path, lease: float) -> tuple[bytes, tls.Credentials]:
    """What an Ec2System will launch with: the agent asks IMDS for its id, serves :7100 with
    a leaf for the name "bigexec-agent", powers off with shutdown."""
    leaf = ca.issue("bigexec-agent", dns=["bigexec-agent"], usage="server")
    doc = AgentDocument(session="world-test", lease=lease, credentials=leaf, instance_id=None,
                        port=AGENT_PORT, poweroff=("shutdown", "-h", "now"))
    return render_user_data(doc.to_json(), Wheelhouse(str(wheels))), leaf


def driver_client(ca: Authority) -> Client:
    """The driver's side: CA verification on, no host name (the leaf names no IP)."""
    ctx = tls.client_context(ca.issue_driver())
    ctx.check_hostname = False
    return Client(ctx, connect_timeout=5.0)


# ── the metadata server, on loopback ─────────────────────────────────────────────────────

@pytest.fixture
def metadata_server():
    server = FakeImds(InstanceMetadata("i-0abc", private_ip="10.200.0.9"), "127.0.0.1", 0)
    server.start()
    try:
        yield server
    finally:
        server.close()


def _fetch(url: str, method: str = "GET", headers: dict[str, str] | None = None
           ) -> tuple[int, str]:
    request = urllib.request.Request(url, method=method, headers=headers or {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only
    try:
        with opener.open(request, timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_metadata_server_speaks_imdsv2_to_the_agents_own_client(metadata_server):
    base = f"http://{metadata_server.address}/latest"
    assert imds.instance_id(host=metadata_server.address) == "i-0abc"
    assert _fetch(f"{base}/meta-data/instance-id")[0] == 401  # no token: IMDSv2 refuses
    assert _fetch(f"{base}/meta-data/instance-id", headers={
        "X-aws-ec2-metadata-token": "forged"})[0] == 401
    assert _fetch(f"{base}/api/token", "PUT")[0] == 400  # a token needs its TTL
    status, token = _fetch(f"{base}/api/token", "PUT",
                           {"X-aws-ec2-metadata-token-ttl-seconds": "60"})
    assert status == 200
    auth = {"X-aws-ec2-metadata-token": token}
    assert _fetch(f"{base}/meta-data/local-ipv4", headers=auth) == (200, "10.200.0.9")
    assert _fetch(f"{base}/meta-data/spot/instance-action", headers=auth)[0] == 404
    metadata_server.interrupt()
    status, body = _fetch(f"{base}/meta-data/spot/instance-action", headers=auth)
    assert status == 200
    notice = json.loads(body)
    assert notice["action"] == "terminate"
    ahead = time.mktime(time.strptime(notice["time"], "%Y-%m-%dT%H:%M:%SZ")) - time.mktime(
        time.gmtime())
    assert 100 <= ahead <= 125  # EC2 gives two minutes' notice


def test_metadata_server_binds_without_asking_dns(monkeypatch):
    """http.server's own bind asks DNS for the host's name: in an instance's namespace,
    with no resolver behind it, that cost seconds per instance (the boot then outran
    short leases)."""
    def no_dns(*args):
        raise AssertionError(f"a DNS lookup for {args}")

    monkeypatch.setattr(socket, "getfqdn", no_dns)
    server = FakeImds(InstanceMetadata("i-0abc"), "127.0.0.1", 0).start()
    try:
        assert imds.instance_id(host=server.address) == "i-0abc"
    finally:
        server.close()


# ── the user-data the world interprets ───────────────────────────────────────────────────

def test_user_data_is_read_plain_or_gzipped_and_unknown_directives_are_refused():
    ca = Authority()
    user_data, leaf = agent_user_data(ca, Path("/wheels"), lease=30)
    for raw in (user_data, gzip.compress(user_data)):
        config = parse_user_data(raw)
        written, stand_in = config.write_files
        assert stand_in.path == "/run/bigexec/stand-in.py" and stand_in.permissions == 0o700
        assert written.path == AGENT_DOCUMENT_PATH
        assert written.permissions == 0o600 and written.owner == "root:root"
        assert json.loads(written.content)["key_pem"] == leaf.key_pem.decode()
        [command] = config.runcmd
        assert command.startswith("sh -c ") and "--no-index --find-links /wheels" in command
    with pytest.raises(ValueError, match="bootcmd"):
        parse_user_data(b'#cloud-config\n{"bootcmd": [["true"]]}\n')
    with pytest.raises(ValueError, match="not #cloud-config"):
        parse_user_data(b"#!/bin/sh\ntrue\n")
    assert parse_user_data(b"#cloud-config\nruncmd:\n - [echo, 'a b']\n").runcmd == (
        "echo 'a b'",)


def test_an_instance_path_never_leads_out_of_its_own_directories(tmp_path):
    """write_files lands in the instance's /run, /opt or /var/log, never on the host's."""
    instance = Instance("i-1", "10.200.0.4", "ns", tmp_path / "i-1", imds=None, booted_at=0)
    assert instance.host_path("/run/bigexec/agent.json") == tmp_path / "i-1/run/bigexec/agent.json"
    assert instance.host_path("/var/log/x.log") == tmp_path / "i-1/var-log/x.log"
    for outside in ("/etc/x", "/optional", "/opt/../../../../etc/passwd", "/run/../etc"):
        with pytest.raises(ValueError, match="own directories"):
            instance.host_path(outside)


# ── the world ────────────────────────────────────────────────────────────────────────────

def _stray_connect(address: str) -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(5)  # "at once": a timeout is a failure (it raises TimeoutError, errno None)
    try:
        return sock.connect_ex((address, 80))
    finally:
        sock.close()


def test_the_hub_has_no_way_out_and_the_driver_runs_in_it(ec2_world: Ec2World):
    routes = subprocess.run(["ip", "-n", ec2_world.hub, "route", "show"], capture_output=True,
                            text=True, check=True).stdout
    assert "default" not in routes and "10.200.0.0/24 dev br0" in routes
    assert ec2_world.in_hub(_stray_connect, "10.9.9.9") == errno.ENETUNREACH
    # nor does the hub route instances' packets anywhere
    assert ec2_world.in_hub(Path("/proc/sys/net/ipv4/ip_forward").read_text).strip() == "0"
    # the driver, as a subprocess in the hub, reaches moto by its environment alone and
    # cannot leave either
    script = (
        "import os, socket, boto3\n"
        "ec2 = boto3.client('ec2', endpoint_url=os.environ['BIGEXEC_EC2_ENDPOINT_URL'],"
        " region_name=os.environ['BIGEXEC_EC2_REGION'])\n"
        "[s] = ec2.describe_subnets(SubnetIds=[os.environ['BIGEXEC_EC2_SUBNET']])['Subnets']\n"
        "print(s['CidrBlock'])\n"
        "ssm = boto3.client('ssm', endpoint_url=os.environ['BIGEXEC_EC2_ENDPOINT_URL'],"
        " region_name=os.environ['BIGEXEC_EC2_REGION'])\n"
        f"print(ssm.get_parameter(Name={DEFAULT_AMI_PARAMETER!r})['Parameter']['Value'])\n"
        "print(socket.socket().connect_ex(('10.9.9.9', 443)))\n")
    driver = ec2_world.run_driver([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
    out, err = driver.communicate(timeout=60)
    assert driver.returncode == 0, err
    assert out.split() == ["10.200.0.0/24", ec2_world.ami, str(errno.ENETUNREACH)]
    # an instance moto puts outside the world's subnet gets no address, and no namespace
    launched = ec2_world.in_hub(lambda: ec2_world.client().run_instances(
        ImageId=ec2_world.ami, MinCount=1, MaxCount=1))["Instances"][0]["InstanceId"]
    deadline = time.monotonic() + 10
    while launched not in ec2_world.refused and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "outside the world's subnet" in ec2_world.refused[launched]
    assert ec2_world.namespaces() == [ec2_world.hub] and not ec2_world.instances


def test_two_instances_boot_the_real_agent_and_end_as_ec2_ends_them(
        wheelhouse: BuiltWheelhouse, tmp_path: Path):
    started = time.monotonic()
    ca = Authority()
    lease = 10.0
    user_data, leaf = agent_user_data(ca, wheelhouse.path, lease)
    client = driver_client(ca)
    with running_world(tmp_path / "world") as world:
        world_up = time.monotonic() - started
        reply = world.in_hub(lambda: world.client().run_instances(
            ImageId=world.ami, MinCount=2, MaxCount=2, SubnetId=world.subnet_id,
            UserData=user_data.decode(), InstanceInitiatedShutdownBehavior="terminate"))
        ids = sorted(i["InstanceId"] for i in reply["Instances"])
        booted = {i.id: i for i in world.wait_booted(2)}
        assert sorted(booted) == ids
        for iid in ids:
            world.wait_listening(iid, AGENT_PORT)
        # each agent learnt its id from its own metadata service, and is this Python
        for iid, instance in booted.items():
            assert instance.ip.startswith("10.200.0.")
            ident = world.in_hub(client.call, f"https://{instance.ip}:{AGENT_PORT}",
                                 "Agent.identity", timeout=10)
            assert ident["instance_id"] == iid and ident["session"] == "world-test"
            assert ident["python"] == ".".join(map(str, sys.version_info[:3]))
            assert ("PUT", "/latest/api/token", 200) in instance.imds.requests
            # the boot wrote into the instance's own /run, /opt, /var/log; the agent
            # deleted its bootstrap document (the leaf's key) once read
            assert not instance.host_path(AGENT_DOCUMENT_PATH).exists()
            assert instance.host_path("/opt/bigexec/venv/bin/python3").exists()
            assert "bigexec-agent-listening" in instance.boot_log
            # ... which the agent sees mounted there, and the host does not see at all
            [agent] = [p for p in world.processes(iid) if "bigexec.agent" in " ".join(p.argv)]
            inside = _mount_points(f"/proc/{agent.pid}/mountinfo", instance.dir)
            assert inside == {"/run", "/opt", "/var/log"}
            assert _mount_points("/proc/self/mountinfo", instance.dir) == set()
            print(f"{iid} boot timings (s): {instance.timings()}")
        # the user-data carries the leaf's key and no other (never the CA's)
        stored = world.in_hub(lambda: world.client().describe_instance_attribute(
            InstanceId=ids[0], Attribute="userData"))["UserData"]["Value"]
        raw = base64.b64decode(stored)
        carried = b"".join([raw, *(f.content for f in parse_user_data(raw).write_files)])
        assert PRIVATE_KEY.findall(carried.replace(b"\\n", b"\n")) == [leaf.key_pem]
        spot, lapsing = (booted[i] for i in ids)

        # spot: the notice shows in the instance's metadata, then EC2 takes the instance
        world.interrupt(spot.id)

        def notice() -> dict[str, str]:
            token = urllib.request.urlopen(urllib.request.Request(
                "http://169.254.169.254/latest/api/token", method="PUT",
                headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"}), timeout=5).read()
            return json.loads(urllib.request.urlopen(urllib.request.Request(
                "http://169.254.169.254/latest/meta-data/spot/instance-action",
                headers={"X-aws-ec2-metadata-token": token.decode()}), timeout=5).read())

        assert in_namespace(spot.namespace, notice)["action"] == "terminate"
        spot_pids = [p.pid for p in world.processes(spot.id)]
        assert spot_pids
        world.kill_instance(spot.id, "Server.SpotInstanceTermination")
        assert world.processes(spot.id) == [] and spot.namespace not in world.namespaces()

        # the other agent's lease lapses (no keepalives): it powers the instance off
        lapsing_pids = [p.pid for p in world.processes(lapsing.id)]
        assert any("bigexec.agent" in " ".join(p.argv) for p in world.processes(lapsing.id))
        world.wait_gone(lapsing.id, timeout=lease + 30)
        assert lapsing.shutdown_requests == ["-h now"]
        assert lapsing.namespace not in world.namespaces()
        states = world.in_hub(lambda: world.client().describe_instances(InstanceIds=ids))
        found = {i["InstanceId"]: (i["State"]["Name"], i["StateReason"]["Code"])
                 for r in states["Reservations"] for i in r["Instances"]}
        assert found == {spot.id: ("terminated", "Server.SpotInstanceTermination"),
                         lapsing.id: ("terminated", "Client.InstanceInitiatedShutdown")}
        for pid in spot_pids + lapsing_pids:
            assert not _alive(pid)
        assert world.errors == []
        prefix = world.prefix
    leftover = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert prefix not in leftover
    print(f"wheelhouse {wheelhouse.seconds:.1f}s ({len(wheelhouse.wheels)} wheels); world up "
          f"{world_up:.1f}s; test {time.monotonic() - started:.1f}s")


def _mount_points(mountinfo: str, under: Path) -> set[str]:
    """The mount points in ``mountinfo`` whose source lies under ``under`` (matched by its
    unique last name: the source's path is relative to its own file system's root)."""
    points = set()
    for line in Path(mountinfo).read_text().splitlines():
        root, point = line.split()[3:5]
        if f"/{under.name}/" in root:
            points.add(point)
    return points


def test_a_failed_boot_powers_off_after_its_delay(wheelhouse: BuiltWheelhouse,
                                                   ec2_world: Ec2World):
    """The boot script's trap runs `shutdown -h +5` when the install fails: the world keeps
    the delay (in world minutes) and then ends the instance, stopped here by its default
    shutdown behaviour."""
    ca = Authority()
    user_data, _ = agent_user_data(ca, wheelhouse.path / "missing", lease=30)
    launched = ec2_world.in_hub(lambda: ec2_world.client().run_instances(
        ImageId=ec2_world.ami, MinCount=1, MaxCount=1, SubnetId=ec2_world.subnet_id,
        UserData=user_data.decode()))["Instances"][0]["InstanceId"]
    [instance] = ec2_world.wait_booted(1)
    ec2_world.wait_gone(launched, timeout=30)
    assert instance.shutdown_requests == ["-h +5"]
    assert "bigexec: bootstrap failed" in instance.boot_log
    assert (instance.ended, instance.reason) == ("stopped", "Client.InstanceInitiatedShutdown")
    assert os.path.isdir(instance.dir)  # its disk stays for the test to read


def test_the_world_ends_everything_even_when_the_test_fails():
    """A termination through the API ends the instance; a test that fails takes the rest
    with it: instances' processes, drivers, namespaces, the world's directory."""
    user_data = (b'#cloud-config\n{"write_files": [{"path": "/opt/note", "content": "hi"}],'
                 b' "runcmd": [["sleep", "300"]]}\n')

    def sleeper(world: Ec2World, iid: str) -> int:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            found = [p.pid for p in world.processes(iid) if p.argv[:1] == ("sleep",)]
            if found:
                return found[0]
            time.sleep(0.05)
        raise AssertionError(f"{iid} runs no sleep: {world.processes(iid)}")

    with pytest.raises(RuntimeError, match="the test failed"), running_world() as world:
        world.in_hub(lambda: world.client().run_instances(
            ImageId=world.ami, MinCount=2, MaxCount=2, SubnetId=world.subnet_id,
            UserData=user_data.decode()))
        ended, left = world.wait_booted(2)
        assert left.host_path("/opt/note").read_text() == "hi"
        ended_pid, left_pid = sleeper(world, ended.id), sleeper(world, left.id)
        world.in_hub(lambda: world.client().terminate_instances(InstanceIds=[ended.id]))
        world.wait_gone(ended.id, timeout=10)
        [vm] = world.in_hub(lambda: world.client().describe_instances(
            InstanceIds=[ended.id]))["Reservations"][0]["Instances"]
        assert (ended.ended, ended.reason) == ("terminated", vm["StateReason"]["Code"])
        assert not _alive(ended_pid) and _alive(left_pid)
        assert world.namespaces() == [world.hub, left.namespace]
        driver = world.run_driver(["sleep", "300"])
        workdir, prefix = world.workdir, world.prefix
        raise RuntimeError("the test failed")
    assert not _alive(left_pid) and driver.poll() is not None
    assert prefix not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                        text=True).stdout
    assert not workdir.exists()


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie awaiting its parent's wait does not; Linux does not
    reuse a pid within a test's seconds)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
