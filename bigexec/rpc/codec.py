"""Message encoding: pickle protocol 5 with out-of-band buffers.

A message is one pickle plus the large buffers it refers to, laid out so that the sender can
hand each piece to the socket without joining them and the receiver can unpickle straight from
the buffer it read into::

    u32 n                       number of out-of-band buffers
    u64 len[0] .. len[n]        length of the pickle, then of each buffer (top bit: the
                                buffer becomes a ``bytes`` object)
    pickle bytes
    buffer 0 .. buffer n-1

A receiver that reads a message off a socket with ``read`` puts each buffer marked ``bytes``
straight into the ``bytes`` object it becomes (on CPython): a large ``bytes`` argument or
result is then never copied in memory on its way, only encrypted and decrypted.

Large ``bytes``, ``bytearray`` and ``memoryview`` values (and anything else that supports
protocol 5 out-of-band pickling, such as NumPy arrays) travel as separate buffers, so the
sender does not copy them into the pickle stream. The pickler never asks ``reducer_override``
about exact ``bytes`` and ``bytearray`` (its fast path), so large ones found in the message's
top levels (the value itself and the items of tuples, lists and dicts in it, two levels down)
are swapped for a stand-in that reduces to an out-of-band buffer. Code (functions, classes
from ``__main__``, closures) is pickled by value with cloudpickle, keeping the file names of
its code objects (which cloudpickle replaces); functions from one module share one namespace
on the receiving machine (see ``bigexec.namespaces``).
"""

from __future__ import annotations

import ctypes
import io
import pickle
import struct
import sys
import types
from collections import ChainMap
from collections.abc import Callable, Iterator
from typing import Any, cast

import cloudpickle  # no type hints, nor stubs: see pyproject.toml [tool.mypy]

from .. import namespaces

__all__ = ["EncodeError", "DecodeError", "Encoded", "Message", "PLAIN_TYPES", "dumps", "loads",
           "dumps_bytes", "named", "read", "read_buffer", "read_into", "register_plain_type"]

_OOB_MIN = 64 * 1024  # below this an extra buffer costs more than the copy it saves
_WALK_MAX = 256  # containers longer than this are not searched for large bytes
_CONTAINERS = (tuple, list, dict)
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_BYTES_FLAG = 1 << 63  # in a buffer's length: it becomes bytes


class Encoded:
    """A message already encoded by ``dumps``. A method that returns one has its pieces sent
    as they are: the caller decodes the value inside, and large buffers are never joined."""

    __slots__ = ("pieces",)

    def __init__(self, pieces: list[Any]) -> None:
        self.pieces = pieces


class EncodeError(TypeError):
    """A value could not be pickled; nothing was sent."""

    @property
    def raised(self) -> BaseException:
        """What pickling itself raised (the standard library's pools report that), or this
        error when there was nothing under it."""
        return self.__cause__ or self


class DecodeError(ValueError):
    """A message could not be unpickled."""


def _bytes_from_buffer(buf: Any) -> bytes:
    return buf if type(buf) is bytes else bytes(buf)  # bytes: read into by ``read``


def _bytearray_from_buffer(buf: Any) -> bytearray:
    return bytearray(buf)


class _LargeBytes:
    """Stands in for a large ``bytes`` or ``bytearray`` so that it is pickled out of band."""

    __slots__ = ("data",)

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = data


_BUSY = object()


def _swap_large(obj: Any, depth: int, memo: dict[int, Any]) -> Any:
    """``obj`` with its large bytes swapped for stand-ins, sharing and cycles kept.

    ``memo`` maps the id of every object seen to its replacement (itself when unchanged), so
    an object that appears twice is replaced by one object, and a large buffer used twice
    travels once.
    """
    t = type(obj)
    if t is bytes or t is bytearray:
        if len(obj) < _OOB_MIN:
            return obj
        hit = memo.get(id(obj))
        if hit is None:
            hit = memo[id(obj)] = _LargeBytes(obj)
        return hit
    if depth == 0 or t not in _CONTAINERS or len(obj) > _WALK_MAX:
        return obj
    hit = memo.get(id(obj))
    if hit is not None:
        return obj if hit is _BUSY else hit  # _BUSY: a cycle through a tuple; keep it as is
    if t is tuple:
        memo[id(obj)] = _BUSY
        items = [_swap_large(x, depth - 1, memo) for x in obj]
        new = tuple(items) if any(a is not b for a, b in zip(items, obj, strict=True)) else obj
    elif t is list:
        new = []
        memo[id(obj)] = new  # registered before the walk, so a cycle finds it
        new.extend(_swap_large(x, depth - 1, memo) for x in obj)
        if all(a is b for a, b in zip(new, obj, strict=True)):
            new = obj
    else:
        new = {}
        memo[id(obj)] = new
        for k, v in obj.items():
            new[k] = _swap_large(v, depth - 1, memo)
        if all(new[k] is v for k, v in obj.items()):
            new = obj
    memo[id(obj)] = new
    return new


# cloudpickle (from 3.1) writes every code object it copies with the file name
# "<dynamic-code>", so that a function's pickle does not depend on where it was defined. A
# machine would then profile, sample and trace back the driver's __main__ functions under that
# name. The pickle of a code object here carries its real file name too, put back once
# cloudpickle's own reduction has rebuilt it.
_cloudpickle_code_reduce = cloudpickle.Pickler.dispatch_table[types.CodeType]


def _code_in_file(make: Callable[..., types.CodeType], args: tuple, filename: str
                  ) -> types.CodeType:
    """A code object rebuilt by cloudpickle's ``make(*args)``, with the file it came from."""
    code = make(*args)
    return code if code.co_filename == filename else code.replace(co_filename=filename)


def _reduce_code(code: types.CodeType) -> Any:
    make, args = _cloudpickle_code_reduce(code)
    return _code_in_file, (make, args, code.co_filename)


class _Pickler(cloudpickle.Pickler):
    dispatch_table = ChainMap({types.CodeType: _reduce_code}, cloudpickle.Pickler.dispatch_table)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.to_bytes: list[pickle.PickleBuffer] = []  # the buffers _bytes_from_buffer takes
        self.namespace_keys: dict[int, Any] = {}  # for namespaces.share_globals

    def _buffer(self, ctor: Any, data: Any) -> Any:
        pb = pickle.PickleBuffer(data)
        if ctor is _bytes_from_buffer:
            self.to_bytes.append(pb)
        return ctor, (pb,)

    def reducer_override(self, obj: Any) -> Any:
        t = type(obj)
        if t is _LargeBytes:
            ctor = _bytearray_from_buffer if type(obj.data) is bytearray else _bytes_from_buffer
            return self._buffer(ctor, obj.data)
        if t is bytes or t is bytearray or t is memoryview:
            if len(obj) >= _OOB_MIN:
                view = memoryview(obj)
                if view.contiguous:
                    ctor = _bytearray_from_buffer if t is bytearray else _bytes_from_buffer
                    return self._buffer(ctor, view)
            if t is memoryview:
                return _bytes_from_buffer, (obj.tobytes(),)
            return NotImplemented
        if t is types.FunctionType:
            if obj in namespaces.PICKLED_BY_NAME or obj is _code_in_file:
                return NotImplemented
            # by value: into the module's namespace on the machine
            return namespaces.share_globals(obj, super().reducer_override(obj),
                                            self.namespace_keys)
        reduction = super().reducer_override(obj)
        if type(reduction) is tuple:  # a class by value: the machine's own copy
            return namespaces.place_class(reduction)
        return reduction


_SCALARS = frozenset({type(None), bool, int, float, complex, str})
_PLAIN_HEAD = struct.Struct("<IQ")
#: Types whose instances the C pickler encodes exactly as cloudpickle would; add to it with
#: ``register_plain_type``.
PLAIN_TYPES: set[type] = {types.BuiltinFunctionType}


def register_plain_type(cls: type) -> None:
    """Declare that the standard pickler alone encodes instances of exactly ``cls`` as
    cloudpickle would, so that ``dumps`` takes its fast path for messages made of them.

    Registering is a promise: ``cls`` pickles by name (an importable class whose
    ``__reduce__`` returns an importable callable and plain data), never by value. A wrong
    promise makes messages that a machine without the driver's modules cannot decode. Meant
    for bigexec's own modules, at import time (the set is read without a lock on every call).
    """
    if not named(cls):
        raise TypeError(f"{cls!r} is not importable by name: it cannot be a plain type")
    PLAIN_TYPES.add(cls)


def named(obj: Any) -> bool:
    """Whether pickle would name ``obj`` (module and qualified name), as cloudpickle does for
    importable functions and classes, rather than copy it by value."""
    module = getattr(obj, "__module__", None)
    if not module or module == "__main__" or module not in sys.modules:
        return False
    target: Any = sys.modules[module]
    for part in getattr(obj, "__qualname__", "<>").split("."):
        target = getattr(target, part, None)
        if target is None:
            return False
    return target is obj


def _is_plain(obj: Any, depth: int = 3) -> bool:
    """Small builtin data, importable functions and classes: the C pickler alone encodes them
    exactly as cloudpickle would."""
    t = type(obj)
    if t in _SCALARS or t in PLAIN_TYPES:
        return True
    if t is types.FunctionType or t is type:
        return named(obj)
    if t is bytes:
        return len(obj) < _OOB_MIN
    if depth and (t is tuple or t is list) and len(obj) <= 16:
        for x in obj:  # loops, not all(<genexpr>): this runs on every call, twice
            if not _is_plain(x, depth - 1):
                return False
        return True
    if depth and t is dict and len(obj) <= 16:
        for k, v in obj.items():
            if type(k) not in _SCALARS or not _is_plain(v, depth - 1):
                return False
        return True
    return False


def dumps(obj: Any) -> list[Any]:
    """Encode ``obj``; return the pieces of the message, ready for ``sendall`` in order."""
    if _is_plain(obj):  # the common small case: skip cloudpickle's set-up (a profile's advice)
        body = pickle.dumps(obj, protocol=5)
        return [_PLAIN_HEAD.pack(0, len(body)), body]
    buffers: list[pickle.PickleBuffer] = []
    out = io.BytesIO()
    pickler = _Pickler(out, protocol=5, buffer_callback=buffers.append)
    try:
        pickler.dump(_swap_large(obj, 3, {}))
    except Exception as exc:  # pickling runs user code: anything can come out of it
        raise EncodeError(f"cannot pickle {_describe(obj)}: {exc}") from exc
    # getvalue, not getbuffer: on CPython it hands over BytesIO's own bytes without a copy,
    # and a getbuffer view caught in a reference cycle (a failed call's pieces, held by its
    # traceback) crashes 3.12's garbage collector and makes 3.13's raise BufferError
    # (CPython gh-111049).
    body = out.getvalue()
    raws = [b.raw() for b in buffers]
    to_bytes = {id(b) for b in pickler.to_bytes}
    head = [_U32.pack(len(raws)), _U64.pack(len(body))]
    head.extend(_U64.pack(r.nbytes | (_BYTES_FLAG if id(b) in to_bytes else 0))
                for b, r in zip(buffers, raws, strict=True))
    return [b"".join(head), body, *raws]


def dumps_bytes(obj: Any) -> bytes:
    """Encode ``obj`` into one ``bytes`` object (for small, non-hot-path messages)."""
    return b"".join(bytes(p) for p in dumps(obj))


class Message:
    """A message as ``read`` took it off a connection: its pickle and its buffers apart."""

    __slots__ = ("body", "buffers", "nbytes")

    def __init__(self, body: bytearray, buffers: list[Any], nbytes: int) -> None:
        self.body = body
        self.buffers = buffers
        self.nbytes = nbytes

    def __len__(self) -> int:
        return self.nbytes


#: Bytes a receive allocates before any of them arrived; past it, its buffer grows as data
#: comes in (see ``read_buffer``), so a peer that declares a huge length and sends little costs
#: little memory.
RECEIVE_STEP = 1 << 20


class _GrowingBytes:
    """A new ``bytes`` object that grows in place as data is read into it (CPython only).

    The object is held by a raw pointer, its only reference, so ``_PyBytes_Resize`` (which a
    new, unshared bytes object allows) can grow it; that is ``realloc``, which for large blocks
    remaps pages instead of copying them, so a large message is still written once, where it
    ends up. ``take`` hands the object to Python.
    """

    __slots__ = ("ptr",)

    def __init__(self, n: int) -> None:
        self.ptr = ctypes.c_void_p(_PyBytes_New(None, n))

    def view(self, start: int, end: int) -> memoryview:
        """A writable view of bytes ``start`` to ``end`` of the contents."""
        addr = self.ptr.value + _BYTES_DATA + start  # type: ignore[operator]
        return _PyMemoryView_FromMemory(addr, end - start, _PyBUF_WRITE)

    def resize(self, n: int) -> None:
        _PyBytes_Resize(ctypes.byref(self.ptr), n)  # on failure: freed, ptr NULL, raises

    def take(self) -> bytes:
        obj = ctypes.cast(self.ptr, ctypes.py_object).value  # a new reference...
        self.release()  # ...and ours goes
        return obj

    def release(self) -> None:
        if self.ptr.value:
            _Py_DecRef(self.ptr)
            self.ptr = ctypes.c_void_p()


def _growing_bytes_work() -> bool:
    """Whether ``_GrowingBytes`` works on this interpreter (probed once, at import)."""
    probe = _GrowingBytes(8)
    try:
        probe.view(0, 8)[:] = b"bigexec-"
        probe.resize(16)
        probe.view(8, 16)[:] = b"bytes-ok"
        return probe.take() == b"bigexec-bytes-ok"
    finally:
        probe.release()


_BYTES_IN_PLACE = False
if sys.implementation.name == "cpython":
    try:
        _PyBytes_New = ctypes.pythonapi.PyBytes_FromStringAndSize
        _PyBytes_New.restype = ctypes.c_void_p  # a raw new reference: see _GrowingBytes
        _PyBytes_New.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
        _PyBytes_Resize = ctypes.pythonapi._PyBytes_Resize
        _PyBytes_Resize.restype = ctypes.c_int
        _PyBytes_Resize.argtypes = (ctypes.POINTER(ctypes.c_void_p), ctypes.c_ssize_t)
        _Py_DecRef = ctypes.pythonapi.Py_DecRef
        _Py_DecRef.restype = None
        _Py_DecRef.argtypes = (ctypes.c_void_p,)
        # not a ctypes array type per size: ctypes keeps every one it makes
        _PyMemoryView_FromMemory = ctypes.pythonapi.PyMemoryView_FromMemory
        _PyMemoryView_FromMemory.restype = ctypes.py_object
        _PyMemoryView_FromMemory.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int)
        _PyBUF_WRITE = 0x200
        _BYTES_DATA = bytes.__basicsize__ - 1  # offsetof(PyBytesObject, ob_sval)
        _BYTES_IN_PLACE = _growing_bytes_work()
    except Exception:  # no ctypes, or a layout we do not know: copy instead
        _BYTES_IN_PLACE = False


def read_into(readinto: Callable[[memoryview], int | None], view: memoryview,
              done: int = 0, total: int | None = None) -> None:
    """Fill ``view`` with ``readinto`` (a file's); ``EOFError`` if the data ends first.
    ``done`` and ``total`` (bytes read before ``view``, and in all) word that error."""
    got, n = 0, len(view)
    while got < n:
        k = readinto(view[got:])
        if not k:
            raise EOFError(f"connection closed after {done + got} of {total or n} bytes")
        got += k


def _steps(n: int) -> Iterator[int]:
    """The sizes a receive buffer of ``n`` bytes takes: ``RECEIVE_STEP``, then doubling."""
    size = min(n, RECEIVE_STEP)
    while True:
        yield size
        if size == n:
            return
        size = min(n, size * 2)


def read_buffer(readinto: Callable[[memoryview], int | None], n: int,
                as_bytes: bool = False) -> bytes | bytearray:
    """Read ``n`` bytes with ``readinto`` into a new ``bytearray`` (or ``bytes``); its memory
    grows with the data that arrives, from ``RECEIVE_STEP`` by doubling, never ahead of it.

    Growing is a ``realloc``, which remaps the pages of a large block rather than copying
    them, so a large message is written once, where it ends up (on CPython; elsewhere a
    ``bytes`` is copied once from the ``bytearray`` it was read into). ``EOFError`` if the
    data ends first.
    """
    if n <= RECEIVE_STEP and not as_bytes:  # most messages: one buffer, no growing
        small = bytearray(n)
        read_into(readinto, memoryview(small))
        return small
    if as_bytes and _BYTES_IN_PLACE and n:
        return _read_growing_bytes(readinto, n)
    buf = bytearray()
    done = 0
    for size in _steps(n):
        _grow_bytearray(buf, size)
        with memoryview(buf) as view:
            read_into(readinto, view[done:], done, n)
        done = size
    return bytes(buf) if as_bytes else buf


def _grow_bytearray_copying(buf: bytearray, n: int) -> None:
    buf.extend(bytes(n - len(buf)))


_grow_bytearray: Callable[[bytearray, int], None] = _grow_bytearray_copying
if sys.implementation.name == "cpython":
    try:
        _PyByteArray_Resize = ctypes.pythonapi.PyByteArray_Resize
        _PyByteArray_Resize.restype = ctypes.c_int
        _PyByteArray_Resize.argtypes = (ctypes.py_object, ctypes.c_ssize_t)

        def _grow_bytearray_in_place(buf: bytearray, n: int) -> None:
            """Grow ``buf`` to ``n`` bytes without writing the new ones (``realloc``)."""
            _PyByteArray_Resize(buf, n)

        _probe = bytearray(b"ok")
        _grow_bytearray_in_place(_probe, 3)
        if len(_probe) == 3 and _probe[:2] == b"ok":
            _grow_bytearray = _grow_bytearray_in_place
        del _probe
    except Exception:  # no ctypes: grow by appending zeros
        pass


def _read_growing_bytes(readinto: Callable[[memoryview], int | None], n: int) -> bytes:
    steps = _steps(n)
    size = next(steps)
    grow = _GrowingBytes(size)
    try:
        done = 0
        while True:
            read_into(readinto, grow.view(done, size), done, n)
            done = size
            size = next(steps, 0)
            if not size:
                return grow.take()
            grow.resize(size)
    finally:
        grow.release()


def read(readinto: Callable[[memoryview], int | None], length: int) -> bytearray | Message:
    """Read a message of ``length`` bytes with ``readinto`` (a file's); ``loads`` decodes it.

    Memory grows with the bytes that arrive (see ``read_buffer``), not with what ``length``
    or the message's header claim. Raises ``EOFError`` if the connection ends early,
    ``DecodeError`` if the message's header does not add up (the connection is then out of
    step and must be closed).
    """
    if length < _OOB_MIN:  # one buffer: no large buffers to place
        return cast(bytearray, read_buffer(readinto, length))
    (n,) = _U32.unpack(read_buffer(readinto, 4))
    if 4 + 8 * (n + 1) > length:
        raise DecodeError(f"a message of {length} bytes cannot hold {n} buffers")
    lens_raw = read_buffer(readinto, 8 * (n + 1))
    lens = [ln for (ln,) in _U64.iter_unpack(lens_raw)]
    if 4 + len(lens_raw) + sum(ln & ~_BYTES_FLAG for ln in lens) != length:
        raise DecodeError(f"message length {length} does not match its header")
    body = cast(bytearray, read_buffer(readinto, lens[0]))
    # writable unless marked bytes, as the sender's buffer was (a NumPy array's)
    buffers = [read_buffer(readinto, ln & ~_BYTES_FLAG, as_bytes=bool(ln & _BYTES_FLAG))
               for ln in lens[1:]]
    return Message(body, buffers, length)


def loads(data: Any) -> Any:
    """Decode a message produced by ``dumps``, from ``read`` or a bytes-like object (which is
    not copied)."""
    if type(data) is Message:
        try:
            return pickle.loads(data.body, buffers=data.buffers)
        except Exception as exc:
            raise DecodeError(f"cannot unpickle message: {exc!r}") from exc
    view = memoryview(data)
    try:
        (n,) = _U32.unpack_from(view, 0)
        pos = 4
        lens = []
        for _ in range(n + 1):
            lens.append(_U64.unpack_from(view, pos)[0] & ~_BYTES_FLAG)
            pos += 8
        body = view[pos : pos + lens[0]]
        pos += lens[0]
        bufs = []
        for ln in lens[1:]:
            bufs.append(view[pos : pos + ln])
            pos += ln
        if pos != len(view):
            raise DecodeError(f"message length {len(view)} does not match its header ({pos})")
    except struct.error as exc:
        raise DecodeError(f"truncated message header: {exc}") from exc
    try:
        return pickle.loads(body, buffers=bufs)
    except DecodeError:
        raise
    except Exception as exc:
        raise DecodeError(f"cannot unpickle message: {exc!r}") from exc


def _describe(obj: Any) -> str:
    try:
        r = repr(obj)
    except Exception:
        r = f"<{type(obj).__qualname__}>"
    return r if len(r) <= 80 else r[:77] + "..."
