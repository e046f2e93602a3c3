"""Shared pytest configuration: the ``slow`` soak tests run only when SYNCBN_RUN_SLOW=1; shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import syncbn_ext

# A bug makes a barrier fail after this many seconds, never hang the suite.
SHORT_BARRIER_TIMEOUT = 30.0


def pytest_collection_modifyitems(config, items):
    if os.environ.get("SYNCBN_RUN_SLOW") == "1":
        return
    skip_slow = pytest.mark.skip(reason="long-running soak; set SYNCBN_RUN_SLOW=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture
def short_barrier_timeout(monkeypatch):
    """Every replication's barrier (created per forward) fails after SHORT_BARRIER_TIMEOUT instead of hanging."""
    monkeypatch.setenv("SYNCBN_TIMEOUT", str(SHORT_BARRIER_TIMEOUT))


@pytest.fixture
def eps_mode():
    """``syncbn_ext.set_sbn_eps_mode``, the mode restored after the test."""
    saved = syncbn_ext.get_sbn_eps_mode()
    yield syncbn_ext.set_sbn_eps_mode
    syncbn_ext.set_sbn_eps_mode(saved)


@pytest.fixture(params=[False, True], ids=["serial_backward", "parallel_backward"])
def parallel_backward(request):
    """Both ways CPU replicas run their backward: ``DataParallelWithCallback(..., parallel_backward=...)``."""
    return request.param


@pytest.fixture
def no_shared_memory_left_behind():
    """The launches' shared-memory segments are unlinked: once every rank mapped one, or when its set-up failed."""
    folder = Path("/dev/shm")
    before = set(folder.glob("syncbn-*")) if folder.is_dir() else set()
    yield
    after = set(folder.glob("syncbn-*")) if folder.is_dir() else set()
    assert after <= before, sorted(map(str, after - before))
