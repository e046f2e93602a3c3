"""The interpreter's exit while replicas left behind still run (run by test_interrupts.py).

``interrupt``: Ctrl-C reaches the caller while both replicas run torch ops in a loop; the KeyboardInterrupt is not
caught, so the interpreter exits at once, with the replicas (left behind) returning from torch ops meanwhile.
``backward-timeout``: in the parallel backward, replica 1 is late at the merge; backward raises
``BarrierTimeoutError``, which the script catches and exits normally while replica 1 still sleeps in its backward;
the module's teardown is slow, so that the replica wakes while the interpreter shuts down.
``backward-failed``: in the parallel backward, replica 1's backward fails with many Python autograd nodes queued in
its worker's thread; the script catches the error and exits: the worker's thread frees them as it ends (C++
thread-local destructors, after its Python part), taking the GIL.

Without the exit's wait for them, either ends in an abort ("terminate called without an active exception" or a
fatal Python error) instead of the script's exit status.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
import time

import torch
from replica_faults import InBackward, fail
from torch import nn

import syncbn_ext

C = 4
MARKER = -1234.0


class BusyReplica(nn.Module):
    """Runs torch ops for about ``seconds`` (each op releases and retakes the GIL), then a synchronized layer."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.bn = syncbn_ext.SynchronizedBatchNorm1d(C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        end = time.monotonic() + self.seconds
        a = torch.randn(200, 200)
        while time.monotonic() < end:
            a = torch.tanh(a @ a)
        return self.bn(x)


class LateBeforeTheMerge(nn.Module):
    """In the replica whose slice holds the marker, backward sleeps before the synchronized layer's merge."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.bn, self.seconds = syncbn_ext.SynchronizedBatchNorm1d(C), seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(x)
        return InBackward.apply(y, functools.partial(time.sleep, self.seconds)) if bool((x == MARKER).any()) else y


class SlowTeardown:
    """Takes its time when the interpreter's exit destroys it (a module-level object, like a logger or a writer)."""

    def __del__(self) -> None:
        time.sleep(3.0)


def interrupt() -> None:
    dp = syncbn_ext.DataParallelWithCallback(BusyReplica(seconds=3.0), device_ids=["cpu"] * 2)
    main_thread = threading.main_thread().ident
    threading.Timer(0.3, signal.pthread_kill, (main_thread, signal.SIGINT)).start()
    dp(torch.randn(4, C))  # KeyboardInterrupt, not caught


def backward_timeout() -> tuple[nn.Module, torch.Tensor]:
    os.environ["SYNCBN_TIMEOUT"] = "1"
    dp = syncbn_ext.DataParallelWithCallback(
        LateBeforeTheMerge(seconds=6.0), device_ids=["cpu"] * 2, parallel_backward=True
    )
    x = torch.randn(4, C)
    x[2] = MARKER  # in replica 1's slice
    y = dp(x)
    try:
        y.sum().backward()
    except syncbn_ext.BarrierTimeoutError:
        print("BarrierTimeoutError", flush=True)
    return dp, y  # the exit destroys the wrapper and the graph replica 1 is still in


class ManyNodesQueuedAtTheFailure(nn.Module):
    """In the replica whose slice holds the marker, backward fails first with many Python nodes still queued."""

    def __init__(self, nodes: int) -> None:
        super().__init__()
        self.bn, self.nodes = syncbn_ext.SynchronizedBatchNorm1d(C), nodes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(x)
        if not bool((x == MARKER).any()):
            return y
        queued = [InBackward.apply(y, nothing) for _ in range(self.nodes)]  # Python nodes
        return torch.stack([*queued, InBackward.apply(y, fail)]).sum(0)  # the last made runs first


def nothing() -> None:
    pass


def backward_failed() -> None:
    dp = syncbn_ext.DataParallelWithCallback(
        ManyNodesQueuedAtTheFailure(2000), device_ids=["cpu"] * 2, parallel_backward=True
    )
    x = torch.randn(4, C)
    x[3] = MARKER  # in replica 1's slice
    try:
        dp(x.requires_grad_()).sum().backward()
    except ValueError:
        print("ValueError", flush=True)


SCENARIOS = {"interrupt": interrupt, "backward-timeout": backward_timeout, "backward-failed": backward_failed}

if __name__ == "__main__":
    # As in a user's program, the scenario's code lives in an imported module and what it returns in the script's
    # globals, destroyed by the exit before the slow teardown.
    import exit_scenario

    result = exit_scenario.SCENARIOS[sys.argv[1]]()
    slow_teardown = exit_scenario.SlowTeardown()
