"""``bigexec ec2 ls`` and ``bigexec ec2 sweep`` against moto's EC2 API on 127.0.0.1, run
in-process through ``bigexec.cli.main``. Nothing here connects to an instance's address."""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from moto_ec2 import MotoEc2, moto_cloud

from bigexec.cli import main
from bigexec.systems.ec2 import Ec2Instances, Ec2Options, InstanceRecord

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def cloud(monkeypatch):
    with moto_cloud(monkeypatch) as api_server:
        yield api_server


def _api(cloud: MotoEc2) -> Ec2Instances:
    ami = cloud.client().describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    return Ec2Instances(Ec2Options(instance_type="c6i.large", subnet=cloud.subnet_id,
                                   ami=ami, procs_per_instance=1,
                                   endpoint_url=cloud.endpoint_url),
                        client=cloud.client(), ssm_client=cloud.client("ssm"))


def _bigexec(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _two_sessions(cloud: MotoEc2) -> tuple[Ec2Instances, list[str], list[str]]:
    """Session "lapsed" (two instances, lease ended 10 minutes ago) and session "live" (one,
    lease 10 minutes ahead)."""
    api = _api(cloud)
    now = time.time()
    old = [r.instance_id for r in api.launch("lapsed", 2, b"x", now - 600)]
    live = [r.instance_id for r in api.launch("live", 1, b"x", now + 600)]
    return api, old, live


def test_ls_shows_every_session_as_an_aligned_table_and_filters_one(cloud, capsys):
    api, old, live = _two_sessions(cloud)
    code, out, err = _bigexec(capsys, "ec2", "ls", "--endpoint-url", cloud.endpoint_url)
    assert (code, err) == (0, "")
    header, *rows = out.splitlines()
    assert header.split() == ["INSTANCE", "SESSION", "STATE", "TYPE", "MARKET", "PRIVATE-IP",
                              "AGE", "LEASE"]
    assert len(rows) == 3
    by_id = {row.split()[0]: row for row in rows}
    assert set(by_id) == set(old + live)
    ips = {r.instance_id: r.private_ip for r in api.describe(old + live)}
    for instance_id in old:
        cells = by_id[instance_id].split()
        assert cells[1:6] == ["lapsed", "running", "c6i.large", "spot", ips[instance_id]]
        assert cells[6].endswith("s")  # launched moments ago
        assert " ".join(cells[7:]) in ("lapsed 10m ago", "lapsed 11m ago")
    cells = by_id[live[0]].split()
    assert cells[1] == "live" and cells[7] in ("9m", "10m")
    # aligned: every column starts where its header does
    for name in ("SESSION", "STATE", "TYPE", "MARKET", "PRIVATE-IP", "AGE", "LEASE"):
        column = header.index(name)
        assert all(row[column - 2:column] == "  " and row[column] != " " for row in rows)

    code, out, _ = _bigexec(capsys, "ec2", "ls", "--session", "live",
                            "--endpoint-url", cloud.endpoint_url)
    assert code == 0
    assert [row.split()[0] for row in out.splitlines()[1:]] == live


def test_ls_json_round_trips_to_the_records(cloud, capsys):
    api, old, live = _two_sessions(cloud)
    code, out, err = _bigexec(capsys, "ec2", "ls", "--json",
                              "--endpoint-url", cloud.endpoint_url)
    assert (code, err) == (0, "")
    listed = [InstanceRecord(**item) for item in json.loads(out)]
    assert sorted(listed) == sorted(api.list_instances())
    assert {r.session for r in listed} == {"lapsed", "live"}
    code, out, _ = _bigexec(capsys, "ec2", "ls", "--json", "--session", "nobody",
                            "--endpoint-url", cloud.endpoint_url)
    assert (code, json.loads(out)) == (0, [])


def test_ls_with_no_instances_says_so(cloud, capsys):
    code, out, err = _bigexec(capsys, "ec2", "ls", "--endpoint-url", cloud.endpoint_url)
    assert (code, out, err) == (0, "no bigexec instances\n", "")


def test_options_come_from_bigexec_ec2_variables_with_the_command_line_winning(
        cloud, capsys, monkeypatch):
    _two_sessions(cloud)
    monkeypatch.setenv("BIGEXEC_EC2_ENDPOINT_URL", cloud.endpoint_url)
    monkeypatch.setenv("BIGEXEC_EC2_REGION", "eu-west-1")  # an empty region in moto
    code, out, _ = _bigexec(capsys, "ec2", "ls")
    assert (code, out) == (0, "no bigexec instances\n")
    code, out, _ = _bigexec(capsys, "ec2", "ls", "--region", "us-west-2")
    assert code == 0 and len(out.splitlines()) == 4
    monkeypatch.setenv("BIGEXEC_EC2_MARKET", "cheap")
    code, out, err = _bigexec(capsys, "ec2", "ls")
    assert code == 2 and out == ""
    assert err.startswith("bigexec: BIGEXEC_EC2_MARKET='cheap'") and err.count("\n") == 1


def test_sweep_terminates_only_the_lapsed_session_and_dry_run_nothing(cloud, capsys):
    api, old, live = _two_sessions(cloud)
    code, out, err = _bigexec(capsys, "ec2", "sweep", "--dry-run",
                              "--endpoint-url", cloud.endpoint_url)
    assert (code, err) == (0, "")
    assert sorted(out.splitlines()) == sorted(f"would terminate {i}" for i in old)
    assert {r.state for r in api.describe(old + live)} == {"running"}

    # a grace longer than the lapse spares the session
    code, out, _ = _bigexec(capsys, "ec2", "sweep", "--grace", "3600",
                            "--endpoint-url", cloud.endpoint_url)
    assert (code, out) == (0, "no instance of a lapsed session\n")
    assert {r.state for r in api.describe(old + live)} == {"running"}

    code, out, err = _bigexec(capsys, "ec2", "sweep", "--endpoint-url", cloud.endpoint_url)
    assert (code, err) == (0, "")
    assert sorted(out.splitlines()) == sorted(f"terminated {i}" for i in old)
    states = {r.instance_id: r.state for r in api.describe(old + live)}
    assert states == {old[0]: "terminated", old[1]: "terminated", live[0]: "running"}
    code, out, _ = _bigexec(capsys, "ec2", "ls", "--endpoint-url", cloud.endpoint_url)
    assert [row.split()[0] for row in out.splitlines()[1:]] == live


def test_without_boto3_one_line_says_what_to_install(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "boto3", None)  # `import boto3` now raises ImportError
    monkeypatch.setitem(sys.modules, "botocore", None)
    for argv in (["ec2", "ls"], ["ec2", "sweep", "--dry-run"]):
        code, out, err = _bigexec(capsys, *argv)
        assert (code, out) == (2, "")
        assert err == "bigexec: the ec2 commands need boto3: pip install bigexec[ec2]\n"


class _Refusing(BaseHTTPRequestHandler):
    """An EC2 endpoint that refuses every request, as AWS does a user without the right."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = (b'<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error>'
                b"<Code>UnauthorizedOperation</Code><Message>You are not authorized to "
                b"perform this operation.</Message></Error></Errors>"
                b"<RequestID>test</RequestID></Response>")
        self.send_response(403)
        self.send_header("Content-Type", "text/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args) -> None:
        pass


@pytest.fixture
def refusing_endpoint(cloud):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


@pytest.mark.parametrize("command", [["ls"], ["sweep"], ["sweep", "--dry-run"]])
def test_access_denied_is_one_line_naming_the_code(refusing_endpoint, capsys, command):
    code, out, err = _bigexec(capsys, "ec2", *command, "--endpoint-url", refusing_endpoint)
    assert (code, out) == (1, "")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"bigexec: ec2 {command[0]}: AWS error UnauthorizedOperation: "), err


def test_no_credentials_is_one_line_naming_the_error(cloud, capsys, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name)
    code, out, err = _bigexec(capsys, "ec2", "ls", "--endpoint-url", cloud.endpoint_url)
    assert (code, out) == (1, "")
    assert err.startswith("bigexec: ec2 ls: AWS error NoCredentialsError: "), err
    assert err.count("\n") == 1


@pytest.mark.parametrize("command", [[], ["ec2"], ["ec2", "ls"], ["ec2", "sweep"]])
def test_help_lists_and_explains_the_ec2_commands(capsys, command):
    with pytest.raises(SystemExit) as stop:
        main([*command, "--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0
    assert out.startswith("usage: bigexec")
    if not command:
        assert "ec2" in out.split("\n\n")[1] or "{status,profile,top,ec2}" in out
        assert "bigexec ec2 ls" in out and "bigexec ec2 sweep" in out  # the epilog
        assert "pip install bigexec[ec2]" in out
    elif command == ["ec2"]:
        assert "ls" in out and "sweep" in out
    else:
        assert "--region" in out and "--endpoint-url" in out
        assert ("--session" in out) == (command[-1] == "ls")
        assert ("--dry-run" in out and "--grace" in out) == (command[-1] == "sweep")
