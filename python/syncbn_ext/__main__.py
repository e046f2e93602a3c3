"""``python -m syncbn_ext``: versions, how ``_C`` was loaded, and a barrier self-check.

``python -m syncbn_ext demo``: trains a small conv net three ways side by side (BatchNorm per replica,
synchronized BatchNorm, one module on the whole batch) and shows how far each is from the whole-batch run.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

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


def make_demo_model(seed: int) -> nn.Module:
    """A small conv net with BatchNorm after every convolution."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def make_demo_data(steps: int, batch: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Synthetic 16x16 images whose labels a fixed random teacher gives; per-image offsets make the
    per-replica statistics differ from the whole batch's, as real data does."""
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.randn(3 * 16 * 16, 10, generator=generator)
    batches = []
    for _ in range(steps):
        images = torch.randn(batch, 3, 16, 16, generator=generator) * 2 + torch.randn(
            batch, 3, 1, 1, generator=generator
        )
        labels = (images.flatten(1) @ teacher).argmax(1)
        batches.append((images, labels))
    return batches


@dataclass
class DemoRun:
    """One way of training: its step times, losses and final BatchNorm buffers and parameters."""

    name: str
    step_seconds: list[float]
    losses: list[float]
    buffers: list[torch.Tensor]
    parameters: list[torch.Tensor]


def _bn_buffers(model: nn.Module) -> list[torch.Tensor]:
    return [
        buffer.detach().cpu().clone()
        for module in model.modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        for buffer in (module.running_mean, module.running_var)
    ]


def train_demo(
    name: str,
    model: nn.Module,
    wrap: Callable[[nn.Module], nn.Module],
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    progress: Callable[[], None],
) -> DemoRun:
    """Trains ``wrap(model)`` with SGD over ``batches``; ``model`` holds the parameters and buffers."""
    model = model.to(device)
    runner = wrap(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    step_seconds, losses = [], []
    for images, labels in batches:
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(runner(images.to(device)), labels.to(device))
        loss.backward()
        optimizer.step()
        step_seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
        progress()
    parameters = [p.detach().cpu().clone() for p in model.parameters()]
    return DemoRun(name, step_seconds, losses, _bn_buffers(model), parameters)


def _max_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def run_demo(replicas: int, steps: int, batch_per_replica: int, seed: int) -> list[DemoRun]:
    """Trains the demo net three ways on the same data from the same initial weights; prints the table."""
    gpus = torch.cuda.device_count()
    if gpus >= 2:
        device, device_ids = torch.device("cuda", 0), list(range(gpus))
    else:
        device, device_ids = torch.device("cpu"), ["cpu"] * replicas
    n = len(device_ids)
    batches = make_demo_data(steps, n * batch_per_replica, seed)
    initial = make_demo_model(seed)
    ways: list[tuple[str, nn.Module, Callable[[nn.Module], nn.Module]]] = [
        (
            "BatchNorm per replica",
            copy.deepcopy(initial),
            lambda m: (
                nn.DataParallel(m, device_ids=device_ids)
                if gpus >= 2
                else syncbn_ext.DataParallelWithCallback(m, device_ids=device_ids)
            ),
        ),
        (
            "synchronized BatchNorm",
            syncbn_ext.convert_model(copy.deepcopy(initial)),
            lambda m: syncbn_ext.DataParallelWithCallback(m, device_ids=device_ids),
        ),
        ("one module, whole batch", copy.deepcopy(initial), lambda m: m),
    ]
    total, done = len(ways) * steps, 0
    where = f"{n} GPUs" if gpus >= 2 else f"{n} CPU replicas"
    print(f"demo: {steps} steps, {where}, {batch_per_replica} images per replica (batch {n * batch_per_replica})")

    def progress() -> None:
        nonlocal done
        done += 1
        if not sys.stderr.isatty():
            return
        filled = 30 * done // total
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {done}/{total} steps")
        sys.stderr.flush()

    runs = [train_demo(name, model, wrap, batches, device, progress) for name, model, wrap in ways]
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    reference = runs[-1]
    print(f"{'':26}{'ms/step':>9}{'max |loss - ref|':>18}{'running stats vs ref':>22}{'weights vs ref':>16}")
    for run in runs:
        print(
            f"{run.name:26}{1e3 * statistics.median(run.step_seconds):9.1f}"
            f"{max(abs(a - b) for a, b in zip(run.losses, reference.losses, strict=True)):18.2e}"
            f"{_max_difference(run.buffers, reference.buffers):22.2e}"
            f"{_max_difference(run.parameters, reference.parameters):16.2e}"
        )
    per_replica, synchronized = runs[0], runs[1]
    print(
        f"synchronized BatchNorm vs the whole-batch run: running statistics within "
        f"{_max_difference(synchronized.buffers, reference.buffers):.1e}; BatchNorm per replica drifts by "
        f"{_max_difference(per_replica.buffers, reference.buffers):.1e}"
    )
    return runs


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1 (argparse turns the ValueError into a usage error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    """The command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m syncbn_ext", description=__doc__)
    parser.add_argument("--replicas", type=positive_int, default=4, help="CPU replicas (default 4)")
    parser.add_argument(
        "--passes", type=positive_int, default=2000, help="barrier passes in the self-check (default 2000)"
    )
    commands = parser.add_subparsers(dest="command")
    demo = commands.add_parser("demo", help="train a small conv net three ways and compare them")
    demo.add_argument(
        "--replicas", type=positive_int, default=4, help="CPU replicas when there are no GPUs (default 4)"
    )
    demo.add_argument("--steps", type=positive_int, default=40, help="training steps (default 40)")
    demo.add_argument("--batch-per-replica", type=positive_int, default=4, help="images per replica (default 4)")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.command == "demo":
        run_demo(args.replicas, args.steps, args.batch_per_replica, args.seed)
        return 0
    print_info()
    median_us = barrier_self_check(args.replicas, args.passes)
    print(
        f"self-check: {args.replicas} CPU replicas x {args.passes} barrier passes OK, "
        f"median round trip {median_us:.1f} us"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
