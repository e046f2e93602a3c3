"""A wrapper's forward in one process of a group: a failure before its first synchronized call is told to the others.

Across processes, every rank's synchronized calls pair in order. A rank whose forward fails after its first
synchronized call on the group meets the other ranks at another call (a ``BarrierError`` on every rank); one whose
forward fails before it (a replica raising before its first synchronized layer, code before that layer) would leave
the others waiting at that call, which would then pair with this rank's next forward: one step apart for good,
silently. So a wrapper's forward (:class:`~syncbn_ext.DataParallelWithCallback`, a patched ``nn.DataParallel``) that
failed without a synchronized call tells the others (``_C.announce_failed_forward``), and every rank fails that
step; :func:`announcing_failure` does the same around any block (layers alone in the process, under DDP). The same
as ``syncbn::ForwardAcrossProcesses`` does for ``syncbn::data_parallel`` in C++.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ._exception_notes import add_note
from ._native import _C
from .distributed import exchange_group, made_exchange_group, mark_out_of_step, out_of_step
from .parallel_apply import running_a_replica
from .synchronized_base import _SynchronizedBatchNorm

__all__ = ["announcing_failure"]


def _exchanging_groups(module: nn.Module) -> list[Any]:
    """The process groups ``module``'s synchronized layers would exchange on in a forward now (training mode)."""
    if not dist.is_available():
        return []
    world = dist.is_initialized()
    groups: list[Any] = []
    for layer in module.modules():
        if not isinstance(layer, _SynchronizedBatchNorm) or not layer.training:
            continue
        if layer.__dict__.get("process_group") is None and not (world and layer._default_to_world):
            continue  # (no group to resolve: the common case, cheaply)
        group = layer.sync_group()
        if group is not None and all(group is not known for known in groups):
            groups.append(group)
    return groups


def _calls_on(group: Any, device: torch.device) -> tuple[int, int]:
    """The synchronized calls this process made on ``group`` so far, on ``device`` (its communicator, if made), and
    how many of them failed because a rank's failure was told there."""
    exchanging = made_exchange_group(group, device)
    if exchanging is None:
        return 0, 0
    return _C.synchronized_calls(exchanging), _C.failed_synchronized_calls(exchanging)


@contextlib.contextmanager
def announcing_failure(
    module: nn.Module, device: torch.device | str | None = None, label: str | None = None
) -> Iterator[None]:
    """Around a forward of ``module`` across processes: where the block raises an ``Exception`` before its first
    synchronized call on the group, the other ranks are told (their first synchronized call of that step raises a
    ``BarrierError`` naming this rank) before the error propagates, so that the ranks' next steps pair again. An
    interrupt (``KeyboardInterrupt``, or another ``BaseException`` that is not an ``Exception``) there propagates at
    once, untold, and this rank's later exchanges on the group fail (the ranks are out of step: start the processes
    again).

    :class:`~syncbn_ext.DataParallelWithCallback` (and a patched ``nn.DataParallel``) do this for every forward; use
    it where the layers run without one (alone in the process, under ``DistributedDataParallel``)::

        with syncbn_ext.announcing_failure(model):
            out = ddp_model(x)

    Args:
        module: the model whose synchronized layers (in their current mode) the block runs.
        device: where its first synchronized call exchanges (copy 0's input device: CUDA for NCCL); default: the
            device of the first synchronized layer's tensors, else the CPU.
        label: what failed, in this rank's messages (the note added where telling the others fails); default:
            "the forward of" ``module``'s class. The other ranks' errors name this rank, not the label.

    Told only where the block made no synchronized call (but ones in which another rank's failure was told): a
    block that made one that paired tells nothing, the other ranks meeting this one at another call. Where
    ``module``'s synchronized layers exchange on several groups, each group on which no failure was told yet is
    told, all at once (the other ranks fail at their first call of one of them, and tell the others the same
    way): every rank's forward must then run under a wrapper or in such a block. Not in a replica (the wrapper's
    forward tells for all of them). Counted from the block's start: another thread's forward of the same layers
    meanwhile (not one of a wrapper, which run one after another) hides the failure. Telling waits for the other
    ranks to reach that call (up to the group's timeout); where telling fails too, the block's error gets a note
    saying so.
    """
    # In a replica, the wrapper's forward tells for every replica (each telling would pair with another call).
    groups = [] if running_a_replica() else _exchanging_groups(module)
    if not groups:
        yield
        return
    device = _first_layer_device(module) if device is None else torch.device(device)
    label = f"the forward of {type(module).__name__}" if label is None else label
    before = [_calls_on(group, device) for group in groups]
    try:
        yield
    except Exception as error:
        # Told only where the block made no exchange but ones a failure was told in: after one that paired (or
        # failed otherwise), the other ranks wait at another call, maybe on a group already called, and telling
        # would wait for them there in vain.
        made = _made_since(before, groups, device)
        if any(calls != failed for calls, failed in made):
            raise
        # (Not on a group whose exchanges fail at once on this rank, out of step: its error says so already.)
        untold = [
            group for group, (_, failed) in zip(groups, made, strict=True) if failed == 0 and not out_of_step(group)
        ]
        for failure in _announce_on(untold, device, label):
            add_note(
                error,
                f"{label} failed before its first synchronized call, and telling the other ranks of the process "
                f"group so failed too ({failure}): they may pair that call with this rank's next forward; restart",
            )
        raise
    except BaseException as interrupt:
        if isinstance(interrupt, GeneratorExit):
            raise
        # An interrupt (KeyboardInterrupt; any BaseException not an Exception) propagates at once, untold (telling
        # waits for the other ranks). Where the block made no exchange on a group, the others wait at a call this
        # rank's next forward would pair with its own first one, one step apart, silently: its exchanges there fail
        # from now on instead.
        for group, made_there in zip(groups, _made_since(before, groups, device), strict=True):
            if made_there == (0, 0):
                mark_out_of_step(
                    group, f"{label} was interrupted ({type(interrupt).__name__}) before its first synchronized call"
                )
        raise


def _made_since(before: list[tuple[int, int]], groups: list[Any], device: torch.device) -> list[tuple[int, int]]:
    """Per group: the synchronized calls made since ``before`` (:func:`_calls_on` of each), and how many of them
    told a failure."""
    after = [_calls_on(group, device) for group in groups]
    return [(c1 - c0, f1 - f0) for (c1, f1), (c0, f0) in zip(after, before, strict=True)]


def _announce_on(groups: list[Any], device: torch.device, label: str) -> list[str]:
    """Tells the other ranks of each of ``groups`` that this rank's forward failed before its first synchronized call
    there; several at once, each from a thread of its own (the others reach them in their model's order, and fail
    at the first, then tell the rest the same way). Returns the tellings that failed."""
    failures: list[str] = []

    def announce(group: Any) -> None:
        try:
            _C.announce_failed_forward(exchange_group(group, label, device), device, label)
        except Exception as telling:
            failures.append(f"{type(telling).__name__}: {telling}")

    if len(groups) == 1:  # on the calling thread: a Ctrl-C meanwhile interrupts the wait
        announce(groups[0])
        return failures
    threads = [
        threading.Thread(target=announce, args=(group,), name="syncbn_ext: telling a failed forward", daemon=True)
        for group in groups
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return failures


def _first_layer_device(module: nn.Module) -> torch.device:
    """The device of the first synchronized layer's tensors (its weight or running mean), else the CPU."""
    for layer in module.modules():
        if isinstance(layer, _SynchronizedBatchNorm):
            for tensor in (layer.weight, layer.running_mean):
                if isinstance(tensor, torch.Tensor):
                    return tensor.device
    return torch.device("cpu")
