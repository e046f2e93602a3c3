"""Round trip of the syncbn barrier from Python threads, against two baselines.

What is measured: the time of one barrier pass, i.e. one ``run_master`` call timed on the
master, while every other replica sits in ``run_slave``. Every variant runs the same
workload, the one of ``syncbn_ext._C.measure_barrier_round_trip_us``: each pass, every copy
sends ``(a 1-element tensor, its copy id)``; the master callback gives every copy back its
own tensor and the sum of all ids. So the numbers are the barrier's cost, not the math's.

* **ours**: ``syncbn_ext.SyncMaster`` (the C++ barrier, GIL released while waiting) driven
  by one Python thread per replica (the main thread is the master) and a Python callback;
* **(a) established**: ``benchmarks/established_sync_master.py``, a plain-Python
  re-implementation of vacancy/Synchronized-BatchNorm-PyTorch's queue/Condition
  ``SyncMaster``, driven exactly like ours;
* **(b) C++**: ``syncbn_ext._C.measure_barrier_round_trip_us``, the same C++ barrier driven
  by C++ ``std::thread`` s with a C++ callback: no Python, no GIL.

The Python variants alternate their passes between two barriers, as a forward alternates
between layers: back to back passes on ONE established barrier trip its shared-queue race
(design note 13). A pass costs the same either way.

Per variant and replica count the result is the median pass time over ``--passes`` passes
(after 50 warm-up passes). These machines are noisy, so the three variants are measured
side by side: ``--rounds`` rounds, each running all three in turn (the order rotates from
round to round), and the reported figure is the median of the rounds' medians. Targets:
ours faster than (a) at every replica count, and at most 1.5x (b).

Run it from the repository root::

    python benchmarks/bench_barrier.py                     # replicas 2 4 8, the table
    python benchmarks/bench_barrier.py --replicas 4 --passes 5000 --rounds 9
    python benchmarks/bench_barrier.py --check --json out.json   # exit 1 if a target is missed

The exit status is 0 whatever the numbers, unless ``--check`` is given. With the defaults
it takes well under a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import established_sync_master  # noqa: E402  (beside this file)
from timing import rotated, writable_file  # noqa: E402  (beside this file)

import syncbn_ext  # noqa: E402

WARMUP = 50
MAX_RATIO_TO_CPP = 1.5  # target: ours / (b) at most this
VARIANTS = ("ours", "established", "cpp")


def _callback(intermediates: list) -> list:
    # The benchmark workload: every copy gets back its own tensor and the sum of the ids.
    id_sum = 0
    for _, msg in intermediates:
        id_sum += msg[1]
    return [(copy_id, (msg[0], id_sum)) for copy_id, msg in intermediates]


def _python_threads_round_trip_us(make_master, replicas: int, passes: int) -> float:
    """Median ``run_master`` time (µs) of barriers from ``make_master`` driven by ``replicas`` Python threads.

    The passes alternate between two barriers, as a forward alternates between layers. The
    established design needs it: its one queue carries both messages and acknowledgements,
    so back to back passes on ONE barrier let a fast slave's next message overtake another
    slave's acknowledgement and trip the master's assertion (design note 13). With two
    barriers, a slave can only reach a barrier again after the master has drained that
    barrier's acknowledgements. Each pass still costs what one pass of one layer costs.
    """
    total = passes + WARMUP
    masters = [make_master(), make_master()]
    expected_sum = replicas * (replicas - 1) // 2
    errors: list[BaseException] = []

    # Register every copy before any pass runs, as replication does.
    pipes = {copy_id: [m.register_slave(copy_id) for m in masters] for copy_id in range(1, replicas)}

    def slave(copy_id: int) -> None:
        try:
            run_slaves = [pipe.run_slave for pipe in pipes[copy_id]]
            payload = torch.ones(1)
            msg = (payload, copy_id)
            result = None
            for i in range(total):
                result = run_slaves[i & 1](msg)
            if result is None or result[0] is not payload or result[1] != expected_sum:
                raise AssertionError(f"copy {copy_id} got a wrong result: {result!r}")
        except BaseException as error:  # reported by the master thread
            errors.append(error)

    payload = torch.ones(1)
    msg = (payload, 0)
    clock = time.perf_counter_ns
    run_masters = [m.run_master for m in masters]
    times_ns = [0] * total
    result = None
    threads = [threading.Thread(target=slave, args=(copy_id,), daemon=True) for copy_id in range(1, replicas)]
    for thread in threads:
        thread.start()
    try:
        for i in range(total):
            run_master = run_masters[i & 1]
            start = clock()
            result = run_master(msg)
            times_ns[i] = clock() - start
    except BaseException as failure:
        # Wake the slaves (they wait for passes that will not come) so none is left waiting in C++ at exit.
        # (The established library's pure-Python slaves cannot be woken; being daemons, they end with the program.)
        closable = all(hasattr(master, "close") for master in masters)
        for master in masters if closable else ():
            master.close("the benchmark's master thread failed")
        for thread in threads if closable else ():
            thread.join(10.0)
        if errors and isinstance(failure, syncbn_ext.BarrierError):
            raise errors[0] from failure  # a slave failed first: the master only waited for it
        raise
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    if result is None or result[0] is not payload or result[1] != expected_sum:
        raise AssertionError(f"the master got a wrong result: {result!r}")
    return statistics.median(times_ns[WARMUP:]) / 1000.0


def measure(variant: str, replicas: int, passes: int) -> float:
    """One measurement: the median round trip (µs) of ``variant`` over ``passes`` passes."""
    if variant == "ours":
        return _python_threads_round_trip_us(lambda: syncbn_ext.SyncMaster(_callback, timeout=60.0), replicas, passes)
    if variant == "established":
        return _python_threads_round_trip_us(lambda: established_sync_master.SyncMaster(_callback), replicas, passes)
    if variant == "cpp":
        return syncbn_ext._C.measure_barrier_round_trip_us(replicas, passes, WARMUP)
    raise ValueError(f"unknown variant {variant!r}")


def run(replica_counts: list[int], passes: int, rounds: int, log=None) -> list[dict]:
    """Measures every variant ``rounds`` times per replica count, interleaved; one row per count."""
    rows = []
    for replicas in replica_counts:
        samples: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
        for round_index in range(rounds):
            for variant in rotated(VARIANTS, round_index):
                samples[variant].append(measure(variant, replicas, passes))
        medians = {variant: statistics.median(values) for variant, values in samples.items()}
        per_round = list(zip(samples["ours"], samples["established"], samples["cpp"], strict=True))
        ours, established, cpp = medians["ours"], medians["established"], medians["cpp"]
        row = {
            "replicas": replicas,
            "ours_us": ours,
            "established_us": established,
            "cpp_us": cpp,
            "ratio_ours_established": ours / established,
            "ratio_ours_cpp": ours / cpp,
            # the same ratios taken within each round, then the median: a cross-check
            "round_ratio_ours_established": statistics.median(o / e for o, e, _ in per_round),
            "round_ratio_ours_cpp": statistics.median(o / c for o, _, c in per_round),
            "faster_than_established": ours < established,
            "within_cpp_target": ours <= MAX_RATIO_TO_CPP * cpp,
            "samples_us": samples,
        }
        rows.append(row)
        if log is not None:
            log(f"  {replicas} replicas done: " + ", ".join(f"{v} {medians[v]:.1f} µs" for v in VARIANTS))
    return rows


def format_table(rows: list[dict]) -> str:
    header = (
        f"{'replicas':>8}  {'ours µs':>9}  {'(a) µs':>9}  {'(b) µs':>9}  "
        f"{'ours/(a)':>8}  {'ours/(b)':>8}  {'< (a)':>5}  {f'<={MAX_RATIO_TO_CPP:g}x(b)':>9}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['replicas']:>8}  {row['ours_us']:>9.1f}  {row['established_us']:>9.1f}  {row['cpp_us']:>9.1f}  "
            f"{row['ratio_ours_established']:>8.2f}  {row['ratio_ours_cpp']:>8.2f}  "
            f"{'yes' if row['faster_than_established'] else 'NO':>5}  {'yes' if row['within_cpp_target'] else 'NO':>9}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, nargs="+", default=[2, 4, 8], help="replica counts (default: 2 4 8)")
    parser.add_argument("--passes", type=int, default=2000, help="timed passes per measurement (default: 2000)")
    parser.add_argument("--rounds", type=int, default=11, help="interleaved rounds per replica count (default: 11)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--json", metavar="PATH", type=writable_file, help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)
    if any(r < 2 for r in args.replicas):
        parser.error("--replicas: every count must be at least 2 (a master and a slave)")
    if args.passes < 1 or args.rounds < 1:
        parser.error("--passes and --rounds must be positive")
    if args.passes > 10_000_000:
        parser.error("--passes: at most 10000000 (each pass's time is kept)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    log(
        f"barrier round trip: replicas {args.replicas}, {args.passes} passes x {args.rounds} rounds, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, syncbn_ext {syncbn_ext.__version__}"
    )
    began = time.perf_counter()
    rows = run(args.replicas, args.passes, args.rounds, log=log)
    elapsed = time.perf_counter() - began

    print(format_table(rows))
    print(
        f"\nmedian of {args.rounds} interleaved rounds, {args.passes} passes each; "
        f"(a) plain-Python queue/Condition SyncMaster, (b) C++ std::threads over our barrier; {elapsed:.1f} s"
    )
    met = all(row["faster_than_established"] and row["within_cpp_target"] for row in rows)
    print("targets: " + ("all met" if met else "MISSED"))

    if args.json:
        report = {
            "replicas": args.replicas,
            "passes": args.passes,
            "rounds": args.rounds,
            "warmup": WARMUP,
            "max_ratio_to_cpp": MAX_RATIO_TO_CPP,
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "syncbn_ext": syncbn_ext.__version__,
            "switch_interval_s": sys.getswitchinterval(),
            "elapsed_s": elapsed,
            "targets_met": met,
            "rows": rows,
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return 1 if args.check and not met else 0


if __name__ == "__main__":
    sys.exit(main())
