"""Noticing dead instances without blocking anyone: ``DeadInstanceMonitor``.

    suspect(id) ──> pending (returns at once)
    the monitor's thread: at most one DescribeInstances per interval, for every pending id
        ──> on_dead(id, state, reason), once per instance, for those shutting-down,
            terminated, stopping, stopped or unknown to EC2
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

from .instances import DEAD_STATES, InstanceRecord

__all__ = ["DeadInstanceMonitor"]

log = logging.getLogger("bigexec.systems.ec2")


class DeadInstanceMonitor:
    """Learns, from the EC2 API, which suspected instances are dead. ``suspect(id)`` (e.g. when
    a keepalive fails) returns at once; a thread of the monitor's own batches the suspects
    and calls ``describe`` (``Ec2Instances.describe``) at most once per ``interval`` seconds.
    An instance found in shutting-down, terminated, stopping or stopped, or unknown to EC2,
    is reported once through ``on_dead(instance_id, state, reason)``; others are dropped
    until suspected again."""

    def __init__(self, describe: Callable[[list[str]], list[InstanceRecord]],
                 on_dead: Callable[[str, str, str], None], *, interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._describe = describe
        self._on_dead = on_dead
        self._interval = interval
        self._clock = clock
        self._cond = threading.Condition()
        self._pending: dict[str, None] = {}
        self._reported: set[str] = set()
        self._closed = False
        self._last_call = -math.inf
        self.calls = 0
        self._thread = threading.Thread(target=self._run, name="bigexec-ec2-monitor",
                                        daemon=True)
        self._thread.start()

    def suspect(self, instance_id: str) -> None:
        with self._cond:
            if instance_id in self._reported or self._closed:
                return
            self._pending[instance_id] = None
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def __enter__(self) -> DeadInstanceMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _next_batch(self) -> list[str] | None:
        with self._cond:
            while True:
                if self._closed:
                    return None
                wait = self._last_call + self._interval - self._clock()
                if self._pending and wait <= 0:
                    batch = list(self._pending)
                    self._pending.clear()
                    self._last_call = self._clock()
                    self.calls += 1
                    return batch
                self._cond.wait(wait if self._pending else None)

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                records = {r.instance_id: r for r in self._describe(batch)}
            except Exception:
                log.exception("DescribeInstances for %d suspected instance(s) failed; "
                              "asking again", len(batch))
                with self._cond:
                    for instance_id in batch:
                        self._pending.setdefault(instance_id, None)
                continue
            for instance_id in batch:
                record = records.get(instance_id)
                if record is None:
                    state, reason = "terminated", "unknown to EC2"
                elif record.state in DEAD_STATES:
                    state, reason = record.state, record.state_reason
                else:
                    continue
                with self._cond:
                    if instance_id in self._reported:
                        continue
                    self._reported.add(instance_id)
                log.info("EC2 instance %s is %s (%s)", instance_id, state, reason or "no reason")
                try:
                    self._on_dead(instance_id, state, reason)
                except Exception:
                    log.exception("the dead-instance callback failed for %s", instance_id)
