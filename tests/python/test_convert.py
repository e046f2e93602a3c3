"""convert_model, revert_model and patch_sync_batchnorm."""

from __future__ import annotations

import copy
import pickle
import re
import warnings

import pytest
import torch
from batchnorm_cases import randomize_batchnorm
from hang_guard import call_with_timeout
from torch import nn
from torch.nn.modules import batchnorm as batchnorm_module

import syncbn_ext
from syncbn_ext import (
    DataParallelWithCallback,
    SynchronizedBatchNorm1d,
    SynchronizedBatchNorm2d,
    SynchronizedBatchNorm3d,
    convert_model,
    patch_sync_batchnorm,
    revert_model,
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


def test_convert_model_replaces_every_batchnorm_keeping_state_and_options():
    original = make_net()
    original.features[3].eval()  # a training flag that differs from its parent's
    reference = copy.deepcopy(original)
    weight = original.features[1].weight
    converted = convert_model(original)
    assert converted is original  # containers are converted in place
    assert not any(type(m) in TORCH_BN for m in converted.modules())
    assert_same_layers(converted, reference, PAIRS)
    assert_state_dicts_equal(converted, reference)
    assert converted.features[1].weight is weight  # the same tensors: an optimizer keeps working
    assert converted.features[3][1].training is False and converted.features[1].training is True
    assert all(p.dtype == torch.float64 for p in converted.parameters())
    for layer in converted.modules():
        if isinstance(layer, SYNC_BN):
            assert layer._copy_id is None and layer._channel is None


def test_convert_model_keeps_dtype_and_root_batchnorm():
    for cls in TORCH_BN:
        for options in ({}, {"momentum": None, "eps": 1e-3}, {"affine": False}, {"bias": False}):
            bn = cls(3, dtype=torch.float32, **options).eval()
            bn.num_batches_tracked.fill_(4)
            converted = convert_model(bn)
            assert type(converted) is PAIRS[cls]
            assert converted.training is False
            assert converted.running_mean.dtype == torch.float32
            assert converted.num_batches_tracked is bn.num_batches_tracked
            for option in OPTION_NAMES:
                assert getattr(converted, option) == getattr(bn, option)
            assert_state_dicts_equal(converted, bn)
    half = convert_model(nn.BatchNorm2d(3).half())
    assert half.weight.dtype == torch.float16 and half.running_var.dtype == torch.float16


def test_convert_model_leaves_other_norms_alone():
    class MyBatchNorm(nn.BatchNorm2d):
        pass

    mine = MyBatchNorm(3)
    ours = SynchronizedBatchNorm2d(3)
    instance = nn.InstanceNorm2d(3)
    lazy_instance = nn.LazyInstanceNorm2d()
    model = nn.Sequential(mine, ours, instance, lazy_instance)
    with pytest.warns(UserWarning, match="left 1 BatchNorm layer.*'0': .*MyBatchNorm.*each replica's slice alone"):
        converted = convert_model(model)
    assert list(converted) == [mine, ours, instance, lazy_instance]
    assert convert_model(ours) is ours


def test_conversions_warn_of_the_batchnorm_layers_they_leave_unsynchronized(recwarn):
    class BatchNormAct2d(nn.BatchNorm2d):  # e.g. a BatchNorm fused with its activation
        def forward(self, x):
            return torch.relu(super().forward(x))

    class SynchronizesItself(nn.BatchNorm2d):  # as the established library's layers: a replication hook of its own
        def __data_parallel_replicate__(self, ctx, copy_id):
            pass

    model = nn.Sequential(*(BatchNormAct2d(3) for _ in range(5)), SynchronizesItself(3), nn.BatchNorm2d(3))
    with pytest.warns(UserWarning) as record:
        convert_model(model)
    assert len(record) == 1 and record[0].filename == __file__  # points at the caller's line
    message = str(record[0].message)
    assert "convert_model left 5 BatchNorm layer(s)" in message
    assert "'0': " in message and "'2': " in message and "and 2 more" in message and "SynchronizesItself" not in message
    with pytest.warns(UserWarning, match="convert_sync_batchnorm left 5") as record:
        syncbn_ext.SyncBatchNorm.convert_sync_batchnorm(model)
    assert record[0].filename == __file__
    recwarn.clear()
    convert_model(nn.Sequential(nn.BatchNorm2d(3), SynchronizesItself(3)))
    assert not [w for w in recwarn if "BatchNorm layer" in str(w.message)]


def test_conversions_warn_of_scripted_and_traced_batchnorm_layers(recwarn):
    x = torch.randn(8, 3, 2, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's own warnings
        models = {
            "scripted": torch.jit.script(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))),
            "traced": torch.jit.trace(nn.Sequential(nn.BatchNorm2d(3)), (x,)),
        }
    for kind, model in models.items():
        with pytest.warns(UserWarning, match="convert_model cannot convert TorchScript modules and left 1") as record:
            assert convert_model(model) is model
        assert record[0].filename == __file__, kind
        assert "BatchNorm2d" in str(record[0].message) and "before torch.jit.script" in str(record[0].message)
    recwarn.clear()
    convert_model(torch.jit.script(nn.Sequential(nn.Conv2d(3, 3, 1))))  # nothing to warn of
    convert_model(torch.jit.script(nn.Sequential(FrozenBatchNorm2d(3))))  # fixed statistics: nothing to synchronize
    assert not [w for w in recwarn if "TorchScript" in str(w.message)]


class FrozenBatchNorm2d(nn.Module):
    """torchvision's kind: BatchNorm with fixed statistics, not a BatchNorm layer."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(channels))

    def forward(self, x):
        return x * self.scale.view(1, -1, 1, 1)


class GroupedBatchNorm(SynchronizedBatchNorm2d):
    """A user's layer derived from a synchronized one."""


def test_conversions_give_a_group_asked_for_to_layers_already_synchronized():
    def model():
        layers = [
            SynchronizedBatchNorm2d(3),
            syncbn_ext.SyncBatchNorm(3),
            syncbn_ext.LazySynchronizedBatchNorm2d(),
            GroupedBatchNorm(3),
        ]
        for layer in layers:
            layer.process_group = "old"
        return nn.Sequential(*layers)

    def groups(converted):
        return [layer.process_group for layer in converted]

    original = model()
    layers = list(original)
    converted = convert_model(original, process_group="new")
    assert list(converted) == layers  # already synchronized: the same layers, in place
    assert groups(converted) == ["new"] * 4
    assert groups(convert_model(model())) == ["old"] * 4  # no group asked for: each keeps its own

    # As torch's convert_sync_batchnorm, which gives its own SyncBatchNorm layers the group, None included.
    original = model()
    converted = syncbn_ext.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(original[1], original[3]), "new")
    assert groups(converted) == ["new", "new"] and converted[0] is original[1]
    original = model()
    converted = syncbn_ext.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(original[1], original[3]))
    assert groups(converted) == [None, "old"]  # the SyncBatchNorm: the default group; the other keeps its own
    with patch_sync_batchnorm():  # a model zoo's own call, on the layers it built while patched
        built = nn.Sequential(nn.SyncBatchNorm(3))
        assert groups(nn.SyncBatchNorm.convert_sync_batchnorm(built, process_group="new")) == ["new"]


def test_shared_layer_converts_once():
    bn = nn.BatchNorm1d(3)
    model = nn.Sequential(bn, nn.Sequential(nn.Linear(3, 3), bn))
    converted = convert_model(model)
    assert type(converted[0]) is SynchronizedBatchNorm1d
    assert converted[0] is converted[1][1]
    reverted = revert_model(converted)
    assert type(reverted[0]) is nn.BatchNorm1d and reverted[0] is reverted[1][1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="nn.DataParallel without an accelerator runs its module")
def test_convert_model_wraps_data_parallel():
    net = make_net()
    reference = copy.deepcopy(net)
    dp = nn.DataParallel(net)
    converted = convert_model(dp)
    assert type(converted) is DataParallelWithCallback
    assert converted.device_ids == dp.device_ids  # [] on a machine without an accelerator: kept
    assert getattr(converted, "dim", 0) == getattr(dp, "dim", 0)  # no accelerator: neither sets dim
    assert converted.module is net
    assert_same_layers(converted.module, reference, PAIRS)
    assert_state_dicts_equal(converted, nn.DataParallel(reference))  # keys keep their "module." prefix
    x = torch.randn(4, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(converted(x), reference(x), **F64)

    # Nested inside a container, too; and a DataParallelWithCallback stays as it is, converted inside.
    outer = nn.Sequential(nn.DataParallel(make_net()), DataParallelWithCallback(make_net(), device_ids=["cpu"] * 2))
    inner_cpu = outer[1]
    converted = convert_model(outer)
    assert type(converted[0]) is DataParallelWithCallback
    assert converted[1] is inner_cpu and converted[1].device_ids == [torch.device("cpu")] * 2
    assert not any(type(m) in TORCH_BN for m in converted.modules())


def test_convert_model_patches_data_parallel_subclasses():
    class MyDataParallel(nn.DataParallel):
        pass

    dp = MyDataParallel(make_net())
    converted = convert_model(dp)
    assert converted is dp
    assert isinstance(vars(dp).get("replicate"), syncbn_ext.patching._ReplicateWithCallbacks)
    assert not any(type(m) in TORCH_BN for m in converted.modules())


@pytest.mark.parametrize("convert", [convert_model, revert_model])
def test_conversions_move_the_hooks_and_their_handles_to_the_new_layer(convert):
    calls = []
    bn = nn.BatchNorm2d(3) if convert is convert_model else SynchronizedBatchNorm2d(3)
    bn.register_forward_hook(lambda module, args, output: calls.append(("kept", type(module))))
    removed = bn.register_forward_pre_hook(lambda module, args: calls.append("removed"))
    # A load-state-dict pre-hook registered with its module is given the new layer (the old one may be gone).
    bn.register_load_state_dict_pre_hook(lambda module, *args: calls.append(("load", type(module))))
    model = nn.Sequential(bn)
    converted = convert(model)
    new_type = type(converted[0])
    assert new_type is not type(bn)
    del bn
    removed.remove()  # a handle taken before the conversion removes the hook from the new layer
    converted(torch.randn(2, 3, 2, 2))
    converted.load_state_dict(converted.state_dict())
    assert calls == [("kept", new_type), ("load", new_type)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="nn.DataParallel without an accelerator runs its module")
def test_converting_data_parallel_keeps_its_hooks_and_every_layers_training_flag():
    calls = []
    net = make_net().train()
    net.features[1].eval()  # a BatchNorm frozen in eval mode stays so
    dp = nn.DataParallel(net)
    handle = dp.register_forward_hook(lambda module, args, output: calls.append(type(module)))
    converted = convert_model(dp)
    assert type(converted) is DataParallelWithCallback and converted.training
    assert not converted.module.features[1].training
    assert sum(not m.training for m in converted.module.modules()) == 1
    converted(torch.randn(2, 3, 4, 4, dtype=torch.float64))
    handle.remove()
    converted(torch.randn(2, 3, 4, 4, dtype=torch.float64))
    assert calls == [DataParallelWithCallback]


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


@pytest.mark.parametrize(
    "convert, name",
    [(convert_model, "SynchronizedBatchNorm1d"), (syncbn_ext.SyncBatchNorm.convert_sync_batchnorm, "SyncBatchNorm")],
)
def test_converted_layers_are_named_by_their_place_in_the_model_in_errors(convert, name):
    # Layers used without a wrapper (under DDP) are named in errors without a replica's context: before, by class,
    # width and number only ("SyncBatchNorm(3) #37"), which a user of many layers could not place.
    model = convert(nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3))))
    layer = model[1][1]
    said = f"'1.1': {name}(3) #{layer._layer_id}"
    assert layer._layer[1] == said
    for copied in (copy.deepcopy(layer), pickle.loads(pickle.dumps(model))[1][1]):
        assert copied._layer[1] == said
    assert not hasattr(revert_model(copy.deepcopy(model))[1][1], "_converted_at")
    replica = syncbn_ext.replicate_on_cpu(model, 2)[1]  # a replica whose replication callbacks did not run
    with pytest.warns(RuntimeWarning, match=f"^{re.escape(said)} runs in a replica whose replication callbacks"):
        replica(torch.randn(4, 2))


@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_converted_model_under_cpu_replicas_matches_the_plain_model(replicas):
    plain = make_net()
    converted = convert_model(copy.deepcopy(plain))
    dp = DataParallelWithCallback(converted, device_ids=["cpu"] * replicas)
    for _ in range(2):
        x = torch.randn(7, 3, 4, 4, dtype=torch.float64)
        x_plain, x_dp = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_plain, y_dp = plain(x_plain), call_with_timeout(dp, x_dp)
        torch.testing.assert_close(y_dp, y_plain, **F64)
        grad_output = torch.randn_like(y_plain)
        y_plain.backward(grad_output)
        y_dp.backward(grad_output)
        torch.testing.assert_close(x_dp.grad, x_plain.grad, **F64)
        for (name, p_dp), p_plain in zip(converted.named_parameters(), plain.parameters(), strict=True):
            torch.testing.assert_close(p_dp.grad, p_plain.grad, msg=name, **F64)
        for (name, b_dp), b_plain in zip(converted.named_buffers(), plain.buffers(), strict=True):
            torch.testing.assert_close(b_dp, b_plain, msg=name, **F64)
    plain.eval()
    converted.eval()
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(call_with_timeout(dp, x), plain(x), **F64)


def test_state_dicts_load_between_plain_and_converted_models():
    plain = make_net()
    converted = convert_model(Net().double())
    converted.load_state_dict(plain.state_dict())
    assert_state_dicts_equal(converted, plain)
    fresh = Net().double()
    fresh.load_state_dict(converted.state_dict())
    assert_state_dicts_equal(fresh, plain)
    x = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    plain.eval()
    converted.eval()
    assert torch.equal(converted(x), plain(x))


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


def test_quantization_aware_training_fused_and_prepared_then_converted_synchronizes_the_fused_batchnorms():
    """torch.ao.quantization builds plain nn.BatchNorm inside its fused QAT modules (ConvBnReLU2d.bn): converted
    after prepare_qat, those synchronize, and the quantized model converts from them directly."""

    from torch.ao import quantization

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation, its observers' reduce_range
        plain = quantization.fuse_modules_qat(plain.train(), [["0", "1", "2"], ["3", "4"]])
        plain.qconfig = quantization.get_default_qat_qconfig("x86")
        plain = quantization.prepare_qat(plain)
    # Without fake quantization (observers see each replica's slice, as on GPUs), the fused BatchNorm's statistics
    # are the whole batch's.
    plain.apply(quantization.disable_fake_quant)
    plain.apply(quantization.disable_observer)
    converted = convert_model(copy.deepcopy(plain))
    assert type(converted[0].bn) is type(converted[3].bn) is SynchronizedBatchNorm2d  # (1, 2, 4: Identity)
    dp = DataParallelWithCallback(converted, device_ids=["cpu"] * 2)
    for step in range(2):
        x = torch.randn(8, 3, 6, 6) + step
        y_dp, y_plain = call_with_timeout(dp, x), plain(x)
        torch.testing.assert_close(y_dp, y_plain)
        y_dp.square().sum().backward()
        y_plain.square().sum().backward()
    for (name, p_dp), p_plain in zip(converted.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p_dp.grad, p_plain.grad, msg=name, rtol=1e-4, atol=1e-4)
    for name in ("0.bn.running_mean", "0.bn.running_var", "3.bn.running_mean", "3.bn.running_var"):
        torch.testing.assert_close(converted.state_dict()[name], plain.state_dict()[name], msg=name)
    converted.apply(quantization.enable_fake_quant)
    converted.apply(quantization.enable_observer)
    call_with_timeout(dp, torch.randn(8, 3, 6, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = quantization.convert(converted.eval())
    assert type(quantized[0]).__name__ == "ConvReLU2d"
    quantized_input = torch.quantize_per_tensor(torch.randn(2, 3, 6, 6), 0.05, 128, torch.quint8)
    assert quantized(quantized_input).shape == (2, 2, 4, 4)


@pytest.mark.parametrize("convert", [convert_model, revert_model])
def test_converting_a_compiled_layer_makes_the_compiled_call_run_the_new_layer(convert):
    # torch.compile's wrapper binds its forward to its module's call: converted, it must call the new layer (the old
    # one would run, unconverted, whenever the wrapper is called directly).
    layer = nn.BatchNorm1d(3) if convert is convert_model else SynchronizedBatchNorm1d(3)
    compiled = torch.compile(layer, backend="eager")
    converted = convert(compiled)
    assert converted is compiled and type(converted._orig_mod) is not type(layer)
    called = []
    converted._orig_mod.register_forward_hook(lambda module, args, output: called.append(type(module)))
    converted(torch.randn(4, 3))
    assert called == [type(converted._orig_mod)]


class Absolute(nn.Module):
    """A parametrization: the weight is the absolute value of the tensor the optimizer trains."""

    def forward(self, weight):
        return weight.abs()


def test_parametrized_layers_convert_keeping_their_parametrizations_and_copy():
    # torch.nn.utils.parametrize gives the layer a class of its own (a subclass of nn.BatchNorm1d): converted, it
    # gets the same around the synchronized class, and synchronizes.
    from torch.nn.utils import parametrize

    torch.manual_seed(9)
    plain = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).double()
    nn.init.normal_(plain[1].weight)
    parametrize.register_parametrization(plain[1], "weight", Absolute())
    reference = copy.deepcopy(plain)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left unconverted
        converted = convert_model(plain)
    layer = converted[1]
    assert isinstance(layer, SynchronizedBatchNorm1d) and parametrize.is_parametrized(layer, "weight")
    assert parametrize.type_before_parametrizations(layer) is SynchronizedBatchNorm1d
    dp = DataParallelWithCallback(converted, device_ids=["cpu"] * 2)
    x = torch.randn(8, 3, dtype=torch.float64) * 2 + 1
    y, y_ref = call_with_timeout(dp, x), reference(x)
    torch.testing.assert_close(y, y_ref, **F64)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    torch.testing.assert_close(
        layer.parametrizations.weight.original.grad, reference[1].parametrizations.weight.original.grad, **F64
    )
    torch.testing.assert_close(layer.running_var, reference[1].running_var, **F64)
    copied = copy.deepcopy(converted)  # (pickling stays refused, as torch refuses it for parametrized modules)
    assert type(copied[1]) is type(layer) and torch.equal(copied[1].weight, layer.weight)
    reverted = revert_model(converted)[1]
    assert parametrize.type_before_parametrizations(reverted) is nn.BatchNorm1d
    assert torch.equal(reverted.weight, reference[1].weight.detach().abs())
