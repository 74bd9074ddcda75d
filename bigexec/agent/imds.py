"""The instance metadata service (IMDSv2): the instance's id, and spot interruption notices.

IMDSv2 wants a session token first (a PUT, which a forwarded or proxied request cannot make
by accident), then answers GETs that carry it. Only an agent whose document names no instance
asks it (one on a real instance, or in a test's namespace with its own metadata server on
169.254.169.254): an agent given its instance id never calls it, so a test on the host can
never send a packet towards 169.254.169.254.

Spot interruption notice: ``/latest/meta-data/spot/instance-action`` answers 404 until EC2
decides to reclaim the instance, then ``{"action": "terminate"|"stop"|"hibernate",
"time": "2026-12-01T18:02:00Z"}``, about two minutes before it acts.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

__all__ = ["ENDPOINT_VARIABLE", "METADATA_HOST", "Metadata", "instance_id"]

METADATA_HOST = "169.254.169.254"
_TOKEN_TTL_SECONDS = 21600


#: Names another endpoint for the service, as in AWS's own SDKs (``http://HOST:PORT/``).
ENDPOINT_VARIABLE = "AWS_EC2_METADATA_SERVICE_ENDPOINT"


class Metadata:
    """One instance's metadata service, with its IMDSv2 token cached until near its end.
    ``host`` (``HOST`` or ``HOST:PORT``) defaults to the endpoint ``ENDPOINT_VARIABLE`` names,
    else 169.254.169.254."""

    def __init__(self, host: str | None = None, timeout: float = 5.0) -> None:
        if host is None:
            endpoint = os.environ.get(ENDPOINT_VARIABLE, "").strip()
            host = urllib.parse.urlsplit(endpoint).netloc if endpoint else METADATA_HOST
        self.base = f"http://{host}/latest"
        self.timeout = timeout
        self._token = ""
        self._token_until = 0.0

    def _fresh_token(self) -> str:
        if time.monotonic() >= self._token_until:
            request = urllib.request.Request(
                f"{self.base}/api/token", method="PUT",
                headers={"X-aws-ec2-metadata-token-ttl-seconds": str(_TOKEN_TTL_SECONDS)})
            with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                self._token = reply.read().decode("ascii").strip()
            self._token_until = time.monotonic() + _TOKEN_TTL_SECONDS / 2
        return self._token

    def get(self, path: str) -> str | None:
        """The text at ``/latest/meta-data/<path>``; None when the service answers 404."""
        request = urllib.request.Request(f"{self.base}/meta-data/{path}",
                                         headers={"X-aws-ec2-metadata-token":
                                                  self._fresh_token()})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                return str(reply.read().decode("utf-8", "replace"))
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            if exc.code == 401:  # the token expired early: the next call gets a new one
                self._token_until = 0.0
            raise

    def instance_id(self) -> str:
        """This instance's id; ValueError if the answer is not one."""
        found = (self.get("instance-id") or "").strip()
        if not found.startswith("i-"):
            raise ValueError(f"the metadata service gave no instance id but {found[:80]!r}")
        return found

    def spot_notice(self) -> dict[str, Any] | None:
        """EC2's interruption notice for this (spot) instance, or None while there is none."""
        text = self.get("spot/instance-action")
        if text is None:
            return None
        try:
            notice = json.loads(text)
        except ValueError:
            return {"action": "terminate", "time": None, "raw": text[:200]}
        return notice if isinstance(notice, dict) else {"action": "terminate", "time": None}


def instance_id(timeout: float = 5.0, host: str | None = None) -> str:
    """This instance's id, asked of the metadata service at ``host`` with an IMDSv2 token."""
    return Metadata(host, timeout).instance_id()
