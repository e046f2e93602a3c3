"""Turning the BatchNorm layers of an existing model into synchronized ones, and back.

* :func:`convert_model`: every ``nn.BatchNorm1d/2d/3d`` becomes the matching :mod:`syncbn_ext.nn` layer (and
  ``torch.nn.SyncBatchNorm`` a :class:`syncbn_ext.SyncBatchNorm`, ``nn.LazyBatchNormNd`` a
  ``LazySynchronizedBatchNormNd``), and an ``nn.DataParallel`` a :class:`syncbn_ext.DataParallelWithCallback`.
* :func:`convert_to_sync_batch_norm` (``SyncBatchNorm.convert_sync_batchnorm``): every BatchNorm layer becomes a
  :class:`syncbn_ext.SyncBatchNorm`.
* :func:`revert_model`: the synchronized layers become ``nn.BatchNorm1d/2d/3d`` again.
* :func:`patch_sync_batchnorm`: while open, ``nn.BatchNorm1d/2d/3d`` *are* the synchronized classes, for code that
  builds its model from ``nn.BatchNorm2d`` itself (e.g. a model zoo's constructor).

Like ``nn.SyncBatchNorm.convert_sync_batchnorm``, the conversions work in place: containers keep their identity
and get the new layers as children, and each new layer takes over the *same* parameter and buffer tensors as the
layer it replaces, so an optimizer built over the model's parameters keeps working. Deep-copy the model first
(``copy.deepcopy``) to keep the original.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import torch
from torch import nn
from torch.nn.modules.batchnorm import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
    _BatchNorm,
)
from torch.nn.modules.batchnorm import SyncBatchNorm as TorchSyncBatchNorm
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrize

from .data_parallel import DataParallelWithCallback
from .established_library import derives_from_established_layer, established_layer, is_established_data_parallel
from .layer_transplant import move_hooks, transplant
from .lazy import LazySynchronizedBatchNorm1d, LazySynchronizedBatchNorm2d, LazySynchronizedBatchNorm3d
from .nn import SyncBatchNorm, SynchronizedBatchNorm1d, SynchronizedBatchNorm2d, SynchronizedBatchNorm3d
from .patching import patch
from .replicate import _optimized_module_type
from .synchronized_base import _SynchronizedBatchNorm

__all__ = ["convert_model", "convert_to_sync_batch_norm", "patch_sync_batchnorm", "revert_model"]

# The torch classes and their synchronized counterparts, captured at import so that a patch of torch.nn
# (patch_sync_batchnorm) does not change them.
_TORCH_TO_SYNC: dict[type[_BatchNorm], type[_SynchronizedBatchNorm]] = {
    BatchNorm1d: SynchronizedBatchNorm1d,
    BatchNorm2d: SynchronizedBatchNorm2d,
    BatchNorm3d: SynchronizedBatchNorm3d,
    TorchSyncBatchNorm: SyncBatchNorm,
    LazyBatchNorm1d: LazySynchronizedBatchNorm1d,
    LazyBatchNorm2d: LazySynchronizedBatchNorm2d,
    LazyBatchNorm3d: LazySynchronizedBatchNorm3d,
}
_SYNC_TO_TORCH: dict[type[_SynchronizedBatchNorm], type[_BatchNorm]] = {v: k for k, v in _TORCH_TO_SYNC.items()}

# The layers SyncBatchNorm.convert_sync_batchnorm converts (exact classes, captured at import).
_TO_SYNC_BATCH_NORM = (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    TorchSyncBatchNorm,
    SynchronizedBatchNorm1d,
    SynchronizedBatchNorm2d,
    SynchronizedBatchNorm3d,
)

M = TypeVar("M", bound=nn.Module)

# A layer revert_model made -> the number of the synchronized layer it stands for: converted again (a round trip to
# trace or export on one rank), it is that layer, and across processes keeps pairing with the other ranks' layers.
_reverted_layer_ids: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _to_synchronized_layers(
    target_of: Callable[[type], type[nn.Module] | None],
    process_group: Any,
    keep_own_group: Callable[[nn.Module], bool],
) -> Callable[[nn.Module], nn.Module]:
    """A converter of each layer whose class ``target_of`` maps to a synchronized class, keeping its state.

    The new layer synchronizes across ``process_group``; when that is None and ``keep_own_group(layer)``, across
    the group the layer already had (if any). A synchronized layer that ``target_of`` leaves in its class (one of
    ours, or a class derived from one) is given ``process_group`` in place under the same rule: a group asked for
    is never silently dropped.
    """

    def convert_layer(module: nn.Module) -> nn.Module:
        target = target_of(parametrize.type_before_parametrizations(module))
        regroup = process_group is not None or not keep_own_group(module)
        if target is None:
            if isinstance(module, _SynchronizedBatchNorm) and regroup:
                module.process_group = process_group
            return module
        new = transplant(module, target)
        # A synchronized layer converted, or one reverted and converted again, keeps its number.
        new._init_sync_state(module.__dict__.get("_layer_id", _reverted_layer_ids.get(module)))
        if regroup:
            new.process_group = process_group
        return new

    return convert_layer


def _to_synchronized(process_group: Any) -> Callable[[nn.Module], nn.Module]:
    def target_of(cls: type) -> type[nn.Module] | None:
        return _TORCH_TO_SYNC.get(cls) or established_layer(cls)

    return _to_synchronized_layers(target_of, process_group, keep_own_group=lambda layer: True)


def _require_module(module: object, function: str) -> None:
    if not isinstance(module, nn.Module):  # else an AttributeError from deep inside the conversion
        raise TypeError(f"{function}: module must be an nn.Module, got {type(module).__name__}")


def _refuse_lazy_batch_norm(cls: type) -> None:
    if issubclass(cls, LazyModuleMixin) and issubclass(cls, _BatchNorm):
        raise TypeError(
            f"convert_sync_batchnorm: {cls.__name__} is not initialized yet and SyncBatchNorm has no lazy form; "
            "run one forward first (the lazy layer then becomes an nn.BatchNormNd), or use "
            "syncbn_ext.convert_model, which makes it a LazySynchronizedBatchNormNd"
        )


def _to_sync_batch_norm(process_group: Any) -> Callable[[nn.Module], nn.Module]:
    def target_of(cls: type) -> type[nn.Module] | None:
        _refuse_lazy_batch_norm(cls)
        return SyncBatchNorm if cls in _TO_SYNC_BATCH_NORM or established_layer(cls) else None

    def keep_own_group(layer: nn.Module) -> bool:
        # As torch's convert_sync_batchnorm, the layers it converts and every SyncBatchNorm get the group given,
        # None (the default group) included; other synchronized layers keep theirs unless one is given.
        cls = parametrize.type_before_parametrizations(layer)
        converted = cls in _TO_SYNC_BATCH_NORM or established_layer(cls) is not None
        return not (converted or isinstance(layer, SyncBatchNorm))

    return _to_synchronized_layers(target_of, process_group, keep_own_group)


# What revert_model may make of a SyncBatchNorm.
_SYNC_BATCH_NORM_REVERTED_TO = (BatchNorm1d, BatchNorm2d, BatchNorm3d, TorchSyncBatchNorm)


def _sync_batch_norm_targets(
    module: nn.Module, sync_batch_norm_as: type[_BatchNorm] | Mapping[str, type[_BatchNorm]] | None
) -> dict[int, type[_BatchNorm]]:
    """The class each SyncBatchNorm of ``module`` reverts to, by the layer's id; checked before anything converts."""

    def checked(cls: Any, what: str) -> type[_BatchNorm]:
        # Inside patch_sync_batchnorm(), nn.BatchNorm2d is our class: the user meant torch's.
        torch_cls = _SYNC_TO_TORCH.get(cls) if isinstance(cls, type) else None  # type: ignore[call-overload]
        if torch_cls is not None and getattr(nn, torch_cls.__name__, None) is cls:
            cls = torch_cls
        if cls not in _SYNC_BATCH_NORM_REVERTED_TO:
            raise TypeError(
                f"revert_model: {what} must be nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d or nn.SyncBatchNorm "
                f"(the class a SyncBatchNorm becomes), not {cls!r}"
            )
        return cls

    # Every name of every SyncBatchNorm: a layer shared by several parents may be named by any of them.
    layers = {
        name: layer
        for name, layer in module.named_modules(remove_duplicate=False)
        if parametrize.type_before_parametrizations(layer) is SyncBatchNorm
    }
    if sync_batch_norm_as is None or isinstance(sync_batch_norm_as, type):
        cls = checked(TorchSyncBatchNorm if sync_batch_norm_as is None else sync_batch_norm_as, "sync_batch_norm_as")
        return {id(layer): cls for layer in layers.values()}
    if not isinstance(sync_batch_norm_as, Mapping):
        raise TypeError(
            "revert_model: sync_batch_norm_as must be a class (nn.BatchNorm1d/2d/3d or nn.SyncBatchNorm) or a "
            f"mapping from layer names to classes, not {type(sync_batch_norm_as).__name__}"
        )
    unknown = [name for name in sync_batch_norm_as if name not in layers]
    if unknown:
        raise ValueError(
            f"revert_model: sync_batch_norm_as names {unknown!r}, but the model has no SyncBatchNorm layer of that "
            f"name (its SyncBatchNorm layers, as model.named_modules() names them: {sorted(layers)!r})"
        )
    targets: dict[int, type[_BatchNorm]] = {}
    named_as: dict[int, str] = {}
    for name, cls in sync_batch_norm_as.items():
        key, cls = id(layers[name]), checked(cls, f"sync_batch_norm_as[{name!r}]")
        if targets.setdefault(key, cls) is not cls:
            raise ValueError(
                f"revert_model: sync_batch_norm_as gives {named_as[key]!r} and {name!r}, the same layer, two classes"
            )
        named_as.setdefault(key, name)
    missing: dict[int, str] = {}  # each layer left out, by its first name
    for name, layer in layers.items():
        if id(layer) not in targets:
            missing.setdefault(id(layer), name)
    if missing:
        raise ValueError(
            "revert_model: sync_batch_norm_as gives no class for the SyncBatchNorm layer(s) "
            f"{list(missing.values())!r}: map every one, to nn.SyncBatchNorm where it should stay torch's synchronized "
            "layer"
        )
    return targets


def _to_torch(sync_batch_norm_targets: dict[int, type[_BatchNorm]]) -> Callable[[nn.Module], nn.Module]:
    def convert_layer(module: nn.Module) -> nn.Module:
        cls = parametrize.type_before_parametrizations(module)
        target = sync_batch_norm_targets[id(module)] if cls is SyncBatchNorm else _SYNC_TO_TORCH.get(cls)  # type: ignore[call-overload]
        if target is None:
            return module
        new = transplant(module, target)
        if target is not TorchSyncBatchNorm:
            new.__dict__.pop("process_group", None)  # nn.BatchNormNd has none
        if "_layer_id" in module.__dict__:
            _reverted_layer_ids[new] = module._layer_id
        return new

    return convert_layer


def _convert(
    module: nn.Module, convert_layer: Any, wrap_data_parallel: bool, memo: dict[int, nn.Module], path: str = ""
) -> nn.Module:
    """Converts ``module`` (at ``path`` in the model converted, as ``named_modules`` names it) and, recursively and
    in place, its children. A module reached twice converts once. The synchronized layers it leaves are named by
    their path in error messages while they are not replicas (a replica's context names its place)."""
    key = id(module)
    if key in memo:
        return memo[key]
    result = convert_layer(module)
    if path and isinstance(result, _SynchronizedBatchNorm):
        result.__dict__["_converted_at"] = path
        result._name_unreplicated(type(result).__name__)
    if wrap_data_parallel and isinstance(module, nn.DataParallel) and not isinstance(module, DataParallelWithCallback):
        # (the established library's wrapper is nn.DataParallel with its replication callbacks, which ours replace)
        if type(module) is nn.DataParallel or is_established_data_parallel(module):
            # nn.DataParallel without an accelerator only sets device_ids (== []): the others take their defaults.
            result = DataParallelWithCallback(
                module.module,
                device_ids=module.device_ids,
                output_device=getattr(module, "output_device", None),
                dim=getattr(module, "dim", 0),
            )
            # Only the wrapper's own flag: its module's layers keep theirs (e.g. BatchNorm frozen in eval mode).
            result.training = module.training
            move_hooks(module, result)
        else:
            # A subclass of nn.DataParallel may have behaviour of its own: keep it, add the replication callbacks.
            result = patch(module)
    memo[key] = result
    for name, child in list(result._modules.items()):
        if child is not None:
            child_path = f"{path}.{name}" if path else name
            converted = _convert(child, convert_layer, wrap_data_parallel, memo, child_path)
            if converted is not child:
                result._modules[name] = converted
                _recompile_around(result, name)
    return result


def _recompile_around(module: nn.Module, name: str) -> None:
    """A ``torch.compile`` wrapper whose module was replaced calls the new one: it had bound its forward to the old
    module's call (which would still run, unconverted, when the wrapper is called directly)."""
    optimized = _optimized_module_type()
    if optimized is not None and isinstance(module, optimized) and name == "_orig_mod":
        module._initialize()


def _is_scripted_torch_batchnorm(layer: torch.jit.ScriptModule) -> bool:
    """Whether a TorchScript module is one of torch's BatchNorm layers (scripted or traced; "___torch_mangle_N"
    may follow the module path), not some other layer whose name says BatchNorm (e.g. a FrozenBatchNorm2d)."""
    return layer._c._type().qualified_name().startswith("__torch__.torch.nn.modules.batchnorm.")


def _warn_of_unconverted_layers(model: nn.Module, converter: str, stacklevel: int = 3) -> nn.Module:
    """Warns of the BatchNorm layers a conversion left as they were and that will not synchronize.

    Subclasses of ``nn.BatchNorm`` (e.g. a BatchNorm fused with its activation) keep their class and their own
    forward: under the wrapper each replica would normalize its slice alone. Layers that handle replication
    themselves (``__data_parallel_replicate__``) are not reported, except subclasses of the established library's
    layers (its own exact classes are converted), which keep its synchronization. Nor can a
    TorchScript module (``torch.jit.script`` / ``trace``) be converted: its code is compiled, whatever its layers.
    """
    left = [
        f"'{name or '<root>'}': {type(layer).__qualname__}"
        for name, layer in model.named_modules()
        if isinstance(layer, _BatchNorm) and not hasattr(layer, "__data_parallel_replicate__")  # ours have it too
    ]
    established = [
        f"'{name or '<root>'}': {type(layer).__qualname__}"
        for name, layer in model.named_modules()
        if isinstance(layer, _BatchNorm) and derives_from_established_layer(type(layer))
    ]
    if established:
        shown = ", ".join(established[:3]) + (f" and {len(established) - 3} more" if len(established) > 3 else "")
        warnings.warn(
            f"{converter} left {len(established)} layer(s) of Synchronized-BatchNorm-PyTorch's design (sync_batchnorm: "
            f"a _data_parallel_master of their own) as they were ({shown}): they synchronize with their own code, "
            "not syncbn_ext's (that library's is GPU only, with no timeouts or failure handling). Derive their class "
            "from the syncbn_ext layer of the same name instead",
            UserWarning,
            stacklevel=stacklevel,
        )
    if left:
        shown = ", ".join(left[:3]) + (f" and {len(left) - 3} more" if len(left) > 3 else "")
        warnings.warn(
            f"{converter} left {len(left)} BatchNorm layer(s) of a class it does not convert as they were ({shown}): "
            "they keep their own forward, which under DataParallelWithCallback normalizes each replica's slice "
            "alone. Derive their class from a syncbn_ext layer, or replace them yourself",
            UserWarning,
            stacklevel=stacklevel,
        )
    scripted = [
        f"'{name or '<root>'}': {layer.original_name}"
        for name, layer in model.named_modules()
        if isinstance(layer, torch.jit.ScriptModule) and _is_scripted_torch_batchnorm(layer)
    ]
    if scripted:
        shown = ", ".join(scripted[:3]) + (f" and {len(scripted) - 3} more" if len(scripted) > 3 else "")
        warnings.warn(
            f"{converter} cannot convert TorchScript modules and left {len(scripted)} scripted or traced BatchNorm "
            f"layer(s) as they were ({shown}): under DataParallelWithCallback they normalize each replica's slice "
            "alone. Convert the model before torch.jit.script / torch.jit.trace",
            UserWarning,
            stacklevel=stacklevel,
        )
    return model


# The conversions return Any, as torch's convert_sync_batchnorm: the module given, or what replaced its root (another
# class), so that `model = convert_model(model)` type-checks.
def convert_model(module: nn.Module, process_group: Any = None) -> Any:
    """Replaces the BatchNorm layers of ``module`` by synchronized ones, recursively; returns the converted model.

    * Every ``nn.BatchNorm1d`` / ``nn.BatchNorm2d`` / ``nn.BatchNorm3d`` (those exact classes: not their
      subclasses or layers already synchronized) becomes a
      :class:`~syncbn_ext.SynchronizedBatchNorm1d` / ``2d`` / ``3d`` with the same parameters and buffers (the same
      tensor objects, ``num_batches_tracked`` included), options (``eps``, ``momentum`` including ``None``,
      ``affine``, bias presence, ``track_running_stats``), training flag, device, dtype and hooks; a
      ``torch.nn.SyncBatchNorm`` (which would normalize each replica on its own) becomes a
      :class:`~syncbn_ext.SyncBatchNorm` (any input dimensionality) with its state and ``process_group``; an
      ``nn.LazyBatchNorm1d`` / ``2d`` / ``3d`` not yet initialized becomes a
      :class:`~syncbn_ext.LazySynchronizedBatchNorm1d` / ``2d`` / ``3d`` (its first forward makes it a
      synchronized layer, where the torch one would become a plain ``nn.BatchNormNd``); the established library's
      (Synchronized-BatchNorm-PyTorch, ``sync_batchnorm``, installed or vendored) ``SynchronizedBatchNorm1d`` /
      ``2d`` / ``3d`` become ours with their state (subclasses of its layers are left as they are, and warned of).
    * An ``nn.DataParallel`` becomes a :class:`~syncbn_ext.DataParallelWithCallback` with the same ``device_ids``,
      ``output_device``, ``dim``, hooks and training flag around the converted module; a subclass of
      ``nn.DataParallel`` is kept and given the replication callbacks with :func:`syncbn_ext.patch`; a
      ``DataParallelWithCallback`` stays (the established library's becomes ours).

    The conversion is in place (see the module's documentation): containers are modified and returned as they
    are, and the root is replaced when it is itself a BatchNorm or an ``nn.DataParallel``, so always use the
    returned module. A layer shared by several parents is converted once and stays shared.

    Args:
        module: the model (or a single BatchNorm layer).
        process_group: a ``torch.distributed`` group the converted layers also synchronize across, given also to
            the layers already synchronized (default ``None``: a converted ``nn.BatchNormNd`` synchronizes the
            replicas of its process; a converted ``nn.SyncBatchNorm`` and the layers already synchronized keep
            their own group).

    Returns:
        The converted model.

    Example:
        >>> model = convert_model(torchvision.models.resnet18())  # doctest: +SKIP
        >>> dp = syncbn_ext.DataParallelWithCallback(model, device_ids=["cpu"] * 4)  # doctest: +SKIP
    """
    _require_module(module, "convert_model")
    return _warn_of_unconverted_layers(_convert(module, _to_synchronized(process_group), True, {}), "convert_model")


def convert_to_sync_batch_norm(module: nn.Module, process_group: Any = None) -> Any:
    """Every BatchNorm layer of ``module`` becomes a :class:`~syncbn_ext.SyncBatchNorm`, recursively, in place.

    ``nn.BatchNorm1d/2d/3d``, ``torch.nn.SyncBatchNorm`` and the ``SynchronizedBatchNormNd`` layers, ours and the
    established library's (those exact classes), take the same parameters and buffers (the same tensors),
    options, training flag and hooks, and ``process_group``; a :class:`~syncbn_ext.SyncBatchNorm` already there
    gets ``process_group`` in place (as torch's does, ``None`` included), other synchronized layers only a group
    given; wrappers are left as they are. ``syncbn_ext.SyncBatchNorm.convert_sync_batchnorm``. TorchScript
    modules cannot be converted (warned).
    A lazy BatchNorm not yet initialized raises a ``TypeError`` (``SyncBatchNorm`` has no lazy form).

    Returns:
        The converted model (the root itself is replaced when it is such a layer).
    """
    return _convert_to_sync_batch_norm(module, process_group, stacklevel=4)


def _convert_to_sync_batch_norm(module: M, process_group: Any, stacklevel: int) -> nn.Module:
    _require_module(module, "convert_sync_batchnorm")
    for layer in module.modules():  # refused before anything is converted: never half a model
        _refuse_lazy_batch_norm(type(layer))
    converted = _convert(module, _to_sync_batch_norm(process_group), False, {})
    return _warn_of_unconverted_layers(converted, "convert_sync_batchnorm", stacklevel)


def revert_model(
    module: nn.Module, sync_batch_norm_as: type[_BatchNorm] | Mapping[str, type[_BatchNorm]] | None = None
) -> Any:
    """The inverse of :func:`convert_model`: synchronized layers become plain ``nn.BatchNorm1d/2d/3d``.

    (A ``LazySynchronizedBatchNormNd`` not yet initialized becomes an ``nn.LazyBatchNormNd``; a
    :class:`~syncbn_ext.SyncBatchNorm`, which takes any dimensionality, becomes what ``sync_batch_norm_as`` says.)

    Parameters, buffers, options, training flag and hooks carry over as in :func:`convert_model` (the same
    tensors), in place. Wrappers are left as they are: a :class:`~syncbn_ext.DataParallelWithCallback` stays one
    (without synchronized layers it runs exactly as ``nn.DataParallel``, and its CPU replicas have no
    ``nn.DataParallel`` equivalent); unwrap or re-wrap it yourself if you need an ``nn.DataParallel``.

    Args:
        module: the model (or a single synchronized layer).
        sync_batch_norm_as: what each :class:`~syncbn_ext.SyncBatchNorm` becomes: ``None`` (the default) torch's
            ``nn.SyncBatchNorm``, with the same ``process_group``; ``nn.BatchNorm1d``, ``nn.BatchNorm2d`` or
            ``nn.BatchNorm3d`` (the one of its inputs' dimensionality: what ``torch.jit.script`` and quantization's
            ``fuse_modules`` take, which ``nn.SyncBatchNorm`` is not) for every one; or a mapping from each one's
            name (as ``module.named_modules()`` gives it) to one of those classes or ``nn.SyncBatchNorm``, where
            they differ. A class or name that does not fit raises before anything is reverted.

    Returns:
        The reverted model.
    """
    _require_module(module, "revert_model")
    return _convert(module, _to_torch(_sync_batch_norm_targets(module, sync_batch_norm_as)), False, {})


# The namespaces code reaches nn.BatchNormNd through. Not torch.nn.modules.batchnorm, where pickle finds the classes
# by their qualified names: patched, torch BatchNorm layers (a teacher, an EMA copy) could not be saved meanwhile,
# and whole-model checkpoints of torch layers loaded as synchronized ones.
_PATCHED_NAMESPACES = (torch.nn, torch.nn.modules)
_PATCHED_NAMES = {cls.__name__: sync_cls for cls, sync_cls in _TORCH_TO_SYNC.items()}


@contextlib.contextmanager
def patch_sync_batchnorm() -> Iterator[None]:
    """While open, ``nn.BatchNorm1d/2d/3d`` are the synchronized classes, and ``nn.SyncBatchNorm`` is ours.

    Replaces the attributes ``BatchNorm1d``, ``BatchNorm2d``, ``BatchNorm3d``, ``SyncBatchNorm`` and
    ``LazyBatchNorm1d/2d/3d`` of ``torch.nn`` and ``torch.nn.modules`` (with the classes :func:`convert_model`
    converts them to), so that models built inside the block from ``nn.BatchNorm2d`` get synchronized layers;
    restores the previous values on exit, also when the block raises. ``torch.nn.modules.batchnorm`` keeps torch's
    classes (as the established library's patch does), so pickle still saves and loads torch's BatchNorm layers
    inside the block as what they are.
    Contexts nest. The patch is process-wide (every thread sees it): build models inside it, and prefer
    :func:`convert_model` where it serves.

    Example:
        >>> with patch_sync_batchnorm():
        ...     model = torchvision.models.resnet18()  # doctest: +SKIP
    """
    saved = [
        (namespace, name, getattr(namespace, name)) for namespace in _PATCHED_NAMESPACES for name in _PATCHED_NAMES
    ]
    try:
        for namespace, name, _ in saved:
            setattr(namespace, name, _PATCHED_NAMES[name])
        yield
    finally:
        for namespace, name, value in reversed(saved):
            setattr(namespace, name, value)
