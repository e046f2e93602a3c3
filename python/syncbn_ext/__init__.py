"""syncbn_ext: synchronized BatchNorm for ``nn.DataParallel`` and LibTorch.

BatchNorm under ``nn.DataParallel`` normalizes each device's slice of the batch with that
slice's statistics. The layers of this package compute them over the whole batch instead,
through a C++ replication engine: after every replication each module gets
``__data_parallel_replicate__(ctx, copy_id)``, and the copies of one layer meet in a
master/slave barrier (:class:`SyncMaster`) to reduce their statistics.
"""

from __future__ import annotations

import importlib.metadata
import os

from ._loader import LoadInfo, StaleBuildLockError
from ._native import _C, load_info

CallbackContext = _C.CallbackContext
execute_replication_callbacks = _C.execute_replication_callbacks
SyncMaster = _C.SyncMaster
SlavePipe = _C.SlavePipe
FutureResult = _C.FutureResult
BarrierError = _C.BarrierError
BarrierTimeoutError = _C.BarrierTimeoutError
BarrierAbortedError = _C.BarrierAbortedError
default_timeout_seconds = _C.default_timeout_seconds

from .data_parallel import DataParallelWithCallback  # noqa: E402
from .patching import patch, patch_replication_callback  # noqa: E402
from .replicate import replicate_on_cpu  # noqa: E402


def _find_version() -> str:
    try:
        return importlib.metadata.version("syncbn_ext")
    except importlib.metadata.PackageNotFoundError:
        return _C.version()


def _find_cmake_prefix_path() -> str | None:
    # The installed package (a wheel, or an editable install's build output) holds lib/,
    # include/ and share/cmake/syncbn beside _C; a JIT build has no CMake package.
    prefix = os.path.dirname(os.path.abspath(_C.__file__))
    return prefix if os.path.isfile(os.path.join(prefix, "share", "cmake", "syncbn", "syncbnConfig.cmake")) else None


__version__ = _find_version()
#: The prefix to add to CMAKE_PREFIX_PATH for ``find_package(syncbn)``; None without an installed package.
cmake_prefix_path = _find_cmake_prefix_path()

__all__ = [
    "BarrierAbortedError",
    "BarrierError",
    "BarrierTimeoutError",
    "CallbackContext",
    "DataParallelWithCallback",
    "FutureResult",
    "LoadInfo",
    "SlavePipe",
    "StaleBuildLockError",
    "SyncMaster",
    "cmake_prefix_path",
    "default_timeout_seconds",
    "execute_replication_callbacks",
    "load_info",
    "patch",
    "patch_replication_callback",
    "replicate_on_cpu",
]

# ----------------------------------------------------------------------------------------------------------------
# Synchronized BatchNorm layers and model conversion (nn.py, lazy.py, convert.py)
# ----------------------------------------------------------------------------------------------------------------

from .convert import convert_model, patch_sync_batchnorm, revert_model  # noqa: E402
from .distributed import cross_process_transport  # noqa: E402
from .forward_across_processes import announcing_failure  # noqa: E402
from .lazy import (  # noqa: E402
    LazySynchronizedBatchNorm1d,
    LazySynchronizedBatchNorm2d,
    LazySynchronizedBatchNorm3d,
)
from .nn import (  # noqa: E402
    SyncBatchNorm,
    SynchronizedBatchNorm1d,
    SynchronizedBatchNorm2d,
    SynchronizedBatchNorm3d,
    get_sbn_eps_mode,
    set_sbn_eps_mode,
)

__all__ += [
    "LazySynchronizedBatchNorm1d",
    "LazySynchronizedBatchNorm2d",
    "LazySynchronizedBatchNorm3d",
    "SyncBatchNorm",
    "SynchronizedBatchNorm1d",
    "SynchronizedBatchNorm2d",
    "SynchronizedBatchNorm3d",
    "announcing_failure",
    "convert_model",
    "cross_process_transport",
    "get_sbn_eps_mode",
    "patch_sync_batchnorm",
    "revert_model",
    "set_sbn_eps_mode",
]
