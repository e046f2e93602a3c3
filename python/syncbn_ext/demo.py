"""``python -m syncbn_ext demo``: a small conv net trained three ways side by side, from the same initial weights.

* **BatchNorm per replica**: plain ``nn.BatchNorm2d`` in every replica (of every process);
* **synchronized BatchNorm**: the same net with synchronized layers (across every replica of every process);
* **one module, whole batch**: one module on the whole (global) batch, the reference.

With ``processes > 1`` the first two run under ``DistributedDataParallel`` in that many processes on localhost
(gloo over a file store), each with ``replicas`` CPU replicas (``DataParallelWithCallback``); the reference runs
alone. The table shows each way's step time and how far its losses, running statistics and weights end up from the
reference's; ``plot`` draws the loss curves and the running statistics' distance to the reference per step.
"""

from __future__ import annotations

import copy
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .convert import convert_model
from .data_parallel import DataParallelWithCallback

__all__ = ["DemoRun", "run_demo"]

WAYS = ("BatchNorm per replica", "synchronized BatchNorm", "one module, whole batch")


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
    """One way of training: its step times, (global) losses, final BatchNorm buffers and parameters, and the
    BatchNorm buffers after each step."""

    name: str
    step_seconds: list[float]
    losses: list[float]
    buffers: list[torch.Tensor]
    parameters: list[torch.Tensor]
    buffer_history: list[list[torch.Tensor]] = field(default_factory=list)


def _bn_buffers(model: nn.Module) -> list[torch.Tensor]:
    return [
        buffer.detach().cpu().clone()
        for module in model.modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        for buffer in (module.running_mean, module.running_var)
    ]


def _max_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def train_demo(
    name: str,
    model: nn.Module,
    runner: nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    progress: Callable[[], None],
    global_loss: Callable[[torch.Tensor], float] = lambda loss: loss.item(),
    record_history: bool = False,
) -> DemoRun:
    """Trains ``runner`` (``model``, or a wrapper around it) with SGD over ``batches``; ``record_history`` keeps the
    BatchNorm buffers of every step (for the plot)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    run = DemoRun(name, [], [], [], [])
    for images, labels in batches:
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(runner(images.to(device)), labels.to(device))
        loss.backward()
        optimizer.step()
        if device.type != "cpu":
            torch.accelerator.synchronize(device)  # the step's kernels, not just their launches
        run.step_seconds.append(time.perf_counter() - start)
        run.losses.append(global_loss(loss))
        if record_history:
            run.buffer_history.append(_bn_buffers(model))
        progress()
    run.buffers = _bn_buffers(model)
    run.parameters = [p.detach().cpu().clone() for p in model.parameters()]
    return run


def _progress_bar(total: int, enabled: bool) -> tuple[Callable[[], None], Callable[[], None]]:
    """(advance, close) of a tqdm bar on stderr (nothing when disabled)."""
    if not enabled:
        return (lambda: None), (lambda: None)
    from tqdm import tqdm

    bar = tqdm(total=total, desc="demo", unit="step", file=sys.stderr)
    return (lambda: bar.update(1)), bar.close


def _train_all(
    rank: int,
    processes: int,
    replicas: int,
    steps: int,
    batch_per_replica: int,
    seed: int,
    show_progress: bool,
    record_history: bool,
) -> list[DemoRun]:
    """The three ways, on this rank (its shard of each global batch); rank 0's results are the ones shown."""
    import torch.distributed as dist

    gpus = torch.cuda.device_count()
    if processes == 1 and gpus >= 2:
        device, device_ids = torch.device("cuda", 0), list(range(gpus))
    else:
        device, device_ids = torch.device("cpu"), ["cpu"] * replicas
    per_process = len(device_ids) * batch_per_replica
    batches = make_demo_data(steps, processes * per_process, seed)
    shard = [
        (x[rank * per_process : (rank + 1) * per_process], y[rank * per_process : (rank + 1) * per_process])
        for x, y in batches
    ]
    initial = make_demo_model(seed).to(device)

    def replicated(model: nn.Module, synchronized: bool) -> nn.Module:
        if synchronized:
            model = convert_model(model, process_group=dist.group.WORLD if processes > 1 else None)
        wrapped = (
            nn.DataParallel(model, device_ids=device_ids)
            if gpus >= 2 and processes == 1 and not synchronized
            else DataParallelWithCallback(model, device_ids=device_ids)
        )
        return nn.parallel.DistributedDataParallel(wrapped) if processes > 1 else wrapped

    def global_loss(loss: torch.Tensor) -> float:
        if processes == 1:
            return loss.item()
        total = loss.detach().clone()
        dist.all_reduce(total)  # equal shards: the global batch's mean loss is the mean of the ranks'
        return total.item() / processes

    advance, close = _progress_bar(len(WAYS) * steps, show_progress and rank == 0)
    runs = []
    for name in WAYS:
        model = copy.deepcopy(initial)
        if name == "one module, whole batch":
            runs.append(train_demo(name, model, model, batches, device, advance, record_history=record_history))
            continue
        runner = replicated(model, synchronized=name == "synchronized BatchNorm")
        model = runner.module.module if processes > 1 else runner.module
        runs.append(train_demo(name, model, runner, shard, device, advance, global_loss, record_history))
    close()
    return runs


def _rank_main(rank: int, processes: int, store: str, result_path: str, *args: int) -> None:
    """One process of a multi-process demo: trains on its shard; rank 0 saves the results."""
    import torch.distributed as dist

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // processes))
    dist.init_process_group("gloo", store=dist.FileStore(store, processes), rank=rank, world_size=processes)
    try:
        runs = _train_all(rank, processes, *args)
        if rank == 0:
            torch.save(runs, result_path)
    finally:
        dist.destroy_process_group()


def _spawn(processes: int, args: tuple) -> list[DemoRun]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        store, result = os.path.join(folder, "store"), os.path.join(folder, "runs.pt")
        mp.start_processes(
            _rank_main, args=(processes, store, result, *args), nprocs=processes, join=True, start_method="spawn"
        )
        return torch.load(result, weights_only=False)


def plot_path_error(path: str) -> str | None:
    """Why :func:`plot_runs` could not save to ``path``, found before any training (None when it can): its folder
    is missing or cannot be written, it is a folder or a file that cannot be written, its extension names no format
    that matplotlib writes, or matplotlib fails to write that format here (a small figure is saved next to it, to a
    temporary file: pgf needs LaTeX). Needs matplotlib."""
    from matplotlib.backend_bases import FigureCanvasBase

    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        return f"no folder {folder!r}"
    if os.path.isdir(path):
        return f"{path!r} is a folder"
    formats = FigureCanvasBase.get_supported_filetypes()
    extension = os.path.splitext(path)[1][1:].lower()
    if extension not in formats:
        known = ", ".join(sorted(formats))
        if not extension:
            return f"{path!r} has no extension to name its format ({known})"
        return f"{path!r}: .{extension} is not a format matplotlib writes ({known})"
    if os.path.exists(path):
        if not os.access(path, os.W_OK):
            return f"{path!r} cannot be written (permission denied)"
        if not os.access(folder, os.W_OK):  # a file that can be written over, in a folder that cannot take another
            return _trial_save_error(tempfile.gettempdir(), extension)
    return _trial_save_error(folder, extension)


def _pyplot_without_screen() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (the demo writes files; no screen is needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _trial_save_error(folder: str, extension: str) -> str | None:
    """Why matplotlib cannot save a figure as ``extension`` in ``folder`` (None when it can), found by saving one."""
    plt = _pyplot_without_screen()
    try:
        with tempfile.NamedTemporaryFile(dir=folder, suffix=f".{extension}") as trial:
            figure = plt.figure(figsize=(1, 1))
            figure.text(0.5, 0.5, "1")  # text too: pgf measures it with LaTeX
            try:
                figure.savefig(trial.name)
            finally:
                plt.close(figure)
    except Exception as error:  # noqa: BLE001 (any failure: the user's message)
        return f"matplotlib cannot save a .{extension} file in {folder!r} here: {type(error).__name__}: {error}"
    return None


def plot_runs(runs: list[DemoRun], path: str) -> None:
    """Draws the loss curves and the running statistics' distance to the whole-batch run, per step, to ``path``."""
    plt = _pyplot_without_screen()
    reference = runs[-1]
    figure, (losses, distance) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        steps = range(1, len(run.losses) + 1)
        style = {"color": "black", "linestyle": "--"} if run is reference else {}
        losses.plot(steps, run.losses, label=run.name, **style)
        if run is not reference:
            gaps = [_max_difference(a, b) for a, b in zip(run.buffer_history, reference.buffer_history, strict=True)]
            distance.plot(steps, gaps, label=run.name)
    losses.set(title="training loss", xlabel="step", ylabel="cross-entropy")
    distance.set(title="running statistics vs the whole batch", xlabel="step", ylabel="largest |difference|")
    distance.set_yscale("symlog", linthresh=1e-7)
    for axes in (losses, distance):
        axes.legend()
        axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def run_demo(
    replicas: int,
    steps: int,
    batch_per_replica: int,
    seed: int,
    processes: int = 1,
    plot: str | None = None,
    show_progress: bool | None = None,
) -> list[DemoRun]:
    """Trains the demo net three ways on the same data from the same initial weights; prints the table."""
    show = sys.stderr.isatty() if show_progress is None else show_progress
    args = (replicas, steps, batch_per_replica, seed, show, plot is not None)
    gpus = torch.cuda.device_count()
    per_process = gpus if processes == 1 and gpus >= 2 else replicas
    where = f"{gpus} GPUs" if processes == 1 and gpus >= 2 else f"{replicas} CPU replicas"
    if processes > 1:
        where = f"{processes} processes x {where}"
    batch = processes * per_process * batch_per_replica
    print(f"demo: {steps} steps, {where}, {batch_per_replica} images per replica (batch {batch})")
    runs = _train_all(0, 1, *args) if processes == 1 else _spawn(processes, args)
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
    if plot is not None:
        plot_runs(runs, plot)
        print(f"plot: {plot}")
    return runs
