"""The model and checks the conversion tests share (test_convert, test_revert, test_patch_sync_batchnorm)."""

from __future__ import annotations

import torch
from batchnorm_cases import randomize_batchnorm
from torch import nn

from syncbn_ext import (
    SynchronizedBatchNorm1d,
    SynchronizedBatchNorm2d,
    SynchronizedBatchNorm3d,
)

F64 = {"rtol": 1e-10, "atol": 1e-10}
TORCH_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
SYNC_BN = (SynchronizedBatchNorm1d, SynchronizedBatchNorm2d, SynchronizedBatchNorm3d)
PAIRS = dict(zip(TORCH_BN, SYNC_BN, strict=True))
OPTION_NAMES = ("num_features", "eps", "momentum", "affine", "track_running_stats")


class Net(nn.Module):
    """All three BatchNorm kinds, with every option, in nested Sequentials."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, momentum=None, affine=False)),
        )
        self.volume = nn.Sequential(
            nn.Conv3d(3, 2, 1),
            nn.BatchNorm3d(2, bias=False),
            nn.BatchNorm3d(2, track_running_stats=False),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 4 * 4 + 2 * 4 * 4, 5), nn.BatchNorm1d(5, eps=1e-3))

    def forward(self, x):
        a = self.features(x)
        b = self.volume(x.unsqueeze(2)).squeeze(2)
        return self.head(torch.cat([a, b], 1))


def make_net(dtype=torch.float64):
    torch.manual_seed(0)
    net = Net().to(dtype)
    for m in net.modules():
        if isinstance(m, TORCH_BN):
            randomize_batchnorm(m, num_batches_tracked=7)
    return net


def batchnorms(module):
    return [(name, m) for name, m in module.named_modules() if isinstance(m, TORCH_BN + SYNC_BN)]


def assert_state_dicts_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name


def assert_same_layers(converted, original, expected_types):
    pairs = list(zip(batchnorms(converted), batchnorms(original), strict=True))
    assert pairs
    for (name_c, c), (name_o, o) in pairs:
        assert name_c == name_o
        assert type(c) is expected_types[type(o)], name_c
        for option in OPTION_NAMES:
            assert getattr(c, option) == getattr(o, option), (name_c, option)
        assert (c.bias is None) == (o.bias is None), name_c
        assert c.training == o.training, name_c
        assert c.extra_repr() == o.extra_repr()
