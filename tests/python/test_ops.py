"""The pure tensor ops torch.ops.syncbn.*: against float64 references, opcheck, numerics.

Each op has a vectorized CPU kernel and, for every other device (CUDA among them), one kernel made of ATen ops
(registered as CompositeExplicitAutograd). The reference tests run both: the latter on CPU tensors, dispatched to
the CUDA key (whose kernel is the composite), so that what a GPU runs is checked without one.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch._C import DispatchKey, DispatchKeySet

import syncbn_ext  # noqa: F401  (registers torch.ops.syncbn)

ops = torch.ops.syncbn


class KernelsOfOtherDevices:
    """``torch.ops.syncbn`` as a CUDA tensor gets it (the ATen composite kernel), callable with CPU tensors."""

    def __getattr__(self, name: str):
        qualified = f"syncbn::{name}"
        # The CUDA key has no kernel of its own: it runs the composite one, the kernel this class stands for.
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CUDA")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CompositeExplicitAutograd")
        return functools.partial(getattr(ops, name).default.redispatch, DispatchKeySet(DispatchKey.CUDA))


KERNELS = {"cpu": ops, "other devices": KernelsOfOtherDevices()}


@pytest.fixture(params=list(KERNELS))
def kernels(request):
    """The op namespace under test: the CPU kernels, or the kernels every other device runs."""
    return KERNELS[request.param]


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
LAYOUTS = [
    ("2d", (6, 5), None),
    ("3d", (4, 3, 7), None),
    ("4d", (3, 5, 7, 9), None),
    ("4d channels_last", (3, 5, 7, 9), torch.channels_last),
    ("5d", (2, 3, 4, 5, 6), None),
    ("5d channels_last_3d", (2, 3, 4, 5, 6), torch.channels_last_3d),
    ("empty batch", (0, 4, 3, 3), None),
    ("one channel", (5, 1, 4, 4), None),
]


def make(shape, dtype, memory_format, seed=0, mean=0.0, std=1.0):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=generator, dtype=torch.float64) * std + mean).to(dtype)
    return x.contiguous(memory_format=memory_format) if memory_format else x


def per_channel(values, like):
    return values.view([1, -1] + [1] * (like.dim() - 2))


def reduce_dims(x):
    return [0, *range(2, x.dim())]


def assert_close(actual, expected, dtype, scale=1.0):
    tol = TOLERANCE[dtype] * max(scale, 1.0)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, shape, memory_format", LAYOUTS)
def test_local_stats(name, shape, memory_format, dtype, kernels):
    x = make(shape, dtype, memory_format)
    mean, m2 = kernels.local_stats(x)
    assert mean.dtype == m2.dtype == torch.float64 and mean.shape == (shape[1],)
    x64 = x.double()
    if x.numel() == 0:
        assert not mean.any() and not m2.any()
        return
    ref_mean = x64.mean(reduce_dims(x64))
    ref_m2 = ((x64 - per_channel(ref_mean, x64)) ** 2).sum(reduce_dims(x64))
    assert_close(mean, ref_mean, torch.float32 if dtype != torch.float64 else dtype)
    assert_close(m2, ref_m2, torch.float32 if dtype != torch.float64 else dtype, scale=ref_m2.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, shape, memory_format", LAYOUTS)
def test_normalize_and_backward(name, shape, memory_format, dtype, kernels):
    x = make(shape, dtype, memory_format)
    C = shape[1]
    stats = torch.float64 if dtype == torch.float64 else torch.float32
    mean, var = torch.randn(C, dtype=stats), torch.rand(C, dtype=stats) + 0.5
    weight, bias = torch.randn(C, dtype=stats), torch.randn(C, dtype=stats)
    y = kernels.normalize(x, mean, var, weight, bias, 1e-5, 0)
    assert y.dtype == dtype and y.shape == x.shape
    if memory_format:
        assert y.is_contiguous(memory_format=memory_format)
    x64 = x.double()
    xmu = x64 - per_channel(mean.double(), x64)
    invstd = (var.double() + 1e-5).rsqrt()
    ref = xmu * per_channel(invstd * weight.double(), x64) + per_channel(bias.double(), x64)
    assert_close(y, ref, dtype, scale=ref.abs().max().item() if ref.numel() else 1.0)

    dy = make(shape, dtype, None, seed=1)  # a gradient in another memory format than the input
    sum_dy, sum_dy_xmu = kernels.backward_reduce(dy, x, mean)
    if x.numel():
        dims = reduce_dims(x64)
        assert_close(sum_dy, dy.double().sum(dims), stats, scale=x64.numel() ** 0.5)
        assert_close(sum_dy_xmu, (dy.double() * xmu).sum(dims), stats, scale=x64.numel() ** 0.5)
    dy_scale, x_scale, shift = torch.randn(C, dtype=stats), torch.randn(C, dtype=stats), torch.randn(C, dtype=stats)
    dx = kernels.backward_elemt(dy, x, mean, dy_scale, x_scale, shift)
    assert dx.dtype == dtype and dx.shape == x.shape
    ref_dx = (
        dy.double() * per_channel(dy_scale.double(), x64)
        + xmu * per_channel(x_scale.double(), x64)
        + per_channel(shift.double(), x64)
    )
    assert_close(dx, ref_dx, dtype, scale=ref_dx.abs().max().item() if ref_dx.numel() else 1.0)


@pytest.mark.parametrize(
    "memory_format, shape", [(torch.channels_last, (3, 5, 4, 12)), (torch.channels_last_3d, (2, 3, 2, 4, 12))]
)
def test_outputs_of_a_channels_last_slice_with_a_step_stay_channels_last(memory_format, shape):
    # Dense in neither format: it was made contiguous (the output too), where nn.BatchNorm keeps the format its
    # strides suggest.
    x = make(shape, torch.float32, memory_format)[..., ::2]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=memory_format)
    C = shape[1]
    mean, var = torch.randn(C), torch.rand(C) + 0.5
    y = ops.normalize(x, mean, var, None, None, 1e-5, 0)
    torch.testing.assert_close(y, (x - per_channel(mean, x)) / (per_channel(var, x) + 1e-5).sqrt())
    dx = ops.backward_elemt(torch.ones_like(x), x, mean, mean, var, var)
    for out in (y, dx):
        assert out.is_contiguous(memory_format=memory_format)
        assert out.is_contiguous(memory_format=memory_format) == torch.batch_norm(
            x, None, None, None, None, True, 0.1, 1e-5, False
        ).is_contiguous(memory_format=memory_format)


def test_normalize_optional_affine_and_clamp_mode(kernels):
    x = make((4, 3, 5), torch.float64, None)
    mean, var = torch.zeros(3, dtype=torch.float64), torch.tensor([1e-7, 1.0, 4.0], dtype=torch.float64)
    plain = kernels.normalize(x, mean, var, None, None, 1e-5, 0)
    torch.testing.assert_close(plain, x / (per_channel(var, x) + 1e-5).sqrt())
    clamped = kernels.normalize(x, mean, var, None, None, 1e-5, 1)
    torch.testing.assert_close(clamped, x / per_channel(var.clamp_min(1e-5), x).sqrt())


def test_merge_stats_is_chan(kernels):
    generator = torch.Generator().manual_seed(3)
    parts = [torch.randn(n, 4, 5, generator=generator, dtype=torch.float64) * 3 + 7 for n in (3, 0, 5, 1)]
    stats = [kernels.local_stats(p) for p in parts]
    counts = torch.tensor([p.shape[0] * p.shape[2] for p in parts])
    mean, var = kernels.merge_stats(counts, torch.stack([s[0] for s in stats]), torch.stack([s[1] for s in stats]))
    whole = torch.cat(parts)
    ref_var, ref_mean = torch.var_mean(whole, dim=[0, 2], correction=0)
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(var, ref_var)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_merge_stats_cpu_kernel_is_the_composite_math_to_the_bit(dtype):
    # The CPU kernel (one loop) and the ATen composite every other device runs: the same formula, in float64, the
    # copies added in order from copy 0; also with an empty copy, non-contiguous rows, and no values at all.
    generator = torch.Generator().manual_seed(4)
    means = (torch.randn(3, 9, generator=generator, dtype=torch.float64) * 3 + 5).to(dtype)
    m2s = (torch.rand(9, 3, generator=generator, dtype=torch.float64) * 50).to(dtype).t()  # (3, 9), not contiguous
    for counts in (torch.tensor([4096, 0, 17]), torch.tensor([0, 0, 0])):
        n = counts.double().unsqueeze(1)
        total = n.sum(0).clamp_min(1)
        mean64 = (n * means.double()).sum(0) / total
        var64 = (m2s.double().sum(0) + (n * (means.double() - mean64).square()).sum(0)) / total
        mean, var = ops.merge_stats(counts, means, m2s)
        assert mean.dtype == var.dtype == dtype
        assert torch.equal(mean, mean64.to(dtype)) and torch.equal(var, var64.to(dtype))
        composite_mean, composite_var = KERNELS["other devices"].merge_stats(counts, means, m2s)
        assert torch.equal(mean, composite_mean) and torch.equal(var, composite_var)


def test_merge_stats_of_huge_means_with_an_empty_copy(kernels):
    # An empty copy (a rank or replica with no samples) adds nothing: its term 0 * (0 - mean)^2 was NaN where the
    # square overflows float64 (|mean| > 1.3e154).
    x = torch.randn(6, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) * 1e150 + 1e155
    stats = [kernels.local_stats(part) for part in (x, x[:0])]
    counts = torch.tensor([18, 0])
    mean, var = kernels.merge_stats(counts, torch.stack([s[0] for s in stats]), torch.stack([s[1] for s in stats]))
    ref_var, ref_mean = torch.var_mean(x, dim=[0, 2], correction=0)
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(var, ref_var)


def test_large_mean_float32_statistics_are_precise(kernels):
    # Sum and sum of squares in float32 would give variance 0 here.
    x = make((16, 8, 32, 32), torch.float32, None, seed=5, mean=1e4, std=1e-2)
    mean, m2 = kernels.local_stats(x)
    x64 = x.double()
    ref_var, ref_mean = torch.var_mean(x64, dim=[0, 2, 3], correction=0)
    var = m2.double() / (x.numel() / x.shape[1])
    assert ((var - ref_var).abs() / ref_var).max() < 1e-3
    assert (mean.double() - ref_mean).abs().max() < 1e-3


def test_merged_statistics_of_large_mean_float32_slices_keep_their_precision(kernels):
    # Chan's merge weighs each slice's (mean_i - mean)^2 by its count: a local mean rounded to float32 gave a merged
    # variance 1e-3 off (1e5 + randn; nn.BatchNorm's own float32 error: 2e-7). Every kernel gives float64 means.
    x = make((32, 4, 6, 6), torch.float32, None, seed=6, mean=1e5)
    x += torch.arange(32, dtype=torch.float32).view(-1, 1, 1, 1)  # slices of other means
    stats = [kernels.local_stats(part) for part in x.chunk(4)]
    counts = torch.full((4,), 8 * 36)
    mean, var = kernels.merge_stats(counts, torch.stack([s[0] for s in stats]), torch.stack([s[1] for s in stats]))
    ref_var, ref_mean = torch.var_mean(x.double(), dim=[0, 2, 3], correction=0)
    assert ((var - ref_var) / ref_var).abs().max() < 1e-6
    assert (mean - ref_mean).abs().max() < 1e-6


def test_errors_are_clear():
    with pytest.raises(ValueError, match=r"expected an input of shape \(N, C, \*\), got 1D input"):
        ops.local_stats(torch.randn(4))
    with pytest.raises(RuntimeError, match="mean should contain 3 elements"):
        ops.normalize(torch.randn(2, 3), torch.zeros(4), torch.ones(3), None, None, 1e-5, 0)


SAMPLES = [
    (ops.local_stats, lambda: (make((4, 3, 5, 5), torch.float32, None),)),
    (ops.local_stats, lambda: (make((4, 3, 5, 5), torch.float32, torch.channels_last),)),
    (
        ops.merge_stats,
        lambda: (torch.tensor([3, 4]), torch.randn(2, 5), torch.rand(2, 5)),
    ),
    (
        ops.normalize,
        lambda: (make((4, 3, 5), torch.float32, None), torch.zeros(3), torch.ones(3), torch.ones(3), None, 1e-5, 0),
    ),
    (
        ops.backward_reduce,
        lambda: (make((4, 3, 5), torch.float32, None, seed=1), make((4, 3, 5), torch.float32, None), torch.zeros(3)),
    ),
    (
        ops.backward_elemt,
        lambda: (
            make((4, 3, 5), torch.bfloat16, None, seed=1),
            make((4, 3, 5), torch.bfloat16, None),
            torch.zeros(3),
            torch.ones(3),
            torch.ones(3),
            torch.zeros(3),
        ),
    ),
]


@pytest.mark.parametrize("index", range(len(SAMPLES)))
def test_opcheck(index):
    # The ops have no autograd kernel of their own (the autograd lives in the composite
    # C++ Functions), so the samples do not require grad.
    op, sample = SAMPLES[index]
    torch.library.opcheck(op, sample())


def test_meta_kernels_give_shapes_and_dtypes():
    x = torch.empty(4, 3, 5, 5, device="meta", dtype=torch.bfloat16)
    mean, m2 = ops.local_stats(x)
    assert mean.device.type == "meta" and mean.shape == (3,) and mean.dtype == torch.float64
    y = ops.normalize(x, mean, m2, None, None, 1e-5, 0)
    assert y.shape == x.shape and y.dtype == x.dtype


def test_cpu_local_stats_of_finite_data_whose_squares_overflow_float32_are_right():
    # Deviations of 4e18 (squares beyond float32's range in the CPU kernels' blocks) gave an M2 of nan (every output
    # of the channel nan, where nn.BatchNorm gives a running_var of inf): such a channel is computed again in float64.
    x = make((4, 2, 6, 6), torch.float32, None)
    x[:, 0] = torch.where(x[:, 0] > 0, 4e18, -4e18)
    mean, m2 = ops.local_stats(x)
    ref_var, ref_mean = torch.var_mean(x.double(), dim=[0, 2, 3], correction=0)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m2 / (x.numel() / 2), ref_var, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_local_stats_of_non_finite_data_match_the_plain_mean(value, kernels):
    x = make((4, 3, 5), torch.float32, None)
    x[2, 1, 3] = value
    mean, m2 = kernels.local_stats(x)
    ref_mean = x.double().mean([0, 2])
    torch.testing.assert_close(mean.double(), ref_mean, equal_nan=True)
    assert torch.isnan(m2[1]) and torch.isfinite(m2[[0, 2]]).all()
