"""A failing parallel backward whose synchronized layer's merge point holds tensors with Python objects (run by
test_parallel_backward_failures.py, in a process of its own: a deadlock cannot be undone; prints one line per try).

Run 1 (retain_graph=True) runs under FlopCounterMode (a TorchDispatchMode): the tensors the merge point keeps get
Python objects. Run 2 (retain_graph=True again): replica 1 fails at the start of its backward, and its failure path
asks for its barrier error (group.raise_backward_failure, from Python) over and over for 2 s (each call is exactly
what the library makes once), while replica 0 arrives first at the merge point and drops run 1's tensors there:
freeing them takes the GIL, so neither may happen holding the lock the other takes (measured before the fix: a
deadlock in 3 of 3 runs). A faulthandler watchdog ends a hung process (exit status 1).
"""

from __future__ import annotations

import faulthandler
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from syncbn_ext import DataParallelWithCallback, SynchronizedBatchNorm2d, parallel_backward
from syncbn_ext.replica_workers import replica_threads_running
from syncbn_ext.replication import Replication

state = {"run": 0}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = SynchronizedBatchNorm2d(3)
        # Work after the layer (before its merge, in backward): replica 0 reaches the merge while replica 1's
        # failure path runs.
        self.conv = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), *[nn.Conv2d(32, 32, 3, padding=1) for _ in range(6)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(self.bn(x))
        copy_id = Replication.of(self)[1]
        y.register_hook(lambda g: fail_in_run_2(copy_id, g))
        return y


def fail_in_run_2(copy_id: int, grad: torch.Tensor) -> torch.Tensor:
    if state["run"] == 2 and copy_id == 1:
        raise ValueError("replica 1's backward fails (run 2)")
    return grad


barrier_failure = parallel_backward._barrier_failure


def barrier_failure_repeated(group, copy_id, *args):
    if state["run"] == 2 and copy_id == 1:
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            barrier_failure(group, copy_id, *args)
    return barrier_failure(group, copy_id, *args)


parallel_backward._barrier_failure = barrier_failure_repeated

torch.manual_seed(0)
dp = DataParallelWithCallback(Net(), device_ids=["cpu"] * 2, parallel_backward=True)
out = dp(torch.randn(4, 3, 64, 64, requires_grad=True))
for attempt in range(1, 4):
    state["run"] = 1
    with FlopCounterMode(display=False):
        out.sum().backward(retain_graph=True)
    state["run"] = 2
    faulthandler.dump_traceback_later(30, exit=True)  # a C watchdog thread: needs no GIL
    try:
        out.sum().backward(retain_graph=True)
        print(f"attempt {attempt}: run 2 returned", flush=True)
    except ValueError as error:
        print(f"attempt {attempt}: run 2 raised: {error}", flush=True)
    faulthandler.cancel_dump_traceback_later()
    deadline = time.monotonic() + 10  # no replica of this attempt outlives it
    while replica_threads_running() and time.monotonic() < deadline:
        time.sleep(0.05)
