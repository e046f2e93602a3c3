"""Double backward (``create_graph=True``: gradient penalties) through synchronized layers and CPU replicas.

A synchronized layer's backward with batch statistics is differentiable once: a second backward through it raises
an error naming the layer, instead of silently dropping its second-order terms. CPU replicas' parallel backward
can be retraced only where the gradients reaching it have no graph; otherwise a clear error says to use
``parallel_backward=False``, autograd's serial backward, which gives the reference's double backward.
"""

from __future__ import annotations

import copy

import pytest
import torch
from batchnorm_cases import assert_grads_equal
from hang_guard import call_with_timeout
from torch import nn

import syncbn_ext
from syncbn_ext import DataParallelWithCallback, SynchronizedBatchNorm2d

BN_MESSAGE = r"double backward \(create_graph=True.*differentiable only once"
WRAPPER_MESSAGE = r"cannot retrace the CPU replicas' parallel backward.*parallel_backward=False"
MERGE_MESSAGE = r"outside the replicas' parallel backward.*parallel_backward=False"


def net(bn: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        SynchronizedBatchNorm2d(4) if bn else nn.Identity(),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(64, 5),
    ).double()


def penalty(module: nn.Module, x: torch.Tensor, wrt: str, outer: str) -> torch.Tensor:
    """The squared gradient of an outer loss (``"sum"``: its gradient has no graph; ``"cube"``: it has), with
    respect to the input or the last layer's weight, kept differentiable."""
    x = x.clone().requires_grad_()
    out = module(x)
    loss = out.sum() if outer == "sum" else out.pow(3).sum()
    model = module.module if isinstance(module, DataParallelWithCallback) else module
    target = x if wrt == "input" else model[4].weight
    (grad,) = torch.autograd.grad(loss, target, create_graph=True)
    return grad.square().sum()


def assert_same_grads(model: nn.Module, reference: nn.Module) -> None:
    assert_grads_equal(model, reference, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("outer", ["sum", "cube"])
def test_serial_backward_retraces_the_first_derivative_of_synchronized_layers(outer):
    # The penalty on the last layer's weight gradient needs the synchronized layer's first derivative only.
    model = net()
    reference = syncbn_ext.revert_model(copy.deepcopy(model))
    dp = DataParallelWithCallback(model, device_ids=["cpu"] * 2, parallel_backward=False)
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    call_with_timeout(penalty(dp, x, "weight", outer).backward)
    penalty(reference, x, "weight", outer).backward()
    assert_same_grads(model, reference)


@pytest.mark.parametrize("outer", ["sum", "cube"])
def test_a_synchronized_layers_second_derivative_raises_naming_the_layer(parallel_backward, outer):
    # The penalty on the input gradient needs the layer's second derivative (before: silently none at all).
    dp = DataParallelWithCallback(net(), device_ids=["cpu"] * 2, parallel_backward=parallel_backward)
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    # In parallel with a cubed outer loss the wrapper's own error comes first (see below).
    message = WRAPPER_MESSAGE if parallel_backward and outer == "cube" else BN_MESSAGE
    with pytest.raises(RuntimeError, match=message) as raised:
        call_with_timeout(penalty(dp, x, "input", outer).backward)
    if message == BN_MESSAGE:
        assert "layer '1: SynchronizedBatchNorm2d(4)'" in str(raised.value)


def test_a_lone_layer_in_the_clamp_eps_mode_raises_too():
    # A lone layer in the "clamp" eps mode runs the synchronized path (one copy): its gradients were silently
    # missing the second-order terms (the input got no gradient at all).
    bn = SynchronizedBatchNorm2d(3).double()
    x = torch.randn(6, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    previous = syncbn_ext.get_sbn_eps_mode()
    syncbn_ext.set_sbn_eps_mode("clamp")
    try:
        (grad,) = torch.autograd.grad(bn(x).pow(3).sum(), x, create_graph=True)
    finally:
        syncbn_ext.set_sbn_eps_mode(previous)
    with pytest.raises(RuntimeError, match=BN_MESSAGE):
        grad.square().sum().backward()
    assert x.grad is None


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_first_order_gradients_under_create_graph_are_right():
    # create_graph=True without a second backward (e.g. to keep .grad differentiable): the same gradients.
    model = net()
    reference = syncbn_ext.revert_model(copy.deepcopy(model))
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    for parallel_backward in (True, False):
        model.zero_grad()
        reference.zero_grad()
        dp = DataParallelWithCallback(model, device_ids=["cpu"] * 2, parallel_backward=parallel_backward)
        call_with_timeout(dp(x).pow(3).sum().backward, create_graph=True)
        reference(x).pow(3).sum().backward(create_graph=True)
        assert_same_grads(model, reference)
        for p in model.parameters():
            assert p.grad.requires_grad  # as under torch: differentiable, and failing clearly if differentiated
            p.grad = None


@pytest.mark.parametrize("bn", [False, True])
def test_parallel_backward_with_a_graph_coming_in_raises_and_the_serial_one_works(bn):
    # A cubed outer loss: the gradients reaching the replicas have graphs, so a second backward would run the
    # replicas' graphs twice over (before: "backward through the graph a second time", or a synchronized merge
    # run by one thread). The serial backward gives the reference's penalty gradients.
    model = net(bn)
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    dp = DataParallelWithCallback(model, device_ids=["cpu"] * 2, parallel_backward=True)
    assert dp.parallel_backward
    with pytest.raises(RuntimeError, match=WRAPPER_MESSAGE):
        call_with_timeout(penalty(dp, x, "weight", "cube").backward)
    model.zero_grad(set_to_none=True)
    reference = syncbn_ext.revert_model(copy.deepcopy(model))
    dp.parallel_backward = False  # between forwards
    call_with_timeout(penalty(dp, x, "weight", "cube").backward)
    penalty(reference, x, "weight", "cube").backward()
    assert_same_grads(model, reference)


def test_parallel_backward_retraced_into_a_synchronized_merge_raises_at_once():
    # A sum outer loss: the parallel backward's gradients have graphs into the replicas' graphs, which a second
    # backward runs one replica after the other; a synchronized layer's merge cannot (it would wait for the other
    # replicas for ever): an error at once.
    dp = DataParallelWithCallback(net(), device_ids=["cpu"] * 2, parallel_backward=True)
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=MERGE_MESSAGE):
        call_with_timeout(penalty(dp, x, "weight", "sum").backward, timeout=30)
    # The wrapper works afterwards.
    call_with_timeout(dp(x).sum().backward)


def test_parallel_backward_retraced_through_plain_layers_works():
    # Without synchronized layers, the retraced replicas' graphs give the reference's penalty gradients.
    model = net(bn=False)
    reference = copy.deepcopy(model)
    dp = DataParallelWithCallback(model, device_ids=["cpu"] * 2, parallel_backward=True)
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    for wrt in ("input", "weight"):
        call_with_timeout(penalty(dp, x, wrt, "sum").backward)
        penalty(reference, x, wrt, "sum").backward()
    assert_same_grads(model, reference)
