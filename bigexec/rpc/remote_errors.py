"""How an exception travels from the machine that raised it to the caller.

An *error tuple* is a codec message of ``(type name, message, remote traceback, pickled
exception or None)``: the body of a 590 reply, and of an ``E`` frame that fails a stream. The
receiver rebuilds the exception when it unpickles, and a ``RemoteError`` of the type's name
and message when it does not, with the remote traceback as its cause either way.
"""

from __future__ import annotations

import traceback
from typing import Any

from ..errors import ProtocolError, RemoteError, RemoteTraceback
from . import codec

__all__ = ["decode_error", "encode_error"]


def encode_error(exc: BaseException) -> bytes:
    """The error tuple of ``exc``; never fails (an unpicklable exception travels by name)."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    t = type(exc)
    type_name = f"{t.__module__}.{t.__qualname__}"
    try:
        blob: bytes | None = codec.dumps_bytes(exc)
    except Exception:
        blob = None
    try:
        message = str(exc)
    except Exception:
        message = f"<unprintable {type_name}>"
    return codec.dumps_bytes((type_name, message, tb, blob))


def decode_error(data: Any, *, base_exceptions: bool = False) -> BaseException:
    """Rebuild the exception of an error tuple, with the remote traceback as its cause.

    Unless ``base_exceptions``, a ``BaseException`` that is not an ``Exception`` (SystemExit,
    KeyboardInterrupt) comes back as ``RemoteError``: it ended a remote method, not the caller.
    """
    try:
        type_name, message, tb, blob = codec.loads(data)
    except Exception as exc:
        return ProtocolError(f"undecodable remote error: {exc}")
    rebuilt: BaseException | None = None
    if blob is not None:
        try:
            rebuilt = codec.loads(blob)
        except Exception:
            rebuilt = None
    if not isinstance(rebuilt, Exception if not base_exceptions else BaseException):
        rebuilt = RemoteError(type_name, message, tb)
    rebuilt.__cause__ = RemoteTraceback(f'\n"""\n{tb}"""')
    try:  # an attribute the caller may read; some exception types refuse new attributes
        rebuilt.remote_traceback = tb  # type: ignore[attr-defined]
    except Exception:
        pass
    return rebuilt
