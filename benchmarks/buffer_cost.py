"""What a module's buffers cost the CPU wrapper per forward: the price of replicas that cannot write the module.

Every forward of ``DataParallelWithCallback`` on CPU replicas gives each replica copies of the module's buffers:
replicas ``1..n-1`` as ``nn.DataParallel`` broadcasts buffers to each device, and replica 0 too (on GPUs device 0
uses the module's own), so that a failed, interrupted or abandoned forward writes nothing to the module. After the
forward, each of replica 0's copies whose version did not move is compared with the module's buffer (kernels that
write in place without counting a version, as ``F.batch_norm``'s running statistics, are found that way) and the
changed ones are copied back. That is ``n`` copies and one comparison of every buffer per forward: nothing for
BatchNorm's statistics, something for a model that carries large constant buffers (masks, tables, encodings).

Measured: a small model (``Linear``, synchronized BatchNorm) carrying one float buffer of each size that its forward
reads, one SGD training step on the whole batch and on 2 CPU replicas, interleaved rounds; then, to explain the
difference, ``clone()`` and ``torch.equal`` of the largest buffer alone. No target: the figure is reported in
README ("Use from Python").
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch
from timing import interleaved_rounds, median_ms, positive_int
from torch import nn

import syncbn_ext


class _CarriesABuffer(nn.Module):
    def __init__(self, buffer_mb: float) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 64)
        self.bn = syncbn_ext.SynchronizedBatchNorm1d(64)
        self.register_buffer("table", torch.randn(max(64, int(buffer_mb * 2**20) // 4)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.linear(x)) + self.table[:64]  # reads the buffer, as a mask or table would be read


def _step(model: nn.Module, x: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()


def size_mb(text: str) -> float:
    """An argparse type: a buffer size in MB, a finite number of at least 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of at least 0, got {text}")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes-mb", type=size_mb, nargs="+", default=[0, 25, 100], help="buffer sizes (default 0 25 100)"
    )
    parser.add_argument("--replicas", type=positive_int, default=2, help="CPU replicas (default 2)")
    parser.add_argument("--iters", type=positive_int, default=5, help="timed steps per variant and round (default 5)")
    parser.add_argument("--rounds", type=positive_int, default=5, help="interleaved rounds (default 5)")
    args = parser.parse_args(argv)

    x = torch.randn(16, 64)
    steps = {}
    for size in args.sizes_mb:
        module = _CarriesABuffer(size)
        wrapper = syncbn_ext.DataParallelWithCallback(module, device_ids=["cpu"] * args.replicas)
        steps[f"{size:g} MB, whole batch"] = lambda m=module: _step(m, x)
        steps[f"{size:g} MB, {args.replicas} replicas"] = lambda w=wrapper: _step(w, x)
    samples = interleaved_rounds(steps, args.iters, args.rounds)
    ms = {name: statistics.median(values) for name, values in samples.items()}

    print(
        f"Training step with one buffer, whole batch vs {args.replicas} CPU replicas ({torch.get_num_threads()} "
        f"intra-op threads; median of {args.rounds} rounds x {args.iters} steps)"
    )
    print(f"{'buffer':>10} {'whole batch ms':>15} {'replicas ms':>12} {'replicas - whole ms':>20}")
    wrapper_ms = {}  # per size, what the replicas add to the whole batch's step
    for size in args.sizes_mb:
        whole, replicas = ms[f"{size:g} MB, whole batch"], ms[f"{size:g} MB, {args.replicas} replicas"]
        wrapper_ms[size] = replicas - whole
        print(f"{size:>7g} MB {whole:>15.2f} {replicas:>12.2f} {replicas - whole:>20.2f}")
    smallest, largest = min(args.sizes_mb), max(args.sizes_mb)
    if largest > smallest:
        added = (wrapper_ms[largest] - wrapper_ms[smallest]) / (largest - smallest) * 100
        print(f"added by the buffer: {added:.1f} ms per step per 100 MB of buffers")

    table = torch.randn(max(64, int(largest * 2**20) // 4))
    copy = table.clone()
    clone_ms = median_ms(table.clone, args.iters)
    equal_ms = median_ms(lambda: torch.equal(table, copy), args.iters)
    print(
        f"one {largest:g} MB buffer alone: clone {clone_ms:.2f} ms, torch.equal {equal_ms:.2f} ms "
        f"(a forward makes {args.replicas} clones and one comparison)"
    )


if __name__ == "__main__":
    main()
