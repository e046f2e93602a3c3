"""convert_model (and what it converts: torch's layers, nn.DataParallel, compiled and parametrized layers)."""

from __future__ import annotations

import copy
import pickle
import re
import warnings

import pytest
import torch
from convert_cases import (
    F64,
    OPTION_NAMES,
    PAIRS,
    SYNC_BN,
    TORCH_BN,
    Net,
    assert_same_layers,
    assert_state_dicts_equal,
    make_net,
)
from hang_guard import call_with_timeout
from torch import nn

import syncbn_ext
from syncbn_ext import (
    DataParallelWithCallback,
    SynchronizedBatchNorm1d,
    SynchronizedBatchNorm2d,
    convert_model,
    patch_sync_batchnorm,
    revert_model,
)


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


@pytest.mark.parametrize(
    "convert, name",
    [
        (syncbn_ext.convert_model, "convert_model"),
        (syncbn_ext.SyncBatchNorm.convert_sync_batchnorm, "convert_sync_batchnorm"),
        (syncbn_ext.revert_model, "revert_model"),
    ],
)
def test_converting_what_is_not_a_module_is_a_type_error_saying_so(convert, name):
    # Before: an AttributeError from deep inside the conversion ("'str' object has no attribute '_modules'").
    with pytest.raises(TypeError, match=rf"^{name}: module must be an nn.Module, got str$"):
        convert("resnet18")
