"""CPU replicas' backward in parallel: how each parameter's gradients from the replicas are summed (as soon as
each is complete, into a tensor nobody else holds; sparse ones as sparse), and parameters some replicas do not use."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from batchnorm_cases import joined
from hang_guard import call_with_timeout
from torch import nn

import syncbn_ext
from syncbn_ext import DataParallelWithCallback, SynchronizedBatchNorm1d

C = 4


class BranchBySign(nn.Module):
    """Uses ``positive`` on slices whose first value is positive, else ``negative``: some replicas leave a
    parameter without a gradient, and the replicas after them still give theirs."""

    def __init__(self):
        super().__init__()
        self.positive, self.negative = nn.Linear(C, C), nn.Linear(C, C)

    def forward(self, x):
        return self.positive(x) if x[0, 0] > 0 else self.negative(x)


def test_parameters_some_replicas_do_not_use_get_the_others_gradients():
    torch.manual_seed(5)
    model = nn.Sequential(BranchBySign(), SynchronizedBatchNorm1d(C)).double()
    branch = copy.deepcopy(model[0])
    dp = DataParallelWithCallback(model, device_ids=["cpu"] * 4, parallel_backward=True)
    x = torch.randn(8, C, dtype=torch.float64)
    x[0::2, 0] = torch.tensor([-1.0, 1.0, -1.0, 1.0], dtype=torch.float64)  # replicas 0 and 2 negative, 1 and 3 not
    y = call_with_timeout(dp, x)
    assert joined(y)
    grad = torch.randn_like(y)
    call_with_timeout(y.backward, grad)
    # The reference: the same slices through the same branches, one BatchNorm over the whole batch.
    slices = [branch.positive(s) if s[0, 0] > 0 else branch.negative(s) for s in x.chunk(4)]
    nn.BatchNorm1d(C).double()(torch.cat(slices)).backward(grad)
    for name in ("positive", "negative"):
        for p, p_ref in zip(getattr(model[0], name).parameters(), getattr(branch, name).parameters(), strict=True):
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-10, atol=1e-10, msg=name)


class KeepsItsGradient(torch.autograd.Function):
    """``x * weight``; its backward keeps the weight gradient it returns (a user's function may)."""

    kept: list[tuple[torch.Tensor, torch.Tensor]] = []

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x)
        return x * weight

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        grad_weight = (grad * x).sum(0)
        KeepsItsGradient.kept.append((grad_weight, grad_weight.clone()))
        return grad * 0 + grad, grad_weight


class ScaleByKeepingFunction(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(C, dtype=torch.float64))

    def forward(self, x):
        return KeepsItsGradient.apply(x, self.weight)


@pytest.mark.parametrize("replicas", [2, 3])
def test_parameter_sums_never_write_a_gradient_someone_else_holds(replicas):
    torch.manual_seed(6)
    model = nn.Sequential(ScaleByKeepingFunction(), SynchronizedBatchNorm1d(C)).double()
    x = torch.randn(12, C, dtype=torch.float64)
    KeepsItsGradient.kept.clear()
    y = call_with_timeout(DataParallelWithCallback(model, device_ids=["cpu"] * replicas, parallel_backward=True), x)
    assert joined(y)
    call_with_timeout(y.square().sum().backward)
    assert len(KeepsItsGradient.kept) == replicas
    for kept, as_returned in KeepsItsGradient.kept:
        assert torch.equal(kept, as_returned)  # not added to in place
    expected = torch.stack([as_returned for _, as_returned in KeepsItsGradient.kept]).sum(0)
    torch.testing.assert_close(model[0].weight.grad, expected, rtol=1e-12, atol=1e-12)
    KeepsItsGradient.kept.clear()


def fresh(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_the_first_sum_goes_into_a_gradient_nobody_else_holds():
    from syncbn_ext.parameter_sums import Total

    total = Total()
    total.add(fresh(1.0, 2.0))
    first = total.value
    first_ptr = first.data_ptr()
    first = None
    total.add(fresh(0.5, 0.25))
    assert total.value.data_ptr() == first_ptr  # written in place, no new tensor
    assert total.value.tolist() == [1.5, 2.25]
    # Or into the addend, when the first is held elsewhere: the same bits as first + addend.
    a, b = torch.randn(1000), torch.randn(1000)
    expected, a_before = a + b, a.clone()
    total = Total()
    total.add(a)  # the caller keeps `a`
    addend = b.clone()
    addend_ptr = addend.data_ptr()
    total.add(addend)
    addend = None
    assert total.value.data_ptr() == addend_ptr
    assert torch.equal(total.value, expected)
    assert torch.equal(a, a_before)  # `a`, held by the caller, untouched


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: torch.empty_strided((4,), (0,)).zero_(), id="overlapping"),
        pytest.param(lambda: torch.zeros(8)[::2], id="a view"),
        pytest.param(lambda: torch.zeros(4, requires_grad=True) * 1, id="in a graph"),
        pytest.param(lambda: torch.zeros(4, dtype=torch.float16), id="another dtype"),
    ],
)
def test_the_sums_never_write_a_gradient_that_cannot_take_it(make):
    from syncbn_ext.parameter_sums import Total

    total = Total()
    total.add(make())
    held = total.value
    snapshot = held.detach().clone()
    held = None
    total.add(torch.ones(4))
    assert total.value is not None and total.owned
    first = total.value
    assert torch.equal(first.detach().float(), snapshot.float() + 1)


@pytest.mark.parametrize("order", ["sparse, sparse, dense", "dense, sparse, sparse", "sparse, dense, dense"])
def test_sparse_and_dense_gradients_of_one_parameter_sum_to_a_dense_one(order):
    # One replica's gradient of an Embedding(sparse=True) weight is dense when that replica also used the weight
    # densely (a tied layer, on some samples only): the sum is dense, as autograd's accumulation makes it.
    from syncbn_ext.parameter_sums import Total

    def gradient(kind, row):
        dense = torch.zeros(3, 2)
        dense[row] = row + 1.0
        return dense if kind == "dense" else dense.to_sparse()

    total = Total()
    total.add_all([gradient(kind, row) for row, kind in enumerate(order.split(", "))])
    assert total.value is not None and not total.value.is_sparse
    torch.testing.assert_close(total.value, torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]))


class TiedOnSomeSamples(nn.Module):
    """A sparse embedding whose weight the slices holding index 19 also use densely (a tied output layer)."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(20, C, sparse=True)
        self.bn = SynchronizedBatchNorm1d(C)

    def forward(self, indices):
        h = self.bn(self.embedding(indices).sum(1))
        if bool((indices == 19).any()):
            h = h + nn.functional.linear(h, self.embedding.weight).sum(1, keepdim=True)
        return h


def test_a_parameter_some_replicas_give_sparse_and_others_dense_gradients_gets_the_serial_sum():
    torch.manual_seed(7)
    indices = torch.randint(0, 19, (9, 3))
    indices[7, 0] = 19  # replica 2 only
    grad = torch.randn(9, C, dtype=torch.float64)
    results = {}
    for parallel in (False, True):  # autograd's serial backward accumulates them: the reference
        torch.manual_seed(8)
        model = TiedOnSomeSamples().double()
        dp = DataParallelWithCallback(model, device_ids=["cpu"] * 3, parallel_backward=parallel)
        y = call_with_timeout(dp, indices)
        assert joined(y) == parallel
        call_with_timeout(y.backward, grad)
        results[parallel] = model.embedding.weight.grad.to_dense()
    torch.testing.assert_close(results[True], results[False], rtol=1e-10, atol=1e-10)


def test_the_sums_never_write_a_tensor_sharing_its_memory():
    from syncbn_ext.parameter_sums import Total

    base = torch.zeros(4)
    alias = base.view(2, 2)  # keeps base's memory shared
    total = Total()
    total.add(base)
    base = None
    total.add(torch.ones(4))
    assert torch.equal(alias, torch.zeros(2, 2))
    assert torch.equal(total.value, torch.ones(4))


class Probe(torch.autograd.Function):
    """Identity; its backward records when the gradient reached the start of the model, and on which thread."""

    events: list[tuple[str, int, int]] = []

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        Probe.events.append(("start of the model", -1, threading.get_ident()))
        return grad


class Probed(nn.Module):
    def forward(self, x):
        return Probe.apply(x)


@pytest.mark.parametrize("replicas", [2, 3])
def test_parameter_gradients_are_summed_while_the_backward_goes_on(monkeypatch, replicas):
    # Autograd runs the most recently created ready node first: a replica's handle on a parameter, made before the
    # forward, must not wait for the end of the backward (keeping every gradient alive until then).
    from syncbn_ext import parameter_sums

    take_for = parameter_sums.ParameterSums._hook

    def logging_hook(self, index, replica):
        take = take_for(self, index, replica)

        def logged(grad):
            if self.collecting:
                Probe.events.append(("parameter", index, threading.get_ident()))
            return take(grad)

        return logged

    monkeypatch.setattr(parameter_sums.ParameterSums, "_hook", logging_hook)
    torch.manual_seed(7)
    model = nn.Sequential(
        Probed(), nn.Linear(C, C), SynchronizedBatchNorm1d(C), nn.ReLU(), nn.Linear(C, C), SynchronizedBatchNorm1d(C)
    ).double()
    dp = DataParallelWithCallback(model, device_ids=["cpu"] * replicas, parallel_backward=True)
    x = torch.randn(4 * replicas, C, dtype=torch.float64, requires_grad=True)
    Probe.events.clear()
    y = call_with_timeout(dp, x)
    assert joined(y)
    call_with_timeout(y.square().sum().backward)
    last_layer_weight = len(list(model.parameters())) - 4  # the second Linear's weight: its gradient comes early
    threads = {thread for kind, _, thread in Probe.events if kind == "start of the model"}
    assert len(threads) == replicas
    for thread in threads:
        order = [(kind, index) for kind, index, t in Probe.events if t == thread]
        assert order.index(("parameter", last_layer_weight)) < order.index(("start of the model", -1)), order
    Probe.events.clear()


def test_sparse_gradients_are_summed_as_sparse_gradients():
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Embedding(20, C, sparse=True), nn.Flatten(), nn.Linear(3 * C, C), SynchronizedBatchNorm1d(C)
    ).double()
    reference = syncbn_ext.revert_model(copy.deepcopy(model))
    dp = DataParallelWithCallback(model, device_ids=["cpu"] * 3, parallel_backward=True)
    indices = torch.randint(0, 20, (9, 3))
    for _ in range(2):  # the second step adds to the sparse gradient the first left
        y = call_with_timeout(dp, indices)
        assert joined(y)
        grad = torch.randn_like(y)
        call_with_timeout(y.backward, grad)
        reference(indices).backward(grad)
    assert model[0].weight.grad.is_sparse
    torch.testing.assert_close(
        model[0].weight.grad.to_dense(), reference[0].weight.grad.to_dense(), rtol=1e-10, atol=1e-10
    )
    torch.testing.assert_close(model[2].weight.grad, reference[2].weight.grad, rtol=1e-10, atol=1e-10)


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return x * self.weight


def scaled_gradient(contributions, parallel_backward):
    model = Scale()
    dp = DataParallelWithCallback(model, ["cpu"] * len(contributions), parallel_backward=parallel_backward)
    call_with_timeout(lambda: dp(torch.tensor(contributions).view(-1, 1)).sum().backward())
    return model.weight.grad


@pytest.mark.parametrize("contributions", [[1e8, 1.0, -1e8], [1e8, 1.0, -1e8, 1.0]])
def test_the_parallel_backward_sums_the_replicas_gradients_in_replica_order_the_serial_one_repeatably(contributions):
    # Float32 makes the order visible: (1e8 + 1) - 1e8 == 0, (1e8 - 1e8) + 1 == 1. The serial backward leaves the
    # sum to autograd, in the order it runs the replicas' nodes: the same every run, not replica order (README).
    in_replica_order = torch.zeros(1)
    for contribution in contributions:
        in_replica_order = in_replica_order + torch.tensor([contribution])
    assert torch.equal(scaled_gradient(contributions, parallel_backward=True), in_replica_order)
    serial = [scaled_gradient(contributions, parallel_backward=False) for _ in range(3)]
    assert all(torch.equal(serial[0], again) for again in serial[1:]), serial
