"""Certificates are renewed before they expire, on the driver and on every machine, without
dropping a call: past the first expiry, calls over pooled connections, new connections from
the driver, new machines and machine-to-machine calls all keep working."""

from __future__ import annotations

import threading
import time

import pytest

import bigexec

pytestmark = pytest.mark.timeout(120)


class Relay:
    """Calls another machine from this one, over its own (machine's) credentials."""

    def init(self, b):
        self.b = b

    def echo(self, x):
        return x

    def ping_other(self, addr):
        return self.b.dial(addr).call("Supervisor.ping", 7, timeout=20)


SYSTEMS = {
    # lifetime: long enough for a worker to boot on a busy host, short for the test to pass it
    "threads": ({"tls": True}, 3.0),
    "local": ({}, 6.0),
}


@pytest.mark.parametrize("system", sorted(SYSTEMS))
def test_calls_keep_working_past_the_first_expiry(system):
    options, lifetime = SYSTEMS[system]
    failures: list[BaseException] = []
    calls = 0
    stop = threading.Event()
    with bigexec.start(system, cert_lifetime=lifetime, keepalive_period=0.5,
                       boot_timeout=60, **options) as b:
        m1, m2 = b.start(2, services={"Relay": Relay()})
        for m in (m1, m2):
            assert m.wait(bigexec.RUNNING, timeout=60) and m.err is None, m.err
        t_booted = time.monotonic()

        def keep_calling():  # calls all along, over the driver's pooled connections
            nonlocal calls
            while not stop.is_set():
                try:
                    assert m1.call("Relay.echo", calls, timeout=10) == calls
                    calls += 1
                except BaseException as exc:
                    failures.append(exc)
                stop.wait(0.05)

        caller = threading.Thread(target=keep_calling)
        caller.start()
        try:
            time.sleep(lifetime * 1.5)  # every certificate issued at the start has expired
        finally:
            stop.set()
            caller.join(30)
        assert time.monotonic() - t_booted > lifetime
        assert not failures, failures[:3]
        assert calls > 10
        b.client.reset(m1.addr)  # the driver's next call dials afresh
        assert m1.call("Relay.echo", "fresh", timeout=10) == "fresh"
        # machine to machine, both ways, on connections made now
        assert m1.call("Relay.ping_other", m2.addr, timeout=30) == 7
        assert m2.call("Relay.ping_other", m1.addr, timeout=30) == 7
        (m3,) = b.start(1, services={"Relay": Relay()})  # a replacement machine boots
        assert m3.wait(bigexec.RUNNING, timeout=60) and m3.err is None, m3.err
        assert m3.call("Relay.ping_other", m1.addr, timeout=30) == 7
        assert m1.call("Relay.ping_other", m3.addr, timeout=30) == 7
        for m in (m1, m2):
            assert m.credential_renewals >= 1
            assert m.call("Supervisor.metrics", timeout=10)["credential_renewals"] >= 1
