"""bigexec.stacks: what overlapping samplers do to the process-wide GIL switch interval."""

from __future__ import annotations

import sys
import threading
import time

from bigexec.stacks import sample_stacks


def test_overlapping_samplers_lower_the_switch_interval_until_the_last_one_ends():
    before = sys.getswitchinterval()
    assert before > 0.0005  # or the test could not tell lowered from not
    errors: list[BaseException] = []
    long_stop = threading.Event()

    def sample_long() -> None:
        try:
            sample_stacks(30, interval=0.005, stop=long_stop)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    long_sampler = threading.Thread(target=sample_long, daemon=True)
    long_sampler.start()
    try:
        deadline = time.monotonic() + 10
        while sys.getswitchinterval() == before and not errors:
            assert time.monotonic() < deadline, "the first sampler never started"
            time.sleep(0.001)
        # A second, finer sampler comes and goes while the first one runs.
        sample_stacks(0.1, interval=0.002)
        during = sys.getswitchinterval()
    finally:
        long_stop.set()
        long_sampler.join(10)
    assert not errors, errors
    # The short one had ended but the long one still ran: the interval stayed lowered for it.
    assert during < before
    assert sys.getswitchinterval() == before
