"""Ctrl-C during a forward, in a process of its own (run by test_interrupts.py; prints one JSON line).

4 CPU replicas; replica 0 (the one that holds the model's buffers) sleeps before its layers. An interrupt reaches the
main thread while the others wait for it in the first synchronized layer: SIGINT, or (argument ``interrupt_main`` or
``async``) an exception set for the main thread without a signal (``_thread.interrupt_main()``, as IDLE's Ctrl-C;
``PyThreadState_SetAsyncExc``, as timeout libraries), which Python raises only between bytecodes. Measures how fast
the KeyboardInterrupt arrives, waits for the slow replica to wake and run on (a plain nn.BatchNorm1d, then a
synchronized layer), and checks that nothing reached the model afterwards; then that the next forward is correct.
"""

from __future__ import annotations

import _thread
import copy
import ctypes
import json
import signal
import sys
import threading
import time

import torch
from torch import nn

import syncbn_ext
from syncbn_ext.replica_workers import replica_threads_running

SLOW_SECONDS = 3.0
SIGNAL_AFTER = 0.5


class SlowInCopy(nn.Module):
    """Sleeps in the replica with copy id `copy_id` while armed."""

    def __init__(self, copy_id: int) -> None:
        super().__init__()
        self.target = copy_id
        self.armed = True
        self.copy_id = None

    def __data_parallel_replicate__(self, ctx: object, copy_id: int) -> None:
        self.copy_id = copy_id

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.armed and self.copy_id == self.target:
            time.sleep(SLOW_SECONDS)
        return x


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        SlowInCopy(0),
        nn.BatchNorm1d(3),  # a plain layer in replica 0 writes its running statistics when the replica wakes
        syncbn_ext.SynchronizedBatchNorm1d(3),
        nn.Linear(3, 3),
        syncbn_ext.SynchronizedBatchNorm1d(3),
    ).double()
    before = copy.deepcopy(model.state_dict())
    dp = syncbn_ext.DataParallelWithCallback(model, device_ids=["cpu"] * 4)
    x = torch.randn(8, 3, dtype=torch.float64)

    main_thread = threading.main_thread().ident
    sent: dict[str, float] = {}

    how = sys.argv[1] if len(sys.argv) > 1 else "signal"

    def interrupt() -> None:
        time.sleep(SIGNAL_AFTER)
        sent["at"] = time.monotonic()
        if how == "interrupt_main":
            _thread.interrupt_main()
        elif how == "async":
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(main_thread), ctypes.py_object(KeyboardInterrupt))
        else:
            signal.pthread_kill(main_thread, signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    result: dict[str, object] = {}
    try:
        dp(x)
        result["raised"] = None
    except KeyboardInterrupt:
        result["raised"] = "KeyboardInterrupt"
        result["latency"] = time.monotonic() - sent["at"]
    result["left_behind"] = sorted(t.name for t in replica_threads_running())
    result["changed_at_interrupt"] = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]

    # The slow replica wakes, runs its plain BatchNorm and reaches its synchronized layer: refused, it ends.
    deadline = time.monotonic() + SLOW_SECONDS + 10
    while replica_threads_running() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    result["left_after_wake"] = sorted(t.name for t in replica_threads_running())
    result["changed_after_wake"] = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]

    # The next forward works and equals the whole-batch reference (the plain layer in eval mode: it is per replica).
    model[0].armed = False
    model[1].eval()
    reference = syncbn_ext.revert_model(copy.deepcopy(model))
    y = dp(x)
    y_ref = reference(x)
    result["next_forward_error"] = (y - y_ref).abs().max().item()
    result["next_running_mean_error"] = (model[2].running_mean - reference[2].running_mean).abs().max().item()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
    sys.exit(0)
