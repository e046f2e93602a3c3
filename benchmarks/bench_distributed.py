"""Synchronized BatchNorm across processes: a CNN training step under DistributedDataParallel, side by side.

Two processes on localhost (gloo over a file store), each running the CNN of ``bench_batchnorm.py`` (8
conv-BN-ReLU blocks, 32 channels, 32x32 images, global batch 32) under ``DistributedDataParallel``, with 1 CPU
replica per process (``DDP(model)``) and with 2 (``DDP(DataParallelWithCallback(model, ["cpu"] * 2))``):

* **torch**: ``nn.BatchNorm2d``, not synchronized (each replica normalizes its own slice): the reference of the
  ratios;
* **ours**: ``syncbn_ext.SyncBatchNorm`` (statistics over every replica of every process), the processes exchanging
  through shared memory (ranks on one host: the default);
* **ours, gloo**: the same layers exchanging through the group's gloo backend (``SYNCBN_SHARED_MEMORY=0`` when its
  group is set up): what ranks on several hosts get;
* **naive**: a re-implementation of the common pure-Python approach (detectron2's ``NaiveSyncBatchNorm``): the
  mean and mean of squares of each process's batch, averaged with a differentiable ``all_reduce`` (one in
  forward, one in backward), the variance rebuilt as ``E[x^2] - E[x]^2``. It runs one replica per process only
  (replica threads issuing collectives of their own would pair them at random across processes).

Two more variants split ours into its parts:

* **ours alone**: ``syncbn_ext.SyncBatchNorm`` given a group of one process (each rank its own): our layers
  without any exchange across processes (with 2 replicas, still synchronized between them), our own cost;
* **sync points** (1 replica per process): ``nn.BatchNorm2d`` preceded by a function making exactly the
  collectives ours makes over gloo (an all-gather of ours' sizes forward, one backward) and nothing else: what
  synchronizing at each layer through gloo costs by itself on this machine, whatever the layer computes (the floor
  of any per-layer synchronized BatchNorm over gloo).

Each variant's step is timed in interleaved rounds (every rank runs the same variants in the same order, a barrier
between them); the reported figure is rank 0's median over rounds of each round's median step. The collectives of
one step are counted with the profiler (c10d ops and our shared-memory exchanges, recorded on every thread) and
their bytes from the tensors' shapes. Target (issue 9): ours at most 1.15x torch, and faster than naive.

    python benchmarks/bench_distributed.py            # about a minute on 2 cores
    python benchmarks/bench_distributed.py --quick    # a smoke run
    python benchmarks/bench_distributed.py --check    # exit 1 when a target is missed
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import warnings
from collections import Counter

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.nn.functional import all_reduce as differentiable_all_reduce

# The naive layer is what such code does, with torch.distributed.nn's differentiable all_reduce, which torch 2.13
# deprecates (warning once per process): not this benchmark's news.
warnings.filterwarnings("ignore", "torch.distributed.nn.functional.all_reduce is deprecated", FutureWarning)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from timing import interleaved_rounds, positive_int, writable_file  # noqa: E402  (beside this file)

import syncbn_ext  # noqa: E402

PROCESSES = 2
TARGET_RATIO = 1.15
BATCH, CHANNELS, SIZE, BLOCKS, CLASSES = 32, 32, 32, 8, 10


class NaiveSyncBatchNorm2d(nn.BatchNorm2d):
    """The common pure-Python synchronized BatchNorm (written for this comparison, after detectron2's idea)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or dist.get_world_size() == 1:
            return super().forward(x)
        world = dist.get_world_size()
        mean = x.mean(dim=(0, 2, 3))
        mean_sq = (x * x).mean(dim=(0, 2, 3))
        both = differentiable_all_reduce(torch.cat([mean, mean_sq]) / world)
        mean, mean_sq = both.split(x.shape[1])
        var = mean_sq - mean * mean
        invstd = torch.rsqrt(var + self.eps)
        scale = self.weight * invstd
        shift = self.bias - mean * scale
        with torch.no_grad():
            count = x.numel() // x.shape[1] * world
            self.running_mean.mul_(1 - self.momentum).add_(mean, alpha=self.momentum)
            self.running_var.mul_(1 - self.momentum).add_(var * count / (count - 1), alpha=self.momentum)
            self.num_batches_tracked.add_(1)
        return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)


def _row_words(channels: int) -> int:
    """The int64 words ours sends per rank in one exchange of ``channels`` channels: its header, then 2 per channel."""
    return syncbn_ext._C.exchange_header_words + 2 * channels


class _SyncPoint(torch.autograd.Function):
    """The identity, making ours' collectives (same kinds, same sizes) forward and backward, and nothing else."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        ctx.channels = channels
        header_and_stats = torch.zeros(_row_words(channels), dtype=torch.int64)
        dist.all_gather([torch.empty_like(header_and_stats) for _ in range(dist.get_world_size())], header_and_stats)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        terms = torch.zeros(_row_words(ctx.channels), dtype=torch.int64)  # a header, then the gradient terms
        dist.all_gather([torch.empty_like(terms) for _ in range(dist.get_world_size())], terms)
        return grad


class SyncPointBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` behind a synchronization point: the bare cost of one exchange per layer each way."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(_SyncPoint.apply(x))


def make_cnn(variant: str, process_group: dist.ProcessGroup | None = None) -> nn.Sequential:
    """The CNN with ``variant``'s BatchNorm; ``process_group``: the group of "ours, gloo" and "ours alone"."""
    torch.manual_seed(0)
    norm = {
        "torch": nn.BatchNorm2d,
        "ours": syncbn_ext.SyncBatchNorm,
        "ours, gloo": lambda channels: syncbn_ext.SyncBatchNorm(channels, process_group=process_group),
        "ours alone": lambda channels: syncbn_ext.SyncBatchNorm(channels, process_group=process_group),
        "sync points": SyncPointBatchNorm2d,
        "naive": NaiveSyncBatchNorm2d,
    }[variant]
    layers: list[nn.Module] = []
    in_channels = 3
    for _ in range(BLOCKS):
        layers += [nn.Conv2d(in_channels, CHANNELS, 3, padding=1, bias=False), norm(CHANNELS), nn.ReLU(inplace=True)]
        in_channels = CHANNELS
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(CHANNELS, CLASSES)]
    return nn.Sequential(*layers)


class Step:
    """One variant's DDP training step on this rank's shard of a fixed global batch."""

    def __init__(self, variant: str, replicas: int, rank: int, process_group: dist.ProcessGroup | None = None) -> None:
        model = make_cnn(variant, process_group)
        inner = model if replicas == 1 else syncbn_ext.DataParallelWithCallback(model, device_ids=["cpu"] * replicas)
        self.ddp = nn.parallel.DistributedDataParallel(inner)
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        generator = torch.Generator().manual_seed(1)
        images = torch.randn(BATCH, 3, SIZE, SIZE, generator=generator)
        labels = torch.randint(0, CLASSES, (BATCH,), generator=generator)
        shard = BATCH // PROCESSES
        self.images, self.labels = images[rank * shard : (rank + 1) * shard], labels[rank * shard : (rank + 1) * shard]

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(self.ddp(self.images), self.labels).backward()
        self.optimizer.step()


def count_collectives(step: Step) -> dict[str, int]:
    """The c10d collectives of one step on this rank, by kind (every thread's: replicas issue them too)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        from torch._C._profiler import _ExperimentalConfig

        config = _ExperimentalConfig(profile_all_threads=True)
    except (ImportError, TypeError):  # pragma: no cover - an older torch: the calling thread only
        config = None
    with profile(activities=[ProfilerActivity.CPU], experimental_config=config) as prof:
        step()
    calls: Counter[str] = Counter(
        event.name.removeprefix("c10d::")
        .rstrip("_")
        .replace("syncbn::shared_memory_allgather", "shared-memory allgather")
        for event in prof.events()
        if (event.name.startswith("c10d::") and "barrier" not in event.name)
        or event.name == "syncbn::shared_memory_allgather"
    )
    return dict(calls)


# Bytes each synchronized call sends per rank (the tensors' sizes; a collective moves about this much per peer):
# ours: forward, an all-gather of an int64 header (call, kind, layer, channels, count, ...) packed with (mean, M2)
# in float64; backward, the same with (d mean, d var), summed on every rank. naive: an all-reduce of (mean,
# mean of squares) in the input's dtype (float32 here) forward, and its gradient backward.
BYTES_PER_CALL = {
    "ours": (8 * _row_words(CHANNELS), 8 * _row_words(CHANNELS)),  # every layer has CHANNELS channels
    "ours, gloo": (8 * _row_words(CHANNELS), 8 * _row_words(CHANNELS)),
    "naive": (8 * CHANNELS, 8 * CHANNELS),
    "ours alone": (0, 0),
}
BYTES_PER_CALL["sync points"] = BYTES_PER_CALL["ours"]  # by construction (_SyncPoint)


def rank_main(rank: int, store: str, result: str, replicas: int, iters: int, rounds: int) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // PROCESSES))
    dist.init_process_group("gloo", store=dist.FileStore(store, PROCESSES), rank=rank, world_size=PROCESSES)
    # Every rank creates every group (new_group is collective); each rank's "ours alone" layers get its own.
    groups_of_one = [dist.new_group([member]) for member in range(PROCESSES)]
    groups = {"ours alone": groups_of_one[rank], "ours, gloo": dist.new_group(list(range(PROCESSES)))}
    variants = ("torch", "ours", "ours, gloo", "ours alone") + (("naive", "sync points") if replicas == 1 else ())
    steps = {variant: Step(variant, replicas, rank, groups.get(variant)) for variant in variants}
    transports = {}
    for variant, step in steps.items():
        # First use. A group's transport is decided at its first synchronized call, reading SYNCBN_SHARED_MEMORY.
        before = os.environ.get("SYNCBN_SHARED_MEMORY")
        if variant == "ours, gloo":
            os.environ["SYNCBN_SHARED_MEMORY"] = "0"
        step()
        if before is None:
            os.environ.pop("SYNCBN_SHARED_MEMORY", None)
        else:
            os.environ["SYNCBN_SHARED_MEMORY"] = before
        if variant.startswith("ours"):
            transports[variant] = syncbn_ext.cross_process_transport(groups.get(variant))
    samples = interleaved_rounds(dict(steps), iters, rounds, before_each=dist.barrier)
    collectives = {variant: count_collectives(steps[variant]) for variant in variants}
    if rank == 0:
        with open(result, "w", encoding="utf-8") as f:
            json.dump({"samples": samples, "collectives": collectives, "transports": transports}, f)
    dist.destroy_process_group()


def run(replicas: int, iters: int, rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        store, result = os.path.join(folder, "store"), os.path.join(folder, "result.json")
        mp.start_processes(
            rank_main, args=(store, result, replicas, iters, rounds), nprocs=PROCESSES, join=True, start_method="spawn"
        )
        with open(result, encoding="utf-8") as f:
            return json.load(f)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: --iters 1 --rounds 2 unless given")
    parser.add_argument(
        "--iters", type=positive_int, default=None, help="timed steps per variant and round (default 3; --quick: 1)"
    )
    parser.add_argument("--rounds", type=positive_int, default=None, help="interleaved rounds (default 7; --quick: 2)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--json", metavar="PATH", type=writable_file, help="also write the results as JSON")
    args = parser.parse_args(argv)
    iters = args.iters if args.iters is not None else 1 if args.quick else 3
    rounds = args.rounds if args.rounds is not None else 2 if args.quick else 7
    print(
        f"syncbn_ext {syncbn_ext.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs, {PROCESSES} "
        f"processes (gloo), CNN of {BLOCKS} conv-BN-ReLU blocks, global batch {BATCH}; {iters} steps x {rounds} rounds",
        file=sys.stderr,
    )
    report, met = {}, True
    variants = ("torch", "ours", "ours, gloo", "naive", "ours alone", "sync points")
    header = f"{'per process':<20}" + "".join(f" {variant + ' ms':>15}" for variant in variants) + "  ours/torch"
    lines = [header, "-" * len(header)]
    ratio_lines = []
    collective_lines = []
    for replicas in (1, 2):
        result = run(replicas, iters, rounds)
        medians = {variant: statistics.median(values) for variant, values in result["samples"].items()}
        ratio = medians["ours"] / medians["torch"]
        naive = medians.get("naive")
        ok = ratio <= TARGET_RATIO and (naive is None or medians["ours"] < naive)
        met = met and ok
        cells = "".join(f" {medians[v]:>15.1f}" if v in medians else f" {'n/a':>15}" for v in variants)
        lines.append(f"{f'{replicas} CPU replica(s)':<20}{cells}  {ratio:>10.3f}  {'yes' if ok else 'NO'}")
        ratio_lines.append(
            f"  {replicas} replica(s): "
            + ", ".join(f"{v} {medians[v] / medians['torch']:.3f}x" for v in variants[1:] if v in medians)
        )
        baseline = result["collectives"]["torch"]  # DDP's own (buffer broadcast, gradient buckets)
        for variant, kinds in result["collectives"].items():
            if variant == "torch":
                continue
            extra = {n: calls - baseline.get(n, 0) for n, calls in kinds.items() if calls != baseline.get(n)}
            forward_bytes, backward_bytes = BYTES_PER_CALL[variant]
            transport = result["transports"].get(variant)
            collective_lines.append(
                f"  {variant:<11} {replicas} replica(s)"
                + (f" ({transport})" if transport else "")
                + ": per synchronized layer and step "
                + (", ".join(f"{calls / BLOCKS:g} {name}" for name, calls in sorted(extra.items())) or "none")
                + f"; {forward_bytes} B sent forward, {backward_bytes} B backward (C = {CHANNELS})"
            )
        report[f"{replicas}_replicas"] = {**result, "medians": medians, "ratio": ratio}
    print("\n".join(lines))
    print("\neach variant / torch:\n" + "\n".join(ratio_lines))
    print("\ncollectives beside DDP's own (profiled, one step on rank 0):\n" + "\n".join(collective_lines))
    print(f"targets (ours/torch <= {TARGET_RATIO}, ours faster than naive): " + ("all met" if met else "MISSED"))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return 1 if args.check and not met else 0


if __name__ == "__main__":
    sys.exit(main())
