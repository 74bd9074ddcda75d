"""HTTP/1.1 message heads: the start line and headers of a request or a reply.

Heads are parsed by hand (the stdlib's ``email``-based parser costs more than the rest of a
call), strictly: at most ``MAX_HEADERS`` header lines and ``MAX_LINE`` bytes in all, a
``Content-Length`` of decimal digits only, and each header that frames the body at most once
(a second copy is how requests are smuggled). Also the status codes bigexec answers with.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ..errors import ProtocolError

__all__ = ["Head", "MAX_HEADERS", "MAX_LINE", "REASONS", "STATUS_APP_ERROR",
           "STATUS_TOO_LARGE", "parse_content_length", "parse_head", "read_head"]

#: The method raised; the body is an error tuple (see ``remote_errors``).
STATUS_APP_ERROR = 590
#: A message or a frame was over the receiver's limit (see ``framing.TooLargeError``).
STATUS_TOO_LARGE = 413
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           413: "Content Too Large", 500: "Internal Server Error", 590: "Application Error"}
MAX_LINE = 65536  # bytes in a line, and in a whole head
MAX_HEADERS = 64  # header lines in a head: bigexec sends fewer than ten
#: Headers that say where a body ends: a second copy of one is refused (request smuggling).
_FRAMING_HEADERS = ("content-length", "transfer-encoding")


class Head(NamedTuple):
    """A parsed head."""

    #: The start line's words: ``[verb, target, version]`` or ``[version, status, reason]``.
    start: list[str]
    #: The headers, names in lower case.
    headers: dict[str, str]


# Heads are made on every call, at both ends: tuple.__new__ straight away costs half of what
# the class's own __new__ (a Python function) does.
_new_tuple = tuple.__new__


def parse_content_length(text: str | None) -> int | None:
    """The value of a ``Content-Length`` header (None when absent); ``ProtocolError`` unless
    it is decimal digits only (``int`` would take signs, spaces and underscores)."""
    if text is None:
        return None
    if not (text.isascii() and text.isdigit()) or len(text) > 19:
        raise ProtocolError(f"bad Content-Length {text[:40]!r}")
    return int(text)


def parse_head(head: bytes) -> Head:
    """The start line's words and the headers (names in lower case) of a whole head, its
    blank line included; ``ProtocolError`` if it is malformed or over the limits."""
    if len(head) > MAX_LINE:
        raise ProtocolError(f"request head over {MAX_LINE} bytes")
    lines = head.decode("latin-1").split("\r\n")
    if len(lines) - 3 > MAX_HEADERS:  # the start line, the headers, then two empty strings
        raise ProtocolError(f"request head over {MAX_HEADERS} headers")
    headers: dict[str, str] = {}
    for line in lines[1:-2]:
        name, sep, value = line.partition(":")
        if not sep:
            raise ProtocolError(f"malformed header line {line[:80]!r}")
        _add_header(headers, name.strip().lower(), value.strip())
    return _new_tuple(Head, (lines[0].split(" ", 2), headers))


def _add_header(headers: dict[str, str], name: str, value: str) -> None:
    if name in headers and name in _FRAMING_HEADERS:
        raise ProtocolError(f"more than one {name} header")
    headers[name] = value


def read_head(rfile: Any) -> Head | None:
    """Read a start line and headers from a buffered binary file; None at a clean end of
    connection."""
    # Fast path: the whole head is usually in the buffer already; split it in one go.
    buffered = rfile.peek(MAX_LINE)
    end = buffered.find(b"\r\n\r\n")
    if end > MAX_LINE:
        raise ProtocolError(f"request head over {MAX_LINE} bytes")
    if end > 0 and not buffered.startswith(b"\r\n"):
        return parse_head(rfile.read(end + 4))
    line = rfile.readline(MAX_LINE)
    if not line:
        return None
    while line in (b"\r\n", b"\n"):  # tolerate stray blank lines between messages
        line = rfile.readline(MAX_LINE)
        if not line:
            return None
    if not line.endswith(b"\n"):
        raise ProtocolError("start line too long or truncated")
    start = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
    headers: dict[str, str] = {}
    size = len(line)
    while True:
        line = rfile.readline(MAX_LINE)
        if not line.endswith(b"\n"):
            raise ProtocolError("header line too long or truncated")
        if line in (b"\r\n", b"\n"):
            return _new_tuple(Head, (start, headers))
        size += len(line)
        if len(headers) >= MAX_HEADERS or size > MAX_LINE:
            raise ProtocolError(f"request head over {MAX_HEADERS} headers or {MAX_LINE} bytes")
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep:
            raise ProtocolError(f"malformed header line {line[:80]!r}")
        _add_header(headers, name.strip().lower(), value.strip())
