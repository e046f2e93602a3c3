"""What splitting the batch costs the kernels themselves, before any wrapper or thread: the floor under the replicas.

The ResNet-18-style training step of :mod:`wrapper_cost` (batch 8), run on the whole batch and on 2 and 4 slices of
it one after another, forward and backward, on **one thread** (no wrapper, no replica threads, no synchronization,
gradients accumulating in place): the same arithmetic, so a slice count that takes longer does so because the
kernels cost more per call than per image. oneDNN's own log (``torch.backends.mkldnn.verbose``) then tells where:
each convolution call reorders its weights into oneDNN's blocked layout (forward and backward-data) and the weight
gradient back out of it, whatever its batch, so these copies are made once per call: once for the whole batch,
once per slice, i.e. once per replica under the wrapper. The figures below add up the primitives' own times (one
thread: CPU time) per training step.

Run in a fresh process (one thread, the log on stdout), by ``bench_batchnorm.py --only wrapper`` and its full run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import wrapper_cost
from timing import interleaved_rounds, positive_int
from torch import nn

SLICES = (1, 2, 4)
_BEGIN, _END = "split-cost-begin", "split-cost-end"


class _SlicedStep:
    """A training step's forward and backward on the batch in ``slices`` slices, one after another."""

    def __init__(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, slices: int) -> None:
        self.model, self.images, self.targets = model, images.chunk(slices), targets.chunk(slices)

    def __call__(self) -> None:
        self.model.zero_grad(set_to_none=True)
        for images, targets in zip(self.images, self.targets, strict=True):
            loss = nn.functional.cross_entropy(self.model(images), targets) / len(self.images)
            loss.backward()


def worker(image_size: int, iters: int, rounds: int, logged_steps: int) -> None:
    """In a fresh process: times the step per slice count (interleaved), then logs ``logged_steps`` steps of each
    with oneDNN's verbose log between markers; prints the timings (JSON) and the convolutions' weight shapes."""
    torch.set_num_threads(1)
    whole = wrapper_cost.WrapperBench(wrapper_cost.VARIANT_WHOLE, image_size)  # the same weights and data
    model = whole.model
    steps = {str(k): _SlicedStep(model, whole.images, whole.targets, k) for k in SLICES}
    for step in steps.values():
        step()  # first use: oneDNN's primitive caches
    samples = interleaved_rounds(steps, iters, rounds)
    logged_ms: dict[str, float] = {}
    for name, step in steps.items():
        print(f"{_BEGIN} {name}", flush=True)
        began = time.perf_counter()
        with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
            for _ in range(logged_steps):
                step()
        logged_ms[name] = (time.perf_counter() - began) * 1e3 / logged_steps
        print(_END, flush=True)
    weights = sorted({"x".join(map(str, m.weight.shape)) for m in model.modules() if isinstance(m, nn.Conv2d)})
    print(json.dumps({"samples": samples, "logged_ms": logged_ms, "weights": weights}), flush=True)


def _primitive_times(lines: list[str], weights: set[str], steps: int) -> dict[str, float]:
    """Per training step: the convolutions' and the weight reorders' time (ms, summed) and the reorders' count.

    A verbose ``exec`` line reads ``onednn_verbose,...,exec,cpu,<primitive>,<implementation>,...,<shape>,<ms>``;
    a reorder whose shape is a convolution's weight shape copies weights (or their gradient)."""
    totals = {"convolution ms": 0.0, "weight reorder ms": 0.0, "weight reorders": 0.0, "other ms": 0.0}
    for line in lines:
        fields = line.split(",")
        if not line.startswith("onednn_verbose") or "exec" not in fields[:-2]:
            continue
        primitive, shape, ms = fields[fields.index("exec") + 2], fields[-2], float(fields[-1])
        if primitive == "convolution":
            totals["convolution ms"] += ms
        elif primitive == "reorder" and shape in weights:
            totals["weight reorder ms"] += ms
            totals["weight reorders"] += 1
        else:
            totals["other ms"] += ms
    return {key: value / steps for key, value in totals.items()}


def run(image_size: int, iters: int, rounds: int, logged_steps: int = 2) -> dict:
    """The split's cost per slice count: median step time (ms, one thread), its ratio to the whole batch (the
    median of each round's), oneDNN's primitive times per step (see :func:`_primitive_times`), and the rest of the
    logged steps' time (ATen's other kernels, the gradients' accumulation, Python, autograd and the log itself)."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = "import sys; sys.path.insert(0, sys.argv[1]); import split_cost; split_cost.worker(*map(int, sys.argv[2:]))"
    command = [sys.executable, "-c", code, here, str(image_size), str(iters), str(rounds), str(logged_steps)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"split-cost worker failed ({done.returncode}):\n{done.stderr[-3000:]}")
    lines = done.stdout.splitlines()
    summary = json.loads(lines[-1])
    weights = set(summary["weights"])
    logs: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in lines:
        if line.startswith(_BEGIN):
            current = logs.setdefault(line.split()[1], [])
        elif line == _END:
            current = None
        elif current is not None:
            current.append(line)
    medians = {name: statistics.median(values) for name, values in summary["samples"].items()}
    whole = summary["samples"][str(SLICES[0])]
    result = {}
    for name, values in summary["samples"].items():
        result[name] = {
            "step ms": medians[name],
            "ratio": statistics.median(v / w for v, w in zip(values, whole, strict=True)),
            **_primitive_times(logs.get(name, []), weights, logged_steps),
        }
        primitives = sum(result[name][key] for key in ("convolution ms", "weight reorder ms", "other ms"))
        result[name]["everything else ms"] = summary["logged_ms"][name] - primitives
    return result


def format_table(result: dict, image_size: int) -> str:
    names = [str(k) for k in SLICES]
    title = f"The split alone: one thread, batch {wrapper_cost.BATCH} in slices ({image_size}x{image_size})"
    header = f"{title:<58}" + "".join(f" {f'{k} slice' + ('s' if k != '1' else ''):>10}" for k in names)
    rows = [
        ("step time (ms), slices one after another", "step ms", 1),
        ("  per-round ratio to the whole batch", "ratio", 3),
        ("  oneDNN convolutions (ms per step)", "convolution ms", 1),
        ("  oneDNN weight reorders (ms per step)", "weight reorder ms", 1),
        ("  oneDNN weight reorders (calls per step)", "weight reorders", 0),
        ("  other oneDNN primitives (ms per step)", "other ms", 1),
        ("  everything else (ms: a logged step less the above)", "everything else ms", 1),
    ]
    lines = [header, "-" * len(header)]
    for label, key, digits in rows:
        lines.append(f"{label:<58}" + "".join(f" {result[name][key]:>10.{digits}f}" for name in names))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "image_size", type=positive_int, nargs="?", default=128, metavar="PIXELS", help="image size (default 128)"
    )
    parser.add_argument(
        "--iters", type=positive_int, default=3, help="timed steps per slice count and round (default 3)"
    )
    parser.add_argument("--rounds", type=positive_int, default=5, help="interleaved rounds (default 5)")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    print(format_table(run(args.image_size, args.iters, args.rounds), args.image_size))
    print(f"({time.perf_counter() - began:.1f} s)")


if __name__ == "__main__":
    main()
