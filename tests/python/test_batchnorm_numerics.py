"""SynchronizedBatchNorm layers across CPU replicas: eps modes, low precision, channels_last, numerics, gradcheck."""

from __future__ import annotations

import pytest
import torch
from batchnorm_cases import (
    CHANNELS,
    F64,
    KINDS,
    assert_buffers_match,
    concatenated,
    cpu_dp,
    make_input,
    make_pair,
    run_in_threads,
    run_replicas,
    step_and_compare,
)
from hang_guard import call_with_timeout
from torch import nn

import syncbn_ext
from syncbn_ext import (
    SynchronizedBatchNorm2d,
    replicate_on_cpu,
)

pytestmark = pytest.mark.usefixtures("short_barrier_timeout")


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


@pytest.mark.parametrize("replicas", [2, 3])
def test_a_variance_beyond_float32_gives_nn_batchnorms_output_and_the_gradients_of_that_output(replicas):
    # Variance ~1e40 in float32: nn.BatchNorm normalizes with an inverse std of 0 (the output is the bias) and its
    # gradients are zero. Our backward took the float64 variance's inverse std (gradients of another output).
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 2, 3, 3, generator=generator) * 1e20
    grad_output = torch.randn(8, 2, 3, 3, generator=generator)
    outputs, grads = [], []
    for layer, forward in ((nn.BatchNorm2d(2), None), (SynchronizedBatchNorm2d(2), replicas)):
        leaf = x.clone().requires_grad_()
        y = call_with_timeout(cpu_dp(layer, forward), leaf) if forward else layer(leaf)
        (y * grad_output).sum().backward()
        outputs.append(y)
        grads.append((leaf.grad, layer.weight.grad, layer.bias.grad))
    torch.testing.assert_close(outputs[1], outputs[0])
    assert not grads[0][0].any() and not grads[0][1].any()  # (torch's)
    for got, expected in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize(
    "shape, mean, std, replicas",
    [((8, 64), 1e4, 1e-2, 2), ((8, 64), 1e5, 1.0, 2), ((32, 16, 8, 8), 1e5, 1.0, 4), ((32, 16, 8, 8), 1e3, 1e-3, 4)],
)
def test_merging_replicas_keeps_the_precision_of_a_large_mean_float32_batch(shape, mean, std, replicas):
    # Chan's merge weighs each copy's (mean_i - mean)^2 by its count: local means rounded to float32 made the merged
    # variance 4-20x less precise than nn.BatchNorm's own float32 result (local statistics are float64 now).
    generator = torch.Generator().manual_seed(1)
    x64 = mean + std * torch.randn(shape, generator=generator, dtype=torch.float64)
    x64 += torch.arange(shape[0], dtype=torch.float64).view(-1, *[1] * (len(shape) - 1)) * std  # means per replica
    x = x64.float()
    layer = {2: nn.BatchNorm1d, 4: nn.BatchNorm2d}[len(shape)]
    ref64 = layer(shape[1], momentum=1.0, dtype=torch.float64)  # momentum 1: running_var = the batch's
    ref32 = layer(shape[1], momentum=1.0)
    ours = syncbn_ext.convert_model(layer(shape[1], momentum=1.0))
    ref64(x.double())
    ref32(x)
    call_with_timeout(cpu_dp(ours, replicas), x)

    def relative(buffer: torch.Tensor) -> float:
        return ((buffer.double() - ref64.running_var) / ref64.running_var).abs().max().item()

    assert relative(ours.running_var) <= min(relative(ref32.running_var), 1e-6), (
        relative(ours.running_var),
        relative(ref32.running_var),
    )
    mean_error_nn = (ref32.running_mean.double() - ref64.running_mean).abs().max().item()
    assert (ours.running_mean.double() - ref64.running_mean).abs().max().item() <= mean_error_nn


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
        return concatenated(run_in_threads(replicas, x.split(sizes)))

    return fn


@pytest.mark.parametrize("sizes", [[3, 2], [2, 1, 2], [2, 0, 3]])
@pytest.mark.parametrize("kind", ["1d-NCL", "2d"])
def test_gradcheck_across_replicas(kind, sizes):
    _, ours = make_pair(kind, track_running_stats=False)
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
