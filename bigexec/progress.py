"""Progress bars over long work: ``bigexec.progress(x)``.

    futures / machines ── done callback, in the thread that finished each ──┐
                                                                            ├─> Progress ─> bar
    an iterator (as_completed, Executor.map, Pool.imap) ── the consumer's ──┘  (counts under
         thread, as each item is taken                                          one lock)

A collection of futures or machines is watched (``WatchedProgress``: callbacks count each
as it finishes, whoever iterates); any other iterable is counted as it is consumed
(``IteratedProgress``). ``progress``'s docstring says what each yields and how the bar is
drawn; a ``break``, an exception, ``close()`` or the garbage collector closes it.
"""

from __future__ import annotations

import logging
import operator
import sys
import threading
import time
import types
from collections.abc import Collection, Iterable, Iterator
from concurrent.futures import Future
from typing import Any

from .human import duration
from .machine import RUNNING, STOPPED, Machine

__all__ = ["LOG_INTERVAL", "IteratedProgress", "Progress", "WatchedProgress", "progress"]

log = logging.getLogger("bigexec.progress")

#: Seconds between two log lines of one bar with ``bar="log"`` (the first and last always go).
LOG_INTERVAL = 5.0

BARS = ("auto", "tqdm", "log", "none")


def progress(x: Iterable[Any], total: int | None = None, desc: str | None = None, *,
             bar: str = "auto") -> Progress:
    """A progress bar over ``x``, which it stands in for.

        fs = [ex.submit(f, i) for i in range(1000)]
        concurrent.futures.wait(bigexec.progress(fs, desc="f"))    # advances as each is done
        for f in bigexec.progress(as_completed(fs), total=len(fs)): ...
        results = list(bigexec.progress(ex.map(f, items)))         # or pool.imap(f, items)
        bigexec.progress(b.start(64), desc="booting").wait()       # machines up (or failed)

    Two kinds of input, told apart by what they are:

    * A collection of ``concurrent.futures.Future``s or of ``Machine``s (a list from ``submit``,
      what ``B.start`` returns): a ``WatchedProgress``. The bar advances as each future
      finishes, or as each machine reaches ``RUNNING`` (or stops without: a failure), whether or
      not anyone iterates. The wrapper stands in for the collection: iterating it yields the
      same items in their original order at once, without waiting, so
      ``concurrent.futures.wait(progress(fs))``, ``as_completed(progress(fs))`` and
      ``[f.result() for f in progress(fs)]`` block exactly as they would over ``fs``;
      ``progress(fs).wait(timeout)`` waits for all of them. (For completion order, wrap
      ``as_completed(fs)`` instead, with ``total=len(fs)``.)
    * Anything else iterable (``as_completed(...)``, ``Executor.map(...)``, ``Pool.imap(...)``,
      a list of values): an ``IteratedProgress``. Iterating it yields exactly what the input
      yields, in the same order, raising what the input raises; the bar advances as each item is
      taken. ``next(timeout)`` passes the timeout on to an input that takes one (``Pool.imap``'s
      ``IMapIterator``).

    The bar closes when the work ends (every future done; the input exhausted), on ``close()``,
    on leaving a ``with`` block, or when the wrapper is let go (a ``break`` out of a ``for``).
    The total is ``total=`` if given, else ``len(x)``, else ``operator.length_hint(x)`` when
    positive, else unknown (the bar counts without a percentage). Failures count among the
    done and are shown apart ("3 failed"): a future that raised or was cancelled, a machine
    that stopped with an ``err``, an exception the input raised (it passes through; the bar
    stays open while the input goes on, as ``Pool.imap`` does after a failed item). Nothing
    here waits beyond what the input waits: the callbacks only count.

    Where the bar goes (``bar=``): ``"tqdm"`` uses ``tqdm.auto`` (the ``progress`` extra
    installs it); ``"log"`` writes a line on the ``bigexec.progress`` logger at the start, at
    most every ``LOG_INTERVAL`` seconds as items arrive, and at the end ("desc: 40/100 (40%),
    12.3/s, ~5 s left"); ``"none"`` only counts. ``"auto"`` (the default) is ``"tqdm"`` when
    tqdm is installed and stderr is a terminal or the code runs in a notebook, else ``"log"``: a
    bar redrawn with carriage returns is noise in a file or a CI log.
    """
    if bar not in BARS:
        raise ValueError(f"bar must be one of {', '.join(map(repr, BARS))}, not {bar!r}")
    if total is not None and (not isinstance(total, int) or isinstance(total, bool)
                              or total < 0):
        raise ValueError(f"total must be a non-negative int or None, not {total!r}")
    if isinstance(x, (Future, Machine)):
        raise TypeError("progress takes a collection of futures or machines, not one: "
                        "wrap it in a list")
    if not isinstance(x, Iterable):
        raise TypeError(f"progress needs an iterable, not {type(x).__name__}")
    if isinstance(x, Collection) and not isinstance(x, (Iterator, str, bytes)):
        # (an empty one too: nothing to wait for, so it is done, and ``wait()`` returns)
        first = next(iter(x), None)
        if isinstance(first, (Future, Machine)) or not x:
            return WatchedProgress(list(x), total, desc, bar)
    if total is None:
        if isinstance(x, Collection):
            total = len(x)
        else:
            hint = operator.length_hint(x)
            total = hint if hint > 0 else None
    return IteratedProgress(x, total, desc, bar)


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    get = getattr(shell, "get_ipython", None)
    ip = get() if get is not None else None
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"


def _use_tqdm(bar: str) -> bool:
    if bar == "tqdm":
        return True
    if bar != "auto":
        return False
    isatty = getattr(sys.stderr, "isatty", None)
    if not (isatty is not None and isatty()) and not _in_notebook():
        return False  # asked first: importing tqdm takes a while, for nothing here
    try:
        import tqdm.auto  # noqa: F401
    except ImportError:
        return False
    return True


class Progress:
    """What both kinds of bar share: the counts, the display, and closing.

    ``n`` items are done, ``failed`` of them with an error; ``total`` is None when unknown;
    ``closed`` tells whether the bar has closed. A context manager: leaving the block closes
    the bar.
    """

    def __init__(self, total: int | None, desc: str | None, bar: str) -> None:
        self.total = total
        self.desc = desc
        self.n = 0
        self.failed = 0
        self.closed = True  # until the display is set up: nothing to close before
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._last_line = self._started
        self._tqdm: Any = None
        self._log = False
        if _use_tqdm(bar):
            try:
                import tqdm.auto
            except ImportError as exc:
                raise ImportError("bar='tqdm' needs tqdm: pip install 'bigexec[progress]'"
                                  ) from exc
            self._tqdm = tqdm.auto.tqdm(total=total, desc=desc)
        elif bar != "none":
            self._log = True
            log.info("%s", self._line(self._started))
        self.closed = False

    def _line(self, now: float, *, final: bool = False) -> str:
        elapsed = now - self._started
        head = f"{self.desc or 'progress'}: "
        if final and self.total is not None and self.n < self.total:
            head += "stopped at "
        if self.total:
            count = f"{self.n}/{self.total} ({100 * self.n // self.total}%)"
        elif self.total == 0:
            count = "0/0"
        else:
            count = f"{self.n}"
        parts = [head + count]
        if self.failed:
            parts.append(f"{self.failed} failed")
        if final:
            parts.append(f"in {duration(elapsed)}")
        rate = self.n / elapsed if elapsed > 0 else 0.0
        if self.n and rate > 0:
            parts.append(f"{rate:,.0f}/s" if rate >= 100 else f"{rate:.3g}/s")
            if not final and self.total is not None and self.n < self.total:
                parts.append(f"~{duration((self.total - self.n) / rate)} left")
        return ", ".join(parts)

    def _advance(self, failed: bool) -> bool:
        """Count one item; True once the last of a known total is counted."""
        with self._lock:
            if self.closed:
                return False
            self.n += 1
            if failed:
                self.failed += 1
            if self._tqdm is not None:
                if failed:
                    self._tqdm.set_postfix(failed=self.failed, refresh=False)
                self._tqdm.update(1)
            elif self._log:
                now = time.monotonic()
                if now - self._last_line >= LOG_INTERVAL:
                    self._last_line = now
                    log.info("%s", self._line(now))
            return self.total is not None and self.n >= self.total

    def close(self) -> None:
        """Close the bar (the log's last line). Idempotent."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            if self._tqdm is not None:
                self._tqdm.close()
            elif self._log:
                log.info("%s", self._line(time.monotonic(), final=True))

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # let go unfinished (a break out of a for loop): the bar must not stay open
        if not getattr(self, "closed", True):
            self.close()

    def __repr__(self) -> str:
        total = "?" if self.total is None else self.total
        state = " closed" if self.closed else ""
        return f"<bigexec.progress {self.desc or ''} {self.n}/{total}{state}>"


class WatchedProgress(Progress):
    """A bar over futures or machines that advances as each finishes (a future done, a
    machine ``RUNNING`` or ``STOPPED``); iterating yields the items at once, in their order.
    A failure is a future that raised or was cancelled, or a machine that stopped with an
    ``err``. The bar closes when the last is done."""

    def __init__(self, items: list[Any], total: int | None, desc: str | None,
                 bar: str) -> None:
        for item in items:
            if not isinstance(item, (Future, Machine)):
                raise TypeError(f"progress over futures or machines got a "
                                f"{type(item).__name__} among them")
        super().__init__(len(items) if total is None else total, desc, bar)
        self._items = items
        self._all_done = threading.Event()
        self._left = len(items)
        self._left_lock = threading.Lock()
        if not items:
            self._all_done.set()
            self.close()
        for item in items:
            # the callbacks hold this object, so that ``wait(progress(fs))`` keeps the bar
            # alive until the work ends
            if isinstance(item, Future):
                item.add_done_callback(self._future_done)
            else:
                item.on_state(RUNNING, self._machine_up)

    def _future_done(self, f: Future) -> None:
        self._one_done(f.cancelled() or f.exception() is not None)

    def _machine_up(self, m: Machine) -> None:
        self._one_done(m.state == STOPPED and m.err is not None)

    def _one_done(self, failed: bool) -> None:
        self._advance(failed)
        with self._left_lock:
            self._left -= 1
            last = self._left == 0
        if last:
            self.close()
            self._all_done.set()

    def __iter__(self) -> Iterator[Any]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, item: object) -> bool:
        return item in self._items

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every future is done or every machine is up or stopped; False if
        ``timeout`` seconds passed first."""
        return self._all_done.wait(timeout)


class IteratedProgress(Progress):
    """A bar over an iterator, advanced as each item is taken; yields exactly what the input
    does. An exception the input raises counts as a failed item and passes through; the bar
    closes when the input ends, or on ``close()`` (which also closes an input that has a
    ``close``: a generator, the iterator of ``Executor.map``, whose calls it cancels)."""

    def __init__(self, x: Iterable[Any], total: int | None, desc: str | None,
                 bar: str) -> None:
        self._it: Iterator[Any] | None = iter(x)
        super().__init__(total, desc, bar)

    def __iter__(self) -> IteratedProgress:
        return self

    def __next__(self) -> Any:
        return self.next()

    def next(self, timeout: float | None = None) -> Any:
        """The input's next item; ``timeout`` goes to an input whose ``next`` takes one
        (``IMapIterator``), and its ``multiprocessing.TimeoutError`` passes through."""
        it = self._it
        if it is None:
            raise StopIteration
        try:
            if timeout is None:
                item = next(it)
            else:
                take = getattr(it, "next", None)
                if take is None:
                    raise TypeError(f"a {type(it).__name__} takes no timeout")
                item = take(timeout)
        except StopIteration:
            self._it = None
            self.close()
            raise
        except Exception as exc:
            mp = sys.modules.get("multiprocessing")  # (not imported here: workers load this)
            if mp is not None and isinstance(exc, mp.TimeoutError):
                raise  # no item yet: nothing to count
            self._advance(True)
            # a generator that raised is over, as is an iterator that says so
            # (``Executor.map``'s: ``finished``)
            if ((isinstance(it, types.GeneratorType) and it.gi_frame is None)
                    or getattr(it, "finished", False) is True):
                self._it = None
                self.close()
            raise
        except BaseException:
            self.close()  # KeyboardInterrupt, GeneratorExit: the work is given up
            raise
        self._advance(False)
        return item

    def close(self) -> None:
        """Close the bar, and the input if it has a ``close``. Idempotent."""
        it, self._it = getattr(self, "_it", None), None
        super().close()
        closer = getattr(it, "close", None)
        if callable(closer):
            closer()
