"""Replication: replicate_on_cpu, CallbackContext and execute_replication_callbacks over nn.Module replicas."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import syncbn_ext
from syncbn_ext import replicate_on_cpu


class Hooked(nn.Module):
    """Records the replication hooks it receives in a log shared by its replicas."""

    def __init__(self, tag, log):
        super().__init__()
        self.tag = tag
        self.log = log

    def __data_parallel_replicate__(self, ctx, copy_id):
        self.log.append((self.tag, copy_id, ctx))
        if copy_id == 0:
            ctx.owner = self.tag
            ctx.sync_master = syncbn_ext.SyncMaster(lambda items: items)
        else:
            assert ctx.owner == self.tag  # the master of this position ran first
            self.pipe = ctx.sync_master.register_slave(copy_id)

    def forward(self, x):
        return x


def make_net(log):
    return nn.Sequential(nn.Linear(2, 2), Hooked("a", log), nn.ReLU(), nn.Sequential(Hooked("b", log)))


def test_master_first_one_shared_context_per_position():
    log = []
    replicas = [make_net(log) for _ in range(3)]
    contexts = syncbn_ext.execute_replication_callbacks(replicas)
    assert len(contexts) == len(list(replicas[0].modules())) == 6
    for tag, position in (("a", 2), ("b", 5)):
        calls = [(copy_id, ctx) for t, copy_id, ctx in log if t == tag]
        assert [copy_id for copy_id, _ in calls] == [0, 1, 2]
        assert all(ctx is contexts[position] for _, ctx in calls)
        assert contexts[position].sync_master.nr_slaves == 2
    assert contexts[2] is not contexts[5]
    assert len(contexts[0]) == 0  # no hook at position 0: its context stays empty


def test_non_isomorphic_replicas_name_position_and_types():
    log = []
    other = nn.Sequential(nn.Linear(2, 2), nn.Tanh())
    with pytest.raises(ValueError) as caught:
        syncbn_ext.execute_replication_callbacks([make_net(log), other])
    message = str(caught.value)
    assert "position 2" in message
    assert "Hooked" in message and "torch.nn.modules.activation.Tanh" in message
    assert log == []  # nothing ran before the check
    with pytest.raises(ValueError, match="has 6 modules but copy 1 has 2"):
        syncbn_ext.execute_replication_callbacks([make_net(log), nn.Sequential(nn.Linear(2, 2))])


def test_callback_context_is_attribute_storage():
    ctx = syncbn_ext.CallbackContext()
    with pytest.raises(AttributeError, match="sync_master"):
        ctx.sync_master  # noqa: B018
    assert getattr(ctx, "sync_master", None) is None
    value = object()
    ctx.sync_master = value
    assert ctx.sync_master is value
    assert "sync_master" in ctx and ctx.keys() == ["sync_master"]
    del ctx.sync_master
    assert "sync_master" not in ctx
    with pytest.raises(AttributeError):
        del ctx.sync_master


def test_callback_context_is_thread_safe():
    ctx = syncbn_ext.CallbackContext()

    def write(tag):
        for i in range(2000):
            setattr(ctx, f"k{tag}", i)
            assert getattr(ctx, f"k{tag}") == i

    threads = [threading.Thread(target=write, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(ctx.keys()) == ["k0", "k1", "k2", "k3"]


def test_hook_exception_propagates():
    class Broken(nn.Module):
        def __data_parallel_replicate__(self, ctx, copy_id):
            raise RuntimeError(f"hook failed in copy {copy_id}")

    with pytest.raises(RuntimeError, match="hook failed in copy 0"):
        syncbn_ext.execute_replication_callbacks([Broken(), Broken()])


def test_tensors_round_trip_through_context():
    ctx = syncbn_ext.CallbackContext()
    ctx.tensor = torch.arange(3)
    assert torch.equal(ctx.tensor, torch.arange(3))


# ---------------------------------------------------------------------------------------------------------------
# Replication on CPU
# ---------------------------------------------------------------------------------------------------------------


def test_replicate_on_cpu_shares_parameters_and_buffers_like_gpus():
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.BatchNorm1d(3), shared, nn.Sequential())
    model.register_buffer("rg_buffer", torch.ones(3, requires_grad=True))
    replicas = replicate_on_cpu(model, 3)
    assert len(replicas) == 3

    for j, replica in enumerate(replicas):
        assert replica is not model and type(replica) is nn.Sequential and replica._is_replica
        assert replica[0] is replica[2] and replica[0] is not shared  # shared submodule stays shared
        # Parameters: differentiable views of the originals, plain attributes rather than Parameters.
        assert list(replica.parameters()) == []
        w = replica[0].weight
        assert not isinstance(w, nn.Parameter) and w.requires_grad and w.grad_fn is not None
        assert w.data_ptr() == shared.weight.data_ptr()
        torch.testing.assert_close(w, shared.weight)
        # Buffers: replica 0 uses the original's tensors, the others clones.
        mean = replica[1].running_mean
        if j == 0:
            assert mean is model[1].running_mean and replica.rg_buffer is model.rg_buffer
        else:
            assert mean.data_ptr() != model[1].running_mean.data_ptr() and not mean.requires_grad
            assert replica.rg_buffer.requires_grad and replica.rg_buffer.grad_fn is not None
            torch.testing.assert_close(mean, model[1].running_mean)

    # Gradients through every replica accumulate on the original leaf parameter.
    x = torch.randn(4, 3)
    sum(r[0](x).sum() for r in replicas).backward()
    torch.testing.assert_close(shared.weight.grad, 3 * x.sum(0).expand(3, 3))


def test_replicate_on_cpu_detaches_without_grad():
    model = nn.Linear(2, 2)
    with torch.no_grad():
        replicas = replicate_on_cpu(model, 2)
    assert all(not r.weight.requires_grad and r.weight.grad_fn is None for r in replicas)
    assert all(r.weight.data_ptr() == model.weight.data_ptr() for r in replicas)
    assert replicate_on_cpu(model, 2, detach=True)[1].bias.grad_fn is None


def test_replicate_on_cpu_arguments():
    assert replicate_on_cpu(nn.Linear(1, 1), 0) == []
    with pytest.raises(ValueError, match="non-negative"):
        replicate_on_cpu(nn.Linear(1, 1), -1)
    for wrong_type in (2.0, "2", True):
        with pytest.raises(
            TypeError, match=f"non-negative int, got {wrong_type!r} of type {type(wrong_type).__name__}"
        ):
            replicate_on_cpu(nn.Linear(1, 1), wrong_type)
    with pytest.raises(ValueError, match="lazy"):
        replicate_on_cpu(nn.LazyLinear(2), 2)
    integer_like = torch.tensor(2)  # has __index__, as numpy's integers
    assert len(replicate_on_cpu(nn.Linear(1, 1), integer_like)) == 2


def _describe(replica):
    """Per module of a replica: its class and what its dictionaries hold (tensors by identity of their source)."""

    def key(value):
        if isinstance(value, torch.Tensor):
            return ("tensor", tuple(value.shape), value.requires_grad, value._is_view())
        if isinstance(value, nn.Module):
            return ("module", type(value).__name__)
        return ("other", type(value).__name__)

    described = []
    for m in replica.modules():
        plain = {k: key(v) for k, v in m.__dict__.items() if k not in ("_parameters", "_buffers", "_modules")}
        described.append(
            (
                type(m).__name__,
                plain,
                {k: key(v) for k, v in m._parameters.items()},
                {k: key(v) for k, v in m._buffers.items()},
                {k: key(v) for k, v in m._modules.items()},
            )
        )
    return described


def test_replicas_are_the_same_through_setattr_and_direct_writes():
    # A global registration hook makes the replication go through nn.Module.__setattr__ as torch's replicate does.
    net = nn.Sequential(nn.Conv2d(3, 4, 3), syncbn_ext.SynchronizedBatchNorm2d(4), nn.Sequential(nn.Linear(2, 2)))
    net.shared = net[0]
    direct = replicate_on_cpu(net, 2)
    handle = torch.nn.modules.module.register_module_buffer_registration_hook(lambda module, name, buffer: None)
    try:
        through_setattr = replicate_on_cpu(net, 2)
    finally:
        handle.remove()
    for a, b in zip(direct, through_setattr, strict=True):
        assert _describe(a) == _describe(b)
        assert a.shared is a[0] and b.shared is b[0]
    assert direct[0][1].running_mean is net[1].running_mean  # replica 0 uses the module's buffers, as before
    assert direct[1][1].running_mean is not net[1].running_mean


class CountsAssignments(nn.Module):
    """A module whose class brings its own __setattr__."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.register_buffer("scale", torch.ones(2))
        self.weight = nn.Parameter(torch.ones(2))

    def __setattr__(self, name, value):
        self.__dict__.setdefault("assigned", []).append(name)
        super().__setattr__(name, value)

    def forward(self, x):
        return self.linear(x) * self.weight * self.scale


def test_a_class_with_its_own_setattr_and_global_registration_hooks_see_the_replicas_assignments():
    module = CountsAssignments()
    module.__dict__["assigned"] = []
    replicas = replicate_on_cpu(module, 2)
    for replica in replicas:
        assert {"linear", "scale", "weight"} <= set(replica.__dict__["assigned"])
        assert replica.weight.grad_fn is not None and "weight" not in replica._parameters
        assert replica.weight.data_ptr() == module.weight.data_ptr()
    seen = []
    net = nn.Sequential(nn.BatchNorm1d(2))
    handles = [
        torch.nn.modules.module.register_module_buffer_registration_hook(lambda m, n, b: seen.append(("buffer", n))),
        torch.nn.modules.module.register_module_module_registration_hook(lambda m, n, c: seen.append(("module", n))),
    ]
    try:
        replicate_on_cpu(net, 2)
    finally:
        for handle in handles:
            handle.remove()
    assert seen.count(("module", "0")) == 2 and seen.count(("buffer", "running_mean")) == 2
