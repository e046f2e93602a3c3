"""Scenarios of the multi-process test in which every rank must match one nn.BatchNorm model on the global batch.

Every rank builds the same model from the same seed and the same global batch; each takes its own slice (sizes
per rank given, an empty slice allowed) and compares what it gets with one nn.BatchNorm model run on the whole
global batch (float64). Run by ``distributed_worker.py``; each scenario returns its measures.
"""

from __future__ import annotations

import gc
import os
import weakref

import torch
import torch.distributed as dist
from torch import nn

import syncbn_ext

C = 3


def make_models(
    layer: str, group: object, momentum: float | None = 0.1, track_running_stats: bool = True
) -> tuple[nn.Module, nn.Module]:
    """(synchronized model, nn.BatchNorm reference) with the same initial state."""

    def norm(plain: bool, dims: int) -> nn.Module:
        options = {"momentum": momentum, "track_running_stats": track_running_stats}
        if plain:
            return {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[dims](C, **options)
        if layer == "SyncBatchNorm":
            return syncbn_ext.SyncBatchNorm(C, process_group=group, **options)
        cls = {1: syncbn_ext.SynchronizedBatchNorm1d, 2: syncbn_ext.SynchronizedBatchNorm2d}[dims]
        return cls(C, process_group=group, **options)

    def build(plain: bool) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(2, C, 3, padding=1),
            norm(plain, 2),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(4 * C, C),
            norm(plain, 1),
        ).double()

    model, reference = build(False), build(True)
    with torch.no_grad():
        for p in reference.parameters():
            p.uniform_(-1, 1)
    model.load_state_dict(reference.state_dict())
    return model, reference


def global_batch(step: int, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    x = torch.randn(total, 2, 5, 5, generator=generator, dtype=torch.float64) * 2 + 1
    grad = torch.randn(total, C, generator=generator, dtype=torch.float64)
    return x, grad


def wrap(model: nn.Module, replicas: int, parallel_backward: bool | None = None) -> nn.Module:
    if replicas == 1:
        return model
    return syncbn_ext.DataParallelWithCallback(
        model, device_ids=["cpu"] * replicas, parallel_backward=parallel_backward
    )


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.0 if a.numel() == 0 else (a - b).abs().max().item()


def same_on_every_rank(tensor: torch.Tensor, group: object) -> bool:
    if group is None:
        return True
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, tensor.contiguous(), group=group)
    return all(torch.equal(t, gathered[0]) for t in gathered)


def measure_buffers(errors: dict, model: nn.Module, reference: nn.Module) -> None:
    """Raises ``errors["buffers"]`` to the largest difference between the models' buffers."""
    for b, b_ref in zip(model.buffers(), reference.buffers(), strict=True):
        errors["buffers"] = max(errors["buffers"], max_error(b.double(), b_ref.double()))


def compare_step(errors: dict, run: object, reference: nn.Module, x: torch.Tensor, grad: torch.Tensor, mine: slice):
    """Forward and backward of ``run`` on this rank's rows ``mine`` of the global batch and of ``reference`` on all of
    it; raises ``errors["output"]`` and ``errors["input_grad"]`` to this rank's differences."""
    x_mine = x[mine].clone().requires_grad_()
    x_ref = x.clone().requires_grad_()
    y = run(x_mine)
    y.backward(grad[mine])
    y_ref = reference(x_ref)
    y_ref.backward(grad)
    errors["output"] = max(errors["output"], max_error(y, y_ref[mine]))
    errors["input_grad"] = max(errors["input_grad"], max_error(x_mine.grad, x_ref.grad[mine]))


def with_final_state(errors: dict, model: nn.Module, group: object) -> dict:
    """``errors`` with whether every rank of ``group`` holds the same buffers and each layer's num_batches_tracked."""
    errors["buffers_equal_on_every_rank"] = all(same_on_every_rank(b, group) for b in model.buffers())
    errors["num_batches_tracked"] = [
        m.num_batches_tracked.item() for m in model.modules() if getattr(m, "num_batches_tracked", None) is not None
    ]
    return errors


WORLD = "world"  # the default group, looked up once torch.distributed is initialized


def run_steps(model, reference, run, sizes, rank, steps, ddp_world=None, members=None, group=WORLD, before_step=None):
    """Trains both on the global batch (each rank its slice); the largest errors of each quantity.

    ``members``: the ranks this one synchronizes with (default all), whose batch the reference runs on; ``group``
    their process group (``None``: this rank alone); ``before_step(step)`` is called before each step.
    """
    members = list(range(len(sizes))) if members is None else members
    group = dist.group.WORLD if group == WORLD else group
    total = sum(sizes)
    start = sum(sizes[:rank])
    mine = slice(start, start + sizes[rank])
    errors = {"output": 0.0, "input_grad": 0.0, "param_grad": 0.0, "buffers": 0.0}
    for step in range(steps):
        if before_step is not None:
            before_step(step)
        x, grad = global_batch(step, total)
        model.zero_grad()
        reference.zero_grad()
        x_mine = x[mine].clone().requires_grad_()
        y = run(x_mine)
        y.backward(grad[mine])
        # The reference: one model on the batch of the ranks that synchronize together.
        rows = torch.cat([torch.arange(sum(sizes[:r]), sum(sizes[: r + 1])) for r in members])
        x_ref = x[rows].clone().requires_grad_()
        y_ref = reference(x_ref)
        y_ref.backward(grad[rows])
        offset = sum(sizes[r] for r in members if r < rank)
        here = slice(offset, offset + sizes[rank])
        errors["output"] = max(errors["output"], max_error(y, y_ref[here]))
        errors["input_grad"] = max(errors["input_grad"], max_error(x_mine.grad, x_ref.grad[here]))
        for p, p_ref in zip(model.parameters(), reference.parameters(), strict=True):
            if p.grad is None and p_ref.grad is None:  # a layer left out of this step
                continue
            g = p.grad.clone()
            if ddp_world is None:
                if group is not None:
                    dist.all_reduce(g, group=group)  # each rank holds its share of the global batch's gradient
                expected = p_ref.grad
            else:
                expected = p_ref.grad / ddp_world  # DistributedDataParallel averages
            errors["param_grad"] = max(errors["param_grad"], max_error(g, expected))
        measure_buffers(errors, model, reference)
    return with_final_state(errors, model, group)


def scenario_parity(rank, world, replicas, sizes):
    results = {}
    for layer in ("SyncBatchNorm", "SynchronizedBatchNorm"):
        for momentum in (0.1, None):
            group = None if layer == "SyncBatchNorm" else dist.group.WORLD
            model, reference = make_models(layer, group, momentum)
            results[f"{layer}/{momentum}"] = run_steps(model, reference, wrap(model, replicas), sizes, rank, steps=3)
    return results


def _threads() -> int:
    """This process's OS threads (Linux)."""
    return len(os.listdir("/proc/self/task"))


def scenario_own_communicator(rank, world, replicas, sizes):
    """A training step's exchanges go through the layers' own communicator: the default group (whatever wraps its
    backend: TORCH_DISTRIBUTED_DEBUG=DETAIL) sees none of them."""
    from syncbn_ext import distributed

    group = dist.group.WORLD
    # A device the group does not serve with gloo (as CUDA tensors on a "cpu:gloo,cuda:nccl" group): its own
    # backend, and no communicator made for it.
    other_device_unchanged = distributed.exchange_group(group, "probe", torch.device("meta")) is group
    made_for_other_device = distributed._own_groups.get(group) is not None
    model, _ = make_models("SyncBatchNorm", None)
    x, grad = global_batch(0, sum(sizes))
    before = group._get_sequence_number_for_group()
    model(x[: sizes[rank]]).backward(grad[: sizes[rank]])
    return {
        "own_communicator": isinstance(distributed._own_groups.get(group), dist.ProcessGroup),
        "user_group_collectives": group._get_sequence_number_for_group() - before,
        "other_device_unchanged": other_device_unchanged and not made_for_other_device,
    }


def scenario_released(rank, world, replicas, sizes):
    """A group our layers synchronized over (under DDP over the same group) is freed by ``destroy_process_group``
    once DDP and the layers given the group are gone, without a garbage collection: nothing else of ours (replicas,
    exchanges, shared memory) holds it, so gloo's threads end there and not at interpreter exit (README's "Ending
    the script"). Measured twice: the group's Python object is gone, and so are the threads gloo started for it."""
    before = _threads()
    group = dist.new_group(list(range(world)))
    group_threads = _threads() - before
    model, reference = make_models("SyncBatchNorm", group)
    ddp = nn.parallel.DistributedDataParallel(wrap(model, replicas), process_group=group)
    errors = run_steps(model, reference, ddp, sizes, rank, steps=2, ddp_world=world, group=group)
    transport = syncbn_ext.cross_process_transport(group)
    released = weakref.ref(group)
    del ddp, model, group  # the layers hold the group they were given, as torch's SyncBatchNorm does
    gc.disable()  # a collection now could free what a reference cycle holds; that would not count
    try:
        before = _threads()
        dist.destroy_process_group(released())
        freed = released() is None
        threads_ended = before - _threads()
    finally:
        gc.enable()
    return {
        "parity": errors,
        "transport": transport,
        "freed": freed,
        "group_threads": group_threads,
        "threads_ended": threads_ended,
    }


def scenario_subgroup(rank, world, replicas, sizes):
    members = [0, 1]
    group = dist.new_group(members)  # every rank calls new_group; rank 2 is not a member
    model, reference = make_models("SyncBatchNorm", group)
    inside = rank in members
    return run_steps(
        model,
        reference,
        wrap(model, replicas),
        sizes,
        rank,
        steps=2,
        members=members if inside else [rank],
        group=group if inside else None,
    )


def scenario_two_groups_in_threads(rank, world, replicas, sizes, timeout):
    """Two models on two groups over the same ranks, each trained from a thread of its own; rank 0 reaches group A's
    first synchronized call first, the other ranks B's. Each group's set-up of the layers' communicator waits for
    that group's ranks only (a process-wide lock held through a set-up made each rank's second thread wait for its
    first, which waited for the other rank's second: both groups failed at the timeout, and stayed broken)."""
    import datetime
    import threading
    import time

    groups = {name: dist.new_group(timeout=datetime.timedelta(seconds=timeout)) for name in "AB"}
    models = {name: make_models("SyncBatchNorm", group) for name, group in groups.items()}
    first = "A" if rank == 0 else "B"
    results: dict = {}

    def train(name: str) -> None:
        if name != first:
            time.sleep(0.5)
        model, reference = models[name]
        try:
            results[name] = run_steps(model, reference, wrap(model, replicas), sizes, rank, 2, group=groups[name])
        except Exception as error:  # reported in the result: the other thread's outcome is wanted too
            results[name] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}

    threads = [threading.Thread(target=train, args=(name,)) for name in "AB"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


class ChannelsNet(nn.Module):
    """Synchronized layers of 3, 5, 3 and 3 channels; ``skip_middle`` leaves out the 5- and second 3-channel ones."""

    def __init__(self, norm2d, norm1d) -> None:
        super().__init__()
        self.skip_middle = False
        self.first = nn.Sequential(nn.Conv2d(2, C, 3, padding=1), norm2d(C), nn.ReLU())
        self.middle = nn.Sequential(nn.Conv2d(C, 5, 1), norm2d(5), nn.ReLU(), nn.Conv2d(5, C, 1), norm2d(C))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * C, C), norm1d(C))

    def forward(self, x):
        x = self.first(x)
        return self.head(x if self.skip_middle else self.middle(x))


def count_exchanges(step) -> dict[str, int]:
    """The all-gathers ``step()`` makes on this rank, on any thread (replicas' masters issue them), by transport:
    the group's backend (``c10d``) or the same-host shared memory (``shared_memory``)."""
    from torch._C._profiler import _ExperimentalConfig
    from torch.profiler import ProfilerActivity, profile

    with profile(
        activities=[ProfilerActivity.CPU], experimental_config=_ExperimentalConfig(profile_all_threads=True)
    ) as prof:
        step()
    names = [event.name for event in prof.events()]
    return {
        "c10d": sum(1 for name in names if name.startswith("c10d::allgather")),
        "shared_memory": sum(1 for name in names if name == "syncbn::shared_memory_allgather"),
    }


def scenario_channels(rank, world, replicas, sizes):
    """Layers of different channel counts, called in a changing order (the first exchange of each call is sized
    by what followed the previous layer last time: too small, then too large): parity, and in a repeated order
    one all-gather per synchronized call forward and one backward."""
    torch.manual_seed(0)
    reference = ChannelsNet(nn.BatchNorm2d, nn.BatchNorm1d).double()
    with torch.no_grad():
        for p in reference.parameters():
            p.uniform_(-1, 1)
    model = ChannelsNet(syncbn_ext.SyncBatchNorm, syncbn_ext.SyncBatchNorm).double()
    model.load_state_dict(reference.state_dict())
    order = [False, False, True, False, False]  # skip the middle at step 2

    def before_step(step: int) -> None:
        model.skip_middle = reference.skip_middle = order[step]

    run = wrap(model, replicas)
    errors = run_steps(model, reference, run, sizes, rank, steps=len(order), before_step=before_step)
    x, grad = global_batch(9, sum(sizes))
    mine = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    errors["exchanges_per_step"] = count_exchanges(lambda: run(x[mine]).backward(grad[mine]))
    errors["transport"] = syncbn_ext.cross_process_transport()
    return errors


WIDE = 5000  # channels: rows larger than a shared-memory slot (64 KiB: 4093 channels)


def scenario_wide(rank, world, replicas, sizes):
    """A layer too wide for the shared-memory slots: every rank's rows go through the group's backend (after their
    sizes, through shared memory where it is used)."""
    torch.manual_seed(0)
    model, reference = syncbn_ext.SyncBatchNorm(WIDE).double(), nn.BatchNorm1d(WIDE).double()
    run = wrap(model, replicas)
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(sum(sizes), WIDE, generator=generator, dtype=torch.float64)
    grad = torch.randn(sum(sizes), WIDE, generator=generator, dtype=torch.float64)
    mine = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    x_mine, x_ref = x[mine].clone().requires_grad_(), x.clone().requires_grad_()
    outputs = []

    def step() -> None:
        outputs.append(run(x_mine))
        outputs[-1].backward(grad[mine])

    step()
    y_ref = reference(x_ref)
    y_ref.backward(grad)
    errors = {
        "output": max_error(outputs[0], y_ref[mine]),
        "running_var": max_error(model.running_var, reference.running_var),
        "input_grad": max_error(x_mine.grad, x_ref.grad[mine]),
    }
    step()
    exchanges = count_exchanges(step)  # sized by the channels of the steps before: one all-gather each way
    return {
        **errors,
        "exchanges_per_step": exchanges,
    }


def scenario_large_mean(rank, world, replicas, sizes):
    """float32 data with a mean large next to its spread, each rank's rows another mean: the merged running
    statistics' errors against float64, and nn.BatchNorm's own float32 errors on the global batch."""
    total = sum(sizes)
    generator = torch.Generator().manual_seed(9)
    x64 = 1e5 + torch.randn(total, C, 6, 6, generator=generator, dtype=torch.float64)
    x64 += torch.arange(total, dtype=torch.float64).view(-1, 1, 1, 1)  # rows of other means on every rank
    x = x64.float()
    mine = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    ours = syncbn_ext.SyncBatchNorm(C, momentum=1.0)  # momentum 1: the running statistics are the batch's
    ref32, ref64 = nn.BatchNorm2d(C, momentum=1.0), nn.BatchNorm2d(C, momentum=1.0, dtype=torch.float64)
    with torch.no_grad():
        wrap(ours, replicas)(x[mine])
        ref32(x)
        ref64(x.double())

    def errors(model: nn.Module) -> dict:
        var = ((model.running_var.double() - ref64.running_var) / ref64.running_var).abs().max().item()
        return {"var": var, "mean": max_error(model.running_mean.double(), ref64.running_mean)}

    return {"ours": errors(ours), "nn.BatchNorm": errors(ref32)}


def scenario_eval(rank, world, replicas, sizes):
    model, reference = make_models("SyncBatchNorm", None)
    run_steps(model, reference, wrap(model, replicas), sizes, rank, steps=1)
    model.eval()
    reference.eval()
    x, _ = global_batch(7, max(sizes[rank], 2))
    with torch.no_grad():
        errors = {"output": max_error(wrap(model, replicas)(x), reference(x))}
    # Batch statistics in eval mode (track_running_stats=False) stay within the process, as torch.nn.SyncBatchNorm's
    # do: rank 0 evaluates alone (a common validation loop) and its replicas normalize with rank 0's batch, while
    # the other ranks wait at the barrier. Then a training step together: the ranks are still in step.
    for layer in ("SyncBatchNorm", "SynchronizedBatchNorm"):
        group = None if layer == "SyncBatchNorm" else dist.group.WORLD
        model, reference = make_models(layer, group, track_running_stats=False)
        model.eval()
        reference.eval()
        if rank == 0:
            with torch.no_grad():
                errors[f"{layer}/rank 0 alone"] = max_error(wrap(model, replicas)(x), reference(x))
        dist.barrier()
        model.train()
        reference.train()
        step = run_steps(model, reference, wrap(model, replicas), sizes, rank, steps=1)
        errors[f"{layer}/then a step"] = max(step[quantity] for quantity in ("output", "input_grad", "param_grad"))
    return errors


def scenario_double_backward(rank, world, replicas, sizes):
    """A gradient penalty through layers that merge across processes (through the replicas' serial backward), two
    steps: the input's gradient under create_graph, then the penalty's gradients (summed over the ranks: the penalty
    of the global batch's input gradient), match the reference's on the global batch."""
    model, reference = make_models("SyncBatchNorm", None)
    run = wrap(model, replicas, parallel_backward=False)
    mine = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    errors = {"input_grad": 0.0, "penalty_input_grad": 0.0, "penalty_param_grad": 0.0, "buffers": 0.0}
    for step in range(2):
        model.zero_grad()
        reference.zero_grad()
        x, _ = global_batch(step, sum(sizes))
        x_mine = x[mine].clone().requires_grad_()
        x_ref = x.clone().requires_grad_()
        (grad,) = torch.autograd.grad(run(x_mine).pow(3).sum(), x_mine, create_graph=True)
        (grad_ref,) = torch.autograd.grad(reference(x_ref).pow(3).sum(), x_ref, create_graph=True)
        errors["input_grad"] = max(errors["input_grad"], max_error(grad, grad_ref[mine]))
        grad.square().sum().backward()
        grad_ref.square().sum().backward()
        penalty_grad = x_mine.grad if x_mine.grad is not None else torch.zeros_like(x_mine)  # an empty slice's
        errors["penalty_input_grad"] = max(errors["penalty_input_grad"], max_error(penalty_grad, x_ref.grad[mine]))
        for p, p_ref in zip(model.parameters(), reference.parameters(), strict=True):
            g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)  # none on an empty rank
            dist.all_reduce(g)  # each rank holds its share
            errors["penalty_param_grad"] = max(errors["penalty_param_grad"], max_error(g, p_ref.grad))
        measure_buffers(errors, model, reference)
    return errors
