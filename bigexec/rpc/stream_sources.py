"""Which values travel as byte streams, and how a sender reads them in chunks.

A call argument or a reply that is a binary file object or an iterator of bytes is sent as
a stream (see ``framing.send_stream``) instead of being pickled; the pickled arguments then
hold a ``StreamPlaceholder`` where it was, and the receiver puts a ``Stream`` there.
"""

from __future__ import annotations

import io
import types
from collections.abc import Iterator
from typing import Any

__all__ = ["NEVER_STREAMS", "STREAM_CHUNK", "StreamPlaceholder", "is_stream_source",
           "iter_source", "never_stream"]

#: Bytes a sender reads from a file object at a time.
STREAM_CHUNK = 1 << 20

#: Types whose values are never sent as a stream (a set lookup spares two ABC checks). Add to
#: it with ``never_stream``.
NEVER_STREAMS: set[type] = {type(None), bool, int, float, str, bytes, bytearray, memoryview,
                            tuple, list, dict, set, types.FunctionType,
                            types.BuiltinFunctionType, types.MethodType, type}


def never_stream(cls: type) -> None:
    """Declare that values of exactly ``cls`` are never sent as streams.

    Registering only spares ``is_stream_source`` its ABC checks for a type that is common in
    calls: it must not change the answer, so register only types that are neither file
    objects nor iterators. Meant for bigexec's own modules, at import time (the set is read
    without a lock on every call).
    """
    if isinstance(cls, type) and (issubclass(cls, io.IOBase) or issubclass(cls, Iterator)):
        raise TypeError(f"{cls.__qualname__} values are streams: they cannot be registered")
    NEVER_STREAMS.add(cls)


def is_stream_source(value: Any) -> bool:
    """Whether a call argument or reply is to be sent as a byte stream."""
    if type(value) in NEVER_STREAMS:
        return False
    if isinstance(value, io.IOBase):
        return True
    return isinstance(value, Iterator)


def iter_source(source: Any) -> Iterator[Any]:
    """The chunks of a stream source (a binary file object or an iterator of bytes);
    ``TypeError`` once it yields text or anything else that is not bytes-like."""
    if isinstance(source, io.IOBase) or (
        hasattr(source, "read") and not isinstance(source, Iterator)
    ):
        read = source.read
        while True:
            chunk = read(STREAM_CHUNK)
            if not chunk:
                return
            if isinstance(chunk, str):
                raise TypeError("stream sources must be binary: a text file object was given")
            yield chunk
    else:
        for chunk in source:
            if not isinstance(chunk, (bytes, bytearray, memoryview)):
                raise TypeError(
                    f"a streamed iterator must yield bytes, not {type(chunk).__name__}"
                )
            yield chunk


class StreamPlaceholder:
    """Stands in the pickled arguments for the argument that travels as a stream."""

    __slots__ = ()
