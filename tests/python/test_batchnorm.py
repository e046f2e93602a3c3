"""SynchronizedBatchNorm1d/2d/3d: nn.BatchNormNd's interface, and parity with ONE nn.BatchNormNd on the whole batch
across CPU replicas."""

from __future__ import annotations

import collections
import copy
import inspect

import pytest
import torch
from batchnorm_cases import (
    CHANNELS,
    F64,
    KINDS,
    assert_buffers_match,
    cpu_dp,
    make_input,
    make_pair,
    run_replicas,
    split_forward,
    step_and_compare,
)
from hang_guard import call_with_timeout
from replica_faults import RaiseOnMarker
from torch import nn
from torch._C import DispatchKey, DispatchKeySet
from torch.utils._python_dispatch import TorchDispatchMode

import syncbn_ext
from syncbn_ext import (
    SynchronizedBatchNorm1d,
)

pytestmark = pytest.mark.usefixtures("short_barrier_timeout")


# ---------------------------------------------------------------------------------------------------------------
# The layers as nn.BatchNormNd: constructor, checks, repr, state_dict
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["1d-NC", "2d", "3d"])
def test_constructor_repr_and_state_dict_match_torch(kind):
    sync_cls, torch_cls, _ = KINDS[kind]
    ours_sig = inspect.signature(sync_cls.__init__).parameters
    torch_sig = inspect.signature(torch_cls.__init__).parameters
    # nn.BatchNormNd's signature, and a group to synchronize across processes (keyword-only, last).
    assert [(p.name, p.kind, p.default) for p in ours_sig.values()] == [
        *((p.name, p.kind, p.default) for p in torch_sig.values()),
        ("process_group", inspect.Parameter.KEYWORD_ONLY, None),
    ]
    assert issubclass(sync_cls, torch_cls)  # isinstance(layer, nn.BatchNorm2d) finds ours too
    for options in (
        {},
        {"eps": 1e-3, "momentum": None},
        {"affine": False},
        {"bias": False},
        {"track_running_stats": False},
        {"dtype": torch.float64},
    ):
        ours, ref = sync_cls(7, **options), torch_cls(7, **options)
        assert ours.extra_repr() == ref.extra_repr()
        assert repr(ours) == repr(ref).replace(torch_cls.__name__, sync_cls.__name__)
        assert list(ours.state_dict()) == list(ref.state_dict())
        for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values(), strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b), name
        assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
        assert ours._copy_id is None and ours._channel is None


def test_code_that_picks_batchnorm_layers_by_class_finds_the_synchronized_ones():
    """A training script's usual selections (no weight decay on BatchNorm, frozen BatchNorm) after a conversion."""

    def batchnorm_parameters(model: nn.Module) -> set[int]:
        return {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    expected = batchnorm_parameters(model)
    assert len(expected) == 4
    converted = syncbn_ext.convert_model(model)
    assert batchnorm_parameters(converted) == expected
    with syncbn_ext.patch_sync_batchnorm():
        built_inside = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    assert type(built_inside[1]) is syncbn_ext.SynchronizedBatchNorm2d and len(batchnorm_parameters(built_inside)) == 2
    for m in converted.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    assert not converted[1].training and not converted[4].training and converted.training


@pytest.mark.parametrize("kind", ["1d-NC", "2d", "3d"])
def test_input_checks_raise_torch_messages(kind):
    sync_cls, torch_cls, _ = KINDS[kind]
    for shape in [(4,), (2, 3, 4, 5), (2, 3, 4, 5, 6, 7), (2, 3, 4)]:
        x = torch.randn(shape)
        try:
            torch_cls(3)(x)
        except ValueError as error:
            expected = str(error)
        else:
            continue  # a valid shape for this kind
        for module in (sync_cls(3), cpu_dp(sync_cls(3), 2)):
            with pytest.raises(ValueError) as caught:
                call_with_timeout(module, x)
            assert expected in str(caught.value)


FLOATS = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def outcome_of(module, x):
    try:
        return "ok", call_with_timeout(module, x).dtype
    except Exception as error:  # noqa: BLE001 (the outcome compared)
        return type(error), str(error).splitlines()[0]


@pytest.mark.parametrize("parameters", FLOATS)
@pytest.mark.parametrize("buffers", FLOATS)
def test_mixed_dtypes_are_accepted_or_refused_as_batchnorm_does(parameters, buffers, eps_mode):
    # nn.BatchNorm on CPU: float32 parameters and buffers with a float16/bfloat16 input, or all of one dtype; its
    # messages otherwise. The replicated path and the clamp mode run our kernels, not F.batch_norm's checks.
    def with_dtypes(module):
        module.weight.data, module.bias.data = module.weight.data.to(parameters), module.bias.data.to(parameters)
        module.running_mean, module.running_var = module.running_mean.to(buffers), module.running_var.to(buffers)
        return module

    for dtype in FLOATS:
        x = torch.randn(4, 3, 2, 2, dtype=dtype)
        expected = outcome_of(with_dtypes(nn.BatchNorm2d(3)), x)
        assert outcome_of(cpu_dp(with_dtypes(syncbn_ext.SynchronizedBatchNorm2d(3)), 2), x) == expected, dtype
        eps_mode("clamp")
        assert outcome_of(with_dtypes(syncbn_ext.SynchronizedBatchNorm2d(3)), x) == expected, dtype
        eps_mode("plus")


@pytest.mark.parametrize(
    "dtype", [torch.int64, torch.bool, torch.complex64, torch.float8_e4m3fn, torch.float8_e5m2], ids=str
)
def test_inputs_of_types_batchnorm_does_not_compute_in_are_refused_as_batchnorm_does(dtype, eps_mode):
    # The float8 types count as floating point in ATen, but torch's batch_norm does not compute in them: before, our
    # kernels refused them later, with another error (and across processes, unannounced: the ranks fell out of step).
    x = torch.randn(4, 3, 2, 2).to(dtype)
    expected = outcome_of(nn.BatchNorm2d(3), x)
    assert expected[0] is NotImplementedError, expected
    for mode in ("plus", "clamp"):
        eps_mode(mode)
        assert outcome_of(cpu_dp(syncbn_ext.SynchronizedBatchNorm2d(3), 2), x) == expected
        assert outcome_of(syncbn_ext.SynchronizedBatchNorm2d(3), x) == expected
        assert outcome_of(syncbn_ext.SyncBatchNorm(3), x) == expected


@pytest.mark.parametrize("kind", ["1d-NC", "2d", "3d"])
def test_state_dicts_load_both_ways_and_old_versions(kind):
    ref, ours = make_pair(kind, momentum=None)
    plain = KINDS[kind][1](CHANNELS, dtype=torch.float64, momentum=None)
    plain.load_state_dict(ours.state_dict())
    for (name, a), b in zip(plain.state_dict().items(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    fresh = KINDS[kind][0](CHANNELS, dtype=torch.float64)
    fresh.load_state_dict(ref.state_dict())
    assert torch.equal(fresh.num_batches_tracked, torch.tensor(3))

    # A version-1 checkpoint has no num_batches_tracked: both get 0, like nn.BatchNorm.
    old = ref.state_dict()
    del old["num_batches_tracked"]
    old._metadata[""]["version"] = 1
    for module in (KINDS[kind][0](CHANNELS, dtype=torch.float64), KINDS[kind][1](CHANNELS, dtype=torch.float64)):
        module.num_batches_tracked.fill_(5)
        module.load_state_dict(copy.deepcopy(old))
        assert torch.equal(module.num_batches_tracked, torch.tensor(5))  # kept (nn.BatchNorm keeps its own)
        assert torch.equal(module.running_mean, ref.running_mean)


def test_eps_mode_accessors(eps_mode):
    assert syncbn_ext.get_sbn_eps_mode() == "plus"
    eps_mode("clamp")
    assert syncbn_ext.get_sbn_eps_mode() == "clamp"
    for bad in ("Plus", "max", ""):
        with pytest.raises(ValueError, match="plus"):
            eps_mode(bad)
    for bad in (None, 1, True):
        with pytest.raises(TypeError, match=f"mode must be 'plus' or 'clamp', got {bad!r} of type"):
            eps_mode(bad)
    assert syncbn_ext.get_sbn_eps_mode() == "clamp"
    eps_mode("plus")
    assert syncbn_ext.get_sbn_eps_mode() == "plus"


# ---------------------------------------------------------------------------------------------------------------
# Parity tables: N replicas of ours == one nn.BatchNormNd on the whole batch (float64)
# ---------------------------------------------------------------------------------------------------------------

OPTIONS = {
    "default": ({}, 2, 8, False),  # (constructor options, steps, batch, eval mode)
    "momentum_none": ({"momentum": None}, 3, 8, False),
    "affine_false": ({"affine": False}, 2, 8, False),
    "bias_false": ({"bias": False}, 2, 8, False),
    "no_running_stats": ({"track_running_stats": False}, 2, 8, False),
    "no_running_stats_eval": ({"track_running_stats": False}, 2, 8, True),
    "unequal_slices": ({"eps": 1e-3, "momentum": 0.3}, 2, 10, False),
}


@pytest.mark.parametrize("replicas", [1, 2, 3, 4])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("kind", list(KINDS))
def test_parity_with_one_batchnorm_on_the_whole_batch(kind, option, replicas, parallel_backward):
    options, steps, batch, eval_mode = OPTIONS[option]
    ref, ours = make_pair(kind, **options)
    if eval_mode:
        ref.eval()
        ours.eval()
    dp = cpu_dp(ours, replicas, parallel_backward=parallel_backward)
    for step in range(steps):
        x = make_input(kind, batch, seed=10 + step)
        step_and_compare(ref, ours, dp, x, seed=20 + step)
    assert ours._copy_id is None  # the replication hook ran on the replicas only


class RoutedToOtherDevicesKernels(TorchDispatchMode):
    """Runs every torch.ops.syncbn op with the kernel a CUDA tensor gets (the ATen composite), on the CPU tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace != "syncbn":
            return func(*args, **(kwargs or {}))
        self.calls[func.__name__] += 1  # from several threads: a count may be lost, never a name
        return func.redispatch(DispatchKeySet(DispatchKey.CUDA), *args, **(kwargs or {}))


@pytest.mark.parametrize("replicas", [2, 3])  # (one replica runs the module itself: nn.BatchNorm's kernels)
@pytest.mark.parametrize("option", ["default", "momentum_none", "affine_false", "unequal_slices"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_parity_with_the_kernels_other_devices_run(kind, option, replicas, parallel_backward):
    # The GPU path's kernels, through the whole layer: forward, both backwards, running statistics.
    options, steps, batch, _ = OPTIONS[option]
    ref, ours = make_pair(kind, **options)
    dp = cpu_dp(ours, replicas, parallel_backward=parallel_backward)
    kernels = RoutedToOtherDevicesKernels()

    def forward(x):
        with kernels:  # in the hang guard's thread, which a dispatch mode (thread-local) does not reach
            return dp(x)

    with kernels:  # the backward, on this thread
        for step in range(steps):
            x = make_input(kind, batch, seed=10 + step)
            step_and_compare(ref, ours, forward, x, seed=20 + step)
    ran = {name.split(".")[0] for name in kernels.calls}
    assert ran == {"local_stats", "normalize", "backward_reduce", "backward_elemt"}, kernels.calls


@pytest.mark.parametrize("kind", list(KINDS))
def test_not_replicated_is_bitwise_nn_batchnorm(kind):
    for options in ({}, {"momentum": None}, {"track_running_stats": False}):
        ref, ours = make_pair(kind, dtype=torch.float32, **options)
        for module in (ours, cpu_dp(ours, 1)):
            for training in (True, False):
                ref.train(training)
                ours.train(training)
                x = make_input(kind, 6, dtype=torch.float32)
                assert torch.equal(module(x), ref(x))
                assert_buffers_match(ours, ref, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["1d-NCL", "2d"])
def test_eval_after_training_steps(kind):
    ref, ours = make_pair(kind, momentum=None)
    dp = cpu_dp(ours, 3)
    for step in range(3):
        step_and_compare(ref, ours, dp, make_input(kind, 7, seed=step), seed=step)
    ref.eval()
    ours.eval()
    for replicas in (1, 3):
        step_and_compare(ref, ours, cpu_dp(ours, replicas), make_input(kind, 7, seed=9))
    assert torch.equal(ours.num_batches_tracked, torch.tensor(6))


@pytest.mark.parametrize("sizes", [[3, 0, 2], [0, 4], [2, 0, 0, 3], [0, 0, 5]])
@pytest.mark.parametrize("kind", ["1d-NC", "2d"])
def test_a_replica_with_an_empty_slice(kind, sizes):
    # chunk() never gives an empty slice of a non-empty batch: drive the replicas ourselves.
    for options in ({}, {"momentum": None}):
        ref, ours = make_pair(kind, **options)
        for step in range(2):
            x = make_input(kind, sum(sizes), seed=step)
            step_and_compare(ref, ours, split_forward(ours, sizes), x, seed=step)


@pytest.mark.parametrize("replicas", [1, 2, 4])
@pytest.mark.parametrize("kind", list(KINDS))
def test_zero_size_batch(kind, replicas):
    # An empty batch: chunk(4) of it gives 4 empty slices, so every replica runs on nothing.
    for options in ({}, {"momentum": None}, {"track_running_stats": False}):
        ref, ours = make_pair(kind, **options)
        x = make_input(kind, 0)
        step_and_compare(ref, ours, cpu_dp(ours, replicas), x)
    ref, ours = make_pair(kind)
    step_and_compare(ref, ours, split_forward(ours, [0, 0, 0]), make_input(kind, 0))


def test_scatter_along_a_spatial_dim():
    # Statistics are per channel over every other dim: slicing along L instead of N changes nothing.
    ref, ours = make_pair("1d-NCL")
    dp = cpu_dp(ours, 3, dim=2)
    for step in range(2):
        step_and_compare(ref, ours, dp, make_input("1d-NCL", 4, seed=step), seed=step)


def test_varying_replica_counts_on_one_wrapper():
    # 8 over 4, then 3 over 4 (3 replicas), then 1 sample (one replica, master alone), then 8 over 4 again.
    ref, ours = make_pair("1d-NCL", momentum=None)
    dp = cpu_dp(ours, 4)
    for step, batch in enumerate([8, 3, 1, 8]):
        step_and_compare(ref, ours, dp, make_input("1d-NCL", batch, seed=step), seed=step)


class TwoLayers(nn.Module):
    """Two synchronized layers, the first applied twice in one forward."""

    def __init__(self, norm_a, norm_b):
        super().__init__()
        self.a = norm_a
        self.b = norm_b
        self.linear = nn.Linear(CHANNELS, CHANNELS, dtype=torch.float64)

    def forward(self, x):
        x = self.a(x)
        x = self.a(torch.tanh(self.linear(x)) * 2 + 1)
        return self.b(x)


@pytest.mark.parametrize("replicas", [2, 3, 4])
def test_a_layer_applied_twice_in_one_forward(replicas):
    ref_a, ours_a = make_pair("1d-NC", momentum=None)
    ref_b, ours_b = make_pair("1d-NC", seed=5, affine=False)
    ref, ours = TwoLayers(ref_a, ref_b), TwoLayers(ours_a, ours_b)
    ours.linear.load_state_dict(ref.linear.state_dict())
    dp = cpu_dp(ours, replicas)
    for step in range(3):
        x = make_input("1d-NC", 10, seed=step)
        x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_ref, y_ours = ref(x_ref), call_with_timeout(dp, x_ours)
        torch.testing.assert_close(y_ours, y_ref, **F64)
        grad_output = torch.randn_like(y_ref)
        y_ref.backward(grad_output)
        y_ours.backward(grad_output)
        torch.testing.assert_close(x_ours.grad, x_ref.grad, **F64)
        for (name, p_ours), p_ref in zip(ours.named_parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p_ours.grad, p_ref.grad, msg=name, **F64)
        for (name, b_ours), b_ref in zip(ours.named_buffers(), ref.buffers(), strict=True):
            torch.testing.assert_close(b_ours, b_ref, msg=name, **F64)


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------

ONE_VALUE = "Expected more than 1 value per channel when training, got input size"


@pytest.mark.parametrize("sizes", [[1, 0], [0, 1], [0, 1, 0], [1]])
def test_one_value_per_channel_raises_in_every_replica(sizes):
    for kind in ("1d-NC", "2d"):
        shape_tail = (1, 1) if kind == "2d" else ()
        ref, ours = make_pair(kind)
        x = torch.randn(1, CHANNELS, *shape_tail, dtype=torch.float64)
        with pytest.raises(ValueError) as expected:
            ref(x)
        assert ONE_VALUE in str(expected.value)
        results = run_replicas(ours, list(x.split(sizes)))
        for i, result in enumerate(results):
            assert isinstance(result, ValueError), (i, result)
            assert ONE_VALUE in str(result), (i, result)
        # A failed pass leaves every buffer untouched, num_batches_tracked included (nn.BatchNorm counts the batch
        # before it raises).
        assert torch.equal(ours.num_batches_tracked, ref.num_batches_tracked - 1)
        with torch.no_grad():
            ref.num_batches_tracked.sub_(1)
        assert_buffers_match(ours, ref, rtol=0, atol=0)
        # The layer works again afterwards.
        step_and_compare(ref, ours, split_forward(ours, [2, 1]), make_input(kind, 3))


def test_one_value_per_channel_under_the_wrapper():
    ref, ours = make_pair("1d-NC")
    for module in (ours, cpu_dp(ours, 2)):  # one sample: a single replica (a master alone)
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            call_with_timeout(module, torch.randn(1, CHANNELS, dtype=torch.float64))
    ours.eval()  # eval mode with running statistics: fine
    ref.eval()
    x = torch.randn(1, CHANNELS, dtype=torch.float64)
    torch.testing.assert_close(cpu_dp(ours, 2)(x), ref(x), **F64)


def test_a_replica_failing_before_the_barrier_wakes_the_others():
    # Replica 1 raises before it reaches the layer; the others wait in the layer's barrier and must be woken by
    # the wrapper's abort (not by the barrier timeout, which would surface as BarrierTimeoutError from copy 0).
    model = nn.Sequential(RaiseOnMarker(), SynchronizedBatchNorm1d(CHANNELS, dtype=torch.float64))
    x = torch.randn(9, CHANNELS, dtype=torch.float64)
    x[4, 0] = RaiseOnMarker.MARKER
    dp = cpu_dp(model, 3)
    with pytest.raises(ValueError, match="marker found") as caught:
        call_with_timeout(dp, x)
    assert not isinstance(caught.value, syncbn_ext.BarrierError)
    # The next pass works.
    ref = nn.BatchNorm1d(CHANNELS, dtype=torch.float64)
    ref.load_state_dict(model[1].state_dict())
    x = torch.randn(9, CHANNELS, dtype=torch.float64)
    torch.testing.assert_close(cpu_dp(model, 3)(x), ref(x), **F64)
