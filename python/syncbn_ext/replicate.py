"""CPU replicas of a module (:func:`replicate_on_cpu`, ``torch.nn.parallel.replicate`` for CPU replicas), and the
shallow replicas of compiled modules. The replicas' callbacks and buffers: :mod:`.replication`; training forwards
from several threads: :mod:`.forward_locks`."""

from __future__ import annotations

import contextlib
import operator
import sys
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from ._native import _C

__all__ = ["replicate_on_cpu", "shallow_replica"]

M = TypeVar("M", bound=nn.Module)


def _check_replicatable(module: nn.Module) -> None:
    try:
        from torch.nn.parallel.replicate import _replicatable_module
    except ImportError:  # pragma: no cover - a private torch helper; its absence only skips the check
        return
    if not _replicatable_module(module):
        raise RuntimeError("Cannot replicate network where python modules are children of ScriptModule")


def replicate_on_cpu(module: M, n: int, *, detach: bool | None = None) -> list[M]:
    """Makes ``n`` CPU replicas of ``module``, as ``torch.nn.parallel.replicate`` does for GPUs.

    Every module of ``module.modules()`` is shallow-copied with ``_replicate_for_data_parallel()`` and the
    copies are wired together as the originals are (a submodule shared by two parents stays shared inside
    each replica). In each replica:

    * parameters are differentiable aliases of the original parameters (same data; a tensor subclass gets
      ``p.view_as(p)``), so gradients flow back and accumulate on the original leaf parameters, like the
      broadcast copies on GPUs, each as soon as it is complete (autograd runs the alias's node as it runs
      AccumulateGrad, not at the end of the backward); with ``detach`` they are ``p.detach()`` instead;
    * buffers: replica 0 uses the original buffer tensors themselves (as device 0 does on GPUs, so running
      statistics updated in replica 0 land on the original module); replicas ``1..n-1`` get clones,
      detached unless the buffer requires grad and ``detach`` is false.

    A ``torch.compile``'d module (``OptimizedModule``) replicates as a compiled module of the replica.

    Args:
        module: the module to replicate; its parameters and buffers must be on CPU.
        n: the number of replicas (0 gives an empty list).
        detach: cut the replicas' tensors from autograd; default ``not torch.is_grad_enabled()``, as
            ``nn.DataParallel.replicate`` does.

    Returns:
        The ``n`` replicas, replica ``i`` for copy id ``i``. No replication callback has run yet: see
        :func:`syncbn_ext.execute_replication_callbacks`.
    """
    try:
        if isinstance(n, bool):
            raise TypeError
        n = operator.index(n)  # an int, or an integer like numpy's, as range() takes
    except TypeError:
        raise TypeError(
            f"replicate_on_cpu: n must be a non-negative int, got {n!r} of type {type(n).__name__}"
        ) from None
    if n < 0:
        raise ValueError(f"replicate_on_cpu: n must be a non-negative int, got {n!r}")
    _check_replicatable(module)
    if n == 0:
        return []
    if detach is None:
        detach = not torch.is_grad_enabled()

    lazy = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if nn.parameter.is_lazy(t)]
    if lazy:
        raise ValueError(
            f"replicate_on_cpu: the module has uninitialized (lazy) parameters or buffers ({', '.join(lazy[:3])}"
            f"{' ...' if len(lazy) > 3 else ''}); run one forward of the module itself, outside the wrapper, first "
            "(the replicas cannot share tensors they would each initialize)"
        )
    params = list(module.parameters())
    param_indices = {p: i for i, p in enumerate(params)}
    param_copies = [[p.detach() for p in params] if detach else _parameter_handles(params) for _ in range(n)]

    buffers = list(module.buffers())
    buffer_indices = {b: i for i, b in enumerate(buffers)}

    def buffer_copy(buf: torch.Tensor, copy_id: int) -> torch.Tensor:
        if copy_id == 0:
            return buf.detach() if detach and buf.requires_grad else buf
        return buf.clone() if buf.requires_grad and not detach else buf.detach().clone()

    buffer_copies = [[buffer_copy(b, j) for b in buffers] for j in range(n)]

    modules = list(module.modules())
    module_indices = {m: i for i, m in enumerate(modules)}
    # nn.Module.__setattr__ checks every assignment (a third of the replication's time): where it would only store the
    # value (the module's class keeps nn.Module's, and no global registration hook is set), store it directly.
    direct = _stores_directly([type(m) for m in modules])
    module_copies: list[list[nn.Module]] = [[] for _ in range(n)]
    for i, m in enumerate(modules):
        for j in range(n):
            replica = _plain_replica(m) if direct[i] else shallow_replica(m)
            # As torch does for DDP, which reads the replicas' parameters from here.
            replica.__dict__["_former_parameters"] = OrderedDict()
            module_copies[j].append(replica)

    for i, m in enumerate(modules):
        for key, child in m._modules.items():
            for j in range(n):
                replica = module_copies[j][i]
                child_copy = None if child is None else module_copies[j][module_indices[child]]
                if child is None or direct[i]:
                    replica._modules[key] = child_copy
                else:
                    setattr(replica, key, child_copy)
        for key, param in m._parameters.items():
            for j in range(n):
                replica = module_copies[j][i]
                if param is None:
                    replica._parameters[key] = None
                    continue
                param_copy = param_copies[j][param_indices[param]]
                # No longer leaves: set as plain attributes, as torch does.
                if direct[i]:
                    replica.__dict__[key] = param_copy
                else:
                    setattr(replica, key, param_copy)
                replica._former_parameters[key] = param_copy
        for key, buf in m._buffers.items():
            for j in range(n):
                replica = module_copies[j][i]
                buffer = None if buf is None else buffer_copies[j][buffer_indices[buf]]
                if buf is None or direct[i]:
                    replica._buffers[key] = buffer
                else:
                    setattr(replica, key, buffer)

    replicas = [module_copies[j][0] for j in range(n)]
    rebind_compiled_modules(replicas)
    return replicas  # type: ignore[return-value]


def _parameter_handles(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """One replica's differentiable handles on ``params`` (see :func:`replicate_on_cpu`)."""
    plain = [type(p) in (nn.Parameter, torch.Tensor) for p in params]
    aliases = iter(_C.parameter_aliases([p for p, ok in zip(params, plain, strict=True) if ok]))
    return [next(aliases) if ok else p.view_as(p) for p, ok in zip(params, plain, strict=True)]


def _stores_directly(module_types: Sequence[type]) -> list[bool]:
    """Per class, whether assigning a replica's children, parameters and buffers through ``nn.Module.__setattr__``
    would only store them (``_modules[key]``, ``__dict__[key]``, ``_buffers[key]``), and
    ``_replicate_for_data_parallel`` only copy the dictionaries: the class keeps both of nn.Module's, and no global
    registration hook is set."""
    from torch.nn.modules import module as module_internals

    if (
        module_internals._global_module_registration_hooks
        or module_internals._global_buffer_registration_hooks
        or module_internals._global_parameter_registration_hooks
    ):
        return [False] * len(module_types)
    return [
        t.__setattr__ is nn.Module.__setattr__
        and t._replicate_for_data_parallel is nn.Module._replicate_for_data_parallel
        for t in module_types
    ]


def _plain_replica(module: nn.Module) -> nn.Module:
    """``nn.Module._replicate_for_data_parallel``, the replica's dictionary built directly, not through
    ``__setattr__`` (see :func:`_stores_directly` and :func:`shallow_replica`)."""
    replica = module.__new__(type(module))
    state = module.__dict__.copy()
    state["_parameters"] = {}
    state["_buffers"] = state["_buffers"].copy()
    state["_modules"] = state["_modules"].copy()
    state["_is_replica"] = True
    object.__setattr__(replica, "__dict__", state)
    return replica


def _optimized_module_type() -> type | None:
    """torch.compile's module wrapper class, once defined (no compiled module exists before). Looked up, not
    imported: where another thread is importing torch._dynamo meanwhile, an import here would run its half-made
    modules a second time (an ImportError in both threads, and Dynamo broken for the process)."""
    return getattr(sys.modules.get("torch._dynamo.eval_frame"), "OptimizedModule", None)


def shallow_replica(module: nn.Module) -> nn.Module:
    """``module._replicate_for_data_parallel()``, also for a ``torch.compile`` wrapper (``OptimizedModule``).

    The wrapper forwards attribute writes to the module it wraps, so the inherited method would write the replica's
    ``_parameters``, ``_buffers`` and ``_modules`` into the *original* wrapped module (a ``Sequential`` would then
    contain itself). Here the replica's dictionary is built directly.
    """
    optimized = _optimized_module_type()
    if optimized is None or not isinstance(module, optimized):
        return module._replicate_for_data_parallel()
    return _plain_replica(module)


def rebind_compiled_modules(replicas: Sequence[nn.Module]) -> None:
    """Points each replicated ``torch.compile`` wrapper, and each module compiled in place, at its replica.

    An ``OptimizedModule`` keeps its compiled forward in its ``__dict__``, bound to the module it wrapped, and a
    module compiled in place (``Module.compile()``) its compiled call, bound to itself: as copied, the replica would
    run the *original* module. Rebinding compiles the replica's, with the same options.
    """
    optimized = _optimized_module_type()
    if optimized is None:
        return
    for replica in replicas:
        for m in replica.modules():
            if isinstance(m, optimized):
                m._initialize()
            elif m.__dict__.get("_compiled_call_impl") is not None:
                m.__dict__["_compiled_call_impl"] = _compiled_call_of(m)


def _compiled_call_of(replica: nn.Module) -> Any:
    """The replica's own compiled call: the original's ``torch.compile`` context (its backend, mode and options) applied
    to the replica's ``_call_impl``. Where that context cannot be found (a torch that keeps it elsewhere), ``None``:
    the replica runs eagerly (right, not compiled), with a warning."""
    from torch._dynamo.eval_frame import _TorchDynamoContext

    compiled = replica.__dict__["_compiled_call_impl"]
    for cell in getattr(compiled, "__closure__", None) or ():
        try:
            context = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(context, _TorchDynamoContext):
            return context(replica._call_impl)
    warnings.warn(
        f"syncbn_ext: cannot recompile the replicas of a {type(replica).__name__} compiled in place "
        "(Module.compile()) with its options; they run eagerly. Replicate torch.compile(module) instead",
        stacklevel=3,
    )
    return None


@contextlib.contextmanager
def compiled_modules_replicable(module: nn.Module) -> Iterator[None]:
    """While open, ``torch.nn.parallel.replicate`` copies the ``torch.compile`` wrappers in ``module`` safely.

    Gives each wrapper an instance-level ``_replicate_for_data_parallel`` (:func:`shallow_replica`); removed on
    exit, from the originals and from the replicas' copied dictionaries. Call :func:`rebind_compiled_modules` on
    the replicas afterwards.
    """
    optimized = _optimized_module_type()
    wrappers = [m for m in module.modules() if optimized is not None and isinstance(m, optimized)]
    for wrapper in wrappers:
        wrapper.__dict__["_replicate_for_data_parallel"] = _ReplicateOptimized(wrapper)
    try:
        yield
    finally:
        for wrapper in wrappers:
            wrapper.__dict__.pop("_replicate_for_data_parallel", None)


class _ReplicateOptimized:
    def __init__(self, wrapper: nn.Module) -> None:
        self.wrapper = wrapper

    def __call__(self) -> nn.Module:
        replica = shallow_replica(self.wrapper)
        replica.__dict__.pop("_replicate_for_data_parallel", None)
        return replica
