"""CPU replicas' backward on one worker each, concurrently: the same gradients as autograd's serial backward (the
replicas' graphs' shapes: test_parallel_backward_graphs.py)."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch
from batchnorm_cases import assert_grads_equal, joined
from hang_guard import call_with_timeout
from torch import nn

import syncbn_ext
from syncbn_ext import DataParallelWithCallback, SynchronizedBatchNorm1d, SynchronizedBatchNorm2d
from syncbn_ext.replication import Replication

C = 4


def net():
    return nn.Sequential(
        nn.Conv2d(3, C, 3, padding=1),
        SynchronizedBatchNorm2d(C),
        nn.ReLU(),
        nn.Conv2d(C, C, 3, padding=1),
        SynchronizedBatchNorm2d(C, momentum=None),
        nn.Flatten(),
        nn.Linear(C * 16, 5),
        SynchronizedBatchNorm1d(5),
    ).double()


def setup(replicas=3, batch=10, parallel_backward=True):
    torch.manual_seed(0)
    model = net()
    reference = syncbn_ext.revert_model(copy.deepcopy(model))
    x = torch.randn(batch, 3, 4, 4, dtype=torch.float64)
    dp = DataParallelWithCallback(model, device_ids=["cpu"] * replicas, parallel_backward=parallel_backward)
    return dp, model, reference, x


@pytest.mark.parametrize("replicas", [2, 3, 4])
def test_parallel_backward_gives_the_whole_batch_gradients(replicas):
    dp, model, reference, x = setup(replicas)
    for step in range(2):
        xp, xr = (x + step).requires_grad_(), (x + step).requires_grad_()
        y = call_with_timeout(dp, xp)
        assert joined(y)
        y_ref = reference(xr)
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        grad = torch.randn_like(y)
        call_with_timeout(y.backward, grad)
        y_ref.backward(grad)
        torch.testing.assert_close(xp.grad, xr.grad, rtol=1e-10, atol=1e-10)
        assert_grads_equal(model, reference)
    for b, b_ref in zip(model.buffers(), reference.buffers(), strict=True):
        torch.testing.assert_close(b, b_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("threads", "cores", "replicas", "parallel"),
    [
        (2, 2, 2, False),  # as many intra-op threads as cores: the serial backward uses them all
        (2, 2, 4, False),  # more replicas than cores: no core to gain
        (4, 8, 2, False),
        (1, 2, 2, True),  # one intra-op thread: the replicas' threads use the cores the serial backward leaves idle
        (1, 8, 4, True),
        (2, 8, 4, True),
        (1, 1, 2, False),  # one core
    ],
)
def test_by_default_the_backward_runs_in_parallel_only_where_that_uses_more_cores(
    monkeypatch, threads, cores, replicas, parallel
):
    from syncbn_ext import parallel_backward

    monkeypatch.setattr(parallel_backward, "_usable_cores", lambda: cores)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert parallel_backward.faster_than_serial(replicas) is parallel
        dp, model, reference, x = setup(replicas, 2 * replicas, parallel_backward=None)
        assert dp.parallel_backward is None
        for choice in (None, not parallel, None):  # the attribute switches between forwards
            dp.parallel_backward = choice
            model.zero_grad()
            reference.zero_grad()
            xp, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
            y = call_with_timeout(dp, xp)
            assert joined(y) is (parallel if choice is None else choice)
            call_with_timeout(y.sum().backward)
            reference(xr).sum().backward()
            torch.testing.assert_close(xp.grad, xr.grad, rtol=1e-10, atol=1e-10)
            assert_grads_equal(model, reference)
    finally:
        torch.set_num_threads(saved)


def test_autograd_grad_with_respect_to_parameters_and_inputs():
    dp, model, reference, x = setup()
    xp, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    loss = call_with_timeout(dp, xp).square().sum()
    loss_ref = reference(xr).square().sum()
    params, params_ref = list(model.parameters()), list(reference.parameters())
    grads = call_with_timeout(torch.autograd.grad, loss, [xp, *params])
    grads_ref = torch.autograd.grad(loss_ref, [xr, *params_ref])
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10)
    assert all(p.grad is None for p in params)  # autograd.grad does not accumulate


class ScaledByABuffer(nn.Module):
    """A synchronized layer's output scaled by a buffer that requires grad (a leaf, not a parameter)."""

    def __init__(self, norm):
        super().__init__()
        self.linear = nn.Linear(3, 4)
        self.norm = norm(4)
        self.register_buffer("gain", torch.linspace(0.5, 2.0, 4, requires_grad=True))

    def forward(self, x):
        return self.norm(self.linear(x)) * self.gain


def test_autograd_grad_of_some_parameters_or_of_a_buffer_that_requires_grad():
    # Each replica computes only the gradients the engine will use. torch cannot tell that for a leaf asked for by
    # torch.autograd.grad (the buffer): such a boundary is computed as before (it raised torch's error).
    torch.manual_seed(0)
    model = ScaledByABuffer(SynchronizedBatchNorm1d).double()
    reference = ScaledByABuffer(nn.BatchNorm1d).double()
    reference.load_state_dict(model.state_dict())
    dp = DataParallelWithCallback(model, device_ids=["cpu"] * 2, parallel_backward=True)
    x = torch.randn(8, 3, dtype=torch.float64)
    for asked, asked_ref in (([model.norm.weight], [reference.norm.weight]), ([model.gain], [reference.gain])):
        got = call_with_timeout(torch.autograd.grad, dp(x).square().sum(), asked)
        expected = torch.autograd.grad(reference(x).square().sum(), asked_ref)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    assert all(p.grad is None for p in model.parameters())


def test_batched_gradients_give_the_whole_batch_vector_jacobian_products():
    # torch.autograd.grad(..., is_grads_batched=True) runs the backward under vmap: the gradients the replicas' sums
    # add are batched tensors, which have no storage to tell whether they may be written in place.
    dp, model, reference, x = setup()
    xp, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, out_ref = call_with_timeout(dp, xp), reference(xr)
    vectors = torch.randn(3, *out.shape, dtype=torch.float64)
    params, params_ref = list(model.parameters()), list(reference.parameters())
    grads = call_with_timeout(torch.autograd.grad, out, [xp, *params], vectors, is_grads_batched=True)
    grads_ref = torch.autograd.grad(out_ref, [xr, *params_ref], vectors, is_grads_batched=True)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10)


def test_retain_graph_and_a_second_backward():
    dp, model, reference, x = setup()
    y, y_ref = call_with_timeout(dp, x), reference(x)
    for _ in range(2):
        call_with_timeout(y.sum().backward, retain_graph=True)
        y_ref.sum().backward(retain_graph=True)
    assert_grads_equal(model, reference)
    call_with_timeout(y.sum().backward)  # the last one frees the graph
    with pytest.raises(RuntimeError, match="second time"):
        call_with_timeout(y.sum().backward)


class TwoHeads(nn.Module):
    """Two outputs whose graphs share nothing but the input; ``trunk=True``: a common synchronized layer first."""

    def __init__(self, trunk=False):
        super().__init__()
        self.trunk = SynchronizedBatchNorm1d(C) if trunk else nn.Identity()
        self.a = nn.Sequential(nn.Linear(C, C), SynchronizedBatchNorm1d(C))
        self.b = nn.Sequential(nn.Linear(C, C), SynchronizedBatchNorm1d(C))

    def forward(self, x):
        x = self.trunk(x)
        return self.a(x), self.b(x)


def test_separate_backwards_through_separate_outputs_free_only_their_graphs():
    # As on the whole batch: one backward per head without retain_graph; a second one through a freed graph, or
    # through a node the heads share, is torch's error.
    torch.manual_seed(6)
    model = TwoHeads().double()
    reference = syncbn_ext.revert_model(copy.deepcopy(model))
    dp = DataParallelWithCallback(model, device_ids=["cpu"] * 2, parallel_backward=True)
    x = torch.randn(6, C, dtype=torch.float64)
    x_dp, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    (a, b), (a_ref, b_ref) = call_with_timeout(dp, x_dp), reference(x_ref)
    call_with_timeout(a.square().sum().backward)
    call_with_timeout(b.pow(3).sum().backward)
    a_ref.square().sum().backward()
    b_ref.pow(3).sum().backward()
    torch.testing.assert_close(x_dp.grad, x_ref.grad, rtol=1e-10, atol=1e-10)
    assert_grads_equal(model, reference)
    with pytest.raises(RuntimeError, match="second time"):
        call_with_timeout(a.sum().backward)

    shared = DataParallelWithCallback(TwoHeads(trunk=True).double(), device_ids=["cpu"] * 2, parallel_backward=True)
    a, b = call_with_timeout(shared, x.clone().requires_grad_())
    call_with_timeout(a.sum().backward)
    with pytest.raises(RuntimeError, match="second time"):
        call_with_timeout(b.sum().backward)


class SlowBackward(torch.autograd.Function):
    """Identity whose backward takes a while: backwards started from two threads overlap there."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(0.5)
        return grad


class SlowTrunk(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(C, C), SynchronizedBatchNorm1d(C))
        self.heads = TwoHeads()

    def forward(self, x):
        return self.heads(SlowBackward.apply(self.trunk(x)))


def test_backwards_of_two_outputs_from_two_threads_at_once_add_both(monkeypatch):
    # torch lets threads run backward through one graph at once (retain_graph): the replicas' backwards of one
    # forward then run one after another. At once, the second run's start made the first one's tasks stale and the
    # first one's end emptied the second one's parameter sums: parameters got no gradient, without an error.
    monkeypatch.setenv("SYNCBN_TIMEOUT", "120")
    torch.manual_seed(7)
    model = SlowTrunk().double()
    reference = syncbn_ext.revert_model(copy.deepcopy(model))
    dp = DataParallelWithCallback(model, device_ids=["cpu"] * 2, parallel_backward=True)
    x = torch.randn(6, C, dtype=torch.float64)
    heads = call_with_timeout(dp, x)
    errors = []

    def backward(head, delay):
        time.sleep(delay)
        try:
            head.sum().backward(retain_graph=True)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=backward, args=(head, 0.2 * i)) for i, head in enumerate(heads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == [] and not any(thread.is_alive() for thread in threads)
    a_ref, b_ref = reference(x)
    (a_ref.sum() + b_ref.sum()).backward()
    assert_grads_equal(model, reference)


def test_double_backward_for_a_gradient_penalty():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    reference = copy.deepcopy(model)
    dp = DataParallelWithCallback(model, device_ids=["cpu"] * 2, parallel_backward=True)
    x = torch.randn(8, 3, dtype=torch.float64)

    def penalty(module, x):
        x = x.clone().requires_grad_()
        (grad,) = torch.autograd.grad(module(x).sum(), x, create_graph=True)
        return grad.square().sum()

    call_with_timeout(penalty(dp, x).backward)
    penalty(reference, x).backward()
    assert_grads_equal(model, reference)


def test_without_gradients_nothing_is_joined():
    dp, _, _, x = setup()

    def forward_without_grad():
        with torch.no_grad():
            return dp(x)

    assert call_with_timeout(forward_without_grad).grad_fn is None
    assert Replication.of(dp.replicate(dp.module, dp.device_ids)[0])[0].group.parallel_backward is False


class RecordThreads(torch.autograd.Function):
    """Identity; records torch's intra-op thread count where its forward and its backward run."""

    seen: list[tuple[str, int]] = []

    @staticmethod
    def forward(ctx, x):
        RecordThreads.seen.append(("forward", torch.get_num_threads()))
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        RecordThreads.seen.append(("backward", torch.get_num_threads()))
        return grad


class RecordingLayer(nn.Module):
    def forward(self, x):
        return RecordThreads.apply(x)


@pytest.mark.parametrize(("threads", "replicas", "share"), [(2, 2, 1), (4, 2, 2), (2, 4, 1), (3, 2, 1)])
def test_each_replica_computes_with_its_share_of_the_intra_op_threads(threads, replicas, share):
    # torch sizes a thread's OpenMP team at its first parallel op to the process-wide count: a worker must not
    # take that over the share it was given, or the replicas oversubscribe the cores.
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = nn.Sequential(nn.Linear(C, C), RecordingLayer(), SynchronizedBatchNorm1d(C)).double()
        dp = DataParallelWithCallback(model, device_ids=["cpu"] * replicas, parallel_backward=True)
        RecordThreads.seen.clear()
        for _ in range(2):
            y = call_with_timeout(dp, torch.randn(2 * replicas, C, dtype=torch.float64))
            assert joined(y)
            call_with_timeout(y.sum().backward)
        assert sorted(RecordThreads.seen) == sorted([("forward", share), ("backward", share)] * replicas * 2)
        assert torch.get_num_threads() == threads  # the caller's own count is left alone
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize(
    "memory_format, shape", [(torch.channels_last, (5, C, 3, 4)), (torch.channels_last_3d, (5, C, 2, 3, 4))]
)
def test_outputs_keep_their_memory_format_when_a_replica_has_one_sample(memory_format, shape):
    # Batch 5 over 3 replicas: a slice of one sample, whose joined output autograd re-aliased with its batch
    # dimension's stride renormalized, so the gather's cat gave a contiguous output where nn.BatchNorm keeps the
    # input's channels_last.
    torch.manual_seed(8)
    layer = SynchronizedBatchNorm2d(C) if len(shape) == 4 else syncbn_ext.SynchronizedBatchNorm3d(C)
    reference = syncbn_ext.revert_model(copy.deepcopy(layer)).double()
    dp = DataParallelWithCallback(layer.double(), device_ids=["cpu"] * 3, parallel_backward=True)
    x = torch.randn(shape, dtype=torch.float64).contiguous(memory_format=memory_format)
    xp, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = call_with_timeout(dp, xp)
    y_ref = reference(xr)
    assert joined(y) and y.is_contiguous(memory_format=memory_format)
    assert y.stride() == y_ref.stride()
    grad = torch.randn_like(y)
    call_with_timeout(y.backward, grad)
    y_ref.backward(grad)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(xp.grad, xr.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("value", ["false", "no", 1, 0.5, [0]])
def test_parallel_backward_is_none_true_or_false(value):
    # Any truthy value chose the parallel backward: "false" from a config file turned it on.
    with pytest.raises(TypeError, match="parallel_backward must be None \\(choose\\), True or False"):
        DataParallelWithCallback(net(), device_ids=["cpu"] * 2, parallel_backward=value)
    dp = DataParallelWithCallback(net(), device_ids=["cpu"] * 2)
    dp.parallel_backward = value  # an attribute, which can be set between forwards: checked at the forward
    with pytest.raises(TypeError, match="parallel_backward must be None"):
        call_with_timeout(dp, torch.randn(4, 3, 4, 4, dtype=torch.float64))
