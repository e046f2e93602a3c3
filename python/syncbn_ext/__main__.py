"""``python -m syncbn_ext``: versions, how the compiled module was loaded, and a barrier self-check."""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time

import torch

import syncbn_ext


def barrier_self_check(replicas: int, passes: int) -> float:
    """Runs ``passes`` barrier passes with ``replicas`` Python threads; returns the median round trip in µs.

    Every copy sends its id; the master callback hands every copy the sum of the ids, which each
    copy checks, so a wrong result raises instead of passing silently.
    """
    if replicas < 1 or passes < 1:
        raise ValueError(f"replicas and passes must be positive, got {replicas} and {passes}")
    expected = replicas * (replicas - 1) // 2

    def master_callback(intermediates: list[tuple[int, int]]) -> list[tuple[int, int]]:
        total = sum(message for _, message in intermediates)
        return [(copy_id, total) for copy_id, _ in intermediates]

    master = syncbn_ext.SyncMaster(master_callback, timeout=60)
    pipes = [master.register_slave(copy_id) for copy_id in range(1, replicas)]
    errors: list[BaseException] = []

    def run_slave(pipe: syncbn_ext.SlavePipe) -> None:
        try:
            for _ in range(passes):
                if pipe.run_slave(pipe.identifier) != expected:
                    raise AssertionError(f"copy {pipe.identifier} got a wrong barrier result")
        except BaseException as error:  # reported by the master thread
            errors.append(error)

    threads = [threading.Thread(target=run_slave, args=(pipe,), daemon=True) for pipe in pipes]
    for thread in threads:
        thread.start()
    round_trips_us = []
    try:
        for _ in range(passes):
            start = time.perf_counter_ns()
            result = master.run_master(0)
            round_trips_us.append((time.perf_counter_ns() - start) / 1e3)
            if result != expected:
                raise AssertionError(f"the master got {result}, expected {expected}")
    finally:
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]
    return statistics.median(round_trips_us)


def print_info() -> None:
    """Prints the package, torch and compiler versions and how ``_C`` was loaded."""
    info = syncbn_ext.load_info
    print(f"syncbn_ext {syncbn_ext.__version__} (core {syncbn_ext._C.version()})")
    print(f"torch {torch.__version__}, python {sys.version.split()[0]}")
    print(f"compiler: {syncbn_ext._C.compiler_version()}")
    print(f"_C: {info.how}, from {info.path} ({info.reason})")
    print(f"CMake package: {syncbn_ext.cmake_prefix_path or 'none (a JIT build has no CMake package)'}")
    print(f"barrier timeout: {syncbn_ext.default_timeout_seconds():g} s (SYNCBN_TIMEOUT)")


def main(argv: list[str] | None = None) -> int:
    """The command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m syncbn_ext", description=__doc__)
    parser.add_argument("--replicas", type=int, default=4, help="replica threads in the self-check (default 4)")
    parser.add_argument("--passes", type=int, default=2000, help="barrier passes in the self-check (default 2000)")
    args = parser.parse_args(argv)

    print_info()
    median_us = barrier_self_check(args.replicas, args.passes)
    print(
        f"self-check: {args.replicas} CPU replicas x {args.passes} barrier passes OK, "
        f"median round trip {median_us:.1f} us"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
