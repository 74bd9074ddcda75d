"""The HTTP/1.1 subset bigexec speaks: an overview, and its parts' names in one namespace.

Requests are ``POST /bigrpc/<Service>.<method>`` on persistent connections with TCP_NODELAY
and keepalive probes (``sockets``). A plain request or reply has a ``Content-Length`` body
holding one codec message; a streamed argument or reply is a chunked body of tagged frames
(``framing``), read on the receiving side as a ``Stream`` (``stream``). Which values stream
is ``stream_sources``' to say, and an exception travels as an error tuple
(``remote_errors``). Heads are parsed strictly and by hand (``heads``).

Status codes: 200 success, 590 the method raised (body: an error tuple), 400 malformed
request, 404 unknown service or method, 405 not POST, 413 a message or a frame over the
receiver's limit (``MAX_MESSAGE_BYTES``, ``MAX_CHUNK_BYTES``).

The client and the server use these names through this module (``wire.send_message``), so
that a test can replace one for both ends at once.
"""

from __future__ import annotations

from .framing import (
    END_FRAME,
    MAX_CHUNK_BYTES,
    MAX_MESSAGE_BYTES,
    STREAM_FRAME_MAX,
    TooLargeError,
    body_length,
    check_size,
    parse_chunk_size,
    read_chunk,
    read_exact,
    read_message,
    send_frame,
    send_message,
    send_stream,
)
from .heads import (
    MAX_HEADERS,
    MAX_LINE,
    REASONS,
    STATUS_APP_ERROR,
    STATUS_TOO_LARGE,
    Head,
    parse_content_length,
    parse_head,
    read_head,
)
from .remote_errors import decode_error, encode_error
from .sockets import KEEPALIVE_COUNT, KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, tune_socket
from .stream import Stream
from .stream_sources import (
    NEVER_STREAMS,
    STREAM_CHUNK,
    StreamPlaceholder,
    is_stream_source,
    iter_source,
    never_stream,
)

__all__ = [
    "END_FRAME", "KEEPALIVE_COUNT", "KEEPALIVE_IDLE", "KEEPALIVE_INTERVAL", "MAX_CHUNK_BYTES",
    "MAX_HEADERS", "MAX_LINE", "MAX_MESSAGE_BYTES", "NEVER_STREAMS", "REASONS",
    "STATUS_APP_ERROR", "STATUS_TOO_LARGE", "STREAM_CHUNK", "STREAM_FRAME_MAX", "Head",
    "Stream", "StreamPlaceholder", "TooLargeError", "body_length", "check_size",
    "decode_error", "encode_error", "is_stream_source", "iter_source", "never_stream",
    "parse_chunk_size", "parse_content_length", "parse_head", "read_chunk", "read_exact",
    "read_head", "read_message", "send_frame", "send_message", "send_stream", "tune_socket",
]
