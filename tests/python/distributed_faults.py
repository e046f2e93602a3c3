"""Scenarios of the multi-process test in which ranks disagree, stall, exit or are interrupted: each must end in a
prompt, clear error on every rank. Run by ``distributed_worker.py``; each scenario returns its measures or raises.
"""

from __future__ import annotations

import contextlib
import copy
import os
import pickle
import signal
import threading
import time

import torch
import torch.distributed as dist
from distributed_parity import C, same_on_every_rank, with_final_state, wrap
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


class StuckOnRank1(nn.Module):
    """Rank 1 never reaches its synchronized layer within the group's timeout."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.armed = True

    def forward(self, x):
        if self.armed and dist.get_rank() == 1:
            time.sleep(self.seconds)
            os._exit(0)  # the group timed out: nothing to tear down collectively
        return x


def scenario_absent(rank, world, replicas, sizes, timeout):
    model = nn.Sequential(StuckOnRank1(timeout + 5), syncbn_ext.SyncBatchNorm(C)).double()
    wrap(model, replicas)(torch.randn(4, C, dtype=torch.float64))
    return {"ran": True}


def scenario_absent_later(rank, world, replicas, sizes, timeout):
    """One step together, then rank 1 never reaches its synchronized layer within the group's timeout."""
    model = nn.Sequential(StuckOnRank1(timeout + 5), syncbn_ext.SyncBatchNorm(C)).double()
    run = wrap(model, replicas)
    x = torch.randn(4, C, dtype=torch.float64)
    model[0].armed = False
    run(x)  # every rank: one synchronized call
    model[0].armed = True
    run(x)
    return {"ran": True}


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


ABANDONED = "syncbn-abandoned-replica"  # the name of a replica thread the wrapper left behind


class WaitsOnRank1(nn.Module):
    """Once armed, rank 1 waits (outside any synchronized layer) until rank 0 says it is done, then exits (over
    gloo, where rank 0's abandoned exchange waits inside gloo until then), or goes on (through shared memory)."""

    released: float | None = None  # when rank 1 went on

    def __init__(self) -> None:
        super().__init__()
        self.armed = False

    def forward(self, x):
        if self.armed and dist.get_rank() == 1:
            dist.distributed_c10d._get_default_store().wait(["interrupt scenario done"])
            if syncbn_ext.cross_process_transport() != "shared memory":
                os._exit(0)
            WaitsOnRank1.released = WaitsOnRank1.released or time.monotonic()
        return x


def scenario_interrupted(rank, world, replicas, sizes):
    """Ctrl-C on rank 0 while it waits for rank 1 in an exchange (after a step: the shared-memory wait): a
    KeyboardInterrupt at once, not after the group's timeout; the group's later exchanges then fail at once."""
    model = nn.Sequential(WaitsOnRank1(), syncbn_ext.SyncBatchNorm(C)).double()
    run = wrap(model, replicas)
    x = torch.randn(4, C, dtype=torch.float64)
    run(x)
    model[0].armed = True
    store = dist.distributed_c10d._get_default_store()
    if rank == 1:
        # Through shared memory: rank 1 comes once rank 0 is done (its first exchange pairs with the one rank 0 gave
        # up), and its next exchange fails at once, told that rank 0 gave up, instead of waiting the group's timeout.
        start = time.monotonic()
        try:
            for _ in range(2):
                run(x)
            outcome = {"after": None}
        except Exception as error:
            waited = time.monotonic() - (WaitsOnRank1.released or start)
            outcome = {"after": type(error).__name__, "message": str(error), "after_seconds": waited}
        store.set("peer done", "1")
        return outcome
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    start = time.monotonic()
    try:
        run(x)
        outcome = {"interrupted": False}
    except KeyboardInterrupt:
        outcome = {"interrupted": True, "seconds": time.monotonic() - start}
    finally:
        timer.join()
    start = time.monotonic()
    try:
        run(x)
    except Exception as error:  # the ranks are out of step
        outcome.update(after=type(error).__name__, message=str(error), after_seconds=time.monotonic() - start)
    store.set("interrupt scenario done", "1")
    if syncbn_ext.cross_process_transport() == "shared memory":
        store.wait(["peer done"])  # rank 1 must not find this process gone instead
    # Over gloo, the abandoned master replica's thread still waits inside gloo: it leaves with an error once rank 1
    # has exited. This process must not end before (ending a process with a thread inside gloo's wait aborts it).
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(t.name.startswith(ABANDONED) for t in threading.enumerate()):
        time.sleep(0.05)
    return outcome


def scenario_interrupted_set_up(rank, world, replicas, sizes, timeout):
    """Ctrl-C on rank 0 while it sets up the layers' communicator, waiting for rank 1, which never makes a
    synchronized call: the KeyboardInterrupt arrives once gloo's wait ends (the group's timeout), and the group is
    marked failed all the same (it stayed unmarked, and the next call set it up again on the spent keys, waiting
    for the timeout once more)."""
    if rank != 0:
        time.sleep(3 * timeout)  # stays until rank 0 is done, never calling
        return {"ran": False}
    layer = syncbn_ext.SyncBatchNorm(C).double()
    x = torch.randn(4, C, dtype=torch.float64)
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        layer(x)
        outcome = {"first": "returned"}
    except BaseException as error:  # KeyboardInterrupt
        outcome = {"first": type(error).__name__}
    finally:
        timer.join()
    start = time.monotonic()
    try:
        layer(x)
    except Exception as error:
        outcome.update(after=type(error).__name__, message=str(error), after_seconds=time.monotonic() - start)
    return outcome


def scenario_killed_in_set_up(rank, world, replicas, sizes):
    """Rank 0 is killed (SIGKILL) while it sets up the same-host exchange and rank 1 is late to its first
    synchronized call: the shared-memory segment, named only once every rank has arrived, is not left in /dev/shm
    (rank 0 named it before waiting for the others, and a rank 0 killed meanwhile left it there)."""
    from syncbn_ext import distributed

    group = dist.group.WORLD
    if rank != 0:
        distributed.exchange_group(group, "probe")  # the layers' communicator is set up together; then late
        time.sleep(6)
        return {"ran": True}
    threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGKILL)).start()
    syncbn_ext.SyncBatchNorm(C).double()(torch.randn(4, C, dtype=torch.float64))
    return {"ran": True}  # not reached: rank 1 is still asleep when the timer kills this process


def scenario_shared_memory_unavailable(rank, world, replicas, sizes):
    """Rank 0 cannot create the same-host segment (a file size limit below its size stands for a full /dev/shm):
    every rank exchanges through the group's backend, and rank 0 says why instead of being silently slower."""
    import resource

    if rank == 0:
        resource.setrlimit(resource.RLIMIT_FSIZE, (128 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    model = nn.Sequential(nn.Linear(C, C), syncbn_ext.SyncBatchNorm(C)).double()
    out = wrap(model, replicas)(torch.randn(4, C, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    return {"transport": syncbn_ext.cross_process_transport(), "finite": bool(out.isfinite().all())}


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
    rank, replicas, failing_ranks, ddp=None, one_device=False, in_block=False, block_inside=False, second_group=False
):
    """Steps in which the forward of each of ``failing_ranks`` fails before its first synchronized call, in every
    replica of that rank: at step 1 in the model's code, at step 3 a replica refusing the first layer's input. The
    other ranks' first call of those steps must fail, naming them, and the steps after must pair (before, those
    calls paired with the failing ranks' next forward: one step apart from then on). ``second_group``: the second
    layer exchanges on a group of its own (over the same ranks)."""
    model = FailsBeforeItsLayers().double()
    model.in_block = block_inside
    if second_group:
        model.second.process_group = dist.new_group(list(range(dist.get_world_size())))
    run = wrap(model, replicas)
    if one_device and replicas == 1:  # the module as it is, under the wrapper
        run = syncbn_ext.DataParallelWithCallback(model, device_ids=["cpu"])
    if ddp:
        run = nn.parallel.DistributedDataParallel(run, broadcast_buffers=ddp == "broadcast_buffers")
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


def scenario_some_parameters_grads(rank, world, replicas, sizes):
    """GradNorm-style steps: every rank asks for the synchronized layer's weight gradient only (torch.autograd.grad,
    then backward(inputs=...)), ranks with several replicas through the parallel backward. Before, those computed the
    gradients of their whole boundary, so their layer made a backward exchange the other ranks' engines pruned."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, C, 1), syncbn_ext.SyncBatchNorm(C)).double()
    reference = nn.Sequential(nn.Conv2d(3, C, 1), nn.BatchNorm2d(C)).double()
    reference.load_state_dict(model.state_dict())
    run = wrap(model, replicas, parallel_backward=True if replicas > 1 else None)
    batches = [
        torch.randn(sizes[r], 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(r))
        for r in range(world)
    ]
    weight = model[1].weight
    (by_grad,) = torch.autograd.grad(run(batches[rank]).square().sum(), [weight])
    dist.all_reduce(by_grad)  # a collective right after: before, it met the other ranks' pruned exchange
    run(batches[rank]).square().sum().backward(inputs=[weight])
    by_inputs = weight.grad.clone()
    dist.all_reduce(by_inputs)
    (expected,) = torch.autograd.grad(reference(torch.cat(batches)).square().sum(), [reference[1].weight])
    outcome = {
        "grad_error": (by_grad - expected).abs().max().item(),
        "inputs_error": (by_inputs - expected).abs().max().item(),
        "others_untouched": model[0].weight.grad is None and model[1].bias.grad is None,
    }
    run(batches[rank]).square().sum().backward()  # and a whole backward after them pairs as ever
    return with_final_state(outcome, model, dist.group.WORLD)


def add_step_errors(errors, out, expected, x, whole, mine, weight, reference_weight):
    """Raises ``errors``' output, input-gradient (where ``x`` has one) and weight-gradient entries (the weight's
    gradient summed over the group) to this step's differences from the whole-batch reference."""
    grad = weight.grad.clone()
    dist.all_reduce(grad)
    errors["output"] = max(errors["output"], (out - expected[mine]).abs().max().item())
    if x.grad is not None:
        errors["input_grad"] = max(errors["input_grad"], (x.grad - whole.grad[mine]).abs().max().item())
    errors["param_grad"] = max(errors["param_grad"], (grad - reference_weight.grad).abs().max().item())


def with_buffer_error(errors, model, reference):
    """``errors`` with the largest difference of ``model``'s buffers from ``reference``'s, and the final state."""
    errors["buffers"] = max(
        (a - b).abs().max().item() for a, b in zip(model.buffers(), reference.buffers(), strict=True)
    )
    return with_final_state(errors, model, dist.group.WORLD)


class CheckpointedBlock(nn.Module):
    """A block with a synchronized layer under torch.utils.checkpoint(use_reentrant=False), then a head."""

    def __init__(self, norm, checkpointed=True):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, C, 1), norm(C), nn.Tanh())
        self.head = nn.Conv2d(C, 2, 1)
        self.checkpointed = checkpointed

    def forward(self, x):
        if not self.checkpointed:
            return self.head(self.block(x))
        return self.head(torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False))


def scenario_checkpoint(rank, world, replicas, sizes):
    """Ranks with and without replicas checkpoint a block together: a replica's recomputation reuses its channel's
    statistics, and a layer alone in its process must too (before, it exchanged again, which the ranks with replicas
    did not: every step failed; and alike on every rank it counted each batch twice)."""
    torch.manual_seed(0)
    reference = CheckpointedBlock(nn.BatchNorm2d, checkpointed=False).double()  # (checkpointed, it counts twice)
    model = CheckpointedBlock(syncbn_ext.SyncBatchNorm).double()
    model.load_state_dict(reference.state_dict())
    run = wrap(model, replicas)
    errors = {"output": 0.0, "input_grad": 0.0, "param_grad": 0.0}
    for step in range(2):
        batches = [
            torch.randn(sizes[r], 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(10 * step + r))
            for r in range(world)
        ]
        model.zero_grad()
        reference.zero_grad()
        x = batches[rank].clone().requires_grad_()
        out = run(x)
        out.square().sum().backward()
        whole = torch.cat(batches).requires_grad_()
        expected = reference(whole)
        expected.square().sum().backward()
        mine = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
        add_step_errors(errors, out, expected, x, whole, mine, model.block[0].weight, reference.block[0].weight)
    return with_buffer_error(errors, model, reference)


class FrozenFirstInCheckpointedBlock(CheckpointedBlock):
    """A frozen synchronized layer (no trainable parameters, an input without gradients: its output has no graph)
    first in a checkpointed block whose trainable conv saves its output."""

    def __init__(self, norm):
        super().__init__(norm)
        self.block = nn.Sequential(norm(3), nn.Conv2d(3, C, 1), nn.Tanh())
        self.block[0].requires_grad_(False)


def batches_repeating_on_rank_0(step, sizes):
    """Each rank's batch of ``step``: rank 0's is the same at every step, the others' change."""
    return [
        torch.randn(
            sizes[r], 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0 if r == 0 else step + 1)
        )
        for r in range(len(sizes))
    ]


def scenario_checkpoint_after_failed_backward(rank, world, replicas, sizes):
    """Checkpointed steps in which rank 0's batch repeats (its local statistics match earlier calls', whose
    whole-batch statistics differ): each recomputation must get its own step's statistics. Step 0's backward fails
    on every rank (in a hook, before reaching the layers) and its exception is kept (its traceback keeps the step's
    graph alive). Before, a layer alone in its process recalled the failed step's call in preference to its own:
    wrong gradients at every later step, silently; also with a frozen layer (no graph to tell by); and two
    checkpointed forwards before one backward, (loss1 + loss2).backward(), got each other's statistics."""
    errors = {"output": 0.0, "input_grad": 0.0, "param_grad": 0.0}
    kept = []

    def refuse(grad):
        raise ValueError("refused in a hook")

    mine = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    models = []
    for cls, weight in ((CheckpointedBlock, lambda m: m.block[0].weight), (FrozenFirstInCheckpointedBlock, None)):
        weight = weight or (lambda m: m.block[1].weight)
        torch.manual_seed(0)
        reference = cls(nn.BatchNorm2d).double()
        reference.checkpointed = False
        model = cls(syncbn_ext.SyncBatchNorm).double()
        model.load_state_dict(reference.state_dict())
        run = wrap(model, replicas)
        frozen = cls is FrozenFirstInCheckpointedBlock
        for step in range(3):
            batches = batches_repeating_on_rank_0(step, sizes)
            model.zero_grad()
            reference.zero_grad()
            x = batches[rank].clone().requires_grad_(not frozen)
            whole = torch.cat(batches).requires_grad_(not frozen)
            expected = reference(whole)
            out = run(x)
            if step == 0:
                out.register_hook(refuse)
                try:
                    out.square().sum().backward()
                except ValueError as error:
                    kept.append(error)
                else:
                    raise AssertionError("the hook did not fail the backward")
                continue
            out.square().sum().backward()
            expected.square().sum().backward()
            add_step_errors(errors, out, expected, x, whole, mine, weight(model), weight(reference))
        models.append(model)
    # Two checkpointed forwards before one backward (two views of a batch): the second's nodes run first.
    model, reference = models[0], CheckpointedBlock(nn.BatchNorm2d).double()
    reference.checkpointed = False
    reference.load_state_dict(model.state_dict())
    model.zero_grad()
    firsts, seconds = batches_repeating_on_rank_0(10, sizes), batches_repeating_on_rank_0(11, sizes)
    x, y = firsts[rank].clone().requires_grad_(), seconds[rank].clone().requires_grad_()
    run = wrap(model, replicas)
    out_x, out_y = run(x), run(y)
    (out_x.square().sum() + out_y.pow(4).sum()).backward()
    whole_x, whole_y = torch.cat(firsts).requires_grad_(), torch.cat(seconds).requires_grad_()
    expected_x, expected_y = reference(whole_x), reference(whole_y)
    (expected_x.square().sum() + expected_y.pow(4).sum()).backward()
    errors["input_grad"] = max(errors["input_grad"], (y.grad - whole_y.grad[mine]).abs().max().item())
    add_step_errors(errors, out_x, expected_x, x, whole_x, mine, model.block[0].weight, reference.block[0].weight)
    errors["kept_exceptions"] = len(kept)
    return with_buffer_error(errors, model, reference)


class TwoViewsInOneCheckpoint(nn.Module):
    """One checkpointed block sending two views through one encoder (a synchronized layer): two calls of the layer in
    parallel branches of one recomputation."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(C, C, 1, bias=False), syncbn_ext.SyncBatchNorm(C), nn.ReLU())

    def both(self, a, b):
        return self.encoder(a), self.encoder(b)

    def forward(self, a, b):
        return torch.utils.checkpoint.checkpoint(self.both, a, b, use_reentrant=False)


def scenario_checkpoint_two_alike_calls_in_one_block(rank, world, replicas, sizes):
    """Rank 1's two views are alike (zero padding), rank 0's are not: the two calls' local statistics match on rank
    1, their whole-batch statistics differ, and which one is recomputed cannot be told there. Rank 1's backward
    raises saying so (before: the first call silently got the second's statistics)."""
    model = TwoViewsInOneCheckpoint().double()
    generator = torch.Generator().manual_seed(rank)
    views = [
        torch.randn(4, C, 4, 4, dtype=torch.float64, generator=generator) if rank == 0 else torch.zeros(4, C, 4, 4)
        for _ in range(2)
    ]
    a, b = (view.double().requires_grad_() for view in views)
    out_a, out_b = model(a, b)
    (out_a.square().sum() + out_b.pow(4).sum()).backward()
    return {"ran": True}


class CallsTheLayerInACheckpoint(nn.Module):
    """A checkpointed block that calls one synchronized layer ``times`` times."""

    def __init__(self, times):
        super().__init__()
        self.norm = syncbn_ext.SyncBatchNorm(C)
        self.times = times

    def block(self, x):
        for _ in range(self.times):
            x = self.norm(x).tanh()
        return x

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False)


def scenario_checkpoint_forgotten(rank, world, replicas, sizes):
    """A layer alone in its process keeps a bounded number of calls for recomputation: one call more in a
    checkpointed forward fails its backward on every rank, saying so (before: it exchanged again, counting the batch
    twice, or failed on ranks with replicas); as many as it keeps work, counting each batch once."""
    kept = syncbn_ext._C.CallRecords().capacity
    x = torch.randn(4, C, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    outcome = {}
    for times in (kept + 1, kept):
        model = CallsTheLayerInACheckpoint(times).double()
        try:
            model(x).square().sum().backward()
            outcome[str(times)] = {"num_batches_tracked": model.norm.num_batches_tracked.item()}
        except RuntimeError as error:
            outcome[str(times)] = {"error": str(error)}
    outcome["kept"] = kept
    return outcome


def scenario_checkpoint_forgotten_among_alike(rank, world, replicas, sizes):
    """One checkpointed forward more than a layer alone in its process keeps, then their backwards in order: rank 1's
    batch is the same every time, rank 0 alternates two. Rank 1's first recomputation finds only other forwards'
    calls alike (its own was forgotten) and fails saying so (before: it silently took one of them)."""
    kept = syncbn_ext._C.CallRecords().capacity
    model = CheckpointedBlock(syncbn_ext.SyncBatchNorm).double()
    batches = [
        torch.randn(4, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0 if rank else i % 2))
        for i in range(kept + 1)
    ]
    losses = [model(x).square().sum() for x in batches]
    try:
        for loss in losses:
            loss.backward()
    except RuntimeError as error:
        return {"error": str(error)}
    return {"error": None}


def scenario_checkpoint_stop_gradient_view(rank, world, replicas, sizes):
    """A checkpointed block calling the layer under torch.no_grad() (a stop-gradient target view, as BYOL's) and with
    gradients: its recomputation reuses both calls (before, the one without gradients exchanged again in backward,
    counting that batch twice in the running statistics)."""
    torch.manual_seed(0)

    class TargetAndOnline(nn.Module):
        def __init__(self, norm, checkpointed):
            super().__init__()
            self.encoder = nn.Sequential(nn.Conv2d(3, C, 1, bias=False), norm(C), nn.ReLU())
            self.checkpointed = checkpointed

        def both(self, online, target):
            with torch.no_grad():
                target = self.encoder(target)
            return self.encoder(online) - target

        def forward(self, online, target):
            if not self.checkpointed:
                return self.both(online, target)
            return torch.utils.checkpoint.checkpoint(self.both, online, target, use_reentrant=False)

    reference = TargetAndOnline(nn.BatchNorm2d, checkpointed=False).double()
    model = TargetAndOnline(syncbn_ext.SyncBatchNorm, checkpointed=True).double()
    model.load_state_dict(reference.state_dict())
    run = wrap(model, replicas)
    errors = {"output": 0.0, "input_grad": 0.0, "param_grad": 0.0}
    mine = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    for _ in range(2):
        # (torch.manual_seed(0) above: alike on every rank)
        views = [[torch.randn(size, 3, 4, 4, dtype=torch.float64) for size in sizes] for _ in range(2)]
        model.zero_grad()
        reference.zero_grad()
        online, whole = views[0][rank].clone().requires_grad_(), torch.cat(views[0]).requires_grad_()
        out = run(online, views[1][rank])
        out.square().sum().backward()
        expected = reference(whole, torch.cat(views[1]))
        expected.square().sum().backward()
        add_step_errors(
            errors, out, expected, online, whole, mine, model.encoder[0].weight, reference.encoder[0].weight
        )
    return with_buffer_error(errors, model, reference)


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
