"""The TCP options every RPC connection gets, on either end."""

from __future__ import annotations

import socket

__all__ = ["KEEPALIVE_COUNT", "KEEPALIVE_IDLE", "KEEPALIVE_INTERVAL", "tune_socket"]

# TCP keepalive on every RPC connection: a peer whose host vanished (powered off, partitioned)
# sends no FIN, and a connection waiting on it would otherwise wait for ever. Probes start
# after KEEPALIVE_IDLE silent seconds and give up after KEEPALIVE_COUNT unanswered ones.
KEEPALIVE_IDLE = 30
KEEPALIVE_INTERVAL = 10
KEEPALIVE_COUNT = 3


def tune_socket(sock: socket.socket) -> None:
    """TCP_NODELAY (calls are small and latency-bound) and keepalive probes on ``sock``."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
                        ("TCP_KEEPCNT", KEEPALIVE_COUNT)):
        option = getattr(socket, name, None)  # Linux names; macOS lacks some of them
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
