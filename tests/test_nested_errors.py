"""Errors a user can act on when a service calls another machine: a dead address fails fast
with the transport's error, and the outer caller gets the nested call's error with its
chain, not a timeout of its own."""

from __future__ import annotations

import time

import pytest
from conftest import FAST

import bigexec

pytestmark = pytest.mark.timeout(60)


class Relay:
    """Calls another machine from inside a service method."""

    def init(self, b):
        self.b = b

    def call_other(self, addr, timeout):
        return self.b.dial(addr).call("Relay.ping", timeout=timeout)

    def ping(self):
        return "pong"


def _two_machines():
    b = bigexec.start("threads", **FAST)
    machines = b.start(2, services={"Relay": Relay()})
    for m in machines:
        assert m.wait(bigexec.RUNNING, 30) and m.err is None
    return b, machines


def test_a_nested_call_works():
    b, (a, other) = _two_machines()
    with b:
        assert a.call("Relay.call_other", other.addr, 5, timeout=20) == "pong"


def test_dialing_a_dead_machine_fails_fast_with_the_transport_error():
    b, (a, dead) = _two_machines()
    with b:
        b.system.kill(dead)
        assert dead.wait(bigexec.STOPPED, 10)
        start = time.monotonic()
        with pytest.raises(bigexec.MachineStopped) as info:
            a.call("Relay.call_other", dead.addr, 5, timeout=20)
        assert time.monotonic() - start < 4.0  # not the nested call's 5 s, nor the outer 20
        err = info.value
        assert "did not start" not in str(err)
        assert "timed out after 20" not in str(err)
        # the nested call's chain reaches the outer caller: the transport's word is in it
        tb = getattr(err, "remote_traceback", "")
        assert "cannot reach machine" in str(err) or "cannot reach machine" in tb
        assert "NetworkError" in tb or "refused" in tb.lower()


def test_a_remote_timeout_error_is_the_remote_methods_not_the_callers():
    b, (a, other) = _two_machines()
    with b:
        other.session.system.kill(other, hang=True)  # answers nothing from now on
        start = time.monotonic()
        with pytest.raises(TimeoutError) as info:
            a.call("Relay.call_other", other.addr, 1.0, timeout=20)
        assert time.monotonic() - start < 10.0
        assert "20" not in str(info.value).replace(other.addr, "")  # the outer timeout is not it
        assert "Relay.ping" in str(info.value)  # the nested call's own message
        assert info.value.__cause__ is not None  # its remote traceback
