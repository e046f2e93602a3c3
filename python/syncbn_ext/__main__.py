"""``python -m syncbn_ext``: versions, how ``_C`` was loaded, and a barrier self-check.

``python -m syncbn_ext demo``: trains a small conv net three ways side by side (BatchNorm per replica,
synchronized BatchNorm, one module on the whole batch) and shows how far each is from the whole-batch run
(:mod:`syncbn_ext.demo`); ``--processes N`` runs the first two in N processes on localhost.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shutil
import statistics
import sys
import textwrap
import threading
import time

import torch

import syncbn_ext
from syncbn_ext.demo import _max_difference, plot_path_error, run_demo  # noqa: F401  (_max_difference: for tests)


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


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1 (argparse turns the ValueError into a usage error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


# torch.manual_seed and torch.Generator.manual_seed take seeds from -2**63 to 2**64 - 1.
SEED_RANGE = (-(2**63), 2**64 - 1)


def seed_int(text: str) -> int:
    """An argparse type: an integer that torch accepts as a seed (see :data:`SEED_RANGE`)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
        raise argparse.ArgumentTypeError(f"must be from -2**63 to 2**64 - 1 (torch's seeds), got {value}")
    return value


def plain_text(docstring: str) -> str:
    """``docstring`` for ``--help``: its reST markup (double backquotes, roles such as ``:mod:``) dropped, each
    paragraph wrapped to the terminal's width."""
    text = re.sub(r":\w+:`([^`]*)`", r"\1", docstring)
    text = re.sub(r"``([^`]*)``", r"\1", text)
    width = max(40, min(shutil.get_terminal_size().columns, 100) - 2)
    return "\n\n".join(
        textwrap.fill(" ".join(paragraph.split()), width, break_on_hyphens=False)
        for paragraph in text.strip().split("\n\n")
    )


def main(argv: list[str] | None = None) -> int:
    """The command-line entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m syncbn_ext",
        description=plain_text(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # The self-check's options: their own dests (not the demo's --replicas), None when not given, so that
    # "--replicas 2 demo" is an error rather than silently overridden by the demo's default.
    parser.add_argument(
        "--replicas",
        dest="check_replicas",
        metavar="REPLICAS",
        type=positive_int,
        default=None,
        help="CPU replicas in the self-check (default 4; the demo's --replicas goes after 'demo')",
    )
    parser.add_argument(
        "--passes", type=positive_int, default=None, help="barrier passes in the self-check (default 2000)"
    )
    commands = parser.add_subparsers(dest="command")
    demo = commands.add_parser("demo", help="train a small conv net three ways and compare them")
    demo.add_argument(
        "--replicas", type=positive_int, default=4, help="CPU replicas when there are no GPUs (default 4)"
    )
    demo.add_argument("--steps", type=positive_int, default=40, help="training steps (default 40)")
    demo.add_argument("--batch-per-replica", type=positive_int, default=4, help="images per replica (default 4)")
    demo.add_argument("--seed", type=seed_int, default=0, help="seed of the weights and the data (default 0)")
    demo.add_argument(
        "--processes", type=positive_int, default=1, help="processes on localhost (torch.distributed, gloo; default 1)"
    )
    demo.add_argument(
        "--plot",
        metavar="FILE.png",
        help="draw the losses and running statistics per step (matplotlib; the extension names the format)",
    )
    args = parser.parse_args(argv)

    if args.command == "demo":
        if args.check_replicas is not None:
            parser.error(
                f"argument --replicas: before 'demo' it is the self-check's, which the demo does not run; "
                f"put it after 'demo': python -m syncbn_ext demo --replicas {args.check_replicas}"
            )
        if args.passes is not None:
            parser.error("argument --passes: the self-check's, which the demo does not run")
        if args.plot is not None:
            if importlib.util.find_spec("matplotlib") is None:
                demo.error("--plot needs matplotlib: pip install 'syncbn_ext[plot]'")
            problem = plot_path_error(args.plot)
            if problem is not None:
                demo.error(f"argument --plot: {problem}")
    try:
        syncbn_ext.default_timeout_seconds()  # a bad SYNCBN_TIMEOUT: one line now, not a traceback halfway through
    except ValueError as error:
        print(f"{parser.prog}: {error}", file=sys.stderr)
        return 1

    if args.command == "demo":
        run_demo(args.replicas, args.steps, args.batch_per_replica, args.seed, args.processes, args.plot)
        return 0
    replicas = 4 if args.check_replicas is None else args.check_replicas
    passes = 2000 if args.passes is None else args.passes
    print_info()
    median_us = barrier_self_check(replicas, passes)
    print(f"self-check: {replicas} CPU replicas x {passes} barrier passes OK, median round trip {median_us:.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
