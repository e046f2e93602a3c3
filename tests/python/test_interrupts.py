"""Nothing left running, nothing written late: Ctrl-C, stuck replicas, timeouts, and patched nn.DataParallel."""

from __future__ import annotations

import copy
import json
import signal
import sys
import threading
import time
from pathlib import Path

import child_processes
import pytest
import torch
from hang_guard import call_with_timeout
from replica_faults import RaiseInCopy, assert_state_unchanged, state_of, wait_for_replica_threads
from replica_modules import CpuDataParallel
from torch import nn

import syncbn_ext
from syncbn_ext import DataParallelWithCallback, SynchronizedBatchNorm1d
from syncbn_ext.parallel_apply import FAILURE_GRACE_SECONDS
from syncbn_ext.patching import _PatchedParallelApply
from syncbn_ext.replica_workers import replica_threads_running

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "benchmarks"))
import established_sync_master  # noqa: E402  (a re-implementation of the established library's pure-Python barrier)

C = 3


def forward_error(fn, *args):
    """fn(*args) under the hang guard: the exception it raised, and how long it took."""
    start = time.monotonic()
    try:
        call_with_timeout(fn, *args)
    except Exception as error:  # handed to the test
        return error, time.monotonic() - start
    pytest.fail("expected an exception")


class BlockInCopy(nn.Module):
    """Blocks in the replica with copy id `copy_id` until `release` is set (a replica stuck for good)."""

    def __init__(self, copy_id: int) -> None:
        super().__init__()
        self.target = copy_id
        self.release = threading.Event()
        self.copy_id = None

    def __data_parallel_replicate__(self, ctx, copy_id):
        self.copy_id = copy_id

    def forward(self, x):
        if self.copy_id == self.target:
            self.release.wait(60)
        return x


# ---------------------------------------------------------------------------------------------------------------
# Ctrl-C
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["signal", "interrupt_main", "async"])
def test_ctrl_c_reaches_the_caller_at_once_and_the_slow_replica_writes_nothing_when_it_wakes(how):
    # Without a signal, the exception is raised only when the waiting thread runs bytecode: it waits in short waits.
    result = child_processes.run([sys.executable, str(HERE / "interrupt_scenario.py"), how], timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["raised"] == "KeyboardInterrupt"
    assert report["latency"] < 1.2, report  # not when the slow replica (3 s) arrives
    assert report["left_behind"] == ["syncbn-abandoned-replica-0"]  # the slow replica, still asleep
    assert report["changed_at_interrupt"] == []
    # It woke, ran a plain nn.BatchNorm1d and reached a synchronized layer: nothing reached the model.
    assert report["changed_after_wake"] == []
    assert report["left_after_wake"] == []  # and its thread ended
    assert report["next_forward_error"] < 1e-12
    assert report["next_running_mean_error"] < 1e-12


def test_at_exit_every_worker_of_ours_ends_idle_ones_too(monkeypatch):
    # Idle workers were left to the interpreter's shutdown, which stops daemon threads where they are: one just
    # released to the pool was still freeing its task's tensors in C++, and stopping it there aborted the process
    # ("terminate called without an active exception"; seen under load at the end of a multi-process test).
    from syncbn_ext import replica_workers

    monkeypatch.setattr(replica_workers._POOL, "_exiting", False)  # restored afterwards: later tests pool workers

    dp = DataParallelWithCallback(SynchronizedBatchNorm1d(3), device_ids=["cpu"] * 3)
    call_with_timeout(lambda: dp(torch.randn(6, 3)).sum().backward())
    assert any(t.name.startswith("syncbn-worker-") for t in threading.enumerate())
    replica_workers._wait_for_replica_threads_at_exit()
    assert [t.name for t in threading.enumerate() if t.name.startswith(("syncbn-worker-", "syncbn-retiring-"))] == []
    call_with_timeout(lambda: dp(torch.randn(6, 3)).sum().backward())  # (a later forward starts workers again)


def test_at_exit_the_workers_of_a_daemon_threads_forward_end_once_it_returns(monkeypatch):
    # The exit's wait joined them as running, but once the forward returned they went back to the pool and waited
    # for another task there: the exit waited its full 10 s, and left them to the interpreter's shutdown.
    from syncbn_ext import replica_workers

    monkeypatch.setattr(replica_workers._POOL, "_exiting", False)  # restored afterwards: later tests pool workers
    in_forward, returned = threading.Event(), threading.Event()

    class Slow(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = SynchronizedBatchNorm1d(C)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn(x)
            in_forward.set()
            time.sleep(0.5)
            return y

    dp = DataParallelWithCallback(Slow(), device_ids=["cpu"] * 2)
    threading.Thread(target=lambda: (dp(torch.randn(8, C)), returned.set()), daemon=True).start()
    assert in_forward.wait(60)
    assert len(replica_workers.replica_threads_running()) == 2
    replica_workers._wait_for_replica_threads_at_exit()
    assert returned.wait(60)
    assert [t.name for t in threading.enumerate() if t.name.startswith(("syncbn-worker-", "syncbn-retiring-"))] == []


@pytest.mark.parametrize(("scenario", "status"), [("interrupt", -signal.SIGINT), ("backward-timeout", 0)])
def test_the_exit_waits_for_replicas_left_behind_and_ends_with_the_scripts_status(scenario, status):
    # Replicas left behind (Ctrl-C during a forward; a replica late in the parallel backward) still run torch ops
    # while the interpreter exits: one returning from an op then would abort the process (measured: "terminate
    # called without an active exception", or a fatal Python error, and status 134 in both scenarios).
    result = child_processes.run([sys.executable, str(HERE / "exit_scenario.py"), scenario], timeout=120)
    assert result.returncode == status, result.stderr
    assert "terminate called" not in result.stderr and "Fatal Python error" not in result.stderr
    assert "syncbn_ext: waiting up to 10 s for" in result.stderr


def test_the_exit_waits_for_the_thread_of_a_failed_parallel_backward_to_end():
    # The worker whose backward failed ends at once, but its OS thread outlives its Python part while it frees the
    # autograd nodes left queued there (taking the GIL): the exit waited for the Python part only, and the
    # interpreter's shutdown meeting the rest aborted the process (7 of 10 runs of this scenario).
    for _ in range(3):
        result = child_processes.run([sys.executable, str(HERE / "exit_scenario.py"), "backward-failed"], timeout=120)
        assert result.returncode == 0 and result.stdout.strip() == "ValueError", result.stderr
        assert "terminate called" not in result.stderr and "Fatal Python error" not in result.stderr


# ---------------------------------------------------------------------------------------------------------------
# Stuck replicas and SYNCBN_TIMEOUT
# ---------------------------------------------------------------------------------------------------------------


def test_a_replica_stuck_for_ever_before_its_layer_is_left_behind_at_the_timeout(monkeypatch):
    monkeypatch.setenv("SYNCBN_TIMEOUT", "0.5")
    blocker = BlockInCopy(1)
    model = nn.Sequential(blocker, SynchronizedBatchNorm1d(C), nn.BatchNorm1d(C)).double()
    before = state_of(model)
    dp = DataParallelWithCallback(model, device_ids=["cpu"] * 3)
    try:
        error, elapsed = forward_error(dp, torch.randn(6, C, dtype=torch.float64))
        assert isinstance(error, syncbn_ext.BarrierTimeoutError), repr(error)
        assert "layer '1: SynchronizedBatchNorm1d(3)' (synchronized call 1)" in str(error)
        assert "copies that never arrived: [1]" in str(error)
        assert elapsed < 0.5 + FAILURE_GRACE_SECONDS + 2.0, elapsed
        assert [t.name for t in replica_threads_running()] == ["syncbn-abandoned-replica-1"]
        assert_state_unchanged(model, before)
    finally:
        blocker.release.set()
    wait_for_replica_threads(timeout=10)  # it woke, was refused at its barrier, and ended
    assert_state_unchanged(model, before)
    # The next forward works: the synchronized layer has the whole batch's statistics.
    blocker.target = -1
    reference = nn.BatchNorm1d(C).double()
    reference.load_state_dict(model[1].state_dict())
    x = torch.randn(6, C, dtype=torch.float64)
    call_with_timeout(dp, x)
    reference(x)
    torch.testing.assert_close(model[1].running_mean, reference.running_mean)
    torch.testing.assert_close(model[1].running_var, reference.running_var)


def test_a_replica_stuck_after_the_others_returned_is_bounded_by_the_timeout(monkeypatch):
    # No barrier waits for it (no synchronized layer after it): the forward is bounded all the same.
    monkeypatch.setenv("SYNCBN_TIMEOUT", "0.5")
    blocker = BlockInCopy(2)
    model = nn.Sequential(nn.BatchNorm1d(C), blocker).double()
    before = state_of(model)
    dp = DataParallelWithCallback(model, device_ids=["cpu"] * 3)
    try:
        error, elapsed = forward_error(dp, torch.randn(6, C, dtype=torch.float64))
        assert isinstance(error, syncbn_ext.BarrierTimeoutError), repr(error)
        assert "replica(s) [2] did not return within 0.5 s" in str(error)
        assert elapsed < 5, elapsed
        assert_state_unchanged(model, before)  # replica 0 finished, but the forward failed: no write-back
    finally:
        blocker.release.set()
    wait_for_replica_threads(timeout=10)
    assert_state_unchanged(model, before)


class VendoredSyncBatchNorm(nn.Module):
    """A client's own copy of the established library's layer: its pure-Python SyncMaster, whose master callback
    fails on CPU (it reduces with CUDA-only communication), leaving the other copies waiting in its queue."""

    def __init__(self) -> None:
        super().__init__()
        self._sync_master = established_sync_master.SyncMaster(self._data_parallel_master)
        self._parallel_id = None
        self._slave_pipe = None

    def __data_parallel_replicate__(self, ctx, copy_id):
        self._parallel_id = copy_id
        if copy_id == 0:
            ctx.sync_master = self._sync_master
        else:
            self._slave_pipe = ctx.sync_master.register_slave(copy_id)

    def _data_parallel_master(self, intermediates):
        raise RuntimeError("reduce_add: CUDA tensors expected")

    def forward(self, x):
        if self._parallel_id == 0:
            self._sync_master.run_master(x.sum())
        else:
            self._slave_pipe.run_slave(x.sum())
        return x


def test_a_failed_replica_is_reported_whatever_the_others_are_blocked_in():
    layer = VendoredSyncBatchNorm()
    dp = DataParallelWithCallback(layer, device_ids=["cpu"] * 2)
    replicas = []
    original_replicate = dp.replicate

    def replicate(module, device_ids):
        replicas[:] = original_replicate(module, device_ids)
        return replicas

    dp.replicate = replicate
    error, elapsed = forward_error(dp, torch.randn(4, C))
    assert type(error) is RuntimeError and str(error) == "reduce_add: CUDA tensors expected"
    assert error.__notes__ == ["(raised in replica 0 on device cpu)"]
    assert elapsed < FAILURE_GRACE_SECONDS + 3.0, elapsed
    # Replica 1 still waits in the client's own queue, which nothing of ours can wake: left behind.
    assert [t.name for t in replica_threads_running()] == ["syncbn-abandoned-replica-1"]
    replicas[1]._slave_pipe.result.put(0.0)  # what the client's master would have sent
    wait_for_replica_threads(timeout=10)


# ---------------------------------------------------------------------------------------------------------------
# patch(nn.DataParallel): the same failure and finish handling
# ---------------------------------------------------------------------------------------------------------------


class CallsTwiceInCopy(nn.Module):
    def __init__(self, copy_id):
        super().__init__()
        self.target = copy_id
        self.copy_id = None
        self.bn = SynchronizedBatchNorm1d(C)

    def __data_parallel_replicate__(self, ctx, copy_id):
        self.copy_id = copy_id

    def forward(self, x):
        y = self.bn(x)
        return self.bn(y) if self.copy_id == self.target else y


@pytest.fixture
def long_timeout(monkeypatch):
    # A copy woken only by the timeout would trip the hang guard: it must be woken at once.
    monkeypatch.setenv("SYNCBN_TIMEOUT", "120")


def test_patch_gives_a_subclass_with_its_own_parallel_apply_the_failure_handling(long_timeout):
    model = nn.Sequential(RaiseInCopy(1), SynchronizedBatchNorm1d(C))
    before = state_of(model)
    dp = syncbn_ext.patch(CpuDataParallel(model, 3))
    assert isinstance(dp.parallel_apply, _PatchedParallelApply)
    error, elapsed = forward_error(dp, torch.randn(6, C))
    # Its parallel_apply raises what it raises first (copy 0's wake-up or copy 1's KeyError): either way, nobody
    # waited for the timeout, and nothing was written.
    assert isinstance(error, (KeyError, syncbn_ext.BarrierAbortedError)), repr(error)
    assert elapsed < 10, elapsed
    assert_state_unchanged(model, before)


def test_patch_catches_call_count_mismatches_when_a_copy_finishes(long_timeout):
    dp = syncbn_ext.patch(CpuDataParallel(CallsTwiceInCopy(1), 2))
    error, _ = forward_error(dp, torch.randn(4, C))
    assert isinstance(error, syncbn_ext.BarrierError), repr(error)
    assert "finished its forward after 1 synchronized call(s), but copy 1 made call 2" in str(error)


def test_a_patched_subclass_synchronizes_and_writes_back_replica_0s_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(C, C), SynchronizedBatchNorm1d(C), nn.BatchNorm1d(C)).double()
    reference = syncbn_ext.revert_model(copy.deepcopy(model))
    dp = syncbn_ext.patch(CpuDataParallel(model, 2))
    x = torch.randn(8, C, dtype=torch.float64)
    call_with_timeout(dp, x)
    hidden = reference[0:2](x)  # the synchronized layer: whole-batch statistics
    torch.testing.assert_close(model[1].running_mean, reference[1].running_mean)
    torch.testing.assert_close(model[1].running_var, reference[1].running_var)
    # The plain layer ran per replica: replica 0's statistics (of the first half) land on the model.
    torch.testing.assert_close(model[2].running_mean, 0.1 * hidden[:4].mean(0).detach())
    assert model[2].num_batches_tracked.item() == 1


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_patched_gpu_data_parallel_fails_fast_and_writes_nothing(long_timeout):
    model = nn.Sequential(RaiseInCopy(1), SynchronizedBatchNorm1d(C)).cuda()
    before = state_of(model)
    dp = syncbn_ext.patch(nn.DataParallel(model, device_ids=[0, 1]))
    error, elapsed = forward_error(dp, torch.randn(4, C, device="cuda"))
    assert type(error) is KeyError and error.__notes__ == ["(raised in replica 1 on device cuda:1)"]
    assert elapsed < 10
    assert_state_unchanged(model, before)
