"""A plain-Python synchronized BatchNorm in the style of the established library, for comparison only.

This is a re-implementation, written for benchmarking from our understanding of its design, of
``_SynchronizedBatchNorm`` of vacancy/Synchronized-BatchNorm-PyTorch (MIT licence),
``sync_batchnorm/batchnorm.py``. It keeps that design's math, its data flow and its cost per pass:

* per replica, the forward views the input as ``(B, C, -1)`` and computes ``input_sum = _sum_ft(input)``
  and ``input_ssum = _sum_ft(input ** 2)`` (sum and sum of squares over the batch and spatial dims);
* it sends ``(sum, ssum, sum_size)`` through the layer's :class:`SyncMaster` (the plain-Python
  queue/Condition barrier of ``benchmarks/established_sync_master.py``): copy 0 calls ``run_master``,
  the others ``run_slave`` on the pipe they registered in ``__data_parallel_replicate__``;
* the master callback adds every copy's sums, computes ``mean = sum / size``,
  ``sumvar = ssum - sum * mean``, the unbiased variance ``sumvar / (size - 1)`` (for the running
  statistics, updated on the original module) and the biased one ``sumvar / size``, and hands every
  copy ``(mean, inv_std = clamp(bias_var, eps) ** -0.5)``;
* every copy computes ``(input - mean) * (inv_std * weight) + bias`` with plain autograd ops.

Differences forced by the CPU: the original reduced the copies' sums with ``ReduceAddCoalesced`` and
sent the results back with ``Broadcast``, autograd functions that move tensors between GPUs. All CPU
replicas live in one process on one device, so the reduction is ``torch.stack(...).sum(0)`` and every
copy gets the same ``mean`` / ``inv_std`` tensors: plain autograd ops that carry the gradient back to
every copy's sums exactly as those two functions did. Like the original, nothing waits in backward
(the only barrier is in the forward), which matters on CPU where the autograd engine runs every
replica's backward on one thread.

Kept from the original on purpose: the float32 sum / sum-of-squares statistics (inexact when
``mean**2 >> var``, design note 11), ``clamp(var, eps)`` instead of ``var + eps``, a ``momentum`` that
must be a number, ``num_batches_tracked`` not counted under replication, and ``F.batch_norm`` itself
whenever the layer is not replicated or not training. Not part of the package; do not import it from
library code.
"""

from __future__ import annotations

import collections
import os
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from established_sync_master import SyncMaster  # noqa: E402  (beside this file)

__all__ = [
    "SynchronizedBatchNorm1d",
    "SynchronizedBatchNorm2d",
    "SynchronizedBatchNorm3d",
]


def _sum_ft(tensor: Tensor) -> Tensor:
    """Sums over the first and the last dimension: ``(B, C, L)`` to ``(C,)``."""
    return tensor.sum(dim=0).sum(dim=-1)


def _unsqueeze_ft(tensor: Tensor) -> Tensor:
    """Adds a dimension at the front and at the end: ``(C,)`` to ``(1, C, 1)``."""
    return tensor.unsqueeze(0).unsqueeze(-1)


_ChildMessage = collections.namedtuple("_ChildMessage", ["sum", "ssum", "sum_size"])
_MasterMessage = collections.namedtuple("_MasterMessage", ["sum", "inv_std"])


class _SynchronizedBatchNorm(_BatchNorm):
    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
    ) -> None:
        super().__init__(
            num_features, eps=eps, momentum=momentum, affine=affine, track_running_stats=track_running_stats
        )
        # Bound to this (the original) module: the replicas are shallow copies that share it, so the
        # master callback updates the original module's running statistics.
        self._sync_master = SyncMaster(self._data_parallel_master)
        self._is_parallel = False
        self._parallel_id: int | None = None
        self._slave_pipe: Any = None

    def forward(self, input: Tensor) -> Tensor:
        # Not replicated, or not training: PyTorch's own BatchNorm.
        if not (self._is_parallel and self.training):
            return F.batch_norm(
                input,
                self.running_mean,
                self.running_var,
                self.weight,
                self.bias,
                self.training,
                self.momentum,
                self.eps,
            )

        # Resize the input to (B, C, -1).
        input_shape = input.size()
        assert input.size(1) == self.num_features, (
            f"Channel size mismatch: got {input.size(1)}, expect {self.num_features}."
        )
        input = input.view(input.size(0), self.num_features, -1)

        # The sum and the sum of squares.
        sum_size = input.size(0) * input.size(2)
        input_sum = _sum_ft(input)
        input_ssum = _sum_ft(input**2)

        # Reduce and broadcast the statistics.
        if self._parallel_id == 0:
            mean, inv_std = self._sync_master.run_master(_ChildMessage(input_sum, input_ssum, sum_size))
        else:
            mean, inv_std = self._slave_pipe.run_slave(_ChildMessage(input_sum, input_ssum, sum_size))

        # The output (the original fuses inv_std and weight into one per-channel factor).
        if self.affine:
            output = (input - _unsqueeze_ft(mean)) * _unsqueeze_ft(inv_std * self.weight) + _unsqueeze_ft(self.bias)
        else:
            output = (input - _unsqueeze_ft(mean)) * _unsqueeze_ft(inv_std)
        return output.view(input_shape)

    def __data_parallel_replicate__(self, ctx: Any, copy_id: int) -> None:
        self._is_parallel = True
        self._parallel_id = copy_id
        # Copy 0 is the master.
        if self._parallel_id == 0:
            ctx.sync_master = self._sync_master
        else:
            self._slave_pipe = ctx.sync_master.register_slave(copy_id)

    def _data_parallel_master(self, intermediates: list) -> list:
        """Reduces the sums and sums of squares, computes the statistics and hands them to every copy."""
        # The original sorts by GPU index (copy 0 on the first device); every CPU replica has
        # device -1, so the copy ids give the same order.
        intermediates = sorted(intermediates, key=lambda i: i[0])

        # ReduceAddCoalesced on one device: a differentiable sum of the copies' tensors.
        sum_size = sum(rec.sum_size for _, rec in intermediates)
        sum_ = torch.stack([rec.sum for _, rec in intermediates]).sum(dim=0)
        ssum = torch.stack([rec.ssum for _, rec in intermediates]).sum(dim=0)
        mean, inv_std = self._compute_mean_std(sum_, ssum, sum_size)

        # Broadcast on one device: every copy gets the same tensors.
        return [(copy_id, _MasterMessage(mean, inv_std)) for copy_id, _ in intermediates]

    def _compute_mean_std(self, sum_: Tensor, ssum: Tensor, size: int) -> tuple[Tensor, Tensor]:
        """Mean and inverse standard deviation from the sum and sum of squares; updates the running statistics."""
        assert size > 1, "BatchNorm computes unbiased standard-deviation, which requires size > 1."
        mean = sum_ / size
        sumvar = ssum - sum_ * mean
        unbias_var = sumvar / (size - 1)
        bias_var = sumvar / size

        if self.track_running_stats:
            with torch.no_grad():
                self.running_mean = (1 - self.momentum) * self.running_mean + self.momentum * mean.detach()
                self.running_var = (1 - self.momentum) * self.running_var + self.momentum * unbias_var.detach()

        return mean, bias_var.clamp(self.eps) ** -0.5


class SynchronizedBatchNorm1d(_SynchronizedBatchNorm):
    """The established design's synchronized ``BatchNorm1d``: input ``(N, C)`` or ``(N, C, L)``."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 2 and input.dim() != 3:
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")


class SynchronizedBatchNorm2d(_SynchronizedBatchNorm):
    """The established design's synchronized ``BatchNorm2d``: input ``(N, C, H, W)``."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


class SynchronizedBatchNorm3d(_SynchronizedBatchNorm):
    """The established design's synchronized ``BatchNorm3d``: input ``(N, C, D, H, W)``."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(f"expected 5D input (got {input.dim()}D input)")
