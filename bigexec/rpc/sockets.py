"""RPC connections at the socket level, on either end: their TCP options, how a peer is
named in logs, and how a connection is closed (with a reset, or after a linger)."""

from __future__ import annotations

import socket
import struct
import time
from typing import Any

__all__ = ["KEEPALIVE_COUNT", "KEEPALIVE_IDLE", "KEEPALIVE_INTERVAL", "hard_close", "linger",
           "peer_name", "tune_socket"]

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


def peer_name(sock: socket.socket) -> str:
    """``host:port`` of the peer (``[host]:port`` for IPv6), for logs and refusals."""
    try:
        host, port = sock.getpeername()[:2]
    except (OSError, ValueError):
        return "an unknown peer"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def linger(sock: socket.socket, rfile: Any, seconds: float) -> None:
    """Close our side, then drop what the peer sends (read from ``rfile``, the socket's
    reader) until it closes or ``seconds`` pass: closing with unread data would reset the
    connection, and the peer could lose our answer."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_WR)
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if not rfile.read1(1 << 16):
                return
    except (OSError, ValueError):  # timed out, reset or closed: done either way
        pass


def hard_close(sock: socket.socket, abort: bool = True) -> None:
    """Close a connection, waking any thread blocked on it; ``abort``: with a reset.

    A connection dropped in the middle (a failure, the server closing, a test's "network
    drop") must be reset, not just shut down: its peer may be sending into a full receive
    window, and a socket shut down and closed with nothing left to read sends a FIN only,
    after which the peer's zero-window probes are answered for a minute (FIN-WAIT-2) while
    its upload hangs. A reset makes its next send fail at once.
    """
    if abort:
        try:  # SO_LINGER 0: close() resets the connection, whoever closes the descriptor last
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    # socket.socket.shutdown, not SSLSocket.shutdown: the latter tears down the SSL object
    # under a thread that may be blocked reading it.
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
