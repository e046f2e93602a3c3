"""CPU replicas' parallel backward and the shapes of the replicas' graphs: graphs that meet (serial backward),
tensors with a graph held on modules (cut there, run once), outputs and parameters the loss does not use."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from batchnorm_cases import assert_grads_equal, joined
from hang_guard import call_with_timeout
from torch import nn

import syncbn_ext
from syncbn_ext import DataParallelWithCallback, SynchronizedBatchNorm1d

C = 4


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


def assert_the_leaf_gets_the_references_gradient(y, reference, x, leaf):
    """Backward of ``y`` (the wrapper's output), then of ``reference(x)``, with one random gradient: ``leaf``, a tensor
    outside the modules, gets the same gradient from both."""
    grad = torch.randn_like(y)
    call_with_timeout(y.backward, grad)
    expected = leaf.grad.clone()
    leaf.grad = None
    reference(x).backward(grad)
    torch.testing.assert_close(expected, leaf.grad, rtol=1e-10, atol=1e-10)


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
    assert_the_leaf_gets_the_references_gradient(y, reference, x, external)


class ScaledByAnAttribute(nn.Module):
    """Multiplies by ``self.scale``, a tensor with a graph computed from the parameters before the forward (held
    as a plain attribute, as a cache), and adds the tensors ``self.external()`` returns."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(C, C)
        self.bn = SynchronizedBatchNorm1d(C)
        self.external = list  # tensors reached through a closure: a function returning them

    def forward(self, x):
        y = self.linear(x) * self.scale
        for t in self.external():
            y = y + t
        return self.bn(y)


def _scaled_model(external=None):
    torch.manual_seed(5)
    model = ScaledByAnAttribute().double()
    reference = syncbn_ext.revert_model(copy.deepcopy(model))
    if external is not None:
        model.external = reference.external = lambda: [external]
    return model, reference


def test_a_tensor_with_a_graph_held_as_an_attribute_is_cut_at_and_runs_each_replica_once():
    model, reference = _scaled_model()
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    dp = DataParallelWithCallback(model, device_ids=["cpu"] * 2, parallel_backward=True)
    x = torch.randn(6, C, dtype=torch.float64)
    for step in range(2):
        for m in (model, reference):
            m.scale = m.linear.weight.sum(0) * 0.5  # a new graph each step
        y = call_with_timeout(dp, x + step)
        assert joined(y) and dp.parallel_backward is True
        grad = torch.randn_like(y)
        call_with_timeout(y.backward, grad)
        reference(x + step).backward(grad)
    assert len(calls) == 2 * 2  # once per replica and step: never run again
    assert_grads_equal(model, reference)


class CachesItsActivation(nn.Module):
    """Keeps its hidden activation as an attribute and in a list its replicas share, as caching modules do."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(C, C)
        self.bn = SynchronizedBatchNorm1d(C)
        self.seen = []

    def forward(self, x):
        self.hidden = self.linear(x)
        self.seen.append(self.hidden)
        return self.bn(self.hidden)


@pytest.mark.parametrize("store", ["spectral_norm", "weight_norm", "forward_hook", "forward"])
def test_tensors_the_forward_stores_on_a_module_are_inside_the_replicas_graph(store):
    # Taken for the graph's edge (as attribute tensors made before the forward are), the worker's backward went
    # through them and autograd again after it: "backward through the graph a second time", or, with
    # retain_graph=True, twice their gradients. Old-style spectral_norm and weight_norm set the weight in a hook.
    torch.manual_seed(6)
    if store == "forward":
        model = CachesItsActivation().double()
    else:
        model = nn.Sequential(nn.Linear(C, C), SynchronizedBatchNorm1d(C), nn.ReLU(), nn.Linear(C, 3)).double()
    reference = syncbn_ext.revert_model(copy.deepcopy(model))
    for m in (model, reference):
        bn = m.bn if store == "forward" else m[1]
        if store == "spectral_norm":
            torch.nn.utils.spectral_norm(bn, "weight", dim=0)
        elif store == "weight_norm":
            with pytest.warns(FutureWarning):
                torch.nn.utils.weight_norm(bn, "weight", dim=None)
        elif store == "forward_hook":
            bn.register_forward_hook(lambda module, args, output: setattr(module, "last_output", output))
    dp = DataParallelWithCallback(model, device_ids=["cpu"] * 2, parallel_backward=True)
    x = torch.randn(6, C, dtype=torch.float64)
    for step in range(3):
        model.zero_grad()
        reference.zero_grad()
        y = call_with_timeout(dp, x + step)
        assert joined(y) and dp.parallel_backward is True
        grad = torch.randn_like(y)
        call_with_timeout(y.backward, grad, retain_graph=step == 0)
        reference(x + step).backward(grad)
        assert_grads_equal(model, reference)
    for b, b_ref in zip(model.buffers(), reference.buffers(), strict=True):
        torch.testing.assert_close(b, b_ref, rtol=1e-12, atol=1e-12)


def test_replicas_meeting_at_a_tensor_reached_otherwise_run_again_serially_with_a_warning():
    source = torch.randn(C, dtype=torch.float64, requires_grad=True)
    external = source + 1.0  # a graph every replica reaches, not through an attribute tensor (none saved)
    model, reference = _scaled_model(external)
    for m in (model, reference):
        m.scale = torch.ones(C, dtype=torch.float64)
    dp = DataParallelWithCallback(model, device_ids=["cpu"] * 2, parallel_backward=True)
    x = torch.randn(6, C, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="ran again .* parallel_backward=False") as caught:
        y = call_with_timeout(dp, x)
    assert caught[0].filename.endswith("hang_guard.py")  # the code calling the wrapper (here the hang guard's)
    assert not joined(y) and dp.parallel_backward is False
    assert_the_leaf_gets_the_references_gradient(y, reference, x, source)
    assert_grads_equal(model, reference)


class UsesALeafAndAnAttributeComputedFromIt(nn.Module):
    def __init__(self, norm: type[nn.Module]) -> None:
        super().__init__()
        self.linear, self.norm = nn.Linear(C, C).double(), norm(C).double()
        self.leaf = torch.full((C,), 1.5, dtype=torch.float64, requires_grad=True)  # not a parameter
        self.attribute = self.leaf * 2  # computed once, before the forward

    def forward(self, x):
        return self.norm(self.linear(x)) * self.attribute + self.leaf


def test_an_attribute_tensor_whose_graph_leads_to_another_tensor_the_forward_uses_runs_again_serially():
    # Before, the leaf's gradient through the attribute was counted twice (the worker went through the attribute's
    # graph to the leaf, and the join handed the attribute's gradient back through it again): silently wrong.
    torch.manual_seed(0)
    reference = UsesALeafAndAnAttributeComputedFromIt(nn.BatchNorm1d)
    model = UsesALeafAndAnAttributeComputedFromIt(SynchronizedBatchNorm1d)
    model.load_state_dict(reference.state_dict())
    x = torch.randn(8, C, dtype=torch.float64)
    reference(x).pow(3).sum().backward()
    dp = DataParallelWithCallback(model, device_ids=["cpu"] * 2, parallel_backward=True)
    with pytest.warns(RuntimeWarning, match="has a graph leading to another tensor the forward uses") as caught:
        y = call_with_timeout(dp, x)
    assert caught[0].filename.endswith("hang_guard.py")
    assert not joined(y) and dp.parallel_backward is False
    call_with_timeout(lambda: y.pow(3).sum().backward())
    torch.testing.assert_close(model.leaf.grad, reference.leaf.grad)
    assert_grads_equal(model, reference)


class ChosenHead(nn.Module):
    """A synchronized layer whose output only the replicas with a positive first value use (the others' head reads
    the layer's input); optionally a second output, from a second head (with a synchronized layer of its own) on the
    layer's output."""

    def __init__(self, second_output):
        super().__init__()
        self.linear = nn.Linear(C, C)
        self.norm = SynchronizedBatchNorm1d(C)
        self.head = nn.Linear(C, 2)
        self.second_head = nn.Sequential(nn.Linear(C, C), SynchronizedBatchNorm1d(C), nn.Linear(C, 2))
        self.second_output = second_output

    def forward(self, x):
        z = self.linear(x)
        y = self.norm(z)
        head = self.head(y if x[0, 0] > 0 else z)
        return (head, self.second_head(y)) if self.second_output else head

    def reference(self, x, replicas):
        """The whole batch through the same layers, each replica's slice choosing its head's input alike."""
        z = self.linear(x)
        y = self.norm(z)
        chosen = [
            ys if xs[0, 0] > 0 else zs
            for xs, ys, zs in zip(x.chunk(replicas), y.chunk(replicas), z.chunk(replicas), strict=True)
        ]
        return self.head(torch.cat(chosen))


@pytest.mark.parametrize("parallel_backward", [True, False])
@pytest.mark.parametrize("second_output", [False, True], ids=["one_output", "unused_second_output"])
def test_what_the_loss_does_not_use(parallel_backward, second_output):
    # Replica 0's loss does not depend on the layer's output, but its input is in the whole batch's statistics,
    # which the other replicas' losses depend on: it gets that gradient. A second output the loss does not use
    # leaves its parameters' gradients None (not zeros, which an optimizer such as Adam would apply), also those
    # below its synchronized layer.
    torch.manual_seed(5)
    model = ChosenHead(second_output).double()
    reference = copy.deepcopy(model)
    dp = DataParallelWithCallback(model, device_ids=["cpu"] * 3, parallel_backward=parallel_backward)
    x = torch.randn(9, C, dtype=torch.float64)
    x[0, 0], x[3, 0], x[6, 0] = -1.0, 1.0, -1.0
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    output = call_with_timeout(dp, x_ours)
    head = output[0] if second_output else output
    grad = torch.randn_like(head)
    call_with_timeout(head.backward, grad)
    reference.reference(x_ref, 3).backward(grad)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-10, atol=1e-10)
    assert all(p.grad is None for p in model.second_head.parameters())
    assert_grads_equal(model, syncbn_ext.revert_model(reference))


class WithAuxiliaryHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(C, C), SynchronizedBatchNorm1d(C), nn.ReLU(), nn.Linear(C, 2))
        self.aux = nn.Linear(C, 2)  # not called on this step (deep supervision on other steps, say)

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("parallel_backward", [True, False])
def test_parameters_the_forward_did_not_use_get_no_hook_call_and_no_gradient(parallel_backward):
    # As in the whole batch's backward. The parallel backward called their hooks with None (gradient clipping hooks
    # and optimizers run in backward then raised).
    torch.manual_seed(0)
    model = WithAuxiliaryHead().double()
    reference = copy.deepcopy(model)
    calls = []
    for name, parameter in model.named_parameters():
        parameter.register_hook(lambda grad, name=name: calls.append((name, grad is None)))
        parameter.register_post_accumulate_grad_hook(lambda p, name=name: calls.append((name, p.grad is None)))
    dp = DataParallelWithCallback(model, device_ids=["cpu"] * 2, parallel_backward=parallel_backward)
    x = torch.randn(8, C, dtype=torch.float64)
    call_with_timeout(lambda: dp(x).sum().backward())
    used = [name for name, _ in model.body.named_parameters(prefix="body")]
    assert sorted(calls) == sorted([(name, False) for name in used] * 2)  # each hook once, with a gradient
    assert all(p.grad is None for p in model.aux.parameters())
    syncbn_ext.revert_model(reference)(x).sum().backward()
    assert_grads_equal(model, reference)


class StatisticsOnlyInOneReplica(nn.Module):
    """Where its batch is marked, a replica normalizes ``p(x)`` but returns ``q(x.detach())``: its input and ``p``
    reach its loss only through the whole batch's statistics (the other replica returns ``bn(p(x))``)."""

    def __init__(self) -> None:
        super().__init__()
        self.p, self.q = nn.Linear(C, C), nn.Linear(C, C)
        self.bn = SynchronizedBatchNorm1d(C)

    def forward(self, x):
        if bool(x[0, 0] > 100):
            self.bn(self.p(x))
            return self.q(x.detach())
        return self.bn(self.p(x))


def test_what_only_the_whole_batchs_statistics_lead_to_gets_its_gradient_in_the_parallel_backward():
    # The join's edges were chosen from the replicas' outputs alone: replica 0's input slice got zeros and p's
    # parameters None (silently), where autograd's serial backward reaches them through the statistics' merge.
    torch.manual_seed(0)
    model = StatisticsOnlyInOneReplica().double()
    x = torch.randn(8, C, dtype=torch.float64)
    x[:4, 0] += 1000  # replica 0's slice
    results = []
    for parallel_backward in (False, True):
        ours = copy.deepcopy(model)
        calls = []
        ours.p.weight.register_hook(lambda grad, calls=calls: calls.append(grad is None))
        leaf = x.clone().requires_grad_()
        dp = DataParallelWithCallback(ours, device_ids=["cpu"] * 2, parallel_backward=parallel_backward)
        call_with_timeout(lambda dp=dp, leaf=leaf: (dp(leaf) ** 3).sum().backward())
        results.append((ours, leaf.grad, calls))
    (serial, serial_grad, serial_calls), (parallel, parallel_grad, parallel_calls) = results
    assert serial_grad[:4].norm() > 0 and serial.p.weight.grad is not None and serial_calls == [False]
    torch.testing.assert_close(parallel_grad, serial_grad, rtol=1e-10, atol=1e-10)
    assert parallel_calls == serial_calls
    assert_grads_equal(parallel, serial)


class OneReplicaCut(nn.Module):
    """Where its batch is marked, a replica normalizes a constant: ``p(x)`` detached (``how="detached"``), or the
    layer called under ``torch.no_grad()`` (``how="no_grad"``); the other replica normalizes ``p(x)`` with its graph."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.p, self.q = nn.Linear(C, C), nn.Linear(C, C)
        self.bn = SynchronizedBatchNorm1d(C)

    def forward(self, x):
        h = self.p(x)
        if bool(x[0, 0] > 100):
            if self.how == "detached":
                return self.q(self.bn(h.detach()))
            with torch.no_grad():
                y = self.bn(h)
            return self.q(y)
        return self.q(self.bn(h))


@pytest.mark.parametrize("how", ["detached", "no_grad"])
@pytest.mark.parametrize("marked", [0, 1])
@pytest.mark.parametrize("parallel_backward", [False, True])
def test_a_replica_normalizing_a_constant_still_counts_in_the_statistics_gradient(how, marked, parallel_backward):
    # Reference: the whole batch through F.batch_norm, the marked replica's rows cut (a constant) where that
    # replica cut them. Before: the parallel backward dropped a detached replica's share of the statistics'
    # gradient (its merge had no node), and the serial one every share when replica 0 ran the layer under no_grad
    # (the merge looked at the master thread's grad mode).
    torch.manual_seed(0)
    model = OneReplicaCut(how).double()
    x = torch.randn(8, C, dtype=torch.float64)
    rows = slice(4 * marked, 4 * marked + 4)
    x[rows.start, 0] += 1000
    ours = copy.deepcopy(model)
    leaf = x.clone().requires_grad_()
    dp = DataParallelWithCallback(ours, device_ids=["cpu"] * 2, parallel_backward=parallel_backward)
    call_with_timeout(lambda: (dp(leaf) ** 3).sum().backward())
    reference = copy.deepcopy(model)
    reference_leaf = x.clone().requires_grad_()
    cut = torch.zeros(8, 1, dtype=torch.bool)
    cut[rows] = True
    h = reference.p(reference_leaf)
    h = torch.where(cut, h.detach(), h)
    y = F.batch_norm(h, None, None, reference.bn.weight, reference.bn.bias, training=True, eps=reference.bn.eps)
    if how == "no_grad":
        y = torch.where(cut, y.detach(), y)
    (reference.q(y) ** 3).sum().backward()
    torch.testing.assert_close(leaf.grad, reference_leaf.grad, rtol=1e-10, atol=1e-10)
    assert_grads_equal(ours, reference)


class SkipsALayerInOneReplica(nn.Module):
    """Where its batch is marked, a replica's samples skip ``p`` (a data-dependent branch), then every replica
    normalizes and applies ``q``."""

    def __init__(self) -> None:
        super().__init__()
        self.p, self.q = nn.Linear(C, C), nn.Linear(C, C)
        self.bn = SynchronizedBatchNorm1d(C)

    def forward(self, x):
        h = x if bool(x[0, 0] > 100) else self.p(x)
        return self.q(self.bn(h))


@pytest.mark.parametrize("ask", ["backward_inputs", "autograd_grad"])
@pytest.mark.parametrize("parameter", ["p", "bn"])
@pytest.mark.parametrize("input_requires_grad", [True, False])
def test_a_backward_asking_for_some_parameters_still_gets_every_replicas_share_of_the_statistics(
    ask, parameter, input_requires_grad
):
    # Replica 0 has no p: a task computing only p's gradient skipped its merge, so its share of the statistics'
    # gradient missed replica 1's (sign-flipped, silently). Without the input's gradient replica 0's statistics
    # have no graph (its merge is reached through an anchor); asking for bn's weight only, no merge runs.

    def step(dp, ours, leaf):
        weight = getattr(ours, parameter).weight
        loss = (dp(leaf) ** 3).sum()
        if ask == "backward_inputs":
            loss.backward(inputs=[weight])
            return weight.grad
        return torch.autograd.grad(loss, [weight])[0]

    serial, parallel = serial_and_parallel(SkipsALayerInOneReplica, step, input_requires_grad)
    torch.testing.assert_close(parallel, serial, rtol=1e-10, atol=1e-10)


def serial_and_parallel(model_class, step, input_requires_grad=True):
    """``step(wrapper, model, input)`` on two CPU replicas of one ``model_class`` (float64), under the serial then
    the parallel backward; the input's first sample marked (replica 0's branch)."""
    torch.manual_seed(0)
    model = model_class().double()
    x = torch.randn(8, C, dtype=torch.float64)
    x[0, 0] += 1000
    results = []
    for parallel_backward in (False, True):
        ours = copy.deepcopy(model)
        dp = DataParallelWithCallback(ours, device_ids=["cpu"] * 2, parallel_backward=parallel_backward)
        results.append(call_with_timeout(step, dp, ours, x.clone().requires_grad_(input_requires_grad)))
    return results


class ChainsLayersInOneReplica(nn.Module):
    """Where its batch is marked, a replica normalizes twice in a row; the others apply ``p`` before the first layer
    and feed the second with their input."""

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Linear(C, C)
        self.bn1, self.bn2 = SynchronizedBatchNorm1d(C), SynchronizedBatchNorm1d(C)

    def forward(self, x):
        marked = bool(x[0, 0] > 100)
        h = self.bn1(x if marked else self.p(x))
        return self.bn2(h if marked else 2 * x)


def test_a_backward_asking_for_a_parameter_below_chained_layers_runs_every_merge_the_serial_one_does():
    # Asking for p's weight: the serial engine runs bn2's merge (the marked replica's bn2 leads to its bn1, whose
    # merge leads to the other replica's p). The other replica's own way from bn2 leads to nothing asked for: its
    # task skipped bn2's merge while the marked one waited there, and each waited for the other until the timeout.
    serial, parallel = serial_and_parallel(
        ChainsLayersInOneReplica, lambda dp, ours, leaf: torch.autograd.grad((dp(leaf) ** 3).sum(), [ours.p.weight])[0]
    )
    torch.testing.assert_close(parallel, serial, rtol=1e-10, atol=1e-10)
