"""Hooks and ``retain_grad`` under the parallel backward: each runs as often as in autograd's serial backward, with
the same gradients (found by a user's review: hooks on the tensors where the replicas' graphs are cut ran twice,
once where a worker took the gradient and again where the joining node handed it back)."""

from __future__ import annotations

import pytest
import torch
from hang_guard import call_with_timeout
from torch import nn

from syncbn_ext import DataParallelWithCallback, SynchronizedBatchNorm1d

C = 3


class RegistersHooksInForward(nn.Module):
    """Registers, at each forward, a hook doubling its weight's gradient and one tripling its input's, and retains
    its input's gradient; its output is scaled by ``scale``, a leaf outside the module's parameters."""

    def __init__(self, norm: type[nn.Module], scale: torch.Tensor) -> None:
        super().__init__()
        self.linear, self.norm, self.scale = nn.Linear(C, C).double(), norm(C).double(), scale
        self.calls: list[str] = []
        self.inputs: list[tuple[int, torch.Tensor]] = []  # (copy id, input)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.linear.weight.register_hook(lambda g: self.calls.append("weight") or g * 2)
        x.register_hook(lambda g: self.calls.append("input") or g * 3)
        x.retain_grad()
        self.inputs.append((self.norm.__dict__.get("_copy_id") or 0, x))
        return self.norm(self.linear(x)) * self.scale


def train_step(replicas: int | None, parallel_backward: bool = False):
    scale = torch.full((1,), 1.5, dtype=torch.float64, requires_grad=True)
    scale_calls = []
    scale.register_hook(lambda g: scale_calls.append(1) or g * 5)  # before the forward, on a leaf
    torch.manual_seed(0)
    model = RegistersHooksInForward(nn.BatchNorm1d if replicas is None else SynchronizedBatchNorm1d, scale)
    x = torch.randn(9, C, dtype=torch.float64, requires_grad=True)
    run = (
        model
        if replicas is None
        else DataParallelWithCallback(model, device_ids=["cpu"] * replicas, parallel_backward=parallel_backward)
    )
    call_with_timeout(lambda: run(x).pow(3).sum().backward())
    return model, x, scale, len(scale_calls)


@pytest.mark.parametrize("replicas", [2, 3])
@pytest.mark.parametrize("parallel_backward", [False, True])
def test_hooks_run_once_per_replica_or_once_in_all_with_the_whole_batchs_gradients(replicas, parallel_backward):
    reference, x_reference, scale_reference, _ = train_step(None)
    model, x, scale, scale_calls = train_step(replicas, parallel_backward)
    # Registered in the forward: once per replica (each on its handle of the weight, its slice of the input).
    assert sorted(model.calls) == ["input"] * replicas + ["weight"] * replicas
    # Registered on a leaf the replicas share: once, with the sum of their gradients.
    assert scale_calls == 1
    torch.testing.assert_close(model.linear.weight.grad, reference.linear.weight.grad)
    torch.testing.assert_close(x.grad, x_reference.grad)
    torch.testing.assert_close(scale.grad, scale_reference.grad)
    # Each slice's retained gradient: its part of the input's, once.
    slices = [s for _, s in sorted(model.inputs, key=lambda entry: entry[0])]  # (appended as the replicas ran)
    torch.testing.assert_close(torch.cat([s.grad for s in slices]), x.grad)
