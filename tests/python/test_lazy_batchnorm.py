"""Lazy synchronized BatchNorm: LazySynchronizedBatchNormNd, and nn.LazyBatchNormNd through the converters."""

from __future__ import annotations

import inspect
import pickle

import pytest
import torch
from hang_guard import call_with_timeout
from torch import nn

import syncbn_ext
from syncbn_ext import (
    DataParallelWithCallback,
    LazySynchronizedBatchNorm1d,
    LazySynchronizedBatchNorm2d,
    LazySynchronizedBatchNorm3d,
    SyncBatchNorm,
    SynchronizedBatchNorm1d,
    SynchronizedBatchNorm2d,
    SynchronizedBatchNorm3d,
    convert_model,
    patch_sync_batchnorm,
    revert_model,
)

# (torch lazy class, ours, what ours becomes, what torch's becomes, an input shape)
KINDS = [
    (nn.LazyBatchNorm1d, LazySynchronizedBatchNorm1d, SynchronizedBatchNorm1d, nn.BatchNorm1d, (8, 3, 5)),
    (nn.LazyBatchNorm2d, LazySynchronizedBatchNorm2d, SynchronizedBatchNorm2d, nn.BatchNorm2d, (8, 3, 4, 5)),
    (nn.LazyBatchNorm3d, LazySynchronizedBatchNorm3d, SynchronizedBatchNorm3d, nn.BatchNorm3d, (8, 3, 2, 3, 4)),
]
OPTIONS = [
    {},
    {"eps": 1e-3, "momentum": None},
    {"affine": False, "track_running_stats": False},
    {"bias": False, "momentum": 0.3},
]


def _whole_batch_and_replicated(torch_lazy: nn.Module, ours: nn.Module, shape: tuple, steps: int = 3) -> None:
    """Materializes both with one forward, then trains ``ours`` on 4 CPU replicas against the whole batch."""
    first = torch.randn(shape, dtype=torch.float64)
    reference = torch_lazy.double()
    ours = ours.double()
    torch.testing.assert_close(ours(first), reference(first))  # materializes both
    wrapper = DataParallelWithCallback(ours, device_ids=["cpu"] * 4)
    for _ in range(steps):
        x = torch.randn(shape, dtype=torch.float64)
        torch.testing.assert_close(call_with_timeout(wrapper, x), reference(x))
    torch.testing.assert_close(ours.state_dict(), reference.state_dict())


@pytest.mark.parametrize("kind", KINDS, ids=lambda kind: kind[0].__name__)
@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_lazy_layer_becomes_synchronized_and_matches_the_whole_batch(kind, options):
    torch_lazy_cls, lazy_cls, becomes, torch_becomes, shape = kind
    ours_sig = inspect.signature(lazy_cls.__init__).parameters
    torch_sig = inspect.signature(torch_lazy_cls.__init__).parameters
    assert [(p.name, p.kind, p.default) for p in ours_sig.values()] == [
        *((p.name, p.kind, p.default) for p in torch_sig.values()),
        ("process_group", inspect.Parameter.KEYWORD_ONLY, None),
    ]
    reference, layer = torch_lazy_cls(**options), lazy_cls(**options)
    assert repr(layer) == repr(reference).replace("LazyBatchNorm", "LazySynchronizedBatchNorm")
    _whole_batch_and_replicated(reference, layer, shape)
    assert type(layer) is becomes and type(reference) is torch_becomes
    # Without parameters or running statistics nothing is inferred: num_features stays 0, as torch's does.
    assert layer.num_features == reference.num_features == (shape[1] if reference.affine else 0)
    assert repr(layer) == repr(reference).replace("BatchNorm", "SynchronizedBatchNorm")
    assert not layer._forward_pre_hooks and not layer._load_state_dict_pre_hooks


@pytest.mark.parametrize("affine", [True, False])
def test_uninitialized_lazy_layer_under_the_wrapper_says_to_run_a_forward_first(affine):
    # Without affine parameters only its buffers are lazy: torch's "uninitialized parameter in detach" came first.
    wrapper = DataParallelWithCallback(LazySynchronizedBatchNorm2d(affine=affine), device_ids=["cpu"] * 2)
    with pytest.raises(ValueError, match=r"lazy\) parameters or buffers \((weight, bias, )?running_mean.*outside"):
        wrapper(torch.randn(4, 3, 2, 2))


@pytest.mark.parametrize("kind", KINDS, ids=lambda kind: kind[0].__name__)
def test_convert_model_makes_lazy_batchnorms_lazy_synchronized_ones(kind):
    torch_lazy_cls, lazy_cls, becomes, _, shape = kind
    seen = []
    lazy = torch_lazy_cls(momentum=None, eps=1e-4)
    lazy.register_forward_hook(lambda module, args, output: seen.append(type(module)))
    model = convert_model(nn.Sequential(lazy, nn.ReLU()))
    assert type(model[0]) is lazy_cls and model[0].momentum is None and model[0].eps == 1e-4
    # The hooks that materialize it are the new layer's own: they run once and leave no trace.
    assert len(model[0]._forward_pre_hooks) == 1 and len(lazy._forward_pre_hooks) == 1
    _whole_batch_and_replicated(nn.Sequential(torch_lazy_cls(momentum=None, eps=1e-4), nn.ReLU()), model, shape)
    assert type(model[0]) is becomes and not model[0]._forward_pre_hooks
    assert f"({shape[1]})" in model[0]._layer[1]  # errors name the layer with its size
    assert seen[:2] == [becomes, becomes] and len(seen) == 1 + 3 * 4  # the user's hook came along (every replica)
    assert type(lazy) is torch_lazy_cls  # the replaced layer is left as it was


@pytest.mark.parametrize("kind", KINDS, ids=lambda kind: kind[0].__name__)
def test_revert_model_gives_the_torch_lazy_layer(kind):
    torch_lazy_cls, lazy_cls, _, torch_becomes, shape = kind
    reverted = revert_model(lazy_cls(affine=False))
    assert type(reverted) is torch_lazy_cls and not reverted.affine
    reverted(torch.randn(shape))
    assert type(reverted) is torch_becomes and not reverted._forward_pre_hooks


def test_converted_lazy_layer_materializes_from_a_state_dict():
    source = nn.BatchNorm2d(5)
    source.running_mean.uniform_()
    source.num_batches_tracked.fill_(7)
    layer = convert_model(nn.LazyBatchNorm2d())
    layer.load_state_dict(source.state_dict())
    assert not layer.has_uninitialized_params()  # (num_features stays 0 then, as torch's lazy layers leave it)
    torch.testing.assert_close(layer.state_dict(), source.state_dict())
    wrapper = DataParallelWithCallback(layer, device_ids=["cpu"] * 4)
    x = torch.randn(8, 5, 2, 2)
    with pytest.raises(RuntimeError, match="dummy forward"):  # as torch's lazy modules: one forward first
        wrapper(x)
    layer.eval()(x)
    assert type(layer) is SynchronizedBatchNorm2d
    # Its width for error messages and for the other ranks (a refused input's announcement): its tensors', not 0.
    assert layer.num_features == 0 and layer._width() == 5 and layer._layer[1].startswith("SynchronizedBatchNorm2d(5)")
    torch.testing.assert_close(call_with_timeout(wrapper.train(), x), source(x))
    torch.testing.assert_close(layer.state_dict(), source.state_dict())


def test_uninitialized_lazy_layer_pickles():
    layer = LazySynchronizedBatchNorm2d(momentum=0.5)
    copied = pickle.loads(pickle.dumps(layer))
    assert type(copied) is LazySynchronizedBatchNorm2d and copied._layer_id == layer._layer_id  # the same layer
    copied(torch.randn(4, 3, 2, 2))
    assert type(copied) is SynchronizedBatchNorm2d and copied.num_features == 3 and copied.momentum == 0.5
    assert type(layer) is LazySynchronizedBatchNorm2d and layer.has_uninitialized_params()


def test_pickles_naming_the_lazy_layers_old_module_load():
    # The lazy layers moved from syncbn_ext.nn to syncbn_ext.lazy: a pickle written before names the old module.
    for dims in (1, 2, 3):
        name = f"LazySynchronizedBatchNorm{dims}d"
        loaded = pickle.loads(f"csyncbn_ext.nn\n{name}\n.".encode())
        assert loaded is getattr(syncbn_ext, name)


def test_patch_sync_batchnorm_patches_the_lazy_classes():
    with patch_sync_batchnorm():
        layer = nn.LazyBatchNorm3d()
    assert type(layer) is LazySynchronizedBatchNorm3d
    assert nn.LazyBatchNorm3d is not LazySynchronizedBatchNorm3d


def test_convert_sync_batchnorm_refuses_an_uninitialized_lazy_layer():
    # Refused before anything is converted: the BatchNorm2d before it was converted already (half a model).
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1), nn.LazyBatchNorm2d())
    with pytest.raises(TypeError, match="LazyBatchNorm2d is not initialized.*run one forward first"):
        SyncBatchNorm.convert_sync_batchnorm(model)
    assert [type(m) for m in model] == [nn.BatchNorm2d, nn.Conv2d, nn.LazyBatchNorm2d]
    model(torch.randn(2, 3, 2, 2))  # materialized: an nn.BatchNorm2d, which converts
    assert type(SyncBatchNorm.convert_sync_batchnorm(model)[2]) is SyncBatchNorm
