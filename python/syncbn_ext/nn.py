"""Synchronized BatchNorm layers: BatchNorm whose batch statistics cover every replica's slice.

Under ``nn.DataParallel`` each copy of an ``nn.BatchNorm2d`` normalizes its slice of the batch with the
statistics of that slice only. :class:`SynchronizedBatchNorm1d`, :class:`SynchronizedBatchNorm2d` and
:class:`SynchronizedBatchNorm3d` compute the mean and variance over the *whole* batch instead: under
:class:`syncbn_ext.DataParallelWithCallback` (or an ``nn.DataParallel`` given :func:`syncbn_ext.patch`), every
copy sends its local statistics ``(count, mean, M2)`` to the copy 0 of the layer, which merges them (Chan's
formula, in C++) and hands every copy the merged mean and variance. N replicas with batch B/N then behave
like one module with batch B: same output, same gradients, same running statistics.

The layers are drop-in replacements for ``nn.BatchNormNd``: same constructor, same input checks and error
messages, same ``repr``, same ``state_dict`` keys (checkpoints load both ways). Whenever the running statistics
are used (eval mode with tracked statistics), and when not replicated (a plain forward, or
``DataParallelWithCallback`` with one device) in the default eps mode, the forward *is* ``nn.BatchNorm``'s, bit
for bit. See :func:`set_sbn_eps_mode` for the established library's ``sqrt(max(var, eps))``.

Example:
    >>> import syncbn_ext
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), syncbn_ext.SynchronizedBatchNorm2d(8), nn.ReLU())
    >>> dp = syncbn_ext.DataParallelWithCallback(model, device_ids=["cpu"] * 4)
    >>> out = dp(torch.randn(16, 3, 32, 32))  # statistics over all 16 samples
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import BatchNorm1d as _TorchBatchNorm1d
from torch.nn.modules.batchnorm import BatchNorm2d as _TorchBatchNorm2d
from torch.nn.modules.batchnorm import BatchNorm3d as _TorchBatchNorm3d
from torch.nn.modules.batchnorm import SyncBatchNorm as _TorchSyncBatchNorm

from .eps_mode import get_sbn_eps_mode, set_sbn_eps_mode
from .synchronized_base import _SynchronizedBatchNorm, _traced_as_a_leaf

__all__ = [
    "SyncBatchNorm",
    "SynchronizedBatchNorm1d",
    "SynchronizedBatchNorm2d",
    "SynchronizedBatchNorm3d",
    "get_sbn_eps_mode",
    "set_sbn_eps_mode",
]


class SynchronizedBatchNorm1d(_SynchronizedBatchNorm, _TorchBatchNorm1d):
    r"""``nn.BatchNorm1d`` with batch statistics over every replica: input ``(N, C)`` or ``(N, C, L)``.

    Same arguments, defaults, checks, ``repr`` and ``state_dict`` as :class:`torch.nn.BatchNorm1d`, and a subclass
    of it (code that picks BatchNorm layers by ``isinstance`` finds it). Under
    :class:`syncbn_ext.DataParallelWithCallback` the mean and variance of each channel are those of the whole
    batch (all replicas' slices); alone, or with running statistics, it is ``nn.BatchNorm1d``.

    Args:
        num_features: the number of features or channels ``C``.
        eps: added to the variance (or its lower bound, see :func:`set_sbn_eps_mode`). Default: 1e-5.
        momentum: the running statistics' update factor; ``None`` for a cumulative average. Default: 0.1.
        affine: learnable ``weight`` and ``bias``. Default: ``True``.
        track_running_stats: keep ``running_mean`` / ``running_var`` (used in eval mode). Default: ``True``.
        device: device of the parameters and buffers.
        dtype: dtype of the parameters and buffers.
        bias: with ``affine``, whether to learn ``bias``. Default: ``True``.
        process_group: a ``torch.distributed`` group to also synchronize across in training mode (every replica of
            every process of the group). Default ``None``: the replicas of this process only.
    """

    _check_input_dim = _TorchBatchNorm1d._check_input_dim


class SynchronizedBatchNorm2d(_SynchronizedBatchNorm, _TorchBatchNorm2d):
    r"""``nn.BatchNorm2d`` with batch statistics over every replica: input ``(N, C, H, W)``.

    Same arguments, defaults, checks, ``repr`` and ``state_dict`` as :class:`torch.nn.BatchNorm2d`, and a subclass
    of it (code that picks BatchNorm layers by ``isinstance`` finds it). Under
    :class:`syncbn_ext.DataParallelWithCallback` the mean and variance of each channel are those of the whole
    batch (all replicas' slices); alone, or with running statistics, it is ``nn.BatchNorm2d``.

    Args:
        num_features: the number of channels ``C``.
        eps: added to the variance (or its lower bound, see :func:`set_sbn_eps_mode`). Default: 1e-5.
        momentum: the running statistics' update factor; ``None`` for a cumulative average. Default: 0.1.
        affine: learnable ``weight`` and ``bias``. Default: ``True``.
        track_running_stats: keep ``running_mean`` / ``running_var`` (used in eval mode). Default: ``True``.
        device: device of the parameters and buffers.
        dtype: dtype of the parameters and buffers.
        bias: with ``affine``, whether to learn ``bias``. Default: ``True``.
        process_group: a ``torch.distributed`` group to also synchronize across in training mode (every replica of
            every process of the group). Default ``None``: the replicas of this process only.
    """

    _check_input_dim = _TorchBatchNorm2d._check_input_dim


class SynchronizedBatchNorm3d(_SynchronizedBatchNorm, _TorchBatchNorm3d):
    r"""``nn.BatchNorm3d`` with batch statistics over every replica: input ``(N, C, D, H, W)``.

    Same arguments, defaults, checks, ``repr`` and ``state_dict`` as :class:`torch.nn.BatchNorm3d`, and a subclass
    of it (code that picks BatchNorm layers by ``isinstance`` finds it). Under
    :class:`syncbn_ext.DataParallelWithCallback` the mean and variance of each channel are those of the whole
    batch (all replicas' slices); alone, or with running statistics, it is ``nn.BatchNorm3d``.

    Args:
        num_features: the number of channels ``C``.
        eps: added to the variance (or its lower bound, see :func:`set_sbn_eps_mode`). Default: 1e-5.
        momentum: the running statistics' update factor; ``None`` for a cumulative average. Default: 0.1.
        affine: learnable ``weight`` and ``bias``. Default: ``True``.
        track_running_stats: keep ``running_mean`` / ``running_var`` (used in eval mode). Default: ``True``.
        device: device of the parameters and buffers.
        dtype: dtype of the parameters and buffers.
        bias: with ``affine``, whether to learn ``bias``. Default: ``True``.
        process_group: a ``torch.distributed`` group to also synchronize across in training mode (every replica of
            every process of the group). Default ``None``: the replicas of this process only.
    """

    _check_input_dim = _TorchBatchNorm3d._check_input_dim


class SyncBatchNorm(_SynchronizedBatchNorm):
    r"""A drop-in for ``torch.nn.SyncBatchNorm``: batch statistics over every replica, any input of 2+ dims.

    Same arguments, checks, ``repr`` and ``state_dict`` as :class:`torch.nn.SyncBatchNorm`, on CPU as on GPUs.
    Under :class:`syncbn_ext.DataParallelWithCallback` the mean and variance of each channel are those of the whole
    batch (all replicas' slices); alone, or with running statistics, it is ``nn.BatchNorm``.

    Args:
        num_features: the number of channels ``C`` of an ``(N, C, *)`` input.
        eps: added to the variance (or its lower bound, see :func:`set_sbn_eps_mode`). Default: 1e-5.
        momentum: the running statistics' update factor; ``None`` for a cumulative average. Default: 0.1.
        affine: learnable ``weight`` and ``bias``. Default: ``True``.
        track_running_stats: keep ``running_mean`` / ``running_var`` (used in eval mode). Default: ``True``.
        process_group: the ``torch.distributed`` group to synchronize across in training mode (in eval mode, as
            ``torch.nn.SyncBatchNorm``, batch statistics are this process's); ``None`` (the default) is the
            default group when ``torch.distributed`` is initialized.
        device: device of the parameters and buffers.
        dtype: dtype of the parameters and buffers.
        bias: with ``affine``, whether to learn ``bias``. Default: ``True``.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            bias=bias,
            process_group=process_group,
        )

    _default_to_world = True
    _check_input_dim = _TorchSyncBatchNorm._check_input_dim

    def forward(self, input: Tensor) -> Tensor:
        """See :meth:`SynchronizedBatchNorm2d.forward`; ``nn.SyncBatchNorm``'s checks, in its order."""
        if isinstance(input, torch.fx.Proxy):
            return _traced_as_a_leaf(self, input)
        try:
            self._check_input_dim(input)
            _TorchSyncBatchNorm._check_non_zero_input_channels(self, input)
        except BaseException:
            if self.training:  # the other ranks must fail this call too (see _announce_failure)
                try:
                    group = self.sync_group()
                except TypeError:  # a process_group that is no group: this call's error is the input's
                    group = None
                self._announce_failure(input, self.__dict__.get("_copy_id"), group)
            raise
        return super().forward(input)

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group: Any = None) -> Any:
        """Converts every BatchNorm layer of ``module`` into a :class:`SyncBatchNorm`, keeping its state.

        ``nn.BatchNorm1d/2d/3d``, ``torch.nn.SyncBatchNorm`` and the ``SynchronizedBatchNormNd`` layers become
        :class:`SyncBatchNorm` layers with the same parameters and buffers (the same tensors), options, training
        flag and hooks, in place (as ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``); returns the converted
        module (the root itself is replaced when it is such a layer). A lazy BatchNorm not yet initialized raises a
        ``TypeError``: run one forward first, or use :func:`syncbn_ext.convert_model`.
        """
        from .convert import _convert_to_sync_batch_norm

        return _convert_to_sync_batch_norm(module, process_group, stacklevel=4)


def __getattr__(name: str) -> Any:
    # The lazy layers live in lazy.py (which imports this module); their old home still finds them, so that
    # pickles naming syncbn_ext.nn.LazySynchronizedBatchNormNd load.
    if name.startswith("LazySynchronizedBatchNorm"):
        from . import lazy

        return getattr(lazy, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
