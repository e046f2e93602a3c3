"""Shared pytest configuration: the ``slow`` soak tests run only when SYNCBN_RUN_SLOW=1."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config, items):
    if os.environ.get("SYNCBN_RUN_SLOW") == "1":
        return
    skip_slow = pytest.mark.skip(reason="long-running soak; set SYNCBN_RUN_SLOW=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)
