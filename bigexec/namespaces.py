"""One module namespace per machine for the functions a driver ships by value.

    driver (codec pickler)                              machine (unpickling a call)
    ──────────────────────                              ───────────────────────────
    f from __main__ (or any module cloudpickle          place = the Namespaces of the machine
    pickles by value), with the globals it reads:       serving this thread (else the process's)
      key   = (sender token, id(f.__globals__))  ────>  ns = place[key], made on first sight
      token = a serial per global name, new when        for each global: ns[name] = value only
              the driver bound the name to another      if the name is absent or its token
              object since it last shipped it           changed since this place last saw it
                                                        f.__globals__ is ns

Plain cloudpickle gives every unpickled function a globals dict of its own, so what an
initializer sets with ``global CONF; CONF = ...`` is never what a task reads. Here every
function shipped from one module of one sender shares one namespace on each machine, as under
``fork``:

- What a machine does to a global (an initializer's ``global X; X = ...``, or a change in place
  to a shipped list or dict) stands until the driver binds that name to another object; then
  the next function that reads it brings the driver's new value. A function redefined in the
  driver (a notebook cell run again) therefore reaches the machines on the next submit, while
  an initializer's state survives. Rebinding a name to an equal immutable value (``N = 5``
  again) may go unnoticed: the machine keeps what it has.
- Names only the machine defines (``global CONF`` in an initializer, with no ``CONF`` in the
  driver's module) are simply there for the tasks and the services' methods.
- A place is one machine: on ``local`` the worker process; on ``threads`` each
  ``MachineRuntime`` has its own, released when it stops; the driver's process decoding
  replies is one more place (the process's). ``set_current`` marks which place a thread works
  for (the RPC server does it for every connection it serves).
- The sender token is made at import and renewed in a forked child, so a fork of the driver
  is a new sender. To keep a token honest, the sender holds the object it last shipped under
  each name until it ships another (weakly when the object allows it; strongly for lists,
  dicts and other builtins, which cannot be weakly referenced): a freed object's ``id`` could
  otherwise come back as a "new" binding's.

This relies on cloudpickle's reduction of a function (``_make_function``, newargs with the base
globals dict second, state ``(dict, slotstate)`` with ``slotstate["__globals__"]``, set by
``_function_setstate``); ``_check_cloudpickle`` verifies that shape at import and fails with a
clear message if a cloudpickle release changed it.
"""

from __future__ import annotations

import itertools
import os
import threading
import types
import weakref
from typing import Any

import cloudpickle

__all__ = ["Namespaces", "process_namespaces", "current", "set_current", "share_globals"]

Key = tuple[str, int]


def _new_token() -> str:
    return os.urandom(8).hex()


_sender = _new_token()


def _renew_sender() -> None:
    global _sender
    _sender = _new_token()
    _bindings.forget()  # the child is a new sender: its serials start over with its token


class _Bindings:
    """The sender's side: a serial per (globals dict, name) that changes when the name is
    bound to another object than the one last shipped."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._serial = itertools.count(1)
        # id(globals) -> name -> (weak?, holder of the object last shipped, its serial)
        self._shipped: dict[int, dict[str, tuple[bool, Any, int]]] = {}

    def tokens(self, globals_id: int, values: dict[str, Any]) -> dict[str, int]:
        out: dict[str, int] = {}
        with self._lock:
            shipped = self._shipped.setdefault(globals_id, {})
            for name, value in values.items():
                hit = shipped.get(name)
                if hit is not None:
                    weak, holder, serial = hit
                    if (holder() if weak else holder) is value:
                        out[name] = serial
                        continue
                try:
                    entry: tuple[bool, Any, int] = (True, weakref.ref(value), next(self._serial))
                except TypeError:  # not weakly referenceable (list, dict, int, ...)
                    entry = (False, value, next(self._serial))
                shipped[name] = entry
                out[name] = entry[2]
        return out

    def forget(self) -> None:
        self._lock = threading.Lock()  # a fork may have copied it held
        self._shipped = {}

    def forget_globals(self, globals_id: int) -> None:
        """Drop what was shipped from a globals dict that is going away (a stopped machine's
        namespace, on ``threads``, pickled back in its replies)."""
        with self._lock:
            self._shipped.pop(globals_id, None)


_bindings = _Bindings()
os.register_at_fork(after_in_child=_renew_sender)


class Namespaces:
    """One place's namespaces: a dict per (sender, module) and the last token seen per name."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spaces: dict[Key, tuple[dict[str, Any], dict[str, int]]] = {}
        self._closed = False

    def namespace(self, key: Key, base: dict[str, Any]) -> dict[str, Any]:
        """The namespace of ``key``, made from ``base`` (the module's ``__name__`` and such)
        the first time."""
        with self._lock:
            hit = self._spaces.get(key)
            if hit is not None:
                return hit[0]
            ns = dict(base)
            if not self._closed:  # a late call on a stopped machine gets a namespace of its own
                self._spaces[key] = (ns, {})
            return ns

    def bind(self, key: Key, ns: dict[str, Any], values: dict[str, Any],
             tokens: dict[str, int]) -> None:
        """Put the shipped ``values`` into ``ns`` by the token rule (see the module's doc)."""
        with self._lock:
            hit = self._spaces.get(key)
            seen = hit[1] if hit is not None and hit[0] is ns else {}
            for name, value in values.items():
                token = tokens.get(name)
                if name not in ns or token is None or seen.get(name) != token:
                    ns[name] = value
                    if token is not None:
                        seen[name] = token

    def __len__(self) -> int:
        with self._lock:
            return len(self._spaces)

    def close(self) -> None:
        """Forget every namespace (the machine stopped), so that they can be collected."""
        with self._lock:
            self._closed = True
            spaces, self._spaces = self._spaces, {}
        for ns, _ in spaces.values():
            _bindings.forget_globals(id(ns))


_process = Namespaces()
_local = threading.local()


def process_namespaces() -> Namespaces:
    """The process's place: the driver's, or a ``local`` machine's (one machine a process)."""
    return _process


def current() -> Namespaces:
    """The place the current thread unpickles into."""
    return getattr(_local, "place", None) or _process


def set_current(place: Namespaces | None) -> None:
    """Mark the current thread as working for ``place`` (None: for the process)."""
    _local.place = place


# --- the pickling side (codec's pickler) and what it unpickles into ------------------------


def _namespace(key: Key, base: dict[str, Any]) -> dict[str, Any]:
    return current().namespace(key, base)


class _NamespaceRef:
    """Stands in for a function's base globals in its pickle: unpickles to the namespace."""

    __slots__ = ("key", "base")

    def __init__(self, key: Key, base: dict[str, Any]) -> None:
        self.key = key
        self.base = base

    def __reduce__(self) -> Any:
        return _namespace, (self.key, self.base)


def _set_function_state(fn: types.FunctionType, state: Any) -> None:
    cp_state, key, tokens = state
    slotstate = cp_state[1]
    values = slotstate["__globals__"]
    slotstate["__globals__"] = {}
    current().bind(key, fn.__globals__, values, tokens)
    _function_setstate(fn, cp_state)


def share_globals(fn: types.FunctionType, reduction: Any, refs: dict[int, _NamespaceRef]) -> Any:
    """cloudpickle's ``reduction`` of ``fn``, made to unpickle into the shared namespace.

    ``refs`` is the pickler's own (one stand-in per globals dict, so a pickle makes each
    namespace once). A reduction of another shape (``fn`` pickled by reference) is returned
    as it is.
    """
    if (type(reduction) is not tuple or len(reduction) != 6
            or reduction[5] is not _function_setstate):
        return reduction
    make, newargs, state, items, pairs, _ = reduction
    gid = id(fn.__globals__)
    ref = refs.get(gid)
    if ref is None:
        ref = refs[gid] = _NamespaceRef((_sender, gid), newargs[1])
    newargs = (newargs[0], ref, *newargs[2:])
    tokens = _bindings.tokens(gid, state[1]["__globals__"])
    return make, newargs, (state, ref.key, tokens), items, pairs, _set_function_state


def _check_cloudpickle() -> Any:
    """cloudpickle's ``_function_setstate``, once a probe shows the reduction has the shape
    ``share_globals`` rewrites; ImportError naming the version otherwise."""
    import io

    version = getattr(cloudpickle, "__version__", "?")
    try:
        setstate = cloudpickle.cloudpickle._function_setstate
        probe_globals: dict[str, Any] = {"__name__": "bigexec_probe_module", "X": 1}
        exec("def probe():\n    return X\n", probe_globals)
        probe = probe_globals["probe"]
        reduction = cloudpickle.Pickler(io.BytesIO())._dynamic_function_reduce(probe)
        make, newargs, state, _, _, setter = reduction
        ok = (setter is setstate and make is cloudpickle.cloudpickle._make_function
              and type(newargs[1]) is dict and state[1]["__globals__"] == {"X": 1})
    except Exception as exc:  # any other shape: the same verdict
        ok, why = False, f"{type(exc).__name__}: {exc}"
    else:
        why = "the reduction of a function has another shape"
    if not ok:
        raise ImportError(
            f"bigexec needs cloudpickle's function reduction as in cloudpickle 3.0 to 3.1 "
            f"(installed: {version}; {why}): install a cloudpickle in that range")
    return setstate


_function_setstate = _check_cloudpickle()
