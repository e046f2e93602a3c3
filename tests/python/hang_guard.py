"""A guard for tests of code that could deadlock: a hang fails the test instead of stalling the suite."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

HANG_TIMEOUT = 60.0


def call_with_timeout(fn: Callable[..., Any], *args: Any, timeout: float = HANG_TIMEOUT, **kwargs: Any) -> Any:
    """fn(*args, **kwargs) on another thread: fails the test instead of hanging when it does not return."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = fn(*args, **kwargs)
        except BaseException as error:  # handed back to the test thread
            result["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        pytest.fail(f"did not return within {timeout} s (deadlock?)")
    if "error" in result:
        error = result.pop("error")
        try:
            raise error
        finally:
            del error  # raised from a local, it would hold this frame and this frame it: a cycle
    return result["value"]
