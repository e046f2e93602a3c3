"""Scenarios of the multi-process test in which a rank is interrupted (Ctrl-C while waiting for another rank, before
its first synchronized call, while setting up the layers' communicator), killed in that set-up, or cannot create its
shared memory: each must end in a prompt, clear error on every rank. Run by ``distributed_worker.py``."""

from __future__ import annotations

import os
import signal
import threading
import time

import torch
import torch.distributed as dist
from distributed_parity import C, wrap
from torch import nn

import syncbn_ext

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


class SleepsWhenArmed(nn.Module):
    """Sleeps two seconds before the synchronized layer while armed (the step rank 0 is interrupted in)."""

    armed = False

    def forward(self, x):
        if SleepsWhenArmed.armed:
            time.sleep(2.0)
        return x


def scenario_interrupted_before_first_call(rank, world, replicas, sizes):
    """Ctrl-C on rank 0 while its forward has made no synchronized call yet (under DataParallelWithCallback, or in an
    announcing_failure block), rank 1 waiting at its first: before, rank 0's next forward paired with rank 1's step,
    one step apart from then on, silently. Now rank 0's later exchanges on the group fail at once (out of step), and
    rank 1's waiting call fails at the group's timeout."""
    model = nn.Sequential(SleepsWhenArmed(), syncbn_ext.SyncBatchNorm(C)).double()
    run = wrap(model, replicas)
    x = torch.randn(4, C, dtype=torch.float64)
    run(x)  # a step that pairs: the layers' communicator is set up
    if rank == 1:
        try:
            run(x)
            return {"step": "returned"}
        except Exception as error:
            return {"step": type(error).__name__, "message": str(error)}
    SleepsWhenArmed.armed = True
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with syncbn_ext.announcing_failure(model):  # (under the wrapper, its own block does the same)
            run(x)
        outcome = {"interrupted": False}
    except KeyboardInterrupt:
        outcome = {"interrupted": True}
    finally:
        timer.join()
    SleepsWhenArmed.armed = False
    start = time.monotonic()
    try:
        run(x)
        outcome["after"] = "returned"
    except Exception as error:
        outcome.update(after=type(error).__name__, message=str(error), after_seconds=time.monotonic() - start)
        outcome["notes"] = getattr(error, "__notes__", [])
    time.sleep(2.5)  # an abandoned replica wakes, and is refused before its exchange
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
