"""The instance metadata service (IMDSv2), for an agent whose document names no instance.

IMDSv2 wants a session token first (a PUT, which a forwarded or proxied request cannot make
by accident), then answers GETs that carry it. Only the agent on a real instance calls this:
tests always put the instance id in the document, and no test may reach 169.254.169.254.
"""

from __future__ import annotations

import urllib.request

__all__ = ["METADATA_HOST", "instance_id"]

METADATA_HOST = "169.254.169.254"
_TOKEN_TTL_SECONDS = 21600


def instance_id(timeout: float = 5.0, host: str = METADATA_HOST) -> str:
    """This instance's id, asked of the metadata service at ``host`` with an IMDSv2 token."""
    base = f"http://{host}/latest"
    token_request = urllib.request.Request(
        f"{base}/api/token", method="PUT",
        headers={"X-aws-ec2-metadata-token-ttl-seconds": str(_TOKEN_TTL_SECONDS)})
    with urllib.request.urlopen(token_request, timeout=timeout) as reply:
        token = reply.read().decode("ascii").strip()
    id_request = urllib.request.Request(f"{base}/meta-data/instance-id",
                                        headers={"X-aws-ec2-metadata-token": token})
    with urllib.request.urlopen(id_request, timeout=timeout) as reply:
        found = reply.read().decode("ascii").strip()
    if not found.startswith("i-"):
        raise ValueError(f"the metadata service gave no instance id but {found[:80]!r}")
    return found
