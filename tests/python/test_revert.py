"""revert_model: synchronized layers back to torch's, and round trips through convert_model."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from batchnorm_cases import randomize_batchnorm
from convert_cases import (
    SYNC_BN,
    TORCH_BN,
    assert_same_layers,
    assert_state_dicts_equal,
    make_net,
)
from torch import nn
from torch.nn.modules import batchnorm as batchnorm_module

import syncbn_ext
from syncbn_ext import (
    DataParallelWithCallback,
    SynchronizedBatchNorm1d,
    SynchronizedBatchNorm2d,
    convert_model,
    patch_sync_batchnorm,
    revert_model,
)


@pytest.mark.parametrize("training", [True, False])
def test_convert_then_revert_gives_the_original(training):
    original = make_net().train(training)
    reference = copy.deepcopy(original)
    reverted = revert_model(convert_model(original))
    assert_same_layers(reverted, reference, {cls: cls for cls in TORCH_BN})
    for m in reverted.modules():
        assert not hasattr(m, "_channel") and not hasattr(m, "_copy_id")
    assert_state_dicts_equal(reverted, reference)
    for _ in range(2):
        x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
        y, y_ref = reverted(x), reference(x)
        assert torch.equal(y, y_ref)
        assert_state_dicts_equal(reverted, reference)
    # A reverted wrapper: the DataParallelWithCallback stays, its layers are torch's again.
    dp = revert_model(convert_model(nn.DataParallel(make_net())))
    assert type(dp) is DataParallelWithCallback
    assert_same_layers(dp.module, make_net(), {cls: cls for cls in TORCH_BN})


def test_revert_model_makes_sync_batch_norm_what_sync_batch_norm_as_says():
    def model():
        torch.manual_seed(0)
        net = nn.Sequential(
            nn.Conv2d(3, 4, 3),
            syncbn_ext.SyncBatchNorm(4, process_group="g"),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(16, 5),
            syncbn_ext.SyncBatchNorm(5, momentum=None),
            SynchronizedBatchNorm1d(5),
        )
        for layer in (net[1], net[5], net[6]):
            randomize_batchnorm(layer, num_batches_tracked=3)
        return net

    default = revert_model(model())  # torch's nn.SyncBatchNorm, keeping the group
    assert [type(default[i]) for i in (1, 5, 6)] == [nn.SyncBatchNorm, nn.SyncBatchNorm, nn.BatchNorm1d]
    assert default[1].process_group == "g"
    one_class = revert_model(model(), sync_batch_norm_as=nn.BatchNorm2d)
    assert [type(one_class[i]) for i in (1, 5, 6)] == [nn.BatchNorm2d, nn.BatchNorm2d, nn.BatchNorm1d]
    assert not hasattr(one_class[1], "process_group")
    original = model()
    reference = {name: value.clone() for name, value in original.state_dict().items()}
    parameters = list(original.parameters())
    by_name = revert_model(original, sync_batch_norm_as={"1": nn.BatchNorm2d, "5": nn.BatchNorm1d})
    assert [type(by_name[i]) for i in (1, 5, 6)] == [nn.BatchNorm2d, nn.BatchNorm1d, nn.BatchNorm1d]
    assert by_name[5].momentum is None and list(by_name.parameters()) == parameters  # the same tensors
    assert all(torch.equal(value, reference[name]) for name, value in by_name.state_dict().items())
    # What TorchScript and quantization's fusion take (torch's nn.SyncBatchNorm is neither); eval results alike.
    x = torch.randn(6, 3, 4, 4)
    scripted = torch.jit.script(copy.deepcopy(by_name).eval())
    torch.testing.assert_close(scripted(x), by_name.eval()(x))
    from torch.ao.quantization import fuse_modules

    fused = fuse_modules(copy.deepcopy(by_name).eval(), [["0", "1", "2"]])
    torch.testing.assert_close(fused(x), by_name(x), rtol=1e-5, atol=1e-5)
    # README's quantization-aware training across processes: fused and prepared, then converted back to layers that
    # synchronize across the default group, as the SyncBatchNorm layers did (convert_model alone: no group).
    from torch.ao import quantization

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = quantization.fuse_modules_qat(copy.deepcopy(by_name).train(), [["0", "1", "2"]])
        prepared.qconfig = quantization.get_default_qat_qconfig("x86")
        prepared = quantization.prepare_qat(prepared)
    synchronized = syncbn_ext.SyncBatchNorm.convert_sync_batchnorm(prepared)
    assert type(synchronized[0].bn) is syncbn_ext.SyncBatchNorm and synchronized[0].bn._default_to_world
    # A mapping may keep a layer torch's synchronized one; a root SyncBatchNorm is named "".
    kept = revert_model(model(), sync_batch_norm_as={"1": nn.SyncBatchNorm, "5": nn.BatchNorm1d})
    assert type(kept[1]) is nn.SyncBatchNorm and kept[1].process_group == "g"
    assert type(revert_model(syncbn_ext.SyncBatchNorm(2), {"": nn.BatchNorm3d})) is nn.BatchNorm3d
    # Inside patch_sync_batchnorm(), nn.BatchNorm2d is the synchronized class: torch's is meant.
    with patch_sync_batchnorm():
        assert type(revert_model(model(), sync_batch_norm_as=nn.BatchNorm2d)[1]) is batchnorm_module.BatchNorm2d


def test_revert_model_takes_any_name_of_a_shared_sync_batch_norm():
    shared = syncbn_ext.SyncBatchNorm(4)
    model = lambda: nn.Sequential(nn.Conv2d(3, 4, 1), shared, nn.Sequential(shared), syncbn_ext.SyncBatchNorm(4))  # noqa: E731
    for names in ({"1": nn.BatchNorm2d}, {"2.0": nn.BatchNorm2d}, {"1": nn.BatchNorm2d, "2.0": nn.BatchNorm2d}):
        reverted = revert_model(model(), {**names, "3": nn.BatchNorm2d})
        assert type(reverted[1]) is nn.BatchNorm2d and reverted[2][0] is reverted[1]
    with pytest.raises(ValueError, match=r"gives '1' and '2.0', the same layer, two classes"):
        revert_model(model(), {"1": nn.BatchNorm2d, "2.0": nn.BatchNorm1d, "3": nn.BatchNorm2d})
    with pytest.raises(ValueError, match=r"gives no class for the SyncBatchNorm layer\(s\) \['1', '3'\]"):
        revert_model(model(), {})


@pytest.mark.parametrize(
    ("sync_batch_norm_as", "error", "message"),
    [
        (nn.LayerNorm, TypeError, r"sync_batch_norm_as must be nn.BatchNorm1d, .* not <class .*LayerNorm'>"),
        (SynchronizedBatchNorm2d, TypeError, r"must be nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d or nn.Sync"),
        ("nn.BatchNorm2d", TypeError, r"a class .* or a mapping from layer names to classes, not str"),
        (
            {"1": nn.BatchNorm2d, "bn": nn.BatchNorm1d},
            ValueError,
            r"names \['bn'\], but the model has no Sync.*\['1'\]",
        ),
        ({}, ValueError, r"gives no class for the SyncBatchNorm layer\(s\) \['1'\]"),
        ({"1": nn.BatchNorm2d, "2": nn.BatchNorm2d}, ValueError, r"names \['2'\]"),  # 2: a ReLU
        ({"1": 2}, TypeError, r"sync_batch_norm_as\['1'\] must be nn.BatchNorm1d, .* not 2"),
    ],
)
def test_revert_model_refuses_a_sync_batch_norm_as_that_does_not_fit_before_reverting(
    sync_batch_norm_as, error, message
):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), syncbn_ext.SyncBatchNorm(4), nn.ReLU(), SynchronizedBatchNorm2d(4))
    layers = list(model)
    with pytest.raises(error, match=message):
        revert_model(model, sync_batch_norm_as=sync_batch_norm_as)
    assert list(model) == layers  # nothing reverted: not the SynchronizedBatchNorm2d either


def test_a_layer_reverted_and_converted_again_keeps_its_number():
    # Layers pair across ranks by their number: a round trip on one rank (revert in place to trace, convert to train
    # on) gave its layers new ones, and every rank's next step failed. A copy of a reverted layer is another layer.
    model = convert_model(make_net(), process_group=None)
    numbers = [m._layer_id for m in model.modules() if isinstance(m, SYNC_BN)]
    reverted = revert_model(model)
    assert not any(hasattr(m, "_layer_id") for m in reverted.modules())
    copied = convert_model(copy.deepcopy(reverted))
    again = convert_model(reverted)
    assert [m._layer_id for m in again.modules() if isinstance(m, SYNC_BN)] == numbers
    assert not set(numbers) & {m._layer_id for m in copied.modules() if isinstance(m, SYNC_BN)}
