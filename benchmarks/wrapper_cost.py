"""The CPU wrapper's own cost: a ResNet-style training step on CPU replicas vs one module on the whole batch.

The replicas do the same work as one module on the whole batch (same math, same batch), so the wrapper's cost is
the ratio of the two. Measured for ``bench_batchnorm.py --only wrapper`` (and its full run):

* **time**: one SGD training step (forward, cross-entropy, backward, step) of a ResNet-18-style network
  (BasicBlocks 64-128-256-512, stride-2 stem and max-pool) at batch 8 on 3x128x128 and 3x256x256 images (each
  size its own table; ``--image-sizes``): one module with
  ``nn.BatchNorm2d`` on the whole batch, and the same network with synchronized BatchNorm under
  ``DataParallelWithCallback`` on 2 and 4 CPU replicas (the same statistics as the whole batch's), with the
  wrapper's default backward and, timed beside it, with ``parallel_backward=True`` (the replicas' backward at once
  on their threads, which the default chooses only with fewer intra-op threads than replicas). Interleaved
  rounds in one process (one step per variant in turn, the order rotating), the median of each round's
  iterations, then the median over rounds; as a cross-check that cancels the machine's drift between rounds,
  also each round's ratio to the whole batch, then the median of those (the targets are judged on the former).
* **peak RSS**: the process's peak resident set size (``VmHWM``) after a few steps of one variant, each in a fresh
  process (interpreter, torch and the model included: what a user sees).
* **what threads alone do**, for reference: each of 2 or 4 threads runs its own copy of the whole-batch module
  (``nn.BatchNorm2d``) forward and backward on its slice of the batch, with its share of the intra-op threads as
  the replicas get theirs; no wrapper, no synchronization, no gradient reduction, one optimizer step. What is left
  between the replicas and these threads is the wrapper's own cost.
* **synchronization's own cost**: the 2 and 4 replicas with plain ``nn.BatchNorm2d`` (each normalizing its slice),
  and for every variant how busy the cores were while it ran (the process's CPU time over the wall time, per core):
  replicas that wait for each other in a synchronized layer leave cores idle.
* **the split alone**, under everything: :mod:`split_cost` runs the whole-batch module on 1, 2 and 4 slices one
  after another on one thread, with oneDNN's count and time of the convolutions' weight reorders (made once per
  convolution call, so once per replica).

Targets (issue 8): at most 1.20x the time and 1.15x the peak RSS of the whole-batch module. The smaller images are
the harder case: the costs that come once per convolution call and per meeting of the replicas are the same at
either size, while the work grows with the pixels (at 256x256 the whole batch's large activations also leave the
caches, which the replicas' slices do less).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from timing import interleaved_rounds, rotated, status_kb
from torch import nn

import syncbn_ext
from syncbn_ext.parallel_apply import run_on_workers
from syncbn_ext.replica_workers import cpu_intra_op_threads

REPLICATED = ("2 replicas", "4 replicas")
UNSYNCHRONIZED = ("2 replicas, nn.BatchNorm2d", "4 replicas, nn.BatchNorm2d")
PARALLEL_BACKWARD = ("2 replicas, parallel backward", "4 replicas, parallel backward")  # timed only
THREADS_ALONE = ("2 threads alone", "4 threads alone")  # timed only
VARIANT_WHOLE = "whole batch"
MEMORY_VARIANTS = (VARIANT_WHOLE, *REPLICATED, *UNSYNCHRONIZED)
TIME_VARIANTS = (*MEMORY_VARIANTS, *PARALLEL_BACKWARD, *THREADS_ALONE)
TIME_TARGET, MEMORY_TARGET = 1.20, 1.15
BATCH, CLASSES = 8, 10


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


def make_resnet(width: int = 64) -> nn.Sequential:
    """A ResNet-18-style network (two BasicBlocks per stage) with nn.BatchNorm2d."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, width, 7, 2, 3, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
    ]
    cin = width
    for stage, cout in enumerate((width, width * 2, width * 4, width * 8)):
        layers += [BasicBlock(cin, cout, 1 if stage == 0 else 2), BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, CLASSES)]
    return nn.Sequential(*layers)


class ThreadsAlone:
    """A training step of ``threads`` threads, each running its own copy of ``model`` on its slice of the batch
    (forward, loss, backward), then one optimizer step on the first copy: threads without any wrapper. The threads
    are the wrapper's own workers, sized alike (see :mod:`syncbn_ext.parallel_apply`)."""

    def __init__(self, model: nn.Module, threads: int, images: torch.Tensor, targets: torch.Tensor) -> None:
        self.copies = [copy.deepcopy(model) for _ in range(threads)]
        self.images, self.targets = images.chunk(threads), targets.chunk(threads)

    def _slice_step(self, index: int) -> None:
        module = self.copies[index]
        module.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(module(self.images[index]), self.targets[index])
        (loss / len(self.copies)).backward()

    def __call__(self) -> None:
        threads = len(self.copies)
        run_on_workers(
            [functools.partial(self._slice_step, index) for index in range(threads)],
            [f"in thread {index} alone" for index in range(threads)],
            cpu_intra_op_threads(threads),
            close=lambda reason: None,  # nothing waits on another thread
            caused_by_closing=lambda error: False,
        )


class WrapperBench:
    """One variant's training step, on fixed data, from the same initial weights as the others."""

    def __init__(self, variant: str, image_size: int) -> None:
        torch.manual_seed(0)
        model = make_resnet()
        generator = torch.Generator().manual_seed(1)
        self.images = torch.randn(BATCH, 3, image_size, image_size, generator=generator)
        self.targets = torch.randint(0, CLASSES, (BATCH,), generator=generator)
        self.threads_alone: ThreadsAlone | None = None
        if variant == VARIANT_WHOLE:
            self.run: nn.Module = model
        elif variant in THREADS_ALONE:
            self.threads_alone = ThreadsAlone(model, int(variant.split()[0]), self.images, self.targets)
            model = self.threads_alone.copies[0]
        else:
            replicas = int(variant.split()[0])
            if variant not in UNSYNCHRONIZED:
                model = syncbn_ext.convert_model(model)
            parallel_backward = True if variant in PARALLEL_BACKWARD else None
            self.run = syncbn_ext.DataParallelWithCallback(
                model, device_ids=["cpu"] * replicas, parallel_backward=parallel_backward
            )
        self.model = model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(self) -> None:
        if self.threads_alone is not None:
            self.threads_alone()
            self.optimizer.step()
            return
        self.optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(self.run(self.images), self.targets)
        loss.backward()
        self.optimizer.step()


class _BusyCores:
    """Wraps a step, adding up the wall time it takes and the CPU time the whole process spends meanwhile."""

    def __init__(self, step: Callable[[], None]) -> None:
        self.step, self.wall, self.cpu = step, 0.0, 0.0

    def __call__(self) -> None:
        wall, cpu = time.perf_counter(), time.process_time()  # process_time: every thread's
        self.step()
        self.wall += time.perf_counter() - wall
        self.cpu += time.process_time() - cpu

    def cores_busy(self) -> float:
        return self.cpu / self.wall / (os.cpu_count() or 1)


def time_variants(iters: int, rounds: int, image_size: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Per variant, the median step time (ms) of each of ``rounds`` interleaved rounds; and the share of the cores
    busy while it ran."""
    benches = {variant: WrapperBench(variant, image_size) for variant in TIME_VARIANTS}
    for bench in benches.values():
        bench.step()  # first use: worker threads, lazy initialization
    steps = {variant: _BusyCores(bench.step) for variant, bench in benches.items()}
    samples = interleaved_rounds(dict(steps), iters, rounds)
    return samples, {variant: step.cores_busy() for variant, step in steps.items()}


def memory_worker(variant: str, steps: int, image_size: int) -> float:
    """In a fresh process: the peak RSS (MB) after ``steps`` training steps of ``variant``."""
    bench = WrapperBench(variant, image_size)
    for _ in range(steps):
        bench.step()
    return status_kb("VmHWM") / 1024.0


def memory_variants(steps: int, rounds: int, image_size: int, threads: int | None) -> dict[str, list[float]]:
    """Per variant, the peak RSS (MB) of ``rounds`` fresh processes each."""
    samples: dict[str, list[float]] = {variant: [] for variant in MEMORY_VARIANTS}
    for round_index in range(rounds):
        for variant in rotated(MEMORY_VARIANTS, round_index):
            code = (
                "import sys, json; sys.path.insert(0, sys.argv[1]); import torch; import wrapper_cost; "
                "threads = int(sys.argv[5]); threads > 0 and torch.set_num_threads(threads); "
                "print(json.dumps(wrapper_cost.memory_worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))"
            )
            here = os.path.dirname(os.path.abspath(__file__))
            command = [sys.executable, "-c", code, here, variant, str(steps), str(image_size), str(threads or 0)]
            done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"memory worker for {variant} failed ({done.returncode}):\n{done.stderr}")
            samples[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
    return samples


def summarize(samples: dict[str, list[float]]) -> dict:
    medians = {variant: statistics.median(values) for variant, values in samples.items()}
    whole = medians[VARIANT_WHOLE]
    return {
        "medians": medians,
        "ratios": {variant: value / whole for variant, value in medians.items() if variant != VARIANT_WHOLE},
        "samples": samples,
    }


def _threads_alone_of(variant: str) -> str:
    return f"{variant.split()[0]} threads alone"


def run(
    iters: int, rounds: int, mem_rounds: int, image_size: int, threads: int | None, log: Callable[[str], None]
) -> dict:
    """Both rows: {'time': ..., 'memory': ...}, each with medians and ratios to the whole-batch module."""
    began = time.perf_counter()
    samples, cores_busy = time_variants(iters, rounds, image_size)
    result = {"time": {**summarize(samples), "cores busy": cores_busy}}
    whole = samples[VARIANT_WHOLE]
    # each round's ratio, then their median: a cross-check that cancels the machine's drift from round to round
    result["time"]["per-round ratios"] = {
        v: statistics.median(x / w for x, w in zip(samples[v], whole, strict=True))
        for v in TIME_VARIANTS
        if v != VARIANT_WHOLE
    }
    medians = result["time"]["medians"]
    result["time"]["ratios to the threads alone"] = {
        v: medians[v] / medians[_threads_alone_of(v)] for v in (*REPLICATED, *UNSYNCHRONIZED, *PARALLEL_BACKWARD)
    }
    log(f"  wrapper time done ({time.perf_counter() - began:.1f} s)")
    result["memory"] = summarize(memory_variants(3, mem_rounds, image_size, threads))
    log(f"  wrapper memory done ({time.perf_counter() - began:.1f} s)")
    result["image_size"] = image_size
    result["met"] = all(result["time"]["ratios"][v] <= TIME_TARGET for v in REPLICATED) and all(
        result["memory"]["ratios"][v] <= MEMORY_TARGET for v in REPLICATED
    )
    return result


def format_table(result: dict) -> str:
    size = result["image_size"]
    # TIME_VARIANTS, short
    names = ("whole", "2 repl.", "4 repl.", "2 plain", "4 plain", "2 par.bw", "4 par.bw", "2 alone", "4 alone")
    title = f"ResNet-18-style step, batch {BATCH}, {size}x{size}"
    header = f"{title:<42}" + "".join(f" {name:>9}" for name in names)
    lines = [header, "-" * len(header)]

    def cells(values: dict[str, float], digits: int) -> str:
        return "".join(f" {values[v]:>9.{digits}f}" if v in values else f" {'n/a':>9}" for v in TIME_VARIANTS[1:])

    for key, unit, target in (("time", "ms", TIME_TARGET), ("memory", "MB", MEMORY_TARGET)):
        m, r = result[key]["medians"], result[key]["ratios"]
        row_title = "training step time" if key == "time" else "process peak RSS"
        lines.append(f"{row_title + f' ({unit})':<42} {m[VARIANT_WHOLE]:>9.1f}" + cells(m, 1))
        ok = all(r[v] <= target for v in REPLICATED)
        verdict = "yes" if ok else "NO"
        lines.append(f"{f'  ratio to the whole batch (<= {target:.2f})':<42} {'':>9}" + cells(r, 3) + f"  {verdict}")
        if key == "time":
            busy, alone = result[key]["cores busy"], result[key]["ratios to the threads alone"]
            lines.append(f"{'  cores busy (CPU / wall time / cores)':<42} {busy[VARIANT_WHOLE]:>9.2f}" + cells(busy, 2))
            lines.append(f"{'  ratio to the same threads alone':<42} {'':>9}" + cells(alone, 3))
            per_round = result[key]["per-round ratios"]
            lines.append(f"{'  per-round ratio to the whole batch':<42} {'':>9}" + cells(per_round, 3))
    return "\n".join(lines)
