"""SynchronizedBatchNorm1d/2d/3d: parity with ONE nn.BatchNormNd on the whole batch, across CPU replicas."""

from __future__ import annotations

import copy
import inspect
import io
import pickle
import threading

import pytest
import torch
from hang_guard import HANG_TIMEOUT, call_with_timeout
from torch import nn

import syncbn_ext
from syncbn_ext import (
    DataParallelWithCallback,
    SynchronizedBatchNorm1d,
    SynchronizedBatchNorm2d,
    SynchronizedBatchNorm3d,
    replicate_on_cpu,
)

BARRIER_TIMEOUT = 30.0  # a bug makes a barrier fail after this, never hang the suite
F64 = {"rtol": 1e-10, "atol": 1e-10}

# kind: (synchronized class, torch class, non-batch non-channel dims of the input)
KINDS = {
    "1d-NC": (SynchronizedBatchNorm1d, nn.BatchNorm1d, ()),
    "1d-NCL": (SynchronizedBatchNorm1d, nn.BatchNorm1d, (5,)),
    "2d": (SynchronizedBatchNorm2d, nn.BatchNorm2d, (4, 3)),
    "3d": (SynchronizedBatchNorm3d, nn.BatchNorm3d, (3, 2, 2)),
}
CHANNELS = 3


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------


def sync_layers(module):
    return [m for m in module.modules() if isinstance(m, syncbn_ext.nn._SynchronizedBatchNorm)]


@pytest.fixture(autouse=True)
def barrier_timeout(monkeypatch):
    """Every replication's barrier (created per forward) fails after BARRIER_TIMEOUT instead of hanging."""
    monkeypatch.setenv("SYNCBN_TIMEOUT", str(BARRIER_TIMEOUT))


def guard_barriers(module):
    return module


def cpu_dp(module, n, **kwargs):
    return DataParallelWithCallback(guard_barriers(module), device_ids=["cpu"] * n, **kwargs)


def run_replicas(module, slices):
    """Replicates ``module`` on len(slices) CPU replicas, runs the callbacks, runs replica i on slices[i] in a
    thread of its own. Returns per replica its output or the exception it raised."""
    guard_barriers(module)
    replicas = replicate_on_cpu(module, len(slices))
    syncbn_ext.execute_replication_callbacks(replicas)
    results = [None] * len(slices)

    def work(i):
        try:
            results[i] = replicas[i](slices[i])
        except BaseException as error:  # compared by the test
            results[i] = error

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(slices))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(HANG_TIMEOUT)
        if thread.is_alive():
            pytest.fail(f"replicas did not return within {HANG_TIMEOUT} s (deadlock?)")
    return results


def run_split(module, x, sizes):
    """The output of ``module`` replicated over slices of ``x`` of the given sizes (0 allowed), concatenated."""
    results = run_replicas(module, list(x.split(sizes)))
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return torch.cat(results)


def split_forward(module, sizes):
    """A forward of ``module`` replicated over slices of the given sizes (see :func:`run_split`)."""
    return lambda x: run_split(module, x, sizes)


def make_pair(kind, dtype=torch.float64, seed=0, **options):
    """(nn.BatchNormNd, synchronized layer) with the same random parameters and running statistics."""
    sync_cls, torch_cls, _ = KINDS[kind]
    torch.manual_seed(seed)
    ref = torch_cls(CHANNELS, dtype=dtype, **options)
    with torch.no_grad():
        if ref.weight is not None:
            ref.weight.uniform_(0.5, 1.5)
        if ref.bias is not None:
            ref.bias.uniform_(-0.5, 0.5)
        if ref.running_mean is not None:
            ref.running_mean.uniform_(-1, 1)
            ref.running_var.uniform_(0.5, 2)
            ref.num_batches_tracked.fill_(3)
    ours = sync_cls(CHANNELS, dtype=dtype, **options)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def make_input(kind, batch, dtype=torch.float64, seed=1):
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, CHANNELS, *KINDS[kind][2])
    offsets = torch.tensor([0.5, -2.0, 10.0], dtype=dtype).view(1, CHANNELS, *([1] * len(KINDS[kind][2])))
    scales = torch.tensor([1.0, 0.3, 3.0], dtype=dtype).view_as(offsets)
    return torch.randn(shape, generator=generator, dtype=dtype) * scales + offsets


def assert_buffers_match(ours, ref, **tol):
    for name in ("running_mean", "running_var"):
        a, b = getattr(ours, name), getattr(ref, name)
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, msg=name, **tol)
    a, b = ours.num_batches_tracked, ref.num_batches_tracked
    assert (a is None) == (b is None)
    if a is not None:
        assert torch.equal(a, b), (a, b)


def assert_grads_match(ours, ref, x_ours, x_ref, **tol):
    torch.testing.assert_close(x_ours.grad, x_ref.grad, msg="input grad", **tol)
    for name in ("weight", "bias"):
        a, b = getattr(ours, name), getattr(ref, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.grad is not None, name
            torch.testing.assert_close(a.grad, b.grad, msg=f"{name} grad", **tol)


def step_and_compare(ref, ours, forward, x, seed=2, **tol):
    """One forward and backward (random grad_output) of ``ref`` on x and of ``forward`` (ours), compared."""
    tol = tol or F64
    x_ref = x.clone().requires_grad_()
    x_ours = x.clone().requires_grad_()
    y_ref = ref(x_ref)
    y_ours = call_with_timeout(forward, x_ours)
    assert y_ours.shape == y_ref.shape
    torch.testing.assert_close(y_ours, y_ref, msg="output", **tol)
    grad_output = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(seed), dtype=y_ref.dtype)
    y_ref.backward(grad_output)
    y_ours.backward(grad_output)
    assert_grads_match(ours, ref, x_ours, x_ref, **tol)
    assert_buffers_match(ours, ref, **tol)


@pytest.fixture
def eps_mode():
    """Restores the eps mode after the test."""
    saved = syncbn_ext.get_sbn_eps_mode()
    yield syncbn_ext.set_sbn_eps_mode
    syncbn_ext.set_sbn_eps_mode(saved)


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
    assert issubclass(sync_cls, nn.modules.batchnorm._BatchNorm)
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
    for bad in ("Plus", "max", "", None, 1):
        with pytest.raises(ValueError, match="plus"):
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
def test_parity_with_one_batchnorm_on_the_whole_batch(kind, option, replicas):
    options, steps, batch, eval_mode = OPTIONS[option]
    ref, ours = make_pair(kind, **options)
    if eval_mode:
        ref.eval()
        ours.eval()
    dp = cpu_dp(ours, replicas)
    for step in range(steps):
        x = make_input(kind, batch, seed=10 + step)
        step_and_compare(ref, ours, dp, x, seed=20 + step)
    assert ours._copy_id is None  # the replication hook ran on the replicas only


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


class RaiseOnMarker(nn.Module):
    MARKER = -12345.0

    def forward(self, x):
        if (x == self.MARKER).any():
            raise RuntimeError("marker found in this slice")
        return x


def test_a_replica_failing_before_the_barrier_wakes_the_others():
    # Replica 1 raises before it reaches the layer; the others wait in the layer's barrier and must be woken by
    # the wrapper's abort (not by the barrier timeout, which would surface as BarrierTimeoutError from copy 0).
    model = nn.Sequential(RaiseOnMarker(), SynchronizedBatchNorm1d(CHANNELS, dtype=torch.float64))
    x = torch.randn(9, CHANNELS, dtype=torch.float64)
    x[4, 0] = RaiseOnMarker.MARKER
    dp = cpu_dp(model, 3)
    with pytest.raises(RuntimeError, match="marker found") as caught:
        call_with_timeout(dp, x)
    assert not isinstance(caught.value, syncbn_ext.BarrierError)
    # The next pass works.
    ref = nn.BatchNorm1d(CHANNELS, dtype=torch.float64)
    ref.load_state_dict(model[1].state_dict())
    x = torch.randn(9, CHANNELS, dtype=torch.float64)
    torch.testing.assert_close(cpu_dp(model, 3)(x), ref(x), **F64)


# ---------------------------------------------------------------------------------------------------------------
# eps modes
# ---------------------------------------------------------------------------------------------------------------


def clamp_reference(x, weight, bias, eps):
    dims = [0, *range(2, x.dim())]
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(torch.clamp(var, min=eps)) * weight.view(shape) + bias.view(shape)


@pytest.mark.parametrize("replicas", [1, 2, 3])
@pytest.mark.parametrize("kind", ["1d-NC", "2d"])
def test_clamp_eps_mode(kind, replicas, eps_mode):
    eps_mode("clamp")
    ref, ours = make_pair(kind, eps=1e-3)
    weight = ref.weight.detach().clone().requires_grad_()
    bias = ref.bias.detach().clone().requires_grad_()
    dp = cpu_dp(ours, replicas)
    for step in range(2):
        x = make_input(kind, 9, seed=step)
        x[:, 1] *= 1e-2  # channel 1: variance ~1e-5 < eps; channels 0, 2: far above
        x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_ref = clamp_reference(x_ref, weight, bias, ours.eps)
        y_ours = call_with_timeout(dp, x_ours)
        torch.testing.assert_close(y_ours, y_ref, **F64)
        with torch.no_grad():
            ref(x)  # the running statistics are updated as in plus mode
        assert_buffers_match(ours, ref, **F64)
        grad_output = torch.randn_like(y_ref)
        y_ref.backward(grad_output)
        y_ours.backward(grad_output)
        torch.testing.assert_close(x_ours.grad, x_ref.grad, **F64)
        torch.testing.assert_close(ours.weight.grad, weight.grad, **F64)
        torch.testing.assert_close(ours.bias.grad, bias.grad, **F64)
    # Normalizing with the running statistics is nn.BatchNorm's (var + eps) in both modes.
    ref.eval()
    ours.eval()
    x = make_input(kind, 9, seed=7)
    torch.testing.assert_close(dp(x), ref(x), **F64)


# ---------------------------------------------------------------------------------------------------------------
# Low precision, channels_last, numerics
# ---------------------------------------------------------------------------------------------------------------

LOW_TOL = {torch.float16: {"rtol": 3e-3, "atol": 3e-3}, torch.bfloat16: {"rtol": 1.5e-2, "atol": 1.5e-2}}


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("param_dtype", ["same", torch.float32])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["2d", "3d"])
def test_low_precision_and_channels_last(kind, dtype, param_dtype, channels_last):
    param_dtype = dtype if param_dtype == "same" else param_dtype
    ref64, ours = make_pair(kind, dtype=torch.float64, momentum=0.5)
    ours = ours.to(param_dtype)
    with torch.no_grad():  # the reference starts from the very values ours holds
        for name, tensor in ours.state_dict().items():
            ref64.state_dict()[name].copy_(tensor.double() if tensor.is_floating_point() else tensor)
    x = make_input(kind, 6).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    ref_nn = KINDS[kind][1](CHANNELS, dtype=param_dtype, momentum=0.5)  # for the memory format only
    ref_nn.load_state_dict(ours.state_dict())

    x64 = x.double().requires_grad_()
    x_ours = x.clone().requires_grad_()
    y64 = ref64(x64)
    y_ours = call_with_timeout(cpu_dp(ours, 3), x_ours)
    assert y_ours.dtype == dtype
    torch.testing.assert_close(y_ours.double(), y64, **LOW_TOL[dtype])
    grad_output = torch.randn_like(y64).to(dtype)
    y64.backward(grad_output.double())
    y_ours.backward(grad_output)
    torch.testing.assert_close(x_ours.grad.double(), x64.grad, **LOW_TOL[dtype])
    for name in ("weight", "bias"):
        grad = getattr(ours, name).grad
        assert grad.dtype == param_dtype
        torch.testing.assert_close(grad.double(), getattr(ref64, name).grad, msg=name, **LOW_TOL[dtype])
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(ours, name).double(), getattr(ref64, name), msg=name, **LOW_TOL[dtype])
    if channels_last:
        # Each replica's output has nn.BatchNorm's memory format (the gather then concatenates them).
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        expected = ref_nn(x).is_contiguous(memory_format=fmt)
        for out in run_replicas(ours, list(x.chunk(2))):
            assert out.is_contiguous(memory_format=fmt) == expected


@pytest.mark.parametrize("kind", ["2d", "3d"])
def test_channels_last_float64(kind):
    ref, ours = make_pair(kind)
    fmt = torch.channels_last if kind == "2d" else torch.channels_last_3d
    dp = cpu_dp(ours, 3)
    for step in range(2):
        x = make_input(kind, 7, seed=step).to(memory_format=fmt)
        step_and_compare(ref, ours, dp, x, seed=step)


def test_large_mean_small_variance_float32():
    # Mean 1e4, std 1e-2: sums of squares in float32 would give variance 0. Our error must be no worse than
    # nn.BatchNorm2d's own float32 error on the same data.
    generator = torch.Generator().manual_seed(0)
    x = (1e4 + 1e-2 * torch.randn(4, 8, 32, 32, generator=generator, dtype=torch.float64)).float()
    ref64 = nn.BatchNorm2d(8, momentum=1.0, dtype=torch.float64)  # momentum 1: running_var = the batch's
    ref32 = nn.BatchNorm2d(8, momentum=1.0)
    ours = SynchronizedBatchNorm2d(8, momentum=1.0)
    y64 = ref64(x.double())
    y32 = ref32(x)
    y_ours = call_with_timeout(cpu_dp(ours, 2), x)
    err_nn = (y32.double() - y64).abs().max().item()
    err_ours = (y_ours.double() - y64).abs().max().item()
    assert err_ours <= err_nn, (err_ours, err_nn)
    var_err_nn = ((ref32.running_var.double() - ref64.running_var) / ref64.running_var).abs().max().item()
    var_err_ours = ((ours.running_var.double() - ref64.running_var) / ref64.running_var).abs().max().item()
    assert var_err_ours <= max(var_err_nn * 1.05, 1e-5), (var_err_ours, var_err_nn)
    mean_err_nn = (ref32.running_mean.double() - ref64.running_mean).abs().max().item()
    mean_err_ours = (ours.running_mean.double() - ref64.running_mean).abs().max().item()
    assert mean_err_ours <= mean_err_nn * 1.05 + 1e-9, (mean_err_ours, mean_err_nn)


# ---------------------------------------------------------------------------------------------------------------
# gradcheck of the whole N-replica computation
# ---------------------------------------------------------------------------------------------------------------


def replicated_batch_norm(module, sizes):
    """f(x, weight, bias): ``module`` replicated over slices of x of the given sizes, weight and bias injected."""

    def fn(x, weight, bias):
        replicas = replicate_on_cpu(module, len(sizes), detach=False)
        for replica in replicas:
            replica.weight = weight.view_as(weight)
            replica.bias = bias.view_as(bias)
        syncbn_ext.execute_replication_callbacks(replicas)
        slices = x.split(sizes)
        outputs = [None] * len(sizes)

        def work(i):
            try:
                outputs[i] = replicas[i](slices[i])
            except BaseException as error:
                outputs[i] = error

        threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(sizes))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(HANG_TIMEOUT)
            assert not thread.is_alive(), "deadlock"
        for output in outputs:
            if isinstance(output, BaseException):
                raise output
        return torch.cat(outputs)

    return fn


@pytest.mark.parametrize("sizes", [[3, 2], [2, 1, 2], [2, 0, 3]])
@pytest.mark.parametrize("kind", ["1d-NCL", "2d"])
def test_gradcheck_across_replicas(kind, sizes):
    _, ours = make_pair(kind, track_running_stats=False)
    guard_barriers(ours)
    fn = replicated_batch_norm(ours, sizes)
    generator = torch.Generator().manual_seed(3)
    tail = {"1d-NCL": (3,), "2d": (2, 2)}[kind]
    x = torch.randn(sum(sizes), CHANNELS, *tail, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = (torch.rand(CHANNELS, generator=generator, dtype=torch.float64) + 0.5).requires_grad_()
    bias = torch.randn(CHANNELS, generator=generator, dtype=torch.float64, requires_grad=True)
    # The function is the nn.BatchNorm of the whole batch, with the weight and bias given.
    expected = nn.functional.batch_norm(x, None, None, weight, bias, training=True)
    torch.testing.assert_close(call_with_timeout(fn, x, weight, bias), expected, **F64)
    assert call_with_timeout(torch.autograd.gradcheck, fn, (x, weight, bias), eps=1e-6, atol=1e-7)


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


def torch_save_load(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize(
    "clone",
    [lambda m: pickle.loads(pickle.dumps(m)), copy.deepcopy, torch_save_load],
    ids=["pickle", "deepcopy", "torch.save"],
)
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
    for clone in (pickle.loads(pickle.dumps(dp)), copy.deepcopy(dp), torch_save_load(dp)):
        assert isinstance(clone, DataParallelWithCallback) and clone.device_ids == dp.device_ids
        assert_models_equal(clone.module, snapshot, grads=False)
        expected = call_with_timeout(cpu_dp(copy.deepcopy(snapshot), 2), x)
        torch.testing.assert_close(call_with_timeout(guard_barriers(clone), x), expected, **F64)

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
