"""A layer's state moved into an instance of another class (the conversions of :mod:`syncbn_ext.convert`): the same
parameter and buffer tensors, options, flags and hooks."""

from __future__ import annotations

from typing import TypeVar

from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.modules.module import _WrappedHook
from torch.nn.utils import parametrize

from .synchronized_base import _SYNC_STATE_DEFAULTS

__all__ = ["move_hooks", "transplant"]

M = TypeVar("M", bound=nn.Module)

# Attributes a converted layer must not inherit from the layer it replaces.
_DROPPED_ATTRIBUTES = (
    "_compiled_call_impl",  # a torch.compile'd call of the *old* module (Module.compile)
    "_is_replica",
    "_layer_id",
    "_converted_at",
    *_SYNC_STATE_DEFAULTS,
    # the established library's replication state (its own barrier, bound to the old layer)
    "_sync_master",
    "_is_parallel",
    "_parallel_id",
    "_slave_pipe",
)


def transplant(module: nn.Module, cls: type[M]) -> M:
    """A new ``cls`` instance with ``module``'s state: the same parameters, buffers, options, flags and hooks.

    The attributes are copied shallowly (the tensors are shared, the dicts of parameters, buffers and submodules are
    copies), so that later changes to one module's structure do not affect the other. The hooks move to the new
    module (see :func:`move_hooks`).
    """
    new = cls.__new__(cls)
    state = {
        key: (value.copy() if isinstance(value, (dict, set)) else value)
        for key, value in module.__dict__.items()
        if key not in _DROPPED_ATTRIBUTES
    }
    new.__dict__.update(state)
    move_hooks(module, new)
    if parametrize.is_parametrized(module):
        # torch.nn.utils.parametrize made the layer an instance of a class of its own (a subclass with a property per
        # parametrized tensor): the new layer gets the same around its class.
        parametrize._inject_new_class(new)
        for name in new.parametrizations:
            parametrize._inject_property(new, name)
    if isinstance(module, LazyModuleMixin) and hasattr(module, "_initialize_hook"):
        _move_lazy_hooks(module, new)
    return new


def _hook_dict_names(module: nn.Module) -> list[str]:
    """The names of ``module``'s dicts of hooks (``_forward_hooks``, ``_load_state_dict_pre_hooks``, ...)."""
    return [
        key
        for key, value in module.__dict__.items()
        if isinstance(value, dict) and (key.endswith("_hooks") or "_hooks_" in key)
    ]


def move_hooks(module: nn.Module, new: nn.Module) -> None:
    """``module``'s dicts of hooks, the same objects, become ``new``'s; ``module`` keeps copies of them.

    A ``RemovableHandle`` refers to the dict its hook is in: the handles the user holds then remove the hooks from
    the module that replaces ``module``. A load-state-dict pre-hook registered with its module
    (``register_load_state_dict_pre_hook``) is given ``new`` in place of ``module``.
    """
    for key in _hook_dict_names(module):
        hooks = module.__dict__[key]
        new.__dict__[key] = hooks
        module.__dict__[key] = hooks.copy()
    for hook_id, hook in list(new._load_state_dict_pre_hooks.items()):
        if isinstance(hook, _WrappedHook) and hook.with_module and hook.module() is module:
            new._load_state_dict_pre_hooks[hook_id] = _WrappedHook(hook.hook, new)


def _move_lazy_hooks(module: nn.Module, new: nn.Module) -> None:
    """The hooks that materialize a lazy module, registered by ``module`` on its own dicts, registered by ``new``.

    Those are bound to ``module``: ``new`` registers its own in their place (``module`` keeps its copies).
    """
    initialize_id, load_id = module._initialize_hook.id, module._load_hook.id
    del new._forward_pre_hooks[initialize_id]
    new._forward_pre_hooks_with_kwargs.pop(initialize_id, None)
    del new._load_state_dict_pre_hooks[load_id]
    new._load_hook = new._register_load_state_dict_pre_hook(new._lazy_load_hook)
    new._initialize_hook = new.register_forward_pre_hook(new._infer_parameters, with_kwargs=True, prepend=True)
