"""Double backward (``create_graph=True``: gradient penalties) through synchronized layers and CPU replicas.

Through autograd's serial backward a synchronized layer's backward is differentiable twice, as ``nn.BatchNorm``'s:
its gradients have their graph through the merge of the copies' statistics, and a second backward gives the whole
batch's second-order terms, checkpointed blocks included (across processes: test_distributed.py). The merge of a
parallel backward cannot be differentiated again: a second backward through it raises an error naming the layer
instead of silently dropping terms. CPU replicas' parallel backward can be retraced only where the gradients reaching
it have no graph; otherwise a clear error says to use ``parallel_backward=False``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from batchnorm_cases import assert_grads_equal
from hang_guard import call_with_timeout
from torch import nn

import syncbn_ext
from syncbn_ext import DataParallelWithCallback, SynchronizedBatchNorm1d, SynchronizedBatchNorm2d

PARALLEL_MESSAGE = r"double backward \(create_graph=True.*run their backward in parallel.*parallel_backward=False"
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


def assert_serial_penalty_matches(model: nn.Module, wrt: str, outer: str, replicas: int = 2) -> nn.Module:
    """``penalty`` through CPU replicas' serial backward gives the plain-layer reference's gradients; returns the
    reference."""
    reference = syncbn_ext.revert_model(copy.deepcopy(model))
    dp = DataParallelWithCallback(model, device_ids=["cpu"] * replicas, parallel_backward=False)
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    call_with_timeout(penalty(dp, x, wrt, outer).backward)
    penalty(reference, x, wrt, outer).backward()
    assert_same_grads(model, reference)
    return reference


@pytest.mark.parametrize("outer", ["sum", "cube"])
def test_serial_backward_retraces_the_first_derivative_of_synchronized_layers(outer):
    # The penalty on the last layer's weight gradient needs the synchronized layer's first derivative only.
    assert_serial_penalty_matches(net(), "weight", outer)


@pytest.mark.parametrize("outer", ["sum", "cube"])
def test_serial_backward_gives_a_synchronized_layers_second_derivative(outer):
    # The penalty on the input gradient needs the layer's second derivative, through the merge of the copies'
    # statistics (before: an error, "differentiable only once"). 3 copies of 3, 3 and 2 samples.
    model = net()
    reference = assert_serial_penalty_matches(model, "input", outer, replicas=3)
    # Running statistics as the reference's: the double backward writes none.
    torch.testing.assert_close(model[1].running_var, reference[1].running_var, rtol=1e-12, atol=1e-12)


def test_double_backward_through_two_synchronized_layers_and_mixed_penalties():
    # Two synchronized layers in a row (the second without affine parameters), a penalty on both the input's and a
    # weight's gradient: every second-order path goes through two merges.
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        SynchronizedBatchNorm2d(4),
        nn.Softplus(),
        nn.Conv2d(4, 4, 1),
        SynchronizedBatchNorm2d(4, affine=False),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(64, 2),
    ).double()
    reference = syncbn_ext.revert_model(copy.deepcopy(model))
    dp = DataParallelWithCallback(model, device_ids=["cpu"] * 2, parallel_backward=False)
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64)

    def loss(module: nn.Module, inner: nn.Module) -> torch.Tensor:
        xi = x.clone().requires_grad_()
        out = module(xi)
        gx, gw = torch.autograd.grad(out.pow(2).sum(), (xi, inner[1].weight), create_graph=True)
        return gx.square().sum() + gw.pow(2).sum() + out.sum()

    call_with_timeout(loss(dp, model).backward)
    loss(reference, reference).backward()
    assert_same_grads(model, reference)


@pytest.mark.parametrize("outer", ["sum", "cube"])
def test_parallel_backward_second_derivative_raises_naming_the_layer(outer):
    # In parallel the copies' sums meet across threads: differentiable once. With a cubed outer loss the
    # wrapper's own error comes first (see below).
    dp = DataParallelWithCallback(net(), device_ids=["cpu"] * 2, parallel_backward=True)
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    message = WRAPPER_MESSAGE if outer == "cube" else PARALLEL_MESSAGE
    with pytest.raises(RuntimeError, match=message) as raised:
        call_with_timeout(penalty(dp, x, "input", outer).backward)
    if message == PARALLEL_MESSAGE:
        assert "layer '1: SynchronizedBatchNorm2d(4)'" in str(raised.value)


@pytest.mark.parametrize("mode", ["plus", "clamp"])
def test_a_lone_layer_is_differentiable_twice_in_either_eps_mode(mode, eps_mode):
    # A lone layer in the "clamp" eps mode runs the synchronized path (one copy); its second derivative is the
    # clamped formula's, as autograd gives it from plain ops.
    bn = SynchronizedBatchNorm2d(3, eps=1e-5).double()
    x = torch.randn(6, 3, 2, 2, dtype=torch.float64)
    x[:, 2] = 0.5 + 1e-4 * x[:, 2]  # a channel whose variance is below eps: clamped in that mode
    eps_mode(mode)
    xa = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(bn(xa).pow(3).sum(), xa, create_graph=True)
    grad.square().sum().backward()
    xb = x.clone().requires_grad_()
    var = xb.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    denominator = var.clamp_min(bn.eps) if mode == "clamp" else var + bn.eps
    weight, bias = bn.weight.detach().clone().requires_grad_(), bn.bias.detach().clone().requires_grad_()
    y = (xb - xb.mean(dim=(0, 2, 3), keepdim=True)) * denominator.rsqrt() * weight.view(1, 3, 1, 1) + bias.view(
        1, 3, 1, 1
    )
    (grad_ref,) = torch.autograd.grad(y.pow(3).sum(), xb, create_graph=True)
    grad_ref.square().sum().backward()
    torch.testing.assert_close(grad, grad_ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(bn.weight.grad, weight.grad, rtol=1e-9, atol=1e-10)


class CheckpointedNet(nn.Module):
    """``net()`` with its convolution and synchronized layer in a checkpointed block."""

    def __init__(self) -> None:
        super().__init__()
        self.body = net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.utils.checkpoint.checkpoint(self.body[:2], x, use_reentrant=False)
        return self.body[2:](h)

    def __getitem__(self, index: int) -> nn.Module:
        return self.body[index]


@pytest.mark.parametrize("wrt", ["input", "weight"])
def test_double_backward_through_a_checkpointed_synchronized_layer(wrt):
    # The recomputation inside the first backward recalls the forward's whole-batch statistics; autograd gives
    # saved tensors back with the forward's graph, through which the second backward differentiates the merge.
    assert_serial_penalty_matches(CheckpointedNet(), wrt, "cube")


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


def test_parallel_backward_second_derivative_toward_the_input_alone_raises_too():
    # torch.autograd.grad(penalty, x) runs only the nodes on a path to x: the error nodes of the merge's gradients
    # are on it (they had no next edges: it skipped them, and the retraced replicas' graph reached the merge itself,
    # which raised an error of its own).
    dp = DataParallelWithCallback(net(), device_ids=["cpu"] * 2, parallel_backward=True)
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64, requires_grad=True)

    def penalty_gradient():
        (grad,) = torch.autograd.grad(dp(x).sum(), x, create_graph=True)
        return torch.autograd.grad(grad.square().sum(), x)

    with pytest.raises(RuntimeError, match=PARALLEL_MESSAGE):
        call_with_timeout(penalty_gradient)


@pytest.mark.parametrize("bn", [False, True])
def test_autograd_functional_second_derivatives_need_the_serial_backward(bn):
    # hessian, hvp and jvp (the latter through the double-backward trick: a gradient of gradients whose incoming
    # gradients require grad) raised nothing under the parallel backward and returned zeros or wrong values. They
    # raise there now; through the serial backward they give the whole batch's values.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), SynchronizedBatchNorm1d(2) if bn else nn.Tanh()).double()
    reference = syncbn_ext.revert_model(copy.deepcopy(model))
    x, v = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)

    def cube(module):
        return lambda inp: module(inp).pow(3).sum()

    def outputs(module):
        return lambda inp: module(inp)

    functional = torch.autograd.functional
    computations = {
        "hessian": lambda m: functional.hessian(cube(m), x),
        "hvp": lambda m: functional.hvp(cube(m), x, v)[1],
        "jvp": lambda m: functional.jvp(outputs(m), x, v)[1],
    }
    for name, compute in computations.items():
        parallel = DataParallelWithCallback(model, device_ids=["cpu"] * 2, parallel_backward=True)
        with pytest.raises(RuntimeError, match=WRAPPER_MESSAGE):
            call_with_timeout(compute, parallel)
        serial = DataParallelWithCallback(model, device_ids=["cpu"] * 2, parallel_backward=False)
        expected = compute(reference)
        assert expected.abs().max() > 0.1, name
        torch.testing.assert_close(call_with_timeout(compute, serial), expected, msg=name)


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


def test_forward_mode_derivatives_through_a_synchronizing_layer_are_a_clear_error_and_jvp_works(eps_mode):
    # Forward-mode AD needs a forward formula, which the C++ autograd function does not have (before: torch's "jvp is
    # not implemented for the c++ API of custom Function yet", naming neither the layer nor a way out).
    # torch.autograd.functional.jvp, through double backward, gives the whole batch's Jacobian-vector products.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 3, 1), SynchronizedBatchNorm2d(3)).double()
    reference = copy.deepcopy(syncbn_ext.revert_model(copy.deepcopy(model)))
    dp = DataParallelWithCallback(model, device_ids=["cpu"] * 2, parallel_backward=False)
    x, tangent = torch.randn(6, 3, 2, 2, dtype=torch.float64), torch.randn(6, 3, 2, 2, dtype=torch.float64)

    def forward_ad_jvp(module):
        with torch.autograd.forward_ad.dual_level():
            return torch.autograd.forward_ad.unpack_dual(module(torch.autograd.forward_ad.make_dual(x, tangent)))

    with pytest.raises(
        RuntimeError,
        match=r"SynchronizedBatchNorm2d cannot compute forward-mode derivatives.*"
        r"across replicas or processes.*torch.autograd.functional.jvp",
    ) as raised:
        call_with_timeout(forward_ad_jvp, dp)
    assert raised.value.__notes__ == ["(raised in replica 0 on device cpu)"]
    assert model[1].num_batches_tracked.item() == 0
    eps_mode("clamp")
    with pytest.raises(RuntimeError, match=r"cannot compute forward-mode derivatives.*in the clamp eps mode"):
        forward_ad_jvp(model[1])
    eps_mode("plus")
    # A lone layer in the default eps mode is nn.BatchNorm, which has a forward formula.
    lone = copy.deepcopy(model[1])
    torch.testing.assert_close(forward_ad_jvp(lone).tangent, forward_ad_jvp(reference[1]).tangent)

    model.zero_grad()
    out, jvp = call_with_timeout(torch.autograd.functional.jvp, dp, x, tangent)
    expected_out, expected_jvp = torch.autograd.functional.jvp(reference, x, tangent)
    torch.testing.assert_close(out, expected_out)
    torch.testing.assert_close(jvp, expected_jvp)


@pytest.mark.parametrize("transform", ["grad", "vmap"])
def test_torch_func_transforms_over_a_synchronizing_layer_are_a_clear_error(transform, eps_mode):
    # The synchronized forward is a C++ autograd function, which torch.func does not support (before: torch's
    # "cannot use C++ torch::autograd::Function with functorch transforms", naming neither the layer nor a way out).
    bn = SynchronizedBatchNorm2d(3).double()
    x = torch.randn(6, 3, 2, 2, dtype=torch.float64)
    run = {
        "grad": lambda: torch.func.grad(lambda t: bn(t).pow(3).sum())(x),
        "vmap": lambda: torch.func.vmap(bn)(x.unsqueeze(0).expand(2, -1, -1, -1, -1)),
    }[transform]
    eps_mode("clamp")
    with pytest.raises(RuntimeError, match=r"SynchronizedBatchNorm2d cannot run under torch.func.*clamp eps mode"):
        run()
    assert bn.num_batches_tracked.item() == 0
    eps_mode("plus")
    # A lone layer in the default eps mode is nn.BatchNorm, which torch.func supports as far as nn.BatchNorm does
    # (without running statistics to update).
    lone = SynchronizedBatchNorm2d(3, track_running_stats=False).double()
    reference = nn.BatchNorm2d(3, track_running_stats=False).double()
    torch.testing.assert_close(
        torch.func.grad(lambda t: lone(t).pow(3).sum())(x), torch.func.grad(lambda t: reference(t).pow(3).sum())(x)
    )
