"""Scenarios of the multi-process test in which ranks disagree, stall, exit or are interrupted: each must end in a
prompt, clear error on every rank. Run by ``distributed_worker.py``; each scenario returns its measures or raises.
Failed forwards told to the other ranks: ``distributed_failed_forwards.py``; checkpoints:
``distributed_checkpoints.py``; gradients of some tensors only: ``distributed_restricted_backward.py``; ranks
interrupted or failing to set up their communicator: ``distributed_interrupts.py``.
"""

from __future__ import annotations

import contextlib
import copy
import os
import pickle
import time

import torch
import torch.distributed as dist
from distributed_parity import C, with_final_state, wrap
from distributed_restricted_backward import seeded_model_and_batch
from torch import nn
from torch.distributed.algorithms.join import Join

import syncbn_ext


class TwoLayers(nn.Module):
    """Calls a then b on rank 0, b then a elsewhere: ranks at different layers."""

    def __init__(self, rank):
        super().__init__()
        self.rank = rank
        self.a = syncbn_ext.SyncBatchNorm(C).double()
        self.b = syncbn_ext.SyncBatchNorm(C).double()

    def forward(self, x):
        return self.b(self.a(x)) if self.rank == 0 else self.a(self.b(x))


def scenario_mismatch(rank, world, replicas, sizes):
    model = TwoLayers(rank)
    wrap(model, replicas)(torch.randn(4, C, dtype=torch.float64))
    return {"ran": True}


def scenario_copied_on_one_rank(rank, world, replicas, sizes):
    """Rank 0 alone deep-copies and unpickles a model of synchronized layers (an EMA copy, a checkpoint), then every
    rank builds and trains another: the copies keep their layers' numbers, so the ranks number the new layers alike."""
    first = TwoLayers(0)
    if rank == 0:
        copy.deepcopy(first)
        pickle.loads(pickle.dumps(first))
    second = syncbn_ext.convert_model(nn.Sequential(nn.BatchNorm1d(C)).double(), process_group=dist.group.WORLD)
    third = syncbn_ext.SyncBatchNorm(C).double()
    x = torch.randn(4, C, dtype=torch.float64)
    wrap(nn.Sequential(second, third), replicas)(x).sum().backward()
    return {"ran": True, "ids": [second[0]._layer_id, third._layer_id]}


class LayersOfDifferentWidths(nn.Module):
    """a (3 channels) then b (5) on every rank while ``agree``; then a on rank 0 and b elsewhere."""

    def __init__(self, rank):
        super().__init__()
        self.rank, self.agree = rank, True
        self.a = syncbn_ext.SyncBatchNorm(C).double()
        self.b = syncbn_ext.SyncBatchNorm(5).double()

    def forward(self, x3, x5):
        if self.agree:
            return self.a(x3).sum() + self.b(x5).sum()
        return self.a(x3).sum() if self.rank == 0 else self.b(x5).sum()


def scenario_mismatch_widths(rank, world, replicas, sizes):
    """Ranks at layers of different channel counts, after steps in which every rank learned the widths."""
    model = LayersOfDifferentWidths(rank)
    run = wrap(model, replicas)
    x3, x5 = torch.randn(4, C, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    for _ in range(2):
        run(x3, x5)
    model.agree = False
    run(x3, x5)
    return {"ran": True}


GAVE_UP = "ranks that gave up waiting for rank 1"


class StuckOnRank1(nn.Module):
    """Rank 1 never reaches its synchronized layer within the group's timeout: it waits until every other rank gave
    up (:func:`_giving_up_on_rank_1`), or ``seconds`` at most, then exits."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.armed = True

    def forward(self, x):
        if self.armed and dist.get_rank() == 1:
            store, deadline = dist.distributed_c10d._get_default_store(), time.monotonic() + self.seconds
            while store.add(GAVE_UP, 0) < dist.get_world_size() - 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            os._exit(0)  # the group timed out: nothing to tear down collectively
        return x


@contextlib.contextmanager
def _giving_up_on_rank_1():
    """On the ranks but 1: says so to rank 1 once the block ended (they gave up waiting for it), so that it leaves
    then rather than after a fixed time (the test's own time)."""
    try:
        yield
    finally:
        if dist.get_rank() != 1:
            dist.distributed_c10d._get_default_store().add(GAVE_UP, 1)


def scenario_absent(rank, world, replicas, sizes, timeout):
    model = nn.Sequential(StuckOnRank1(timeout + 30), syncbn_ext.SyncBatchNorm(C)).double()
    with _giving_up_on_rank_1():
        wrap(model, replicas)(torch.randn(4, C, dtype=torch.float64))
    return {"ran": True}


def scenario_absent_later(rank, world, replicas, sizes, timeout):
    """One step together, then rank 1 never reaches its synchronized layer within the group's timeout."""
    model = nn.Sequential(StuckOnRank1(timeout + 30), syncbn_ext.SyncBatchNorm(C)).double()
    run = wrap(model, replicas)
    x = torch.randn(4, C, dtype=torch.float64)
    model[0].armed = False
    run(x)  # every rank: one synchronized call
    model[0].armed = True
    with _giving_up_on_rank_1():
        run(x)
    return {"ran": True}


def scenario_late_past_the_timeout(rank, world, replicas, sizes):
    """Two steps together, then rank 1 comes to its next synchronized call only after rank 0 gave up waiting for it
    (the group's timeout, 3 s: set by the test), in a training step without grad (statistics recalibrated): rank 1
    must fail too, writing nothing. Through shared memory it found rank 0's abandoned row and completed the
    exchange with it, writing its running statistics (failing only at its next exchange, if any)."""
    model = syncbn_ext.SyncBatchNorm(C).double()
    run = wrap(model, replicas)
    x = torch.randn(4, C, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    for _ in range(2):  # (from then on, a call's statistics need one exchange: the channels' count is known)
        run(x).square().sum().backward()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    store = dist.distributed_c10d._get_default_store()
    if rank == 1:
        deadline = time.monotonic() + 60
        while store.add(GAVE_UP, 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
    outcome = {}
    try:
        with torch.no_grad():
            run(x)
    except Exception as error:
        outcome = {"error": type(error).__name__, "message": str(error)}
    if rank == 0:
        store.add(GAVE_UP, 1)
    state = model.state_dict()
    outcome["untouched"] = all(torch.equal(state[name], value) for name, value in before.items())
    return outcome


def scenario_exited(rank, world, replicas, sizes):
    """One step together, then rank 1's process exits: the others are told so (not after the group's timeout)."""
    model = syncbn_ext.SyncBatchNorm(C).double()
    run = wrap(model, replicas)
    x = torch.randn(4, C, dtype=torch.float64)
    run(x)
    if rank == 1:
        os._exit(0)
    run(x)
    return {"ran": True}


def scenario_slow_rank(rank, world, replicas, sizes):
    """After a step together, rank 1 reaches its synchronized layer 3 s late: past $SYNCBN_TIMEOUT (1 s, set by the
    test) but within the group's timeout. The others wait for it, their replicas too (a wait for other ranks is
    bounded by the group's timeout, not by the barrier's), and every rank ends with the same buffers."""
    model = nn.Sequential(nn.Linear(C, C), syncbn_ext.SyncBatchNorm(C)).double()
    run = wrap(model, replicas)
    x = torch.randn(4, C, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    run(x).sum().backward()
    if rank == 1:
        time.sleep(3.0)
    start = time.monotonic()
    run(x).square().sum().backward()
    return with_final_state({"seconds": time.monotonic() - start}, model, dist.group.WORLD)


def scenario_steps(rank, world, replicas, sizes):
    """Rank 0 runs backward while the others already run the next forward: ranks at different steps."""
    model = syncbn_ext.SyncBatchNorm(C).double()
    run = wrap(model, replicas)
    x = torch.randn(4, C, dtype=torch.float64, requires_grad=True)
    y = run(x)
    if rank == 0:
        y.sum().backward()
    else:
        run(x)
    return {"ran": True}


def scenario_unused_output(rank, world, replicas, sizes):
    """Rank 1's loss does not use the synchronized layer's output (a branch taken on rank 1 only): its backward
    makes no exchange for the call, and it moves on to the next step's forward while rank 0 sums gradients."""
    model = nn.Sequential(nn.Linear(C, C), syncbn_ext.SyncBatchNorm(C)).double()
    head = nn.Linear(C, 1).double()
    run = wrap(model, replicas)
    x = torch.randn(4, C, dtype=torch.float64)
    for _ in range(2):
        y = run(x)
        (head(y) if rank == 0 else head(model[0](x))).sum().backward()
    return {"ran": True}


def scenario_skipped_step(rank, world, replicas, sizes):
    """A training loop that catches a failed step and goes on: rank 1 raises once between forward and backward (in its
    loss). Rank 0's backward then meets rank 1's next forward, and both fail; from there the ranks count their calls
    on alike, so their following steps pair again (before, every later step failed, one call apart for good)."""
    model = nn.Sequential(nn.Linear(C, C), syncbn_ext.SyncBatchNorm(C), syncbn_ext.SyncBatchNorm(C)).double()
    run = wrap(model, replicas)
    x = torch.randn(4, C, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    errors = {}
    for step in range(4 if rank == 0 else 5):  # rank 1 loses one step more: its step 2 met rank 0's step 1
        try:
            loss = run(x).square().sum()
            if rank == 1 and step == 1:
                raise ValueError("a bad batch")
            loss.backward()
        except Exception as error:
            errors[step] = [type(error).__name__, str(error)]
    return with_final_state({"errors": errors}, model, dist.group.WORLD)


def scenario_input_grad_on_one_rank(rank, world, replicas, sizes):
    """The synchronized layer's input requires grad on rank 0 only: rank 0's input gradient needs rank 1's part of
    the backward, which rank 1 would never make. Every rank fails in the forward, saying so; a step with inputs alike
    afterwards works."""
    model = syncbn_ext.SyncBatchNorm(C).double()
    run = wrap(model, replicas)
    x = torch.randn(4, C, dtype=torch.float64)
    outcome = {}
    try:
        run(x.clone().requires_grad_(rank == 0)).square().sum().backward()
    except Exception as error:
        outcome = {"error": type(error).__name__, "message": str(error)}
    run(x.clone().requires_grad_()).square().sum().backward()
    return with_final_state(outcome, model, dist.group.WORLD)


def scenario_channels_differ(rank, world, replicas, sizes):
    """The same layer built with 3 channels on rank 0 and 4 elsewhere (a user's bug)."""
    channels = C if rank == 0 else C + 1
    wrap(syncbn_ext.SyncBatchNorm(channels).double(), replicas)(torch.randn(4, channels, dtype=torch.float64))
    return {"ran": True}


def scenario_channels_differ_in_subgroup(rank, world, replicas, sizes):
    """In a world of 3, the layer on the subgroup of ranks 1 and 2 built with one channel more on rank 2: the error
    lists the group's own rank numbers (0, 1) and says which global ranks they are (1, 2)."""
    from syncbn_ext.distributed import _where

    group = dist.new_group([1, 2])  # every rank calls new_group; rank 0 is not a member
    if rank == 0:
        return {"ran": True}
    channels = C if rank == 1 else C + 1
    layer = wrap(syncbn_ext.SyncBatchNorm(channels, process_group=group).double(), replicas)
    try:
        layer(torch.randn(4, channels, dtype=torch.float64))
    except Exception as error:
        return {"error": [type(error).__name__, str(error)], "set_up_where": _where(group, "layer")}
    return {"error": None}


def scenario_refused_input(rank, world, replicas, sizes):
    """Rank 1 feeds batches its synchronized layers refuse: 4-D input to a SynchronizedBatchNorm1d (refused in Python),
    one channel too many (refused in C++), then 1-D input to a SyncBatchNorm (refused in its own forward) and a float8
    one (a type batch_norm does not compute in: refused in C++). Every rank must fail those steps (rank 1 with its own
    error), and the steps after must pair as before; before, rank 0 merged its step with rank 1's next one, silently."""
    model = syncbn_ext.SynchronizedBatchNorm1d(C, momentum=None, process_group=dist.group.WORLD).double()
    drop_in = syncbn_ext.SyncBatchNorm(C, momentum=None).double()
    run, run_drop_in = wrap(model, replicas), wrap(drop_in, replicas)
    x = torch.randn(4, C, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    bad = {1: torch.randn(4, C, 2, 2, dtype=torch.float64), 2: torch.randn(4, C + 1, dtype=torch.float64)}
    errors = {}
    bad.update({4: torch.randn(4, dtype=torch.float64), 5: x.to(torch.float8_e4m3fn)})
    for step in range(7):
        layer_run = run if step < 4 else run_drop_in
        batch = bad.get(step, x) if rank == 1 else x
        try:
            layer_run(batch).square().sum().backward()
        except Exception as error:
            errors[step] = [type(error).__name__, str(error)]
    outcome = with_final_state({"errors": errors}, model, dist.group.WORLD)
    outcome["drop_in"] = with_final_state({}, drop_in, dist.group.WORLD)
    return outcome


LATE_IN_BACKWARD = {"armed": False}


class FirstLayerWithoutGradWhereMarked(nn.Module):
    """A replica whose batch is marked runs ``lin`` and ``bn1`` without grad (its backward task has no merge of
    ``bn1`` to run, and returns while the others run it); rank 1, once armed, is 3 s late in its backward between
    ``bn2``'s merge and ``bn1``'s."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(C, C)
        self.bn1, self.bn2 = syncbn_ext.SyncBatchNorm(C), syncbn_ext.SyncBatchNorm(C)

    def forward(self, x):
        with torch.set_grad_enabled(torch.is_grad_enabled() and not bool(x[0, 0] > 100)):
            h = self.bn1(self.lin(x))
        if LATE_IN_BACKWARD["armed"] and dist.get_rank() == 1 and h.requires_grad:
            h = h.clone()
            h.register_hook(lambda grad: (time.sleep(3.0), grad)[1])
        return self.bn2(h) + self.lin(x)


def scenario_slow_rank_in_backward(rank, world, replicas, sizes):
    """Rank 1 is 3 s late in its backward, past $SYNCBN_TIMEOUT (1 s, set by the test) but within the group's
    timeout, while rank 0's first replica's backward task has returned (no merge of ``bn1`` to run): its other
    replica, waiting for rank 1 in ``bn1``'s merge, is waited for (the group's timeout bounds a wait for other ranks),
    not given up on $SYNCBN_TIMEOUT after the first task's return."""
    model, run, x = seeded_model_and_batch(FirstLayerWithoutGradWhereMarked, rank, replicas, sizes, True)
    if rank == 0:
        x[0, 0] += 1000
    run(x).square().sum().backward()  # a step together
    LATE_IN_BACKWARD["armed"] = True
    start = time.monotonic()
    run(x).square().sum().backward()
    return with_final_state({"seconds": time.monotonic() - start}, model, dist.group.WORLD)


def train_unevenly(rank, replicas, throw_on_early_termination):
    """DistributedDataParallel under DDP's ``Join``: rank 0 has one batch, the others two. Returns the model, its DDP,
    this rank's batch and what the Join context raised on this rank (``{}``: nothing; else its type and message,
    not the exception, whose traceback would keep the DDP, and so the group, alive past the scenario)."""
    model = nn.Sequential(nn.Linear(C, C), syncbn_ext.SyncBatchNorm(C)).double()
    ddp = nn.parallel.DistributedDataParallel(wrap(model, replicas))
    x = torch.randn(4, C, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    raised = {}
    try:
        with Join([ddp], throw_on_early_termination=throw_on_early_termination):
            for _ in range(1 if rank == 0 else 2):
                ddp(x).sum().backward()
    except Exception as error:  # Join's own error, or a timeout
        raised = {"error": type(error).__name__, "message": str(error)}
    return model, ddp, x, raised


def scenario_join_throw(rank, world, replicas, sizes):
    """Uneven inputs under ``Join(..., throw_on_early_termination=True)``: every rank gets Join's error at the start
    of the step rank 0 lacks, before any synchronized exchange, so the ranks stay in step: one more step together
    gives every rank the same buffers."""
    model, ddp, x, raised = train_unevenly(rank, replicas, throw_on_early_termination=True)
    ddp(x).sum().backward()  # every rank, after the Join error
    outcome = {"join_error": raised.get("error"), "join_message": raised.get("message")}
    return with_final_state(outcome, model, dist.group.WORLD)


def scenario_join_shadowing(rank, world, replicas, sizes):
    """Uneven inputs under ``Join`` without ``throw_on_early_termination``: rank 0, out of inputs, shadows DDP's
    collectives but not our exchanges, so the others wait in their first synchronized layer until the group's
    timeout, which names it."""
    return train_unevenly(rank, replicas, throw_on_early_termination=False)[3]
