"""Making an existing ``nn.DataParallel`` run the replication callbacks (:func:`patch`): its ``replicate``,
``parallel_apply``, ``forward`` and call wrapped in place, as the established library's
``patch_replication_callback`` did, with :class:`~syncbn_ext.DataParallelWithCallback`'s failure handling."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from torch import nn

from .data_parallel import (
    DataParallelWithCallback,
    _call_telling_failed_pre_hooks,
    _one_forward,
    _PatchedParallelApply,
    _replicate_with_callbacks,
    _write_back_deferred,
)

__all__ = ["patch", "patch_replication_callback"]

DP = TypeVar("DP", bound=nn.DataParallel)


class _ReplicateWithCallbacks:
    """The ``replicate`` that :func:`patch` installs: the previous one, then the replication callbacks.

    A class rather than a closure so that a patched module can still be pickled and deep-copied.
    """

    def __init__(self, replicate: Any) -> None:
        self.replicate = replicate

    def __call__(self, module: nn.Module, device_ids: Sequence[Any]) -> list[nn.Module]:
        _write_back_deferred()  # a forward replicating again starts from its previous replicas' buffers
        return _replicate_with_callbacks(self.replicate, module, device_ids)


class _OneTrainingForwardAtATime:
    """The ``forward`` that :func:`patch` installs: the instance's previous one under its module's
    :func:`~syncbn_ext.forward_locks.training_forward_lock`, writing the buffers back once it succeeded (see
    :func:`_one_forward`). A class so that a patched module can still be pickled."""

    def __init__(self, forward: Any, data_parallel: nn.DataParallel) -> None:
        self.forward = forward  # a bound method, or a function of the user's set on the instance before patch()
        self.data_parallel = data_parallel

    def __call__(self, *inputs: Any, **kwargs: Any) -> Any:
        with _one_forward(self.data_parallel.module, self.data_parallel):
            return self.forward(*inputs, **kwargs)


class _CallTellingFailedPreHooks:
    """The call that :func:`patch` installs: the class's, with the instance's forward pre-hooks (where it has any)
    in the block that tells the other ranks a forward failing before its first synchronized call, as
    :class:`~syncbn_ext.DataParallelWithCallback`'s. A class so that a patched module can still be pickled."""

    def __init__(self, data_parallel: nn.DataParallel) -> None:
        self.data_parallel = data_parallel

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        data_parallel = self.data_parallel
        call = type(data_parallel)._call_impl.__get__(data_parallel)
        return _call_telling_failed_pre_hooks(data_parallel, call, *args, **kwargs)


def patch(data_parallel: DP) -> DP:
    """Makes an existing ``nn.DataParallel`` run the replication callbacks after each replication.

    Wraps the instance's ``replicate`` (monkey-patching, like the established library's
    ``patch_replication_callback``), so that each forward calls ``__data_parallel_replicate__(ctx,
    copy_id)`` on the new copies, its ``parallel_apply``, so that the patched instance handles failing,
    interrupted and stuck replicas as :class:`DataParallelWithCallback` does, its ``forward``, so that
    training forwards from several threads run one after another (as the wrapper's), and its call, so that across
    processes a forward pre-hook of the instance raising is told to the other ranks as a forward failing before its
    first synchronized call is. Prefer :class:`DataParallelWithCallback` for new code.

    Args:
        data_parallel: an ``nn.DataParallel`` (or subclass) instance.

    Returns:
        The same instance. Patching twice, or patching a :class:`DataParallelWithCallback`, changes nothing.

    Raises:
        TypeError: ``data_parallel`` is not an ``nn.DataParallel``.

    Example:
        >>> model = nn.DataParallel(model, device_ids=[0, 1])
        >>> patch(model)  # doctest: +SKIP
    """
    if not isinstance(data_parallel, nn.DataParallel):
        raise TypeError(f"patch() expects an nn.DataParallel instance, got {type(data_parallel).__qualname__}")
    if isinstance(data_parallel, DataParallelWithCallback):
        return data_parallel
    if isinstance(data_parallel.__dict__.get("replicate"), _ReplicateWithCallbacks):
        return data_parallel
    data_parallel.replicate = _ReplicateWithCallbacks(data_parallel.replicate)
    data_parallel.parallel_apply = _PatchedParallelApply(data_parallel.parallel_apply)
    data_parallel.forward = _OneTrainingForwardAtATime(data_parallel.forward, data_parallel)
    data_parallel._call_impl = _CallTellingFailedPreHooks(data_parallel)
    return data_parallel


#: The established library's name for :func:`patch`.
patch_replication_callback = patch
