"""CPU replicas' backward on one worker each, concurrently: the same gradients as autograd's serial backward."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from batchnorm_cases import assert_grads_equal
from hang_guard import call_with_timeout
from torch import nn

import syncbn_ext
from syncbn_ext import DataParallelWithCallback, SynchronizedBatchNorm1d, SynchronizedBatchNorm2d
from syncbn_ext.replicate import Replication

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


def joined(output):
    """Whether the output's backward goes through the node that runs the replicas' backward in parallel."""
    pending, seen = [output.grad_fn], set()
    while pending:
        node = pending.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if type(node).__name__ == "_JoinReplicasBackward":
            return True
        pending += [next_node for next_node, _ in node.next_functions]
    return False


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


class SumAcrossReplicas(nn.Module):
    """Adds the sum of every replica's input mean, exchanged *with its graph* through a SyncMaster (as the
    established library's layers do): the replicas' graphs share nodes, so their backward stays serial."""

    def __init__(self):
        super().__init__()
        self.master = syncbn_ext.SyncMaster(lambda items: [(i, sum(m for _, m in items)) for i, _ in items])
        self.copy_id, self.pipe = None, None

    def __data_parallel_replicate__(self, ctx, copy_id):
        self.copy_id = copy_id
        if copy_id == 0:
            self.master.reset()
            ctx.master = self.master
        else:
            self.pipe = ctx.master.register_slave(copy_id)

    def forward(self, x):
        mean = x.mean()
        if self.copy_id is None:
            total = mean
        elif self.copy_id == 0:
            total = self.master.run_master(mean)
        else:
            total = self.pipe.run_slave(mean)
        return x + total


def test_replicas_whose_graphs_meet_keep_the_serial_backward():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 3), SumAcrossReplicas()).double()
    dp = DataParallelWithCallback(model, device_ids=["cpu"] * 2, parallel_backward=True)
    x = torch.randn(4, 3, dtype=torch.float64)
    y = call_with_timeout(dp, x)
    assert not joined(y)
    call_with_timeout(y.sum().backward)
    # The reference: each half adds the sum of both halves' means.
    reference = copy.deepcopy(model[0])
    h = reference(x)
    total = h[:2].mean() + h[2:].mean()
    (h + total).sum().backward()
    torch.testing.assert_close(model[0].weight.grad, reference.weight.grad)


def test_a_leaf_outside_the_module_gets_its_gradient():
    external = torch.randn(C, dtype=torch.float64, requires_grad=True)

    class UsesExternal(nn.Module):
        def forward(self, x):
            return x * external

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(C, C), UsesExternal(), SynchronizedBatchNorm1d(C)).double()
    reference = syncbn_ext.revert_model(copy.deepcopy(model))
    dp = DataParallelWithCallback(model, device_ids=["cpu"] * 2, parallel_backward=True)
    x = torch.randn(6, C, dtype=torch.float64)
    y = call_with_timeout(dp, x)
    assert joined(y)
    grad = torch.randn_like(y)
    call_with_timeout(y.backward, grad)
    expected = external.grad.clone()
    external.grad = None
    reference(x).backward(grad)
    torch.testing.assert_close(expected, external.grad, rtol=1e-10, atol=1e-10)


class FailingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise ValueError("backward failed in this replica")


MARKER = -1234.0


class FailOnMarker(nn.Module):
    """Fails in backward in the replica whose slice holds the marker (no replication hook: a parallel backward)."""

    def __init__(self):
        super().__init__()
        self.armed = True

    def forward(self, x):
        return FailingBackward.apply(x) if self.armed and (x.abs() > 1000).any() else x


def test_a_replica_failing_in_backward_raises_at_once(monkeypatch):
    monkeypatch.setenv("SYNCBN_TIMEOUT", "120")  # the others must not wait for it until a timeout
    torch.manual_seed(4)
    model = nn.Sequential(FailOnMarker(), nn.Linear(C, C), SynchronizedBatchNorm1d(C)).double()
    dp = DataParallelWithCallback(model, device_ids=["cpu"] * 3, parallel_backward=True)
    x = torch.randn(6, C, dtype=torch.float64)
    x[3] = MARKER  # in replica 1's slice
    y = call_with_timeout(dp, x.requires_grad_())
    assert joined(y)
    with pytest.raises(ValueError, match="backward failed in this replica") as raised:
        call_with_timeout(y.sum().backward)
    assert raised.value.__notes__[-1] == "(raised in replica 1 on device cpu, in backward)"
    # The next step works.
    model[0].armed = False
    y = call_with_timeout(dp, torch.randn(6, C, dtype=torch.float64))
    call_with_timeout(y.sum().backward)


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
    from syncbn_ext.parallel_backward import _Total

    total = _Total()
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
    total = _Total()
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
    from syncbn_ext.parallel_backward import _Total

    total = _Total()
    total.add(make())
    held = total.value
    snapshot = held.detach().clone()
    held = None
    total.add(torch.ones(4))
    assert total.value is not None and total.owned
    first = total.value
    assert torch.equal(first.detach().float(), snapshot.float() + 1)


def test_the_sums_never_write_a_tensor_sharing_its_memory():
    from syncbn_ext.parallel_backward import _Total

    base = torch.zeros(4)
    alias = base.view(2, 2)  # keeps base's memory shared
    total = _Total()
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
    from syncbn_ext import parallel_backward

    take_for = parallel_backward._ParameterSums._hook

    def logging_hook(self, index, replica):
        take = take_for(self, index, replica)

        def logged(grad):
            if self.collecting:
                Probe.events.append(("parameter", index, threading.get_ident()))
            return take(grad)

        return logged

    monkeypatch.setattr(parallel_backward._ParameterSums, "_hook", logging_hook)
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
