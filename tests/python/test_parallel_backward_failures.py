"""CPU replicas' backward in parallel when a replica fails in it or is late at a synchronized layer's merge: the
failing replica's own error, at once; a late one's BarrierTimeoutError."""

from __future__ import annotations

import sys
import threading
import time
import weakref
from pathlib import Path

import child_processes
import pytest
import torch
from batchnorm_cases import joined
from hang_guard import call_with_timeout
from replica_faults import InBackward, UnprintableError, fail, fail_unprintably, garbage_collector_off
from torch import nn

import syncbn_ext
from syncbn_ext import DataParallelWithCallback, SynchronizedBatchNorm1d
from syncbn_ext.parallel_apply import FAILURE_GRACE_SECONDS
from syncbn_ext.replica_workers import replica_threads_running
from syncbn_ext.replication import Replication

HERE = Path(__file__).resolve().parent

C = 4


def take_three_seconds():
    time.sleep(3)


MARKER = -1234.0


class MarkedNet(nn.Module):
    """Linear and a synchronized layer; in the replica whose slice holds the marker, ``in_backward`` is called in
    backward, after the layer's merge or before it."""

    def __init__(self, in_backward, before_the_merge):
        super().__init__()
        self.linear, self.bn = nn.Linear(C, C), SynchronizedBatchNorm1d(C)
        self.in_backward, self.before_the_merge, self.armed = in_backward, before_the_merge, True

    def forward(self, x):
        marked = self.armed and bool((x.abs() > 1000).any())
        if marked and not self.before_the_merge:
            x = InBackward.apply(x, self.in_backward)
        y = self.bn(self.linear(x))
        return InBackward.apply(y, self.in_backward) if marked and self.before_the_merge else y


def test_a_replicas_exception_in_backward_whose_str_raises_reaches_the_caller_as_itself():
    model = MarkedNet(fail_unprintably, before_the_merge=True).double()
    dp = DataParallelWithCallback(model, device_ids=["cpu"] * 2, parallel_backward=True)
    x = torch.randn(4, C, dtype=torch.float64)
    x[3] = MARKER  # in replica 1's slice
    y = call_with_timeout(dp, x)
    with pytest.raises(UnprintableError) as raised:
        call_with_timeout(y.sum().backward)
    assert raised.value.__notes__[-1] == "(raised in replica 1 on device cpu, in backward)"
    model.armed = False
    call_with_timeout(dp(torch.randn(4, C, dtype=torch.float64)).sum().backward)  # the next step works


@pytest.mark.parametrize("before_the_merge", [False, True])
def test_a_replica_failing_in_backward_raises_its_own_error_at_once(monkeypatch, before_the_merge):
    # Failing before its synchronized layer's merge, the replica wakes the others waiting there: its error is the
    # one raised, not theirs.
    monkeypatch.setenv("SYNCBN_TIMEOUT", "120")  # the others must not wait for it until a timeout
    torch.manual_seed(4)
    model = MarkedNet(fail, before_the_merge).double()
    dp = DataParallelWithCallback(model, device_ids=["cpu"] * 3, parallel_backward=True)
    x = torch.randn(6, C, dtype=torch.float64)
    x[3] = MARKER  # in replica 1's slice
    y = call_with_timeout(dp, x.requires_grad_())
    assert joined(y)
    with pytest.raises(ValueError, match="backward failed in this replica") as raised:
        call_with_timeout(y.sum().backward)
    assert raised.value.__notes__[-1] == "(raised in replica 1 on device cpu, in backward)"
    # The next step works.
    model.armed = False
    y = call_with_timeout(dp, torch.randn(6, C, dtype=torch.float64))
    call_with_timeout(y.sum().backward)


def test_a_replica_late_in_backward_is_a_barrier_timeout_error(monkeypatch):
    monkeypatch.setenv("SYNCBN_TIMEOUT", "1")
    dp = DataParallelWithCallback(
        MarkedNet(take_three_seconds, before_the_merge=True).double(), device_ids=["cpu"] * 2, parallel_backward=True
    )
    x = torch.randn(4, C, dtype=torch.float64)
    x[2] = MARKER  # replica 1 is late at the merge
    y = call_with_timeout(dp, x)
    # The type the merge raised, which autograd's engine hands on as a plain RuntimeError.
    with pytest.raises(syncbn_ext.BarrierTimeoutError, match=r"timed out after 1 s; copies that never .*\[1\]"):
        call_with_timeout(y.sum().backward)


class PhasedNet(nn.Module):
    """Linear (and a synchronized layer); in backward, each replica calls ``phase["action"](copy_id)`` first."""

    def __init__(self, phase, sync):
        super().__init__()
        self.phase = phase
        self.lin, self.bn = nn.Linear(C, C), SynchronizedBatchNorm1d(C) if sync else nn.Identity()

    def forward(self, x):
        tag = Replication.of(self)
        copy_id = tag[1] if tag is not None else 0
        return InBackward.apply(self.bn(self.lin(x)), lambda: self.phase["action"](copy_id))


@pytest.mark.parametrize("sync", [False, True])
def test_a_backward_task_left_running_writes_nothing_into_the_next_backward(sync):
    # loss1.backward(retain_graph=True) fails while replica 0 is slow: the caller gives up on it and raises; then
    # loss2.backward() runs the same graph while replica 0's old task is still running. That task must not be
    # summed into the new .grad (measured: wrong gradients), nor arrive at the new run's merge as its copy 0
    # (measured: a healthy backward raised).
    torch.manual_seed(0)
    phase = {"action": lambda copy_id: None}
    model = PhasedNet(phase, sync).double()
    x = torch.randn(8, C, dtype=torch.float64)
    call_with_timeout(
        (3 * DataParallelWithCallback(model, device_ids=["cpu"] * 2, parallel_backward=True)(x)).sum().backward
    )
    expected = model.lin.weight.grad.clone()
    model.zero_grad(set_to_none=True)

    out = call_with_timeout(DataParallelWithCallback(model, device_ids=["cpu"] * 2, parallel_backward=True), x)
    slow = FAILURE_GRACE_SECONDS + 1.0  # the old task wakes during the next backward

    def first_backward(copy_id):
        if copy_id == 1:
            raise ValueError("replica 1 fails in the first backward")
        time.sleep(slow)

    phase["action"] = first_backward
    with pytest.raises(ValueError, match="replica 1 fails"):
        call_with_timeout(out.sum().backward, retain_graph=True)
    model.zero_grad(set_to_none=True)
    phase["action"] = lambda copy_id: time.sleep(slow + 0.5) if copy_id == 0 else None  # outlasts the old task
    try:
        call_with_timeout((3 * out).sum().backward)
        torch.testing.assert_close(model.lin.weight.grad, expected)
    finally:
        phase["action"] = lambda copy_id: None
        deadline = time.monotonic() + 30
        while replica_threads_running() and time.monotonic() < deadline:
            time.sleep(0.05)


def test_a_failing_parallel_backward_does_not_deadlock_on_python_backed_tensors_at_its_merge():
    # The merge point held the last run's tensors with Python objects (a dispatch mode): the first arrival freed them
    # holding the point's lock (freeing takes the GIL) while the failing replica asked, from Python, for its barrier
    # error (the same lock, the GIL held): measured, a deadlock of the whole process.
    result = child_processes.run([sys.executable, str(HERE / "backward_gil_scenario.py")], timeout=150)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines == [f"attempt {i}: run 2 raised: replica 1's backward fails (run 2)" for i in (1, 2, 3)], result.stdout


class ExpAndFailing(nn.Module):
    """A synchronized layer, then exp(y) + InBackward(y): in the replica whose slice holds the marker, the backward
    fails with other nodes of that replica's graph still queued in its thread."""

    def __init__(self):
        super().__init__()
        self.linear, self.bn = nn.Linear(C, C), SynchronizedBatchNorm1d(C)

    def forward(self, x):
        y = self.bn(self.linear(x))
        return y.exp() + (InBackward.apply(y, fail) if bool((x == MARKER).any()) else y)


def forward_and_backward(module, x):
    module(x).sum().backward()


def test_a_failed_parallel_backward_leaves_nothing_on_the_workers():
    # The nodes autograd had queued when the replica's backward failed stay in the thread's autograd state until
    # its next backward: on a pooled worker, the graph (input, parameters, and across processes the groups its nodes
    # hold) lived until some later step. The worker of a failed task now ends instead.
    model = ExpAndFailing()
    dp = DataParallelWithCallback(model, device_ids=["cpu"] * 2, parallel_backward=True)
    x = torch.randn(4, C)
    x[3] = MARKER  # replica 1's slice
    x.requires_grad_()
    with pytest.raises(ValueError, match="backward failed in this replica"):
        call_with_timeout(forward_and_backward, dp, x)
    dropped = [weakref.ref(model.linear.weight), weakref.ref(x)]
    with garbage_collector_off():
        del model, dp, x
        for thread in threading.enumerate():
            if thread.name.startswith("syncbn-retiring-"):
                thread.join(timeout=30)
        # join() returns when the thread's Python code has ended; its C++ thread-locals (autograd's queued nodes)
        # are destroyed as the OS thread exits, a moment later (a CI run on 2 busy cores saw them alive).
        deadline = time.monotonic() + 30
        while any(ref() is not None for ref in dropped) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [ref() for ref in dropped] == [None, None]
