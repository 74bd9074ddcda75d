"""One instance's metadata service (IMDSv2) for the ec2 test world, served by the test process.

EC2 answers an instance at 169.254.169.254:80. The world binds this server there inside the
instance's own network namespace (so each instance sees its own id); a unit test may bind it
on loopback. It speaks the part of IMDSv2 that bigexec's agent and a spot-aware driver use:

    PUT /latest/api/token                       a session token (needs the TTL header)
    GET /latest/meta-data/instance-id            with the token; 401 without it, as EC2
    GET /latest/meta-data/local-ipv4
    GET /latest/meta-data/instance-type
    GET /latest/meta-data/spot/instance-action   404 until ``interrupt()``, then EC2's JSON
    GET /latest/dynamic/instance-identity/document
"""

from __future__ import annotations

import datetime
import json
import secrets
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import TCPServer
from typing import Any

__all__ = ["FakeImds", "InstanceMetadata"]

_TOKEN_PATH = "/latest/api/token"
_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
_TOKEN_HEADER = "X-aws-ec2-metadata-token"
_MAX_TTL = 21600  # EC2 refuses longer tokens
#: How far ahead EC2's spot interruption notice names the instance's end.
SPOT_NOTICE_SECONDS = 120


@dataclass(frozen=True)
class InstanceMetadata:
    """What the service says about its instance."""

    instance_id: str
    private_ip: str = ""
    instance_type: str = ""
    image_id: str = ""
    region: str = ""
    availability_zone: str = ""
    account_id: str = ""

    def identity_document(self) -> dict[str, Any]:
        return {"instanceId": self.instance_id, "privateIp": self.private_ip,
                "instanceType": self.instance_type, "imageId": self.image_id,
                "region": self.region, "availabilityZone": self.availability_zone,
                "accountId": self.account_id, "architecture": "x86_64"}


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self) -> None:
        # HTTPServer's own asks DNS for the host's name (getfqdn): inside an instance's
        # namespace that is a query to nowhere, seconds of timeouts; the name is not needed
        TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


class FakeImds:
    """The server, bound (listening) when constructed: construct it in a thread that entered
    the instance's namespace, then ``start()`` it from anywhere. ``close()`` when done."""

    def __init__(self, metadata: InstanceMetadata, host: str = "169.254.169.254",
                 port: int = 80) -> None:
        self.metadata = metadata
        self._lock = threading.Lock()
        self._tokens: dict[str, float] = {}  # token -> expiry (monotonic)
        self._spot_action: dict[str, str] | None = None
        #: (method, path, status) of every request answered, for tests.
        self.requests: list[tuple[str, str, int]] = []
        self._server = _Server((host, port), self._handler_class())
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{host}:{port}"

    def start(self) -> FakeImds:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
            name=f"imds-{self.metadata.instance_id}", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(10)
        self._server.server_close()

    def interrupt(self, action: str = "terminate", seconds_ahead: float = SPOT_NOTICE_SECONDS
                  ) -> dict[str, str]:
        """Post a spot interruption notice, as EC2 does about two minutes before it acts."""
        when = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(
            seconds=seconds_ahead)
        notice = {"action": action, "time": when.strftime("%Y-%m-%dT%H:%M:%SZ")}
        with self._lock:
            self._spot_action = notice
        return notice

    # --- the protocol --------------------------------------------------------------------

    def _new_token(self, ttl_header: str | None) -> tuple[int, str]:
        try:
            ttl = int(ttl_header or "")
        except ValueError:
            return 400, "missing or invalid X-aws-ec2-metadata-token-ttl-seconds"
        if not 1 <= ttl <= _MAX_TTL:
            return 400, "X-aws-ec2-metadata-token-ttl-seconds out of range"
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[token] = time.monotonic() + ttl
        return 200, token

    def _valid(self, token: str | None) -> bool:
        with self._lock:
            expiry = self._tokens.get(token or "")
        return expiry is not None and time.monotonic() < expiry

    def _get(self, path: str) -> tuple[int, str]:
        m = self.metadata
        with self._lock:
            spot = self._spot_action
        answers = {
            "/latest/meta-data/instance-id": m.instance_id,
            "/latest/meta-data/local-ipv4": m.private_ip,
            "/latest/meta-data/instance-type": m.instance_type,
            "/latest/dynamic/instance-identity/document": json.dumps(
                m.identity_document(), indent=2),
        }
        if spot is not None:
            answers["/latest/meta-data/spot/instance-action"] = json.dumps(spot)
        if path in answers:
            return 200, answers[path]
        return 404, "Not Found"

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        service = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "EC2ws"
            protocol_version = "HTTP/1.1"

            def _answer(self, status: int, text: str) -> None:
                body = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                with service._lock:
                    service.requests.append((self.command, self.path, status))

            def do_PUT(self) -> None:  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                if self.path != _TOKEN_PATH:
                    self._answer(404, "Not Found")
                    return
                self._answer(*service._new_token(self.headers.get(_TTL_HEADER)))

            def do_GET(self) -> None:  # noqa: N802
                if not service._valid(self.headers.get(_TOKEN_HEADER)):
                    self._answer(401, "Unauthorized")  # IMDSv2 only, as bigexec asks it
                    return
                self._answer(*service._get(self.path))

            def log_message(self, format: str, *args: Any) -> None:
                pass  # the requests list is the log

        return Handler
