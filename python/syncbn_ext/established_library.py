"""The established library's (Synchronized-BatchNorm-PyTorch) classes, told apart without importing it: projects
vendor it under other package names, and :func:`syncbn_ext.convert_model` converts its layers to ours."""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .nn import SynchronizedBatchNorm1d, SynchronizedBatchNorm2d, SynchronizedBatchNorm3d
from .synchronized_base import _SynchronizedBatchNorm

__all__ = ["derives_from_established_layer", "established_layer", "is_established_data_parallel"]

# The established library's (Synchronized-BatchNorm-PyTorch) layers, told by their design (nn.BatchNorm with its
# replication hook and a master callback of their own), names and module: its package is not imported here, and
# projects vendor it (`lib.sync_batchnorm.batchnorm`, or `lib.nn.modules.batchnorm` as CSAIL's segmentation code).
# Its layers synchronize with its own code (a GPU-only reduction, no timeouts): converted to ours, with their state.
_ESTABLISHED_LAYERS: dict[str, type[_SynchronizedBatchNorm]] = {
    "SynchronizedBatchNorm1d": SynchronizedBatchNorm1d,
    "SynchronizedBatchNorm2d": SynchronizedBatchNorm2d,
    "SynchronizedBatchNorm3d": SynchronizedBatchNorm3d,
}


def _defined_in_module_named(cls: type, name: str) -> bool:
    """Whether ``cls`` is defined in a module whose last name is ``name`` (``<anything>.batchnorm``)."""
    return (getattr(cls, "__module__", None) or "").rsplit(".", 1)[-1] == name


def _of_established_design(cls: type) -> bool:
    """A BatchNorm layer of the established library's design (its code, or a copy of it), not one of ours."""
    return (
        issubclass(cls, _BatchNorm)
        and not issubclass(cls, _SynchronizedBatchNorm)
        and callable(getattr(cls, "__data_parallel_replicate__", None))
        and callable(getattr(cls, "_data_parallel_master", None))
    )


def established_layer(cls: type) -> type[_SynchronizedBatchNorm] | None:
    """Our layer for one of the established library's (its exact classes), else None."""
    if cls.__name__ in _ESTABLISHED_LAYERS and _defined_in_module_named(cls, "batchnorm"):
        if _of_established_design(cls):
            return _ESTABLISHED_LAYERS[cls.__name__]
    return None


def derives_from_established_layer(cls: type) -> bool:
    """A class of the established library's design other than its own layers (a subclass of one: not converted)."""
    return _of_established_design(cls) and established_layer(cls) is None


def is_established_data_parallel(module: nn.Module) -> bool:
    """Whether ``module`` is the established library's ``DataParallelWithCallback``."""
    cls = type(module)
    return cls.__name__ == "DataParallelWithCallback" and _defined_in_module_named(cls, "replicate")
