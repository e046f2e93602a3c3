"""CPU replicas' backward in parallel when a replica fails in it or is late at a synchronized layer's merge: the
failing replica's own error, at once; a late one's BarrierTimeoutError."""

from __future__ import annotations

import time

import pytest
import torch
from batchnorm_cases import joined
from hang_guard import call_with_timeout
from torch import nn

import syncbn_ext
from syncbn_ext import DataParallelWithCallback, SynchronizedBatchNorm1d

C = 4


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


def fail():
    raise ValueError("backward failed in this replica")


def take_three_seconds():
    time.sleep(3)


MARKER = -1234.0


class MarkedNet(nn.Module):
    """Linear and a synchronized layer; in the replica whose slice holds the marker, ``in_backward`` is called in
    backward, after the layer's merge or before it."""

    def __init__(self, in_backward, before_the_merge):
        super().__init__()
        self.linear, self.bn = nn.Linear(C, C), SynchronizedBatchNorm1d(C)
        self.in_backward, self.before_the_merge, self.armed = in_backward, before_the_merge, True

    def forward(self, x):
        marked = self.armed and bool((x.abs() > 1000).any())
        if marked and not self.before_the_merge:
            x = InBackward.apply(x, self.in_backward)
        y = self.bn(self.linear(x))
        return InBackward.apply(y, self.in_backward) if marked and self.before_the_merge else y


@pytest.mark.parametrize("before_the_merge", [False, True])
def test_a_replica_failing_in_backward_raises_its_own_error_at_once(monkeypatch, before_the_merge):
    # Failing before its synchronized layer's merge, the replica wakes the others waiting there: its error is the
    # one raised, not theirs.
    monkeypatch.setenv("SYNCBN_TIMEOUT", "120")  # the others must not wait for it until a timeout
    torch.manual_seed(4)
    model = MarkedNet(fail, before_the_merge).double()
    dp = DataParallelWithCallback(model, device_ids=["cpu"] * 3, parallel_backward=True)
    x = torch.randn(6, C, dtype=torch.float64)
    x[3] = MARKER  # in replica 1's slice
    y = call_with_timeout(dp, x.requires_grad_())
    assert joined(y)
    with pytest.raises(ValueError, match="backward failed in this replica") as raised:
        call_with_timeout(y.sum().backward)
    assert raised.value.__notes__[-1] == "(raised in replica 1 on device cpu, in backward)"
    # The next step works.
    model.armed = False
    y = call_with_timeout(dp, torch.randn(6, C, dtype=torch.float64))
    call_with_timeout(y.sum().backward)


def test_a_replica_late_in_backward_is_a_barrier_timeout_error(monkeypatch):
    monkeypatch.setenv("SYNCBN_TIMEOUT", "1")
    dp = DataParallelWithCallback(
        MarkedNet(take_three_seconds, before_the_merge=True).double(), device_ids=["cpu"] * 2, parallel_backward=True
    )
    x = torch.randn(4, C, dtype=torch.float64)
    x[2] = MARKER  # replica 1 is late at the merge
    y = call_with_timeout(dp, x)
    # The type the merge raised, which autograd's engine hands on as a plain RuntimeError.
    with pytest.raises(syncbn_ext.BarrierTimeoutError, match=r"timed out after 1 s; copies that never .*\[1\]"):
        call_with_timeout(y.sum().backward)
