"""CallbackContext and execute_replication_callbacks over Python nn.Module replicas."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import syncbn_ext


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
