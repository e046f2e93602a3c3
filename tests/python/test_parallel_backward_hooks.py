"""Hooks and ``retain_grad`` under the parallel backward: each runs as often as in autograd's serial backward, with
the same gradients (found by a user's review: hooks on the tensors where the replicas' graphs are cut ran twice,
once where a worker took the gradient and again where the joining node handed it back)."""

from __future__ import annotations

import threading

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


def _backward_of_cubes(run: nn.Module, x: torch.Tensor) -> None:
    call_with_timeout(lambda: run(x).pow(3).sum().backward())


class RetainsItsWeightsGradient(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear, self.norm = nn.Linear(C, C).double(), SynchronizedBatchNorm1d(C).double()
        self.handles: list[tuple[int, torch.Tensor]] = []  # (copy id, the replica's weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.linear.weight.retain_grad()
        self.handles.append((self.norm.__dict__.get("_copy_id") or 0, self.linear.weight))
        return self.norm(self.linear(x))


@pytest.mark.parametrize("replicas", [2, 3])
def test_a_replicas_retained_weight_gradient_is_its_own_in_both_backwards(replicas):
    # Before, the parallel backward retained zeros (the placeholder its sums hand autograd) or the sum in replica 0.
    retained = {}
    for parallel_backward in (False, True):
        torch.manual_seed(0)
        model = RetainsItsWeightsGradient()
        dp = DataParallelWithCallback(model, device_ids=["cpu"] * replicas, parallel_backward=parallel_backward)
        _backward_of_cubes(dp, torch.randn(8, C, dtype=torch.float64))
        retained[parallel_backward] = [w.grad for _, w in sorted(model.handles, key=lambda entry: entry[0])]
        torch.testing.assert_close(sum(retained[parallel_backward]), model.linear.weight.grad)
    torch.testing.assert_close(retained[True], retained[False])


class WithTorchFunction(torch.Tensor):
    """A tensor type of its own: a handle on its parameter is an alias and then a view (two autograd nodes)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return super().__torch_function__(func, types, args, kwargs or {})


def test_a_hook_on_a_parameter_of_a_tensor_type_of_its_own_runs_once_per_replica():
    # Before, the sum went back through replica 0's handle, running its hook a second time (scaling it again).
    grads, calls = {}, {}
    for replicas, parallel_backward in ((None, False), (3, False), (3, True)):
        torch.manual_seed(0)
        model = RegistersHooksInForward(nn.BatchNorm1d if replicas is None else SynchronizedBatchNorm1d, torch.ones(1))
        model.linear.weight = nn.Parameter(model.linear.weight.detach().clone().as_subclass(WithTorchFunction))
        x = torch.randn(9, C, dtype=torch.float64, requires_grad=True)
        run = (
            model
            if replicas is None
            else DataParallelWithCallback(model, device_ids=["cpu"] * replicas, parallel_backward=parallel_backward)
        )
        _backward_of_cubes(run, x)
        grads[replicas, parallel_backward] = model.linear.weight.grad.as_subclass(torch.Tensor)
        calls[replicas, parallel_backward] = model.calls.count("weight")
    assert calls == {(None, False): 1, (3, False): 3, (3, True): 3}
    torch.testing.assert_close(grads[3, True], grads[None, False])
    torch.testing.assert_close(grads[3, False], grads[None, False])


def test_backwards_of_two_outputs_on_two_threads_run_a_shared_leafs_hook_each_once():
    # Before, one backward took the leaf's hooks away while its workers ran, as the other handed gradients back.
    results = {}
    for parallel_backward in (False, True):
        for seed in range(8):
            scale = torch.full((1,), 1.5, dtype=torch.float64, requires_grad=True)
            scale.register_hook(lambda g: g * 5)
            torch.manual_seed(seed)
            model = RegistersHooksInForward(SynchronizedBatchNorm1d, scale)
            dp = DataParallelWithCallback(model, device_ids=["cpu"] * 2, parallel_backward=parallel_backward)
            y = dp(torch.randn(16, C, dtype=torch.float64, requires_grad=True))
            outputs = (y, y.tanh())
            threads = [threading.Thread(target=lambda t=t: t.pow(2).sum().backward(retain_graph=True)) for t in outputs]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
            assert not any(thread.is_alive() for thread in threads)
            results[parallel_backward, seed] = scale.grad
    for seed in range(8):
        torch.testing.assert_close(results[True, seed], results[False, seed])
