"""patch_sync_batchnorm: nn.BatchNormNd (and nn.SyncBatchNorm) are the synchronized classes inside the block."""

from __future__ import annotations

import pickle

import pytest
import torch
from convert_cases import (
    SYNC_BN,
    Net,
)
from torch import nn
from torch.nn.modules import batchnorm as batchnorm_module

import syncbn_ext
from syncbn_ext import (
    SynchronizedBatchNorm1d,
    SynchronizedBatchNorm2d,
    SynchronizedBatchNorm3d,
    patch_sync_batchnorm,
    revert_model,
)


def test_patch_sync_batchnorm_context():
    originals = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    torch_sync_batch_norm = nn.SyncBatchNorm
    with patch_sync_batchnorm():
        assert (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) == SYNC_BN
        # torch's own SyncBatchNorm becomes ours, as convert_model converts it.
        assert nn.SyncBatchNorm is syncbn_ext.SyncBatchNorm
        assert torch.nn.modules.BatchNorm2d is SynchronizedBatchNorm2d
        # The classes' own module keeps them, for pickle (see the test below).
        assert (batchnorm_module.BatchNorm1d, batchnorm_module.BatchNorm2d, batchnorm_module.BatchNorm3d) == originals
        assert batchnorm_module.SyncBatchNorm is torch_sync_batch_norm
        layer = nn.BatchNorm2d(3)
        assert type(layer) is SynchronizedBatchNorm2d
        net = Net()  # built from nn.BatchNormNd
        assert sum(isinstance(m, SYNC_BN) for m in net.modules()) == 5
        # The layers still check and behave as nn.BatchNorm (no recursion through the patched names).
        with pytest.raises(ValueError, match="expected 4D input"):
            layer(torch.randn(2, 3))
        assert layer(torch.randn(2, 3, 2, 2)).shape == (2, 3, 2, 2)
        # revert_model gives torch's own classes even while patched.
        assert type(revert_model(SynchronizedBatchNorm1d(2))) is originals[0]
        with patch_sync_batchnorm():  # nests
            assert nn.BatchNorm1d is SynchronizedBatchNorm1d
        assert nn.BatchNorm1d is SynchronizedBatchNorm1d
    assert (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) == originals
    assert (batchnorm_module.BatchNorm1d, batchnorm_module.BatchNorm2d, batchnorm_module.BatchNorm3d) == originals
    assert nn.SyncBatchNorm is torch_sync_batch_norm and batchnorm_module.SyncBatchNorm is torch_sync_batch_norm
    assert type(nn.BatchNorm2d(3)) is originals[1]


def test_torch_batchnorm_layers_pickle_as_they_are_inside_patch_sync_batchnorm(tmp_path):
    # pickle finds a class by its module and name: with torch.nn.modules.batchnorm patched, a torch layer built
    # before the block (a teacher, an EMA copy) could not be saved in it, and a saved whole model loaded in it came
    # back with synchronized layers (each a new number).
    teacher = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.SyncBatchNorm(4))
    torch.save(teacher, tmp_path / "teacher.pt")
    with patch_sync_batchnorm():
        torch.save(teacher, tmp_path / "inside.pt")
        for name in ("teacher.pt", "inside.pt"):
            loaded = torch.load(tmp_path / name, weights_only=False)
            expected = [nn.Conv2d, batchnorm_module.BatchNorm2d, batchnorm_module.SyncBatchNorm]
            assert [type(m) for m in loaded] == expected
        copied = pickle.loads(pickle.dumps(teacher))
        assert type(copied[1]) is batchnorm_module.BatchNorm2d
        assert type(nn.BatchNorm2d(4)) is SynchronizedBatchNorm2d  # built in the block: synchronized


def test_patch_sync_batchnorm_restores_after_an_exception():
    originals = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, torch.nn.modules.batchnorm.BatchNorm2d)
    with pytest.raises(KeyError, match="inside"), patch_sync_batchnorm():
        assert nn.BatchNorm3d is SynchronizedBatchNorm3d
        raise KeyError("inside")
    assert (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, torch.nn.modules.batchnorm.BatchNorm2d) == originals
