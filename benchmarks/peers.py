"""Peers: one small adapter per executor, all with the same interface.

    adapter = make_peer("ppe-fork")
    adapter.start()                         # construct the executor (workers may start lazily)
    adapter.submit(fn, *args).result(t)     # one task; for mp.Pool apply_async, Dask submit
    list(adapter.map(fn, items, chunksize)) # in order
    adapter.shutdown()                      # stop every worker; idempotent

``make_peer`` raises ``NotInstalled`` when the peer's package cannot be imported.
"""

from __future__ import annotations

import concurrent.futures as cf
import importlib.util
import itertools
import logging
import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from . import tasks

WORKERS = 2

#: Executor-shaped peers, in table order. The first two are bigexec.
PEERS = [
    "bigexec-threads",
    "bigexec-local",
    "tpe",
    "ppe-fork",
    "ppe-spawn",
    "mp-pool",
    "loky",
    "dask",
]

LABELS = {
    "bigexec-threads": "bigexec threads",
    "bigexec-local": "bigexec local (mTLS)",
    "tpe": "ThreadPoolExecutor",
    "ppe-fork": "ProcessPoolExecutor fork",
    "ppe-spawn": "ProcessPoolExecutor spawn",
    "mp-pool": "multiprocessing.Pool (fork)",
    "loky": "loky",
    "dask": "Dask LocalCluster",
}

#: The reference of every "x PPE" ratio (the default start method on Linux, Python 3.11).
REFERENCE = "ppe-fork"

_REQUIRES = {"loky": "loky", "dask": "distributed"}


class NotInstalled(Exception):
    pass


class _Result:
    """Gives ``multiprocessing``'s ``AsyncResult`` the ``Future.result`` spelling."""

    __slots__ = ("_r",)

    def __init__(self, r: Any) -> None:
        self._r = r

    def result(self, timeout: float | None = None) -> Any:
        return self._r.get(timeout)


def _batched(items: Iterable[Any], n: int) -> Iterator[list[Any]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


class Peer:
    name = ""

    def start(self) -> None:
        raise NotImplementedError

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        raise NotImplementedError

    def map(self, fn: Callable[..., Any], items: Iterable[Any],
            chunksize: int = 1) -> Iterable[Any]:
        raise NotImplementedError

    def shutdown(self) -> None:
        raise NotImplementedError


class _ExecutorPeer(Peer):
    """Anything shaped like ``concurrent.futures.Executor``."""

    ex: Any = None

    def make(self) -> Any:
        raise NotImplementedError

    def start(self) -> None:
        self.ex = self.make()

    def submit(self, fn, *args):
        return self.ex.submit(fn, *args)

    def map(self, fn, items, chunksize=1):
        return self.ex.map(fn, items, chunksize=chunksize)

    def shutdown(self) -> None:
        ex, self.ex = self.ex, None
        if ex is not None:
            ex.shutdown(wait=True)


class BigexecPeer(_ExecutorPeer):
    def __init__(self, system: str) -> None:
        self.system = system
        self.name = f"bigexec-{system}"

    def make(self):
        import bigexec

        return bigexec.Executor(WORKERS, system=self.system)


class ThreadPeer(_ExecutorPeer):
    name = "tpe"

    def make(self):
        return cf.ThreadPoolExecutor(WORKERS)


class ProcessPeer(_ExecutorPeer):
    def __init__(self, method: str) -> None:
        self.method = method
        self.name = f"ppe-{method}"

    def make(self):
        return cf.ProcessPoolExecutor(WORKERS, mp_context=multiprocessing.get_context(self.method))


class LokyPeer(_ExecutorPeer):
    name = "loky"

    def make(self):
        import loky

        # a fresh executor, not loky's reusable singleton: start-up is measured every time
        return loky.ProcessPoolExecutor(max_workers=WORKERS)


class PoolPeer(Peer):
    name = "mp-pool"
    pool: Any = None

    def start(self) -> None:
        self.pool = multiprocessing.get_context("fork").Pool(WORKERS)

    def submit(self, fn, *args):
        return _Result(self.pool.apply_async(fn, args))

    def map(self, fn, items, chunksize=1):
        return self.pool.map(fn, items, chunksize)

    def shutdown(self) -> None:
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.close()
            pool.join()


class DaskPeer(Peer):
    name = "dask"
    client: Any = None
    cluster: Any = None

    def start(self) -> None:
        from distributed import Client, LocalCluster

        self.cluster = LocalCluster(n_workers=WORKERS, threads_per_worker=1, processes=True,
                                    dashboard_address=None, silence_logs=logging.ERROR)
        self.client = Client(self.cluster)

    def submit(self, fn, *args):
        return self.client.submit(fn, *args, pure=False)

    def map(self, fn, items, chunksize=1):
        if chunksize == 1:
            return self.client.gather(self.client.map(fn, list(items), pure=False))
        futs = [self.client.submit(tasks.apply_chunk, fn, c, pure=False)
                for c in _batched(items, chunksize)]
        return [x for chunk in self.client.gather(futs) for x in chunk]

    def shutdown(self) -> None:
        client, cluster = self.client, self.cluster
        self.client = self.cluster = None
        try:
            if client is not None:
                client.close()
        finally:
            if cluster is not None:
                cluster.close()


def installed(name: str) -> bool:
    mod = _REQUIRES.get(name)
    return mod is None or importlib.util.find_spec(mod) is not None


def make_peer(name: str) -> Peer:
    if not installed(name):
        raise NotInstalled(f"{name}: the {_REQUIRES[name]!r} package is not installed")
    if name.startswith("bigexec-"):
        return BigexecPeer(name.split("-", 1)[1])
    if name == "tpe":
        return ThreadPeer()
    if name.startswith("ppe-"):
        return ProcessPeer(name.split("-", 1)[1])
    if name == "mp-pool":
        return PoolPeer()
    if name == "loky":
        return LokyPeer()
    if name == "dask":
        return DaskPeer()
    raise ValueError(f"unknown peer {name!r}; known: {', '.join(PEERS)}")
