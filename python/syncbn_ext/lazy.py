"""Lazy synchronized layers: ``nn.LazyBatchNormNd`` whose first forward makes them synchronized layers.

``LazySynchronizedBatchNorm1d/2d/3d`` infer ``num_features`` from their first input, as torch's lazy BatchNorm
layers do, then become :class:`~syncbn_ext.SynchronizedBatchNorm1d` / ``2d`` / ``3d``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.nn.modules.batchnorm import _LazyNormBase

from .nn import SynchronizedBatchNorm1d, SynchronizedBatchNorm2d, SynchronizedBatchNorm3d

__all__ = ["LazySynchronizedBatchNorm1d", "LazySynchronizedBatchNorm2d", "LazySynchronizedBatchNorm3d"]


class _LazySynchronizedBatchNorm(_LazyNormBase):
    """``nn.LazyBatchNormNd``'s lazy initialization for a synchronized layer: ``num_features`` from the first input.

    Until its first forward the layer holds uninitialized parameters and buffers (which the replicas cannot share:
    run one forward outside the wrapper first, as with every lazy module); that forward materializes them and the
    layer becomes the ``cls_to_become`` synchronized layer.
    """

    def __init__(
        self,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        process_group: Any = None,
    ) -> None:
        super().__init__(eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.process_group = process_group

    def initialize_parameters(self, input: Tensor) -> None:  # type: ignore[override]
        super().initialize_parameters(input)
        # Error messages name the layer with its number of features, known from now on.
        self._name_unreplicated(self.cls_to_become.__name__)


class LazySynchronizedBatchNorm1d(_LazySynchronizedBatchNorm, SynchronizedBatchNorm1d):
    """``nn.LazyBatchNorm1d`` for :class:`SynchronizedBatchNorm1d`: ``num_features`` inferred at the first forward.

    Same arguments as :class:`torch.nn.LazyBatchNorm1d`, and ``process_group`` as
    :class:`SynchronizedBatchNorm1d`'s; becomes a :class:`SynchronizedBatchNorm1d` at its first forward.
    """

    cls_to_become = SynchronizedBatchNorm1d  # type: ignore[assignment]


class LazySynchronizedBatchNorm2d(_LazySynchronizedBatchNorm, SynchronizedBatchNorm2d):
    """``nn.LazyBatchNorm2d`` for :class:`SynchronizedBatchNorm2d`: ``num_features`` inferred at the first forward.

    Same arguments as :class:`torch.nn.LazyBatchNorm2d`, and ``process_group`` as
    :class:`SynchronizedBatchNorm2d`'s; becomes a :class:`SynchronizedBatchNorm2d` at its first forward.
    """

    cls_to_become = SynchronizedBatchNorm2d  # type: ignore[assignment]


class LazySynchronizedBatchNorm3d(_LazySynchronizedBatchNorm, SynchronizedBatchNorm3d):
    """``nn.LazyBatchNorm3d`` for :class:`SynchronizedBatchNorm3d`: ``num_features`` inferred at the first forward.

    Same arguments as :class:`torch.nn.LazyBatchNorm3d`, and ``process_group`` as
    :class:`SynchronizedBatchNorm3d`'s; becomes a :class:`SynchronizedBatchNorm3d` at its first forward.
    """

    cls_to_become = SynchronizedBatchNorm3d  # type: ignore[assignment]
