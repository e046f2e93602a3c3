"""SynchronizedBatchNorm layers and the wrapper after pickle, deepcopy and torch.save."""

from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch
from batchnorm_cases import (
    CHANNELS,
    CLONES,
    F64,
    cpu_dp,
    sync_layers,
)
from hang_guard import call_with_timeout
from torch import nn

import syncbn_ext
from syncbn_ext import (
    DataParallelWithCallback,
    SynchronizedBatchNorm1d,
    SynchronizedBatchNorm2d,
    replicate_on_cpu,
)

pytestmark = pytest.mark.usefixtures("short_barrier_timeout")


# ---------------------------------------------------------------------------------------------------------------
# Pickle, deepcopy, torch.save
# ---------------------------------------------------------------------------------------------------------------


def small_model():
    torch.manual_seed(4)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        SynchronizedBatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 2, 1),
        SynchronizedBatchNorm2d(2, momentum=None),
        nn.Flatten(),
        SynchronizedBatchNorm1d(2 * 5 * 5, affine=False),
    ).double()


def train_step(model, x, replicas, seed=0):
    y = call_with_timeout(cpu_dp(model, replicas), x)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype))
    return y


def assert_models_equal(a, b, grads=True):
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(ta, tb, msg=name, **F64)
    if grads:
        for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
            torch.testing.assert_close(pa.grad, pb.grad, msg=name, **F64)


@pytest.mark.parametrize("clone", list(CLONES.values()), ids=list(CLONES))
def test_pickle_deepcopy_and_save_then_training_still_matches(clone):
    model = small_model()
    train_step(model, torch.randn(6, 3, 5, 5, dtype=torch.float64), 3)
    copied = clone(model)
    for original, layer in zip(sync_layers(model), sync_layers(copied), strict=True):
        assert layer._copy_id is None and layer._channel is None
        assert original._copy_id is None and original._channel is None
    assert_models_equal(model, copied, grads=False)
    model.zero_grad()
    for step in range(2):
        x = torch.randn(7, 3, 5, 5, dtype=torch.float64)
        y = train_step(model, x, 3, seed=step)
        y_copy = train_step(copied, x, 3, seed=step)
        torch.testing.assert_close(y_copy, y, **F64)
        assert_models_equal(model, copied)
    # The clone's own replication: independent of the original's master.
    y, y_copy = train_step(model, x, 2), train_step(copied, x, 4)
    torch.testing.assert_close(y_copy, y, **F64)


def test_pickle_a_wrapper_and_a_replica():
    model = small_model()
    dp = cpu_dp(model, 3)
    x = torch.randn(6, 3, 5, 5, dtype=torch.float64)
    dp(x)
    snapshot = copy.deepcopy(model)
    for how, make_clone in CLONES.items():
        clone = make_clone(dp)
        assert isinstance(clone, DataParallelWithCallback) and clone.device_ids == dp.device_ids
        assert_models_equal(clone.module, snapshot, grads=False)
        expected = call_with_timeout(cpu_dp(copy.deepcopy(snapshot), 2), x)
        torch.testing.assert_close(call_with_timeout(clone, x), expected, msg=how, **F64)

    # A replica holds its channel: an unpickled replica is a plain, unreplicated layer.
    layer = SynchronizedBatchNorm1d(CHANNELS, dtype=torch.float64)
    replicas = replicate_on_cpu(layer, 3)
    syncbn_ext.execute_replication_callbacks(replicas)
    assert replicas[2]._copy_id == 2 and replicas[2]._channel.copy_id == 2
    assert layer._copy_id is None
    restored = pickle.loads(pickle.dumps(replicas[2]))
    assert restored._copy_id is None and restored._channel is None
    x = torch.randn(5, CHANNELS, dtype=torch.float64)
    expected = nn.functional.batch_norm(x, None, None, restored.weight, restored.bias, training=True)
    torch.testing.assert_close(restored(x), expected, **F64)


class KeepsALock(SynchronizedBatchNorm2d):
    """Holds a lock (which cannot be copied) that its own __getstate__ leaves out."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lock = threading.Lock()

    def __getstate__(self):
        state = dict(super().__getstate__())
        state.pop("lock", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.lock = threading.Lock()


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))], ids=["deepcopy", "pickle"])
def test_a_subclass_s_own_getstate_is_used_by_deepcopy_as_by_pickle(clone):
    # deepcopy called our class's __getstate__, bypassing the subclass's: "cannot pickle '_thread.lock' object".
    layer = KeepsALock(3)
    with torch.no_grad():
        layer.running_mean.add_(1.0)
    copied = clone(layer)
    assert type(copied) is KeepsALock and copied.lock is not layer.lock
    assert torch.equal(copied.running_mean, layer.running_mean)
