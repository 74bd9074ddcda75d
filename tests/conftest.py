"""Shared fixtures: short keepalive settings so liveness tests take seconds, not minutes."""

from __future__ import annotations

import pytest

import bigexec

FAST = dict(keepalive_period=0.1, keepalive_lease=5.0, keepalive_timeout=1.0,
            keepalive_rpc_timeout=0.5)


@pytest.fixture(autouse=True)
def no_user_config_file(tmp_path_factory, monkeypatch):
    """Tests never read the developer's own bigexec config file (``bigexec.config``)."""
    missing = tmp_path_factory.getbasetemp() / "no-bigexec-config.toml"
    monkeypatch.setenv("BIGEXEC_CONFIG", str(missing))


@pytest.fixture
def threads_b():
    with bigexec.start("threads", **FAST) as b:
        yield b
