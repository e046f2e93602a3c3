"""Peak memory of the synchronized layers' kernels for accelerators (CUDA among them), beside torch's BatchNorm.

Every device but the CPU runs ``torch.ops.syncbn``'s ATen kernels (made of ATen ops; the CPU has vectorized kernels
of its own). For each op, the peak memory it allocates (its outputs and temporaries), as a multiple of the input's
size S, beside ``F.batch_norm``'s training forward on the same input (its output: 1.00x). On a GPU (``--device
cuda``): torch.cuda's peak statistics. Without one (``--device cpu``, the default there): the same kernels on CPU
tensors, dispatched as a CUDA tensor's call would be (as tests/python/test_ops.py checks them), the peak tallied
from the profiler's record of the CPU allocations. No target: the figures are reported in README (Benchmarks).
"""

from __future__ import annotations

import argparse
import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timing import positive_int
from torch._C import DispatchKey, DispatchKeySet
from torch.profiler import ProfilerActivity, profile

import syncbn_ext  # noqa: F401  (registers torch.ops.syncbn)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _peak_on_cpu(run: Callable[[], object]) -> int:
    """The most bytes ``run`` held allocated at once on the CPU, from the profiler's allocation records."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as recorded:
        run()
    held = peak = 0
    events = sorted((e for e in recorded.events() if e.self_cpu_memory_usage != 0), key=lambda e: e.time_range.start)
    for event in events:
        held += event.self_cpu_memory_usage
        peak = max(peak, held)
    return peak


def _peak_on_cuda(run: Callable[[], object]) -> int:
    """The most bytes ``run`` held allocated at once on the current GPU beyond what was allocated before."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def measure(device: str, shape: list[int], dtype: torch.dtype) -> dict[str, float]:
    """Each kernel's peak memory on an input of ``shape`` and ``dtype``, as a multiple of the input's size."""
    x = torch.randn(shape, device=device).to(dtype)
    grad = torch.randn_like(x)
    channels = shape[1]
    stats = {"device": device, "dtype": torch.float64}
    mean, var = torch.randn(channels, **stats), torch.rand(channels, **stats) + 0.5
    scale, shift = torch.randn(channels, **stats), torch.randn(channels, **stats)
    weight, bias = torch.ones(channels, device=device), torch.zeros(channels, device=device)
    names = ("local_stats", "normalize", "backward_reduce", "backward_elemt")
    if device == "cpu":  # the kernel a CUDA tensor's call runs, on these CPU tensors
        as_on_cuda = DispatchKeySet(DispatchKey.CUDA)
        ops = {
            name: functools.partial(getattr(torch.ops.syncbn, name).default.redispatch, as_on_cuda) for name in names
        }
        peak_of = _peak_on_cpu
    else:
        ops = {name: getattr(torch.ops.syncbn, name) for name in names}
        peak_of = _peak_on_cuda
    affine = (weight.to(dtype), bias.to(dtype)) if dtype in (torch.float32, torch.float64) else (weight, bias)
    runs = {
        "F.batch_norm, training forward (torch)": lambda: F.batch_norm(x, None, None, *affine, training=True),
        "local_stats (forward: count, mean, M2)": lambda: ops["local_stats"](x),
        "normalize (forward: the output)": lambda: ops["normalize"](x, mean, var, weight, bias, 1e-5, 0),
        "backward_reduce (backward: two sums)": lambda: ops["backward_reduce"](grad, x, mean),
        "backward_elemt (backward: grad_input)": lambda: ops["backward_elemt"](grad, x, mean, scale, scale, shift),
    }
    size = x.numel() * x.element_size()
    return {name: peak_of(run) / size for name, run in runs.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the kernels run (default: cuda where available; cpu runs the same ATen kernels on CPU tensors)",
    )
    parser.add_argument(
        "--shape", type=positive_int, nargs="+", default=[32, 64, 56, 56], help="the input's (N, C, *) shape"
    )
    parser.add_argument(
        "--dtypes", choices=list(DTYPES), nargs="+", default=["float32", "bfloat16"], help="(default: float32 bfloat16)"
    )
    args = parser.parse_args(argv)
    if len(args.shape) < 2:
        parser.error("--shape needs at least two sizes, (N, C, *)")
    if math.prod(args.shape) // args.shape[1] < 2:  # as nn.BatchNorm in training
        parser.error(f"--shape {' '.join(map(str, args.shape))}: BatchNorm needs more than one value per channel")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU here (torch.cuda.is_available() is False)")
    print(f"peak memory allocated by each kernel, in multiples of the input's size S ({args.device})")
    for name in args.dtypes:
        ratios = measure(args.device, args.shape, DTYPES[name])
        print(f"\ninput {tuple(args.shape)} {name}")
        for row, ratio in ratios.items():
            print(f"  {row:42s} {ratio:5.2f} x S")


if __name__ == "__main__":
    main()
