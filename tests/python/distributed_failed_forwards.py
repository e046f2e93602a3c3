"""Scenarios of the multi-process test in which a rank's forward fails (before, between or after its synchronized
calls, under the wrappers, DDP or announcing_failure blocks, on one group or two): every rank must fail those steps
promptly, naming the rank, and the steps after must pair again. Run by ``distributed_worker.py``.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

import torch
import torch.distributed as dist
from distributed_parity import C, same_on_every_rank, with_final_state, wrap
from replica_modules import CpuDataParallel
from torch import nn

import syncbn_ext


class RaisesBetweenLayers(nn.Module):
    """Two synchronized layers; raises between them while ``fail`` is set (after the forward's first synchronized
    call)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(C, C)
        self.first, self.second = syncbn_ext.SyncBatchNorm(C), syncbn_ext.SyncBatchNorm(C)
        self.fail = False

    def forward(self, x):
        h = self.first(self.linear(x))
        if self.fail:
            raise ValueError("a bad batch")
        return self.second(h)


def scenario_ddp_failed_forward(rank, world, replicas, sizes):
    """Under DistributedDataParallel(broadcast_buffers=False), rank 1's forward raises between two synchronized
    layers once and the loop goes on: rank 1's next forward meets rank 0 at the other layer and both fail; rank 1
    makes the step up and the following steps pair (with broadcast_buffers=True, DDP's broadcast at rank 1's next
    forward would wait for rank 0, which waits at the second layer: README says restart there)."""
    model = RaisesBetweenLayers().double()
    ddp = nn.parallel.DistributedDataParallel(wrap(model, replicas), broadcast_buffers=False)
    x = torch.randn(4, C, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    errors = {}
    for step in range(4 if rank == 0 else 5):  # rank 1's step 2 met rank 0's step 1
        model.fail = rank == 1 and step == 1
        try:
            ddp(x).square().sum().backward()
        except Exception as error:
            errors[step] = [type(error).__name__, str(error)]
    outcome = with_final_state({"errors": errors}, model, dist.group.WORLD)
    outcome["parameters_equal_on_every_rank"] = all(same_on_every_rank(p, dist.group.WORLD) for p in model.parameters())
    return outcome


class FailsBeforeItsLayers(nn.Module):
    """A linear layer, then two synchronized ones. Before them (before the forward's first synchronized call): raises
    while ``fail`` is "raise"; while it is "widen", gives the first one a channel too many, which it refuses."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(C, C)
        self.first, self.second = syncbn_ext.SyncBatchNorm(C), syncbn_ext.SyncBatchNorm(C)
        self.fail = None
        self.in_block = False  # the forward in an announcing_failure block of its own (in each replica too)
        self.seconds = 0.0  # slept first

    def forward(self, x):
        time.sleep(self.seconds)
        with syncbn_ext.announcing_failure(self) if self.in_block else contextlib.nullcontext():
            h = self.linear(x)
            if self.fail == "raise":
                raise ValueError("a bad batch")
            if self.fail == "widen":
                h = torch.cat([h, h[:, :1]], 1)
            return self.second(self.first(h))


def failing_before_first_call(
    rank,
    replicas,
    failing_ranks,
    ddp=None,
    one_device=False,
    in_block=False,
    block_inside=False,
    second_group=False,
    patched=False,
    pre_hook=False,
):
    """Steps in which the forward of each of ``failing_ranks`` fails before its first synchronized call, in every
    replica of that rank: at step 1 in the model's code, at step 3 a replica refusing the first layer's input. The
    other ranks' first call of those steps must fail, naming them, and the steps after must pair (before, those
    calls paired with the failing ranks' next forward: one step apart from then on). ``second_group``: the second
    layer exchanges on a group of its own (over the same ranks). ``patched``: under a patched nn.DataParallel
    (CpuDataParallel) instead; ``pre_hook``: at step 1 a forward pre-hook of the wrapper raises instead."""
    model = FailsBeforeItsLayers().double()
    model.in_block = block_inside
    if second_group:
        model.second.process_group = dist.new_group(list(range(dist.get_world_size())))
    run = wrap(model, replicas)
    if one_device and replicas == 1:  # the module as it is, under the wrapper
        run = syncbn_ext.DataParallelWithCallback(model, device_ids=["cpu"])
    if patched:
        run = syncbn_ext.patch(CpuDataParallel(model, replicas))
    if ddp:
        run = nn.parallel.DistributedDataParallel(run, broadcast_buffers=ddp == "broadcast_buffers")
    if pre_hook:

        def refuse(module, args):
            if model.fail == "raise":
                raise ValueError("a bad batch (a forward pre-hook of the wrapper)")

        run.register_forward_pre_hook(refuse)
    x = torch.randn(4, C, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    errors = {}
    for step in range(6):
        model.fail = {1: "raise", 3: "widen"}.get(step) if rank in failing_ranks else None
        try:
            with syncbn_ext.announcing_failure(model) if in_block else contextlib.nullcontext():
                out = run(x)
            out.square().sum().backward()
        except Exception as error:
            errors[step] = [type(error).__name__, str(error)]
    outcome = with_final_state({"errors": errors}, model, dist.group.WORLD)
    if ddp:  # the gradients DDP summed over the steps every rank completed
        outcome["grads_equal_on_every_rank"] = all(
            same_on_every_rank(p.grad, dist.group.WORLD) for p in model.parameters()
        )
    return outcome


def scenario_failed_before_first_call(rank, world, replicas, sizes):
    """Rank 1's forward (under DataParallelWithCallback) fails before its first synchronized call (see
    failing_before_first_call)."""
    return failing_before_first_call(rank, replicas, failing_ranks={1})


def scenario_failed_before_first_call_everywhere(rank, world, replicas, sizes):
    """Every rank's forward fails before its first synchronized call at the same steps: each one tells the others."""
    return failing_before_first_call(rank, replicas, failing_ranks=set(range(world)))


def scenario_failed_before_first_call_one_device(rank, world, replicas, sizes):
    """failed_before_first_call with each rank of one replica under DataParallelWithCallback(device_ids=["cpu"])."""
    return failing_before_first_call(rank, replicas, failing_ranks={1}, one_device=True)


def scenario_failed_before_first_call_in_pre_hook(rank, world, replicas, sizes):
    """failed_before_first_call, rank 1's step 1 failing in a forward pre-hook of its DataParallelWithCallback (one
    replica: device_ids=["cpu"])."""
    return failing_before_first_call(rank, replicas, failing_ranks={1}, one_device=True, pre_hook=True)


def scenario_patched_failed_before_first_call_in_pre_hook(rank, world, replicas, sizes):
    """failed_before_first_call_in_pre_hook under a patched nn.DataParallel."""
    return failing_before_first_call(rank, replicas, failing_ranks={1}, patched=True, pre_hook=True)


def scenario_failed_before_first_call_in_block(rank, world, replicas, sizes):
    """failed_before_first_call, each forward in a syncbn_ext.announcing_failure block."""
    return failing_before_first_call(rank, replicas, failing_ranks={1}, in_block=True)


def scenario_ddp_failed_before_first_call_in_block(rank, world, replicas, sizes):
    """failed_before_first_call under DistributedDataParallel (broadcast_buffers=True), each forward in a
    syncbn_ext.announcing_failure block."""
    return failing_before_first_call(rank, replicas, failing_ranks={1}, ddp="broadcast_buffers", in_block=True)


class _SlowToTell:
    """syncbn_ext's _C, whose announce_failed_forward starts 0.2 s late: every replica's block that would tell has
    checked the call count by then (else whether several tell depends on the threads' timing)."""

    def __init__(self, native):
        self.native = native

    def __getattr__(self, name):
        return getattr(self.native, name)

    def announce_failed_forward(self, *args):
        time.sleep(0.2)
        return self.native.announce_failed_forward(*args)


def scenario_failed_before_first_call_block_in_replicas(rank, world, replicas, sizes):
    """failed_before_first_call with the model's forward in an announcing_failure block of its own, run in every
    replica: the wrapper tells, once (before, each replica's block told too: the others failed one step more, then
    went on one step apart)."""
    import syncbn_ext.forward_across_processes as telling

    telling._C = _SlowToTell(telling._C)
    try:
        return failing_before_first_call(rank, replicas, failing_ranks={1}, block_inside=True)
    finally:
        telling._C = telling._C.native


def scenario_failed_behind_another_threads_forward(rank, world, replicas, sizes):
    """On rank 1, thread A's forward (slow before its first layer) and thread B's, started meanwhile, which waits for
    A's (training forwards of one wrapper run one after another) and fails before its first synchronized call;
    rank 0 runs two forwards, then both two more. Rank 0's second must fail naming rank 1 and the later ones pair
    (before, B counted A's calls as its own and told nothing: one step apart)."""
    model = FailsBeforeItsLayers().double()
    run = syncbn_ext.DataParallelWithCallback(model, device_ids=["cpu"] * max(replicas, 2))
    x = torch.randn(4, C, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    outcomes = {}

    def forward(name):  # no backward: A's would race with B's forward (threads of one rank have no set order)
        try:
            run(x)
            outcomes[name] = "ok"
        except Exception as error:
            outcomes[name] = f"{type(error).__name__}: {error}"

    if rank == 1:
        model.seconds = 1.0
        a = threading.Thread(target=forward, args=("first",))
        a.start()
        time.sleep(0.3)  # A replicated (its replicas sleep): B's replicas get fail and no sleep
        model.seconds, model.fail = 0.0, "raise"
        forward("second")
        a.join()
        model.fail = None
    else:
        forward("first")
        forward("second")
    forward("third")
    forward("fourth")
    return with_final_state({"outcomes": outcomes}, model, dist.group.WORLD)


def scenario_failed_forward_told_to_nobody(rank, world, replicas, sizes, timeout):
    """One step together; then rank 1's forward fails before its first synchronized call while rank 0 never comes
    (it leaves after the group's timeout): telling it times out, and rank 1's error says so in a note."""
    model = FailsBeforeItsLayers().double()
    run = wrap(model, replicas)
    x = torch.randn(4, C, dtype=torch.float64)
    run(x)
    if rank == 0:
        time.sleep(timeout + 2)
        os._exit(0)  # the group timed out: nothing to tear down collectively
    model.fail = "raise"
    try:
        run(x)
    except ValueError as error:
        return {"error": str(error), "notes": getattr(error, "__notes__", [])}
    return {"error": None}


def scenario_ddp_failed_before_first_call(rank, world, replicas, sizes):
    """failed_before_first_call under DistributedDataParallel(broadcast_buffers=False)."""
    return failing_before_first_call(rank, replicas, failing_ranks={1}, ddp="no_broadcast")


def scenario_ddp_broadcasting_failed_before_first_call(rank, world, replicas, sizes):
    """failed_before_first_call under DistributedDataParallel (its default broadcast_buffers=True)."""
    return failing_before_first_call(rank, replicas, failing_ranks={1}, ddp="broadcast_buffers")


def scenario_failed_before_first_call_on_two_groups(rank, world, replicas, sizes):
    """failed_before_first_call with the second layer on a group of its own: the failing rank tells both groups;
    the others fail at their first call, on the first group, and tell the second."""
    return failing_before_first_call(rank, replicas, failing_ranks={1}, second_group=True)


def scenario_failed_before_first_call_on_two_groups_in_block(rank, world, replicas, sizes):
    """failed_before_first_call_on_two_groups, each forward in a syncbn_ext.announcing_failure block."""
    return failing_before_first_call(rank, replicas, failing_ranks={1}, in_block=True, second_group=True)


class _TwoOnTheWorldThenOneOnItsOwnGroup(nn.Module):
    """Two synchronized layers on the default group, then one on a group of its own (over the same ranks); raises
    between the first two while ``fail``."""

    def __init__(self, world):
        super().__init__()
        self.a, self.b = syncbn_ext.SyncBatchNorm(C), syncbn_ext.SyncBatchNorm(C)
        self.c = syncbn_ext.SyncBatchNorm(C, process_group=dist.new_group(list(range(world))))
        self.fail = False

    def forward(self, x):
        h = self.a(x)
        if self.fail:
            raise ValueError("a bad batch between its layers")
        return self.c(self.b(h))


def scenario_failed_between_calls_on_one_of_two_groups(rank, world, replicas, sizes):
    """Rank 1's forward raising between its two calls on the default group at step 1, a later layer on a group of
    its own: nothing is told (its first call paired; the others wait at their second, on the default group, where
    telling the other group would have waited for them in vain, until the timeout); they meet rank 1's next forward
    there (a BarrierError on every rank), and after rank 1 makes up its step the ranks pair again, as with one
    group. Forwards in announcing_failure blocks where a rank has no wrapper."""
    model = _TwoOnTheWorldThenOneOnItsOwnGroup(world).double()
    run = wrap(model, replicas)
    x = torch.randn(4, C, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    errors = {}
    for step in range(5 if rank == 1 else 4):  # rank 1 makes up the step it failed
        model.fail = step == 1 and rank == 1
        started = time.monotonic()
        try:
            with syncbn_ext.announcing_failure(model):
                out = run(x)
            out.square().sum().backward()
        except Exception as error:
            errors[step] = [type(error).__name__, str(error), time.monotonic() - started]
    return with_final_state({"errors": errors}, model, dist.group.WORLD)
