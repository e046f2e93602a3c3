"""A process forked while the wrapper's worker threads exist, and while another thread is in a training forward.

Run as a script by ``test_parallel_state.py``. The parent trains a step on 2 CPU replicas (its worker threads now
wait in the pool), then forks while a thread of its own holds the module's training-forward lock (as a training
forward running there would). The child, which has only the forking thread, sets one intra-op thread (torch's own
OpenMP cannot run in a forked child otherwise) and trains a step on the same wrapper: it must finish (not wait for
the parent's threads) and match one module on the whole batch. Prints one JSON line with what happened.
"""

from __future__ import annotations

import copy
import faulthandler
import json
import os
import threading
import time

import torch
from torch import nn

import syncbn_ext
from syncbn_ext.forward_locks import training_forward_lock

CHILD_SECONDS = 30  # the child's own bound: past it, it dumps its threads and exits with 1
CHILD_GRADIENT_ERROR = 3  # the child's exit status when its step differs from the whole batch's


def training_step(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    module.zero_grad()
    y = module(x)
    y.square().mean().backward()
    return y.detach(), [p.grad.clone() for p in module.parameters()]


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), syncbn_ext.SynchronizedBatchNorm2d(4), nn.ReLU())
    whole = copy.deepcopy(model)  # a synchronized layer outside a replication normalizes its own batch
    wrapper = syncbn_ext.DataParallelWithCallback(model, device_ids=["cpu"] * 2)
    x = torch.randn(6, 3, 8, 8)
    training_step(wrapper, x)
    training_step(whole, x)

    held, release = threading.Event(), threading.Event()

    def forward_elsewhere() -> None:
        with training_forward_lock(model):
            held.set()
            release.wait()

    thread = threading.Thread(target=forward_elsewhere, daemon=True)
    thread.start()
    held.wait()
    pid = os.fork()
    if pid == 0:
        faulthandler.dump_traceback_later(CHILD_SECONDS, exit=True)
        torch.set_num_threads(1)
        y, grads = training_step(wrapper, x)
        y_whole, grads_whole = training_step(whole, x)
        same = torch.allclose(y, y_whole, atol=1e-5) and all(
            torch.allclose(g, g_whole, atol=1e-5) for g, g_whole in zip(grads, grads_whole, strict=True)
        )
        os._exit(0 if same else CHILD_GRADIENT_ERROR)

    release.set()
    thread.join()
    deadline = time.monotonic() + CHILD_SECONDS + 10
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)  # (0, 0) while it runs
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            _, status = os.waitpid(pid, 0)  # killed: not an exit, so no exit status below
            break
        time.sleep(0.05)
    # The parent's wrapper goes on as before.
    y, grads = training_step(wrapper, x)
    y_whole, grads_whole = training_step(whole, x)
    parent_error = max((a - b).abs().max().item() for a, b in zip([y, *grads], [y_whole, *grads_whole], strict=True))
    child = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    print(json.dumps({"child_exit": child, "parent_error": parent_error}))


if __name__ == "__main__":
    main()
