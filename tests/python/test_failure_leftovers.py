"""What a failed step leaves behind: no reference cycle keeping the replicas' frames, the model or the input alive
until the garbage collector runs, and no lock held."""

from __future__ import annotations

import contextlib
import gc
import queue
import threading
import time
import types
import weakref
from pathlib import Path

import pytest
import torch
from hang_guard import call_with_timeout
from replica_faults import InBackward, fail, garbage_collector_off, wait_for_replica_threads
from replica_modules import CpuDataParallel
from torch import nn

import syncbn_ext
import syncbn_ext.parallel_apply
from syncbn_ext import DataParallelWithCallback, SynchronizedBatchNorm1d
from syncbn_ext.forward_locks import training_forward_lock

C = 3
MARKER = -12345.0


@pytest.fixture(autouse=True)
def long_barrier_timeout(monkeypatch):
    # A pass must fail by abort or mismatch detection, at once, not by the barrier's timeout.
    monkeypatch.setenv("SYNCBN_TIMEOUT", "120")


class FailsInReplicaOne(nn.Module):
    """A synchronized layer; replica 1 (its slice holds MARKER) raises in forward before it, or in backward."""

    def __init__(self, when):
        super().__init__()
        self.bn, self.when = SynchronizedBatchNorm1d(C), when

    def forward(self, x):
        marked = bool((x == MARKER).any())
        if marked and self.when == "forward":
            raise ValueError("forward failed in this replica")
        y = self.bn(x)
        return InBackward.apply(y, fail) if marked else y


def frames_of_ours_left_to_the_garbage_collector(step):
    """The frames of syncbn_ext that only the garbage collector would free once ``step()`` raised and the error
    was dropped: a reference cycle through a raised error keeps the replicas' frames, and whatever they hold (the
    user's process groups), alive until the collector runs, in a short script not before the interpreter's
    shutdown (past the user's destroy_process_group)."""
    gc.collect()
    with garbage_collector_off():
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            with pytest.raises(ValueError):
                step()
            gc.collect()
            return sorted(
                f"{Path(o.f_code.co_filename).name}:{o.f_code.co_name}"
                for o in gc.garbage
                if isinstance(o, types.FrameType) and "syncbn_ext" in o.f_code.co_filename
            )
        finally:
            gc.set_debug(0)
            gc.garbage.clear()


@pytest.mark.parametrize(
    "when, parallel_backward", [("forward", False), ("forward", True), ("backward", False), ("backward", True)]
)
def test_a_failed_step_leaves_no_reference_cycle_holding_the_replicas_frames(when, parallel_backward):
    dp = DataParallelWithCallback(FailsInReplicaOne(when), device_ids=["cpu"] * 2, parallel_backward=parallel_backward)
    x = torch.randn(4, C)
    x[3] = MARKER  # replica 1's slice

    def step():
        call_with_timeout(lambda: dp(x).sum().backward())

    assert frames_of_ours_left_to_the_garbage_collector(step) == []


class SlowInReplicaOne(nn.Module):
    """Replica 1 (its slice holds MARKER) sleeps ``seconds`` before its synchronized layer."""

    def __init__(self, seconds):
        super().__init__()
        self.linear, self.bn, self.seconds = nn.Linear(C, C), SynchronizedBatchNorm1d(C), seconds

    def forward(self, x):
        if bool((x == MARKER).any()):
            time.sleep(self.seconds)
        return self.bn(self.linear(x))


def test_a_replica_s_report_of_its_error_makes_no_reference_cycle():
    # The error's traceback holds the reporting frame; were that frame (or its object) still holding the queue, a
    # queue no caller reads any more (a replica given up on) would close a cycle error -> frame -> queue -> error,
    # keeping the replica's frames, the user's input and the model until the garbage collector ran.
    def fails():
        raise KeyError("replica failure")

    report = queue.SimpleQueue()
    syncbn_ext.parallel_apply._Reporting(1, fails, report)()
    unread = weakref.ref(report)
    with garbage_collector_off():
        del report
        assert unread() is None


def test_a_replica_left_behind_that_fails_later_frees_the_model_and_input_without_the_garbage_collector(monkeypatch):
    # Its error goes to a queue no caller reads any more (see the test above): nothing may keep it.
    monkeypatch.setenv("SYNCBN_TIMEOUT", "1")
    model = SlowInReplicaOne(seconds=2)
    dp = DataParallelWithCallback(model, device_ids=["cpu"] * 2)
    x = torch.randn(4, C)
    x[3] = MARKER
    x.requires_grad_()
    with pytest.raises(syncbn_ext.BarrierTimeoutError):
        call_with_timeout(dp, x)
    dropped = [weakref.ref(model), weakref.ref(model.linear.weight), weakref.ref(x)]
    with garbage_collector_off():
        del model, dp, x
        wait_for_replica_threads(timeout=30)  # it returns, and its closed replication's layer refuses it
        assert [ref() for ref in dropped] == [None, None, None]


@pytest.mark.parametrize("wrapper", ["ours", "patched"])
def test_a_failure_entering_the_wrappers_telling_block_leaves_the_training_forward_lock_free(monkeypatch, wrapper):
    # Where the wrapper has forward pre-hooks its call enters the training-forward lock, then the block that tells
    # other ranks a failed forward: entering the block failing (a group that cannot be resolved) must release the
    # lock, or every other thread's training forward of the module would wait for ever.
    @contextlib.contextmanager
    def failing_to_enter(*args, **kwargs):
        raise RuntimeError("cannot resolve the group")
        yield

    monkeypatch.setattr(syncbn_ext.data_parallel, "announcing_failure", failing_to_enter)
    model = nn.Sequential(nn.Linear(C, C), SynchronizedBatchNorm1d(C))
    run = (
        DataParallelWithCallback(model, device_ids=["cpu"] * 2)
        if wrapper == "ours"
        else syncbn_ext.patch(CpuDataParallel(model, 2))
    )
    run.register_forward_pre_hook(lambda module, args: None)
    with pytest.raises(RuntimeError, match="cannot resolve the group"):
        run(torch.randn(4, C))
    taken = threading.Event()

    def take_the_lock():
        with training_forward_lock(model):
            taken.set()

    other = threading.Thread(target=take_the_lock, daemon=True)
    other.start()
    other.join(timeout=10)
    assert taken.is_set(), "the training-forward lock stayed held after the failure"
