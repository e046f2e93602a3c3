"""Synchronized BatchNorm on CPU replicas: time and memory against ``nn.BatchNorm2d`` and the established design.

Every row runs the same work three ways, under the same wrapper,
``syncbn_ext.DataParallelWithCallback(model, device_ids=["cpu"] * 2)`` (2 CPU replicas, one thread each):

* **torch**: ``nn.BatchNorm2d`` (each replica normalizes its half of the batch: not synchronized), the
  reference of every ratio;
* **ours**: ``syncbn_ext.SynchronizedBatchNorm2d`` (statistics over the whole batch, merged in C++);
* **established**: ``benchmarks/established_batchnorm.py``, a plain-Python re-implementation of
  vacancy/Synchronized-BatchNorm-PyTorch's ``_SynchronizedBatchNorm`` (sum / sum of squares sent through
  its queue/Condition ``SyncMaster``, normalization with plain autograd ops). No target; for comparison.

What is measured:

1. **layer**: one BatchNorm layer, input 64x64x32x32 float32 (N=64, C=64) requiring grad, forward and
   backward (``out.backward(g)`` with a fixed random ``g``); the time of one iteration, gradients of the
   input and parameters dropped after each.
2. **cnn**: one SGD training step of a small CNN: 8 conv(3x3, padding 1, no bias)-BN-ReLU blocks (3->32,
   then 7x 32->32) on 32x32 images, global average pool, linear 32->10, cross-entropy, batch 32 (16 per
   replica). The three variants start from the same weights.
3. **memory**: the peak memory of one ``layer`` iteration above the steady state. Each variant runs in a
   fresh subprocess (a clean heap; ``--quick``: one subprocess measures the three in turn) with
   ``MALLOC_MMAP_THRESHOLD_=65536``: glibc then serves every block of 64 KiB or more with its own ``mmap``
   and returns it to the kernel on ``free``, so the resident set size follows the live tensors (without
   it glibc raises the threshold dynamically and keeps freed blocks, and RSS would show its caching, not
   our allocations). After two warm-up iterations (thread pools, lazy initialization), each measured
   iteration reads ``VmRSS`` (inputs, ``g``, parameters and buffers alive, no graph, no gradients), resets
   the kernel's peak-RSS mark (``echo 5 > /proc/self/clear_refs``), runs the iteration and reads
   ``VmHWM``: the difference is the peak extra memory of the iteration, everything its forward and
   backward allocate at once, including the wrapper's scatter copies, the gathered output and the input's
   gradient. The kernel updates the mark before it unmaps a block, so the peak is exact to a few pages.
   The profiler's memory tracking (``torch.profiler(profile_memory=True)``) was not used: it does not see
   the allocations of the replica threads. Each worker first measures a known allocation (64 MiB) as a
   calibration, reported in the output.

Timing: the variants are measured in interleaved rounds (these machines are noisy): each round runs every
variant in turn, the order rotating from round to round, one warm-up iteration then ``--iters`` timed
iterations each; a round's figure is the median of its iterations and the reported figure the median of
the rounds'. Memory: the median over the measured iterations of ``--mem-rounds`` workers per variant,
interleaved too. Targets: ours / torch at most 1.10 in each of the three rows. Each replica computes with
its share of the process's intra-op threads (``torch.get_num_threads() // 2``, at least one: one each on the
2-core development machine), for every variant alike; ``--threads N`` sets the process's count first. With
several OpenMP threads per replica, any other busy process makes the spinning OpenMP threads lose their
cores and a step (the CNN's above all) takes 2-10x longer at random; with one thread per replica, a replica
that loses its core still holds the other up at the next synchronized layer. The output
gives the load average before and after, and the per-round ratios (each round's ours / torch, then the
median) as a cross-check that cancels slow drifts of the load.

Before timing, both synchronized variants are checked against one ``nn.BatchNorm2d`` applied to the whole
batch without replication: output, input and parameter gradients and running statistics, over two passes,
to 1e-4 (relative to the largest reference value, when above 1); and the CNN's loss and parameter gradients
against the unreplicated CNN with ``nn.BatchNorm2d``, to 1e-3 (eight layers of float32 statistics summed in
another order). A variant that fails is reported; ``--check`` then fails too. (Torch's BatchNorm under
replication normalizes each half with its own statistics: it is not meant to match, and not checked.)

Run it from the repository root::

    python benchmarks/bench_batchnorm.py                     # the tables, about 20 minutes on 2 cores (the
                                                             # wrapper's at 128x128, 6 min; at 256x256, 12)
    python benchmarks/bench_batchnorm.py --quick             # a smoke run (--threads 1): 31 s on 2 cores, 46-49 s
                                                             # beside other jobs; 3/4 of it the wrapper's and split's
    python benchmarks/bench_batchnorm.py --only layer memory --rounds 15
    python benchmarks/bench_batchnorm.py --only wrapper --image-sizes 256   # the wrapper's cost, one size
    python benchmarks/bench_batchnorm.py --threads 1         # one intra-op thread per process
    python benchmarks/bench_batchnorm.py --only layer --profile   # + each variant's top ops (torch.profiler)
    python benchmarks/bench_batchnorm.py --check --json out.json   # exit 1 if a target is missed

The exit status is 0 whatever the numbers, unless ``--check`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import split_cost  # noqa: E402  (beside this file)
import wrapper_cost  # noqa: E402  (beside this file)
from batchnorm_workloads import (  # noqa: E402  (beside this file)
    REPLICAS,
    SYNCHRONIZED,
    TOLERANCE,
    CnnBench,
    LayerBench,
    check_cnn,
    check_layer,
)
from timing import (  # noqa: E402  (beside this file)
    interleaved_rounds,
    peak_extra_mb,
    rotated,
    status_kb,
    writable_file,
)

import syncbn_ext  # noqa: E402

VARIANTS = ("torch", "ours", "established")
TARGET_RATIO = 1.10  # ours / torch, every row

MMAP_THRESHOLD = 65536
CALIBRATION_MB = 64


# --------------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------------


def time_rows(
    make: Callable[[str], LayerBench | CnnBench], iters: int, rounds: int, first_use: bool = True
) -> dict[str, list[float]]:
    """Per variant, the median iteration time (ms) of each of ``rounds`` interleaved rounds."""
    benches = {variant: make(variant) for variant in VARIANTS}
    if first_use:
        for bench in benches.values():
            bench.step()  # first use: thread pools, lazy initialization
    return interleaved_rounds({variant: bench.step for variant, bench in benches.items()}, iters, rounds)


def profile_layer(iters: int, row_limit: int = 14) -> str:
    """Per variant, the ops of ``iters`` layer iterations by self CPU time, replica threads included."""
    from torch.profiler import ProfilerActivity, profile

    try:
        from torch._C._profiler import _ExperimentalConfig

        config = _ExperimentalConfig(profile_all_threads=True)  # the forward runs on the replica threads
    except (ImportError, TypeError):  # an older torch: the calling thread only (the backward)
        config = None
    tables = []
    for variant in VARIANTS:
        bench = LayerBench(variant)
        for _ in range(2):
            bench.step()
        with profile(activities=[ProfilerActivity.CPU], experimental_config=config) as prof:
            for _ in range(iters):
                bench.step()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit, max_name_column_width=50)
        tables.append(f"{variant} ({iters} iterations, {REPLICAS} replicas):\n{table}")
    return "\n".join(tables)


# --------------------------------------------------------------------------------------------------------------
# Memory, in a fresh subprocess per measurement
# --------------------------------------------------------------------------------------------------------------


def memory_worker(variants: list[str], iters: int) -> list[dict]:
    """In a worker subprocess: per variant, the peak extra memory (MB) of ``iters`` layer iterations.

    Normally one variant per (fresh) worker; several in one worker (``--quick``) are measured one after the
    other, each with its own warm-up and baseline: with the fixed mmap threshold every block a variant freed
    went back to the kernel, so the next one starts from a clean RSS.
    """
    holder: list[torch.Tensor] = []

    def calibration() -> None:
        holder.append(torch.ones(CALIBRATION_MB * 2**20 // 4))
        holder.clear()

    calibration()
    calibration_mb = peak_extra_mb(calibration)
    results = []
    for variant in variants:
        bench = LayerBench(variant)
        for _ in range(2):
            bench.step()
        steady_mb = status_kb("VmRSS") / 1024.0
        peaks = [peak_extra_mb(bench.step) for _ in range(iters)]
        del bench
        results.append(
            {"variant": variant, "peaks_mb": peaks, "steady_rss_mb": steady_mb, "calibration_mb": calibration_mb}
        )
    return results


def _run_memory_worker(variants: list[str], iters: int, threads: int | None) -> list[dict]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    command = [sys.executable, os.path.abspath(__file__), "--memory-worker", *variants, "--iters", str(iters)]
    if threads is not None:
        command += ["--threads", str(threads)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory worker for {' '.join(variants)} failed ({done.returncode}):\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory_rows(
    iters: int, rounds: int, threads: int | None = None, one_worker: bool = False
) -> dict[str, list[float]]:
    """Per variant, the peak extra memory (MB) of every measured iteration of ``rounds`` workers each.

    A fresh worker per variant and round, the order rotating from round to round; with ``one_worker``
    (``--quick``: one interpreter start instead of three) one worker per round measures every variant.
    """
    samples: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    calibrations: list[float] = []
    for round_index in range(rounds):
        order = rotated(VARIANTS, round_index)
        if one_worker:
            results = _run_memory_worker(order, iters, threads)
        else:
            results = [result for variant in order for result in _run_memory_worker([variant], iters, threads)]
        for result in results:
            samples[result["variant"]] += result["peaks_mb"]
            calibrations.append(result["calibration_mb"])
    samples["calibration"] = calibrations
    return samples


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------

ROWS = (
    ("layer", "layer fwd+bwd 64x64x32x32", "ms"),
    ("cnn", "CNN train step (8 blocks)", "ms"),
    ("memory", "layer fwd+bwd peak extra", "MB"),
)


def summarize(samples: dict[str, list[float]]) -> dict:
    medians = {variant: statistics.median(samples[variant]) for variant in VARIANTS}
    per_round = list(zip(samples["torch"], samples["ours"], samples["established"], strict=True))
    return {
        "medians": medians,
        "ratio_ours": medians["ours"] / medians["torch"],
        "ratio_established": medians["established"] / medians["torch"],
        # the same ratios taken within each round (or worker iteration), then the median: a cross-check
        "round_ratio_ours": statistics.median(o / t for t, o, _ in per_round),
        "round_ratio_established": statistics.median(e / t for t, _, e in per_round),
        "samples": samples,
    }


def format_table(results: dict) -> str:
    header = (
        f"{'benchmark':<27} {'unit':>4}  {'torch':>8}  {'ours':>8}  {'estab.':>8}  "
        f"{'ours/torch':>10}  {'estab./torch':>12}  {f'<={TARGET_RATIO:.2f}':>6}"
    )
    lines = [header, "-" * len(header)]
    for key, title, unit in ROWS:
        if key not in results:
            continue
        row = results[key]
        m = row["medians"]
        met = row["ratio_ours"] <= TARGET_RATIO
        lines.append(
            f"{title:<27} {unit:>4}  {m['torch']:>8.2f}  {m['ours']:>8.2f}  {m['established']:>8.2f}  "
            f"{row['ratio_ours']:>10.3f}  {row['ratio_established']:>12.3f}  {'yes' if met else 'NO':>6}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: few iterations and rounds, --threads 1 unless given"
    )
    parser.add_argument("--iters", type=int, default=None, help="timed iterations per variant and round (default 5)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 9)")
    parser.add_argument("--mem-rounds", type=int, default=None, help="memory workers per variant (default 2)")
    parser.add_argument("--mem-iters", type=int, default=None, help="measured iterations per memory worker (default 3)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads in every process (default: torch's own)"
    )
    parser.add_argument(
        "--only", choices=[*(key for key, _, _ in ROWS), "wrapper"], nargs="+", help="run only these benchmarks"
    )
    parser.add_argument(
        "--profile", action="store_true", help="also print each variant's top ops in the layer benchmark (profiler)"
    )
    parser.add_argument(
        "--image-sizes",
        type=int,
        nargs="+",
        default=None,
        metavar="PIXELS",
        help="the wrapper benchmark's image sizes, each its own table (default 128 256; --quick: 64)",
    )
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--json", metavar="PATH", type=writable_file, help="also write the results as JSON to PATH")
    parser.add_argument("--memory-worker", choices=VARIANTS, nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = args.quick
    if args.iters is None:
        args.iters = 1 if quick else 5
    if args.rounds is None:
        args.rounds = 2 if quick else 9
    if args.mem_rounds is None:
        args.mem_rounds = 1 if quick else 2
    if args.mem_iters is None:
        args.mem_iters = 1 if quick else 3
    if args.image_sizes is None:
        args.image_sizes = [64] if quick else [128, 256]
    if args.threads is None and quick:
        args.threads = 1  # a smoke run must not take 10x longer on a busy machine (see the module docstring)
    if min(args.iters, args.rounds, args.mem_rounds, args.mem_iters, *args.image_sizes) < 1 or (
        args.threads is not None and args.threads < 1
    ):
        parser.error("--iters, --rounds, --mem-rounds, --mem-iters, --image-sizes and --threads must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker, args.iters)))
        return 0

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    selected = args.only or [*(key for key, _, _ in ROWS), "wrapper"]
    log(
        f"syncbn_ext {syncbn_ext.__version__} ({getattr(syncbn_ext.load_info, 'how', '?')} _C), "
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
        f"{REPLICAS} CPU replicas; {args.iters} iterations x {args.rounds} rounds"
    )
    load_before = os.getloadavg()
    began = time.perf_counter()

    checks: dict[str, dict[str, float]] = {}
    if "layer" in selected or "memory" in selected:
        checks["layer"] = {variant: check_layer(variant) for variant in SYNCHRONIZED}
    if "cnn" in selected:
        checks["cnn"] = {variant: check_cnn(variant) for variant in SYNCHRONIZED}
    failed = [f"{name}/{v}" for name, errors in checks.items() for v, e in errors.items() if not e <= TOLERANCE[name]]
    correct = not failed
    for name, errors in checks.items():
        log(
            f"  check {name} against nn.BatchNorm2d on the whole batch: "
            + ", ".join(f"{v} {e:.1e}" for v, e in errors.items())
            + f" (tolerance {TOLERANCE[name]:g})"
        )

    results: dict = {}
    if "layer" in selected:
        results["layer"] = summarize(time_rows(LayerBench, args.iters, args.rounds, first_use=not args.quick))
        log(f"  layer done ({time.perf_counter() - began:.1f} s)")
    if "cnn" in selected:
        results["cnn"] = summarize(time_rows(CnnBench, args.iters, args.rounds, first_use=not args.quick))
        log(f"  cnn done ({time.perf_counter() - began:.1f} s)")
    if "memory" in selected:
        samples = memory_rows(args.mem_iters, args.mem_rounds, args.threads, one_worker=args.quick)
        calibration = samples.pop("calibration")
        results["memory"] = summarize(samples)
        results["memory"]["calibration_mb"] = calibration
        log(f"  memory done ({time.perf_counter() - began:.1f} s)")
    wrappers: list[dict] = []  # per image size: {"wrapper": ..., "split": ...}
    for image_size in args.image_sizes if "wrapper" in selected else ():
        log(f"  wrapper at {image_size}x{image_size}")
        wrapper = wrapper_cost.run(args.iters, args.rounds, args.mem_rounds, image_size, args.threads, log)
        split = split_cost.run(image_size, args.iters, args.rounds, logged_steps=1 if args.quick else 2)
        wrappers.append({"image_size": image_size, "wrapper": wrapper, "split": split})
        log(f"  split alone done ({time.perf_counter() - began:.1f} s)")
    elapsed = time.perf_counter() - began
    load_after = os.getloadavg()

    if results:
        print(format_table(results))
        calibration = (
            f"{statistics.median(results['memory']['calibration_mb']):.1f} MB)" if "memory" in results else "not run)"
        )
        print(
            f"\ntime: median of {args.rounds} interleaved rounds x {args.iters} iterations; memory: peak RSS growth of "
            f"one iteration, {'one fresh process' if args.quick else 'fresh process per variant'} "
            f"(calibration {CALIBRATION_MB} MiB -> {calibration}; {elapsed:.1f} s"
        )
        print(
            "per-round ratios ours/torch: "
            + ", ".join(f"{key} {results[key]['round_ratio_ours']:.3f}" for key, _, _ in ROWS if key in results)
            + f"; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after"
        )
    for index, run in enumerate(wrappers):
        print(("\n" if results or index else "") + wrapper_cost.format_table(run["wrapper"]))
        print("\n" + split_cost.format_table(run["split"], run["image_size"]))
    # The load before only: the load after includes this run's own threads (a run of a minute or more on 2 cores
    # ends above 1 on an idle machine).
    if load_before[0] > 1.0 and args.threads is None:
        print(
            "note: other processes were running (load average above 1): a replica that loses its core holds the "
            "others up at the next synchronized layer, and with several intra-op threads per replica torch's "
            "OpenMP threads spin and one busy core can stretch a step 2-10x at random (--threads 1 then helps)."
        )
    if not correct:
        print(f"CHECK FAILED: {', '.join(failed)} do(es) not match nn.BatchNorm2d on the whole batch")
    met = correct and all(row["ratio_ours"] <= TARGET_RATIO for row in results.values())
    met = met and all(run["wrapper"]["met"] for run in wrappers)
    print("targets: " + ("all met" if met else "MISSED"))
    if args.profile:
        print("\n" + profile_layer(args.iters * 2))

    if args.json:
        report = {
            "replicas": REPLICAS,
            "iters": args.iters,
            "rounds": args.rounds,
            "mem_rounds": args.mem_rounds,
            "mem_iters": args.mem_iters,
            "quick": args.quick,
            "target_ratio": TARGET_RATIO,
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "syncbn_ext": syncbn_ext.__version__,
            "elapsed_s": elapsed,
            "load_average_before": load_before,
            "load_average_after": load_after,
            "checks": checks,
            "correct": correct,
            "targets_met": met,
            "results": results,
            "wrappers": wrappers,
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return 1 if args.check and not met else 0


if __name__ == "__main__":
    sys.exit(main())
