"""Faults the failure tests put in replicas, and what they check afterwards: shared by the test modules."""

from __future__ import annotations

import contextlib
import copy
import gc
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

from syncbn_ext.replica_workers import replica_threads_running


class InBackward(torch.autograd.Function):
    """Identity; its backward calls ``action()`` first."""

    @staticmethod
    def forward(ctx, x, action):
        ctx.action = action
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.action()
        return grad, None


def fail() -> None:
    raise ValueError("backward failed in this replica")


class UnprintableError(Exception):
    """An exception whose message cannot be made: its ``__str__`` raises (formatted from a resource now gone)."""

    def __str__(self) -> str:
        raise RuntimeError("the message's resource is gone")


def fail_unprintably() -> None:
    raise UnprintableError()


@contextlib.contextmanager
def garbage_collector_off() -> Iterator[None]:
    """No automatic collection inside: what is freed there was freed by reference counting alone."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def replica_failure() -> Exception:
    return KeyError("replica failure")


class RaiseInCopy(nn.Module):
    """Raises ``make_error()`` in the replica with copy id ``copy_id`` while ``armed``."""

    def __init__(self, copy_id: int, make_error: Callable[[], BaseException] = replica_failure) -> None:
        super().__init__()
        self.target, self.make_error, self.copy_id = copy_id, make_error, None
        self.armed = True

    def __data_parallel_replicate__(self, ctx, copy_id):
        self.copy_id = copy_id

    def forward(self, x):
        if self.armed and self.copy_id == self.target:
            raise self.make_error()
        return x


class RaiseOnMarker(nn.Module):
    """Raises ValueError when its input contains MARKER (put the marker in the rows one replica gets)."""

    MARKER = -12345.0

    def forward(self, x):
        if (x == self.MARKER).any():
            raise ValueError("marker found in this slice")
        return x


def wait_for_replica_threads(timeout: float) -> None:
    """Waits until no replica thread runs (the ones left behind end when their replica returns)."""
    deadline = time.monotonic() + timeout
    while replica_threads_running():
        assert time.monotonic() < deadline, [t.name for t in replica_threads_running()]
        time.sleep(0.05)


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the model's parameters and buffers, to compare with after a failure."""
    return copy.deepcopy(model.state_dict())


def assert_state_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
