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
  an initializer's state survives. A change the driver makes in place (``CONF["k"] = v``) is
  no rebinding and is not seen, as under ``fork``: rebind the name (``CONF = {**CONF, "k":
  v}``) to ship it. Rebinding a name to an equal immutable value (``N = 5`` again) may go
  unnoticed too: the machine keeps what it has.
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

Classes copied by value (their methods are functions) follow: a machine's place keeps its own
copy of each, and a class the driver defined is never overwritten when one of its instances
comes back (cloudpickle alone would reset the driver's class to the machine's copy).

This relies on cloudpickle's reductions: of a function (``_make_function`` with newargs
``(code, base globals, name, defaults, closure)``, state ``(dict, slotstate)`` with
``slotstate["__globals__"]``, set by ``_function_setstate``) and of a class
(``_make_skeleton_class`` with a tracker id, set by ``_class_setstate``; the tracker
``_DYNAMIC_CLASS_TRACKER_BY_CLASS``). ``_check_cloudpickle`` verifies those shapes at import
and fails with a clear message if a cloudpickle release changed them.
"""

from __future__ import annotations

import itertools
import os
import threading
import types
import weakref
from typing import Any

import cloudpickle
import cloudpickle.cloudpickle as _cp

__all__ = ["Namespaces", "process_namespaces", "current", "set_current", "share_globals",
           "place_class", "PICKLED_BY_NAME"]

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
        self._classes: dict[str, type] = {}  # cloudpickle's class tracker ids -> our copies
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

    def class_for(self, tracker_id: str, skeleton: type) -> type:
        """This place's copy of the class ``tracker_id`` (``skeleton`` the first time)."""
        with self._lock:
            if self._closed:
                return skeleton
            return self._classes.setdefault(tracker_id, skeleton)

    def close(self) -> None:
        """Forget every namespace (the machine stopped), so that they can be collected."""
        with self._lock:
            self._closed = True
            spaces, self._spaces = self._spaces, {}
            self._classes.clear()
        for ns, _ in spaces.values():
            _bindings.forget_globals(id(ns))


_process = Namespaces()
_local = threading.local()


def process_namespaces() -> Namespaces:
    """The process's place: the driver's, or a ``local`` machine's (one machine a process)."""
    return _process


def current() -> Namespaces:
    """The place the current thread unpickles into."""
    place = getattr(_local, "place", None)
    return _process if place is None else place


def set_current(place: Namespaces | None) -> None:
    """Mark the current thread as working for ``place`` (None: for the process)."""
    _local.place = place


# --- the pickling side (codec's pickler) and what it unpickles into ------------------------


def _make_shared_function(code: types.CodeType, key: Key, base: dict[str, Any], name: Any,
                          argdefs: Any, closure: Any) -> types.FunctionType:
    """cloudpickle's ``_make_function``, in the place's namespace of ``key``."""
    return _cp._make_function(code, current().namespace(key, base), name, argdefs, closure)


def _set_function_state(fn: types.FunctionType, state: Any) -> None:
    cp_state, key, tokens = state
    slotstate = cp_state[1]
    values = slotstate["__globals__"]
    slotstate["__globals__"] = {}
    current().bind(key, fn.__globals__, values, tokens)
    _function_setstate(fn, cp_state)


def share_globals(fn: types.FunctionType, reduction: Any, keys: dict[int, Key]) -> Any:
    """cloudpickle's ``reduction`` of ``fn``, made to unpickle into the shared namespace.

    ``keys`` is the pickler's own (one key object per globals dict, which the pickle then
    memoizes). A reduction of another shape (``fn`` pickled by reference) is returned as it is.
    """
    if (type(reduction) is not tuple or len(reduction) != 6
            or reduction[5] is not _function_setstate):
        return reduction
    _, (code, base, name, argdefs, closure), state, items, pairs, _ = reduction
    gid = id(fn.__globals__)
    key = keys.get(gid)
    if key is None:
        key = keys[gid] = (_sender, gid)
    tokens = _bindings.tokens(gid, state[1]["__globals__"])
    return (_make_shared_function, (code, key, base, name, argdefs, closure),
            (state, key, tokens), items, pairs, _set_function_state)


# --- classes: one copy per place, and the driver's own classes left as they are ------------
#
# cloudpickle tracks the classes it copies by an id, process-wide, so that a class unpickled
# twice is one class; and it sets a class's attributes again at every unpickling, even on the
# class it found. Two consequences: on ``threads`` every machine would share one copy (whose
# methods read the namespace of whichever machine unpickled it last), and the driver's own
# class, found by its id when a task returns an instance, would get the machine's methods.
# So a machine's place keeps copies of its own, and a class this process defined itself is
# never overwritten.

_received: weakref.WeakSet[type] = weakref.WeakSet()  # the classes unpickled, not defined, here


def _make_class(type_constructor: Any, name: str, bases: tuple, type_kwargs: dict,
                tracker_id: str | None, extra: Any) -> type:
    skeleton = _cp._make_skeleton_class(type_constructor, name, bases, type_kwargs, None, extra)
    place = current()
    if tracker_id is None:
        cls = skeleton
    elif place is _process:
        cls = _cp._lookup_class_or_track(tracker_id, skeleton)
    else:
        cls = place.class_for(tracker_id, skeleton)
        if cls is skeleton:  # pickled again from here, it keeps its id
            with _cp._DYNAMIC_CLASS_TRACKER_LOCK:
                _cp._DYNAMIC_CLASS_TRACKER_BY_CLASS[cls] = tracker_id
    if cls is skeleton:
        _received.add(cls)
    return cls


def _set_class_state(cls: type, state: Any) -> None:
    if cls in _received:  # else: this process's own class (the driver's), left as it is
        _class_setstate(cls, state)


def place_class(reduction: Any) -> Any:
    """cloudpickle's ``reduction`` of a class it copies, made to unpickle into the place's
    own copy; any other reduction is returned as it is."""
    if (type(reduction) is tuple and len(reduction) == 6
            and reduction[0] is _cp._make_skeleton_class and reduction[5] is _class_setstate):
        return (_make_class, *reduction[1:5], _set_class_state)
    return reduction


def _check_cloudpickle() -> tuple[Any, Any]:
    """cloudpickle's ``_function_setstate`` and ``_class_setstate``, once probes show that
    its reductions have the shapes ``share_globals`` and ``place_class`` rewrite; ImportError
    naming the installed version otherwise."""
    import io

    version = getattr(cloudpickle, "__version__", "?")
    why = "its reduction of a function or a class has another shape"
    try:
        probe_globals: dict[str, Any] = {"__name__": "bigexec_probe_module", "X": 1}
        exec("def probe():\n    return X\nclass Probe:\n    pass\n", probe_globals)
        pickler = cloudpickle.Pickler(io.BytesIO())
        make, newargs, state, _, _, setter = pickler.reducer_override(probe_globals["probe"])
        ok = (make is _cp._make_function and len(newargs) == 5 and type(newargs[1]) is dict
              and state[1]["__globals__"] == {"X": 1} and setter is _cp._function_setstate)
        make, cargs, _, _, _, csetter = pickler.reducer_override(probe_globals["Probe"])
        ok = ok and (make is _cp._make_skeleton_class and len(cargs) == 6
                     and type(cargs[4]) is str and csetter is _cp._class_setstate
                     and callable(_cp._lookup_class_or_track)
                     and isinstance(_cp._DYNAMIC_CLASS_TRACKER_BY_CLASS,
                                    weakref.WeakKeyDictionary)
                     and hasattr(_cp._DYNAMIC_CLASS_TRACKER_LOCK, "acquire"))
    except Exception as exc:  # any other shape: the same verdict
        ok, why = False, f"{type(exc).__name__}: {exc}"
    if not ok:
        raise ImportError(
            f"bigexec needs cloudpickle's function and class reductions as in cloudpickle "
            f"3.0 to 3.1 (installed: {version}; {why}): install a cloudpickle in that range")
    return _cp._function_setstate, _cp._class_setstate


_function_setstate, _class_setstate = _check_cloudpickle()

#: Functions every pickle of code names (ours and cloudpickle's): the pickler can name them
#: at once, without asking cloudpickle whether they are importable.
PICKLED_BY_NAME = frozenset(
    f for f in (_make_shared_function, _set_function_state, _make_class, _set_class_state,
                _function_setstate, _class_setstate, _cp._make_function,
                _cp._make_skeleton_class, getattr(_cp, "_builtin_type", None),
                getattr(_cp, "_make_empty_cell", None), getattr(_cp, "_make_cell", None))
    if f is not None)
