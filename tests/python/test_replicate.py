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
    with pytest.raises(ValueError, match="lazy"):
        replicate_on_cpu(nn.LazyLinear(2), 2)
