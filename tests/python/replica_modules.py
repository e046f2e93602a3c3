"""Modules with a barrier of their own that the wrapper tests replicate, and an nn.DataParallel subclass on CPU
threads to patch(): shared by the test modules."""

from __future__ import annotations

import threading
import time

import torch
from hang_guard import call_with_timeout
from torch import nn

import syncbn_ext

BARRIER_TIMEOUT = 30.0  # a bug makes a barrier fail after this, never hang the suite


def _sum_messages(messages):
    total = sum(msg for _, msg in messages)
    return [(copy_id, total) for copy_id, _ in messages]


class BatchSum(nn.Module):
    """Adds the batch size summed over every replica (through a SyncMaster) to its input.

    Run alone it adds its own batch size, so a parallel run must equal a plain run on the whole batch. The
    replication hook and each pass record into lists shared by the original and its shallow copies.
    """

    def __init__(self, dim: int = 0) -> None:
        super().__init__()
        self.dim = dim
        self.hook_calls: list[int] = []  # copy ids, in the order the hook saw them
        self.passes: list[tuple[int, int, int]] = []  # (copy id, local size, total)
        self.barrier_errors: list[type] = []
        self.before_barrier = None  # optional callable(copy_id), runs in the replica before the barrier
        self.copy_id = None
        self.master = None
        self.pipe = None

    def __data_parallel_replicate__(self, ctx, copy_id):
        # Runs on the replica: attributes set here stay on that copy.
        self.hook_calls.append(copy_id)
        self.copy_id = copy_id
        if copy_id == 0:
            self.master = syncbn_ext.SyncMaster(_sum_messages, timeout=BARRIER_TIMEOUT)
            ctx.sync_master = self.master
        else:
            self.pipe = ctx.sync_master.register_slave(copy_id)

    def forward(self, x):
        local = x.shape[self.dim]
        if self.before_barrier is not None:
            self.before_barrier(self.copy_id)
        try:
            if self.pipe is not None:
                total = self.pipe.run_slave(local)
            elif self.master is not None:
                total = self.master.run_master(local)
            else:
                total = local
        except syncbn_ext.BarrierError as error:
            self.barrier_errors.append(type(error))
            raise
        self.passes.append((self.copy_id, local, total))
        return x + total


class PersistentBatchSum(BatchSum):
    """BatchSum whose one SyncMaster lives on the layer and serves every replication."""

    def __init__(self, use_barrier: bool = True) -> None:
        super().__init__()
        self.use_barrier = use_barrier
        self.persistent_master = syncbn_ext.SyncMaster(_sum_messages, timeout=1.0)

    def __data_parallel_replicate__(self, ctx, copy_id):
        self.hook_calls.append(copy_id)
        self.copy_id = copy_id
        if copy_id == 0:
            self.persistent_master.reset()  # a new replication, maybe with fewer copies than the last
            self.master = ctx.sync_master = self.persistent_master
        else:
            self.pipe = ctx.sync_master.register_slave(copy_id)

    def forward(self, x):
        return super().forward(x) if self.use_barrier else x


class CpuDataParallel(nn.DataParallel):
    """An nn.DataParallel subclass that brings its own replicate and parallel_apply, on CPU threads."""

    def __init__(self, module: nn.Module, replicas: int) -> None:
        nn.Module.__init__(self)
        self.module = module
        self.device_ids = list(range(replicas))
        self.dim = 0

    def forward(self, x):
        slices = x.chunk(len(self.device_ids))
        replicas = self.replicate(self.module, self.device_ids[: len(slices)])
        outputs = self.parallel_apply(replicas, [(s,) for s in slices], [{} for _ in slices])
        return torch.cat(outputs)

    def replicate(self, module, device_ids):
        return syncbn_ext.replicate_on_cpu(module, len(device_ids))

    def parallel_apply(self, replicas, inputs, kwargs):
        results: dict[int, object] = {}

        def run(i):
            try:
                results[i] = replicas[i](*inputs[i], **kwargs[i])
            except BaseException as error:
                results[i] = error

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(replicas))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        failed = [results[i] for i in range(len(replicas)) if isinstance(results[i], BaseException)]
        if failed:
            # Raised from the dict, the error's traceback would hold this frame, and the frame the error: a cycle
            # keeping the replicas' frames (their process group among them) until the garbage collector runs, past
            # destroy_process_group(), so that the rank could abort at exit (as README's "Ending the script" says).
            error = failed[0]
            results.clear()
            del failed
            try:
                raise error
            finally:
                del error
        return [results[i] for i in range(len(replicas))]


class SlowSynchronizedBatchNorm1d(syncbn_ext.SynchronizedBatchNorm1d):
    """Sleeps a little before normalizing, so that forwards started at once from several threads overlap."""

    def forward(self, input):
        time.sleep(0.003)
        return super().forward(input)


def forwards_from_threads(dp, batches, threads=3):
    """dp(batch) for every batch, spread over ``threads`` threads started at once; fails on a hang or an error.
    ``dp`` may be a list: thread ``i`` calls ``dp[i % len(dp)]``."""
    errors = []
    wrappers = dp if isinstance(dp, list) else [dp]

    def train(first):
        try:
            for x in batches[first::threads]:
                wrappers[first % len(wrappers)](x)
        except BaseException as error:
            errors.append(error)

    def run_all():
        workers = [threading.Thread(target=train, args=(i,)) for i in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()

    call_with_timeout(run_all)
    assert errors == []
