"""A real EC2 and SSM API on loopback for tests: moto's server bound to 127.0.0.1 on a free
port, with a VPC and a 10.200.0.0/24 subnet (so that moto invents no public address), and
ways to do what the real cloud does on its own (kill an instance, publish the Ubuntu AMI's
SSM parameter, refuse or throttle a call).

Nothing here, nor in the tests that use it, ever connects to an instance's address.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import ipaddress
import socket
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from werkzeug.serving import make_server

boto3 = pytest.importorskip("boto3", reason="the ec2 tests need boto3 (pip install boto3)")
moto_app = pytest.importorskip(
    "moto.moto_server.werkzeug_app",
    reason="the ec2 tests need moto's server (pip install 'moto[server,ec2,ssm]')")

REGION = "us-west-2"
ACCOUNT = "123456789012"  # moto's default account
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing",
               "aws_session_token": "testing"}


@dataclass
class FakeHttp:
    """What a botocore ``before-call`` hook hands back instead of a real HTTP response."""

    status_code: int
    headers: dict[str, str] = field(default_factory=dict)
    text: str = ""
    content: bytes = b""


def refusal(code: str, status: int = 400) -> tuple[FakeHttp, dict[str, Any]]:
    return FakeHttp(status), {"Error": {"Code": code, "Message": f"injected {code}"},
                              "ResponseMetadata": {"HTTPStatusCode": status}}


class Throttle:
    """WSGI middleware in front of moto: answers the next ``pending[action]`` requests for an
    EC2 ``Action`` with HTTP 503 RequestLimitExceeded, as EC2 does, and counts every request
    that reached the server by action (``seen``)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.pending: dict[str, int] = {}
        self.seen: dict[str, int] = {}
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        environ["wsgi.input"] = io.BytesIO(body)
        action = urllib.parse.parse_qs(body.decode("utf-8", "replace")).get("Action", [""])[0]
        with self.lock:
            self.seen[action] = self.seen.get(action, 0) + 1
            throttled = self.pending.get(action, 0) > 0
            if throttled:
                self.pending[action] -= 1
        if not throttled:
            return self.app(environ, start_response)
        answer = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Errors><Error>"
                  b"<Code>RequestLimitExceeded</Code><Message>Request limit exceeded."
                  b"</Message></Error></Errors><RequestID>injected</RequestID></Response>"
                  )
        start_response("503 Service Unavailable", [("Content-Type", "text/xml"),
                                                   ("Content-Length", str(len(answer)))])
        return [answer]


@dataclass
class MotoEc2:
    endpoint_url: str
    subnet_id: str
    vpc_id: str
    throttle: Throttle
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def client(self, service: str = "ec2") -> Any:
        return boto3.session.Session(region_name=REGION, **CREDENTIALS).client(
            service, endpoint_url=self.endpoint_url)

    def inject(self, client: Any, operation: str,
               answer: Callable[[dict[str, Any]], tuple[FakeHttp, dict[str, Any]] | None]
               ) -> None:
        """Before each ``operation`` (e.g. ``RunInstances``) ``client`` makes, ask
        ``answer(params)`` (the call's API parameters): a refusal() short-circuits the call,
        None lets it through to the server."""

        def keep(params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
            context["test-api-params"] = dict(params)

        def hook(context: dict[str, Any], **_: Any) -> Any:
            return answer(context["test-api-params"])

        client.meta.events.register(f"before-parameter-build.ec2.{operation}", keep)
        client.meta.events.register(f"before-call.ec2.{operation}", hook)

    def record_calls(self, client: Any) -> None:
        """Append (operation, API parameters) to ``calls`` for every call ``client`` makes,
        whether the server answers it or an injected refusal does."""

        def hook(model: Any, params: dict[str, Any], **_: Any) -> None:
            self.calls.append((model.name, dict(params)))

        client.meta.events.register("before-parameter-build.*.*", hook)

    def publish_ubuntu_ami(self, name: str, ami: str) -> None:
        """Put the public SSM parameter the real cloud serves (moto cannot put ``/aws/``
        names through the API), in-process."""
        from moto.ssm.models import Parameter, ssm_backends

        backend = ssm_backends[ACCOUNT][REGION]
        backend._parameters[name].append(Parameter(
            account_id=ACCOUNT, name=name, value=ami, parameter_type="String",
            description=None, allowed_pattern=None, keyid=None,
            last_modified_date=datetime.datetime.now(datetime.timezone.utc), version=1,
            data_type="aws:ec2:image"))

    def kill(self, instance_id: str, reason: str = "Server.SpotInstanceTermination") -> None:
        """Terminate an instance as EC2 itself would (spot interruption, self power-off)."""
        from moto.ec2.models import ec2_backends
        from moto.ec2.models.instances import StateReason

        instance = ec2_backends[ACCOUNT][REGION].get_instance(instance_id)
        instance.terminate()
        instance.state_reason = StateReason(f"{reason}: injected", reason)

    def stop(self, instance_id: str) -> None:
        from moto.ec2.models import ec2_backends

        ec2_backends[ACCOUNT][REGION].get_instance(instance_id).stop()


def is_loopback(address: Any) -> bool:
    """Whether a socket address (an AF_INET/AF_INET6 tuple, or an AF_UNIX path) stays on
    this host's loopback."""
    if not isinstance(address, tuple):
        return True  # AF_UNIX
    try:
        return ipaddress.ip_address(address[0]).is_loopback
    except ValueError:
        return address[0] == "localhost"


def refuse_non_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every Python socket in this process refuse, before any packet, to connect
    anywhere but loopback (a net under THE NETWORK RULE: the code under test must never dial
    an address the fake cloud invented)."""
    connect = socket.socket.connect
    connect_ex = socket.socket.connect_ex

    def guarded(sock: socket.socket, address: Any) -> Any:
        if not is_loopback(address):
            raise ConnectionRefusedError(f"test guard: no connection to {address!r}")
        return connect(sock, address)

    def guarded_ex(sock: socket.socket, address: Any) -> Any:
        if not is_loopback(address):
            raise ConnectionRefusedError(f"test guard: no connection to {address!r}")
        return connect_ex(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.setattr(socket.socket, "connect_ex", guarded_ex)


@contextlib.contextmanager
def moto_cloud(monkeypatch: pytest.MonkeyPatch) -> Iterator[MotoEc2]:
    """moto's EC2/SSM/IAM server on 127.0.0.1, stopped and emptied on the way out, however
    the test ends (use it in a fixture)."""
    # boto3 under test reads its credentials and region the ordinary way; none of them real
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key.upper(), value)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/bigexec-test-aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/bigexec-test-aws-creds")
    # a stray call to the instance metadata service would leave loopback: forbid it
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    refuse_non_loopback(monkeypatch)
    throttle = throttled_app()
    server = bind_server(throttle)
    # a short poll: shutting the server down waits for one, and every test does it
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              name="moto", daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        ec2 = boto3.session.Session(region_name=REGION, **CREDENTIALS).client(
            "ec2", endpoint_url=url)
        vpc, subnet = create_network(ec2)
        yield MotoEc2(endpoint_url=url, subnet_id=subnet, vpc_id=vpc, throttle=throttle)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
        reset_backends()


def throttled_app() -> Throttle:
    """moto's WSGI app (every service it has) behind a Throttle."""
    return Throttle(moto_app.DomainDispatcherApplication(moto_app.create_backend_app))


def bind_server(app: Any, host: str = "127.0.0.1") -> Any:
    """A threaded werkzeug server for ``app``, listening on a free port of ``host`` in the
    calling thread's network namespace (serve it with ``serve_forever`` from any thread)."""
    return make_server(host, 0, app, threaded=True, request_handler=moto_app.MotoRequestHandler)


#: The subnet every test instance gets its private address from (no public address).
SUBNET_CIDR = "10.200.0.0/24"


def create_network(ec2: Any) -> tuple[str, str]:
    """A VPC and the SUBNET_CIDR subnet in it, through the API: (vpc id, subnet id)."""
    vpc = ec2.create_vpc(CidrBlock="10.200.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock=SUBNET_CIDR)["Subnet"]["SubnetId"]
    return vpc, subnet


def reset_backends() -> None:
    """Empty moto's in-process backends: the next test starts from an empty cloud."""
    from moto.core.base_backend import BackendDict

    BackendDict.reset()
