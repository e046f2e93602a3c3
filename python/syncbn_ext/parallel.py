"""Data parallelism that runs the replication callbacks, on GPUs and on CPU replicas.

``nn.DataParallel`` copies the module to every device on each forward, but gives the copies no way to find
each other. :class:`DataParallelWithCallback` (or :func:`patch` applied to an existing ``nn.DataParallel``)
calls ``__data_parallel_replicate__(ctx, copy_id)`` on every module of every copy right after each
replication (see :func:`syncbn_ext.execute_replication_callbacks`), which is how synchronized layers share a
:class:`syncbn_ext.SyncMaster` between their copies.

``nn.DataParallel`` needs an accelerator; on a machine without one it silently runs the module as is.
``DataParallelWithCallback(module, device_ids=["cpu"] * n)`` instead runs ``n`` real replicas on CPU threads,
one thread per replica, with the same scatter / replicate / parallel apply / gather steps: a way to use and
test synchronized layers without a GPU.
"""

from __future__ import annotations

import queue
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
from torch import nn
from torch._utils import ExceptionWrapper

__all__ = [
    "DataParallelWithCallback",
    "patch",
    "patch_replication_callback",
    "replicate_on_cpu",
]

M = TypeVar("M", bound=nn.Module)
DP = TypeVar("DP", bound=nn.DataParallel)

_CPU = torch.device("cpu")
_ABORT_TAG = "DataParallelWithCallback"


def _execute_replication_callbacks(replicas: Sequence[nn.Module]) -> None:
    """Runs the replication hooks, and tags each replica with its replication group and copy id."""
    # Imported lazily: the package imports this module while it is still initializing.
    from . import execute_replication_callbacks

    if not replicas:
        return
    group = execute_replication_callbacks(list(replicas))[0].group
    for copy_id, replica in enumerate(replicas):
        replica.__dict__["_syncbn_replication"] = (group, copy_id)


class _ReplicaRunner:
    """Runs one replica and tells its replication group how it ended.

    When the forward returns, the copy takes part in no more barrier passes (``copy_finished``): a copy still
    waiting for it fails at once with an error naming both, instead of waiting for the timeout (the replicas
    called the synchronized layers a different number of times). When it raises, every barrier of the
    replication is aborted, so nobody waits for the failed copy.
    """

    def __init__(self, module: nn.Module, group: Any, copy_id: int) -> None:
        self.module = module
        self.group = group
        self.copy_id = copy_id

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            output = self.module(*args, **kwargs)
        except BaseException as error:
            self.group.abort(f"{_ABORT_TAG}: replica {self.copy_id} raised {type(error).__name__}: {error}")
            raise
        self.group.copy_finished(self.copy_id)
        return output


def _runners(replicas: Sequence[nn.Module]) -> list[Any]:
    """The replicas, each wrapped in a _ReplicaRunner when it came from a replication with callbacks."""
    runners: list[Any] = []
    for replica in replicas:
        tag = replica.__dict__.get("_syncbn_replication")
        runners.append(replica if tag is None else _ReplicaRunner(replica, *tag))
    return runners


def _is_cpu_device(device: Any) -> bool:
    """True for ``"cpu"``, ``"cpu:0"`` or ``torch.device("cpu")``; ints are accelerator indices."""
    if isinstance(device, torch.device):
        return device.type == "cpu"
    if isinstance(device, str):
        try:
            return torch.device(device).type == "cpu"
        except RuntimeError:
            return False
    return False


def _is_namedtuple(obj: Any) -> bool:
    return isinstance(obj, tuple) and hasattr(obj, "_asdict") and hasattr(obj, "_fields")


# --------------------------------------------------------------------------------------------------------------
# Replication on CPU
# --------------------------------------------------------------------------------------------------------------


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

    * parameters are differentiable views of the original parameters (``p.view_as(p)``), so gradients
      flow back and accumulate on the original leaf parameters, like the broadcast copies on GPUs; with
      ``detach`` they are ``p.detach()`` instead;
    * buffers: replica 0 uses the original buffer tensors themselves (as device 0 does on GPUs, so running
      statistics updated in replica 0 land on the original module); replicas ``1..n-1`` get clones,
      detached unless the buffer requires grad and ``detach`` is false.

    Args:
        module: the module to replicate; its parameters and buffers must be on CPU.
        n: the number of replicas (0 gives an empty list).
        detach: cut the replicas' tensors from autograd; default ``not torch.is_grad_enabled()``, as
            ``nn.DataParallel.replicate`` does.

    Returns:
        The ``n`` replicas, replica ``i`` for copy id ``i``. No replication callback has run yet: see
        :func:`syncbn_ext.execute_replication_callbacks`.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"replicate_on_cpu: n must be a non-negative int, got {n!r}")
    _check_replicatable(module)
    if n == 0:
        return []
    if detach is None:
        detach = not torch.is_grad_enabled()

    params = list(module.parameters())
    for p in params:
        if nn.parameter.is_lazy(p):
            raise ValueError("replicate_on_cpu: the module has uninitialized (lazy) parameters; run a forward first")
    param_indices = {p: i for i, p in enumerate(params)}
    param_copies = [[p.detach() if detach else p.view_as(p) for p in params] for _ in range(n)]

    buffers = list(module.buffers())
    buffer_indices = {b: i for i, b in enumerate(buffers)}

    def buffer_copy(buf: torch.Tensor, copy_id: int) -> torch.Tensor:
        if copy_id == 0:
            return buf.detach() if detach and buf.requires_grad else buf
        return buf.clone() if buf.requires_grad and not detach else buf.detach().clone()

    buffer_copies = [[buffer_copy(b, j) for b in buffers] for j in range(n)]

    modules = list(module.modules())
    module_indices = {m: i for i, m in enumerate(modules)}
    module_copies: list[list[nn.Module]] = [[] for _ in range(n)]
    for m in modules:
        for j in range(n):
            replica = m._replicate_for_data_parallel()
            # As torch does for DDP, which reads the replicas' parameters from here.
            replica._former_parameters = OrderedDict()
            module_copies[j].append(replica)

    for i, m in enumerate(modules):
        for key, child in m._modules.items():
            for j in range(n):
                replica = module_copies[j][i]
                if child is None:
                    replica._modules[key] = None
                else:
                    setattr(replica, key, module_copies[j][module_indices[child]])
        for key, param in m._parameters.items():
            for j in range(n):
                replica = module_copies[j][i]
                if param is None:
                    replica._parameters[key] = None
                else:
                    param_copy = param_copies[j][param_indices[param]]
                    # No longer leaves: set as plain attributes, as torch does.
                    setattr(replica, key, param_copy)
                    replica._former_parameters[key] = param_copy
        for key, buf in m._buffers.items():
            for j in range(n):
                replica = module_copies[j][i]
                if buf is None:
                    replica._buffers[key] = None
                else:
                    setattr(replica, key, buffer_copies[j][buffer_indices[buf]])

    return [module_copies[j][0] for j in range(n)]  # type: ignore[misc]


# --------------------------------------------------------------------------------------------------------------
# Scatter, parallel apply and gather on CPU
# --------------------------------------------------------------------------------------------------------------


def _scatter_on_cpu(obj: Any, n: int, dim: int) -> list[Any]:
    """``torch.nn.parallel.scatter`` for CPU: tensors split with ``chunk(n, dim)``, containers recursed."""

    def scatter_map(obj: Any) -> list[Any]:
        if isinstance(obj, torch.Tensor):
            # Each replica gets its own copy of its slice (as each GPU does): an in-place layer must neither
            # write into the caller's tensor nor rewrite the autograd history of a base shared by the threads.
            return [chunk.clone() for chunk in obj.chunk(n, dim)]
        if _is_namedtuple(obj):
            return [type(obj)(*args) for args in zip(*map(scatter_map, obj), strict=False)]
        if isinstance(obj, tuple) and len(obj) > 0:
            return list(zip(*map(scatter_map, obj), strict=False))
        if isinstance(obj, list) and len(obj) > 0:
            return [list(i) for i in zip(*map(scatter_map, obj), strict=False)]
        if isinstance(obj, dict) and len(obj) > 0:
            return [type(obj)(i) for i in zip(*map(scatter_map, obj.items()), strict=False)]
        return [obj for _ in range(n)]

    try:
        return scatter_map(obj)
    finally:
        scatter_map = None  # type: ignore[assignment]  # breaks the closure's reference cycle


def _scatter_kwargs_on_cpu(
    inputs: tuple[Any, ...], kwargs: dict[str, Any] | None, n: int, dim: int
) -> tuple[tuple[Any, ...], tuple[dict[str, Any], ...]]:
    scattered_inputs = _scatter_on_cpu(inputs, n, dim) if inputs else []
    scattered_kwargs = _scatter_on_cpu(kwargs, n, dim) if kwargs else []
    if not scattered_inputs:
        scattered_inputs = [() for _ in scattered_kwargs]
    elif not scattered_kwargs:
        scattered_kwargs = [{} for _ in scattered_inputs]
    else:
        # Positional and keyword tensors of different batch sizes: as between two positional tensors, the
        # number of slices is the smaller one.
        count = min(len(scattered_inputs), len(scattered_kwargs))
        scattered_inputs, scattered_kwargs = scattered_inputs[:count], scattered_kwargs[:count]
    return tuple(scattered_inputs), tuple(scattered_kwargs)


def _gather_on_cpu(outputs: Sequence[Any], dim: int) -> Any:
    """``torch.nn.parallel.gather`` for CPU: tensors concatenated with ``torch.cat`` (differentiable)."""

    def gather_map(outputs: Sequence[Any]) -> Any:
        out = outputs[0]
        if isinstance(out, torch.Tensor):
            tensors = list(outputs)
            if dim == 0 and all(t.dim() == 0 for t in tensors):
                warnings.warn(
                    "Was asked to gather along dimension 0, but all input tensors were scalars; "
                    "will instead unsqueeze and return a vector.",
                    stacklevel=4,
                )
                tensors = [t.view(1) for t in tensors]
            return torch.cat(tensors, dim)
        if out is None:
            return None
        if isinstance(out, dict):
            if not all(len(out) == len(d) for d in outputs):
                raise ValueError("All dicts must have the same number of keys")
            return type(out)((k, gather_map([d[k] for d in outputs])) for k in out)
        if _is_namedtuple(out):
            return type(out)._make(map(gather_map, zip(*outputs, strict=True)))
        return type(out)(map(gather_map, zip(*outputs, strict=True)))

    try:
        return gather_map(outputs)
    finally:
        gather_map = None  # type: ignore[assignment]


def _abort_barriers(replicas: Sequence[nn.Module], reason: str) -> None:
    """Aborts every barrier a replica holds as an attribute, so copies waiting for a failed one wake up now.

    The replication group's barriers (the synchronized BatchNorm layers') are aborted by _ReplicaRunner; this
    reaches the SyncMasters of modules written against the established library's API, which the group does
    not know.
    """
    from . import _C

    barrier_types = (_C.SyncMaster,)
    seen: set[int] = set()
    for replica in replicas:
        for m in replica.modules():
            for value in vars(m).values():
                if isinstance(value, barrier_types) and id(value) not in seen:
                    seen.add(id(value))
                    value.abort(reason)


def _parallel_apply_on_cpu(
    replicas: Sequence[nn.Module], inputs: Sequence[Any], kwargs_tup: Sequence[dict[str, Any]] | None = None
) -> list[Any]:
    """Runs ``replicas[i](*inputs[i], **kwargs_tup[i])``, every replica at once on a thread of its own.

    Synchronized layers block until all their copies arrive, so the replicas must run concurrently (an
    ``at::parallel_for`` or a pool smaller than the replica count would deadlock). The caller's grad mode,
    inference mode and CPU autocast state apply in every thread. When a replica raises, the barriers of
    the replicas are aborted so the other copies stop waiting for it, every thread is joined, and the
    exception of the lowest failing copy id is raised again, naming that replica.
    """
    if len(replicas) != len(inputs):
        raise ValueError(f"parallel apply: {len(replicas)} replicas but {len(inputs)} inputs")
    if kwargs_tup is None:
        kwargs_tup = [{} for _ in replicas]
    elif len(kwargs_tup) != len(replicas):
        raise ValueError(f"parallel apply: {len(replicas)} replicas but {len(kwargs_tup)} kwargs")

    grad_enabled = torch.is_grad_enabled()
    inference_mode = torch.is_inference_mode_enabled()
    autocast_enabled = torch.is_autocast_enabled("cpu")
    autocast_dtype = torch.get_autocast_dtype("cpu")
    autocast_cache = torch.is_autocast_cache_enabled()

    results: dict[int, Any] = {}
    finished: queue.SimpleQueue[tuple[int, bool]] = queue.SimpleQueue()

    def worker(i: int, module: Any, input: Any, kwargs: dict[str, Any]) -> None:
        failed = False
        try:
            with (
                torch.inference_mode(inference_mode),
                torch.set_grad_enabled(grad_enabled),
                torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_enabled, cache_enabled=autocast_cache),
            ):
                if not isinstance(input, (list, tuple)):
                    input = (input,)
                results[i] = module(*input, **kwargs)
        except BaseException:
            failed = True
            results[i] = ExceptionWrapper(where=f"in replica {i} on device cpu")
        finally:
            finished.put((i, failed))

    abort_reason = None
    if len(replicas) == 1:
        worker(0, _runners(replicas)[0], inputs[0], kwargs_tup[0])
    else:
        threads = [
            threading.Thread(target=worker, args=(i, *args), name=f"syncbn-replica-{i}", daemon=True)
            for i, args in enumerate(zip(_runners(replicas), inputs, kwargs_tup, strict=True))
        ]
        for thread in threads:
            thread.start()
        try:
            for done in range(1, len(threads) + 1):
                i, failed = finished.get()
                if failed and abort_reason is None and done < len(threads):
                    # The others may be waiting for this copy in a barrier: wake them now rather than at
                    # the barrier's timeout.
                    abort_reason = f"{_ABORT_TAG}: replica {i} raised an exception"
                    _abort_barriers(replicas, abort_reason)
        except BaseException:  # e.g. KeyboardInterrupt while waiting: wake the replicas, then leave
            if abort_reason is None:
                abort_reason = f"{_ABORT_TAG}: the calling thread was interrupted"
                _abort_barriers(replicas, abort_reason)
            raise
        finally:
            for thread in threads:
                thread.join()

    failures = [i for i in range(len(replicas)) if isinstance(results[i], ExceptionWrapper)]
    if failures:
        # Raise the lowest copy id's exception, ignoring the ones an abort caused (a BarrierAbortedError whose
        # reason carries our tag) unless nothing else is left.
        from . import BarrierAbortedError

        primary = [
            i
            for i in failures
            if not (issubclass(results[i].exc_type, BarrierAbortedError) and _ABORT_TAG in results[i].exc_msg)
        ]
        results[min(primary or failures)].reraise()
    return [results[i] for i in range(len(replicas))]


# --------------------------------------------------------------------------------------------------------------
# DataParallelWithCallback and patch
# --------------------------------------------------------------------------------------------------------------


class DataParallelWithCallback(nn.DataParallel):
    """``nn.DataParallel`` that calls ``__data_parallel_replicate__(ctx, copy_id)`` after each replication.

    With accelerator ``device_ids`` (or ``None``) this is exactly ``nn.DataParallel`` plus the replication
    callbacks; on a machine without an accelerator and ``device_ids=None`` it is, like ``nn.DataParallel``,
    a wrapper that runs the module as is (``device_ids == []``).

    With ``device_ids=["cpu"] * n`` (strings or ``torch.device("cpu")``), the forward runs ``n`` CPU
    replicas, each on its own thread: the inputs are split along ``dim`` with ``chunk(n, dim)`` semantics
    (a batch smaller than ``n`` uses fewer replicas, as ``nn.DataParallel`` does), the module is copied
    with :func:`replicate_on_cpu`, the callbacks run, the replicas run concurrently and their outputs are
    concatenated along ``dim``. Parameter gradients accumulate on the original module, and replica 0
    updates the original's buffers (e.g. BatchNorm running statistics), as device 0 does on GPUs.

    Args:
        module: the module to parallelize.
        device_ids: accelerator devices (ints or devices; default: all), or ``n`` CPU devices.
        output_device: where outputs are gathered (default ``device_ids[0]``); ``None`` or CPU in CPU mode.
        dim: the dimension inputs are split along and outputs concatenated along.

    Raises:
        ValueError: ``device_ids`` mixes CPU and accelerator devices, or in CPU mode ``output_device`` is
            not the CPU.
    """

    def __init__(
        self,
        module: nn.Module,
        device_ids: Sequence[int | str | torch.device] | None = None,
        output_device: int | str | torch.device | None = None,
        dim: int = 0,
    ) -> None:
        if device_ids is not None:
            device_ids = list(device_ids)
        cpu_entries = [_is_cpu_device(d) for d in device_ids] if device_ids is not None else []
        if not any(cpu_entries):
            super().__init__(module, device_ids, output_device, dim)
            self._cpu_replicas = False
            return
        if not all(cpu_entries):
            raise ValueError(
                "DataParallelWithCallback: device_ids mixes CPU and accelerator devices "
                f"({device_ids!r}); give either only accelerator devices or only CPU devices"
            )
        if output_device is not None and not _is_cpu_device(output_device):
            raise ValueError(
                "DataParallelWithCallback: with CPU device_ids the output device must be the CPU, "
                f"got {output_device!r}"
            )
        # nn.DataParallel.__init__ would resolve accelerator indices: set what it sets ourselves.
        nn.Module.__init__(self)
        self.module = module
        self.device_ids = [_CPU for _ in device_ids]
        self.output_device = _CPU
        self.dim = dim
        self.src_device_obj = _CPU
        self._cpu_replicas = True

    @property
    def cpu_replicas(self) -> bool:
        """True when this wrapper runs CPU replicas (``device_ids`` are CPU devices)."""
        return self.__dict__.get("_cpu_replicas", False)

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        """Scatters the inputs, replicates the module, runs the callbacks and the replicas, gathers."""
        if not self.cpu_replicas:
            return super().forward(*inputs, **kwargs)
        with torch.autograd.profiler.record_function("DataParallelWithCallback.forward"):
            if len(self.device_ids) == 1:
                return self.module(*inputs, **kwargs)
            for t in (*self.module.parameters(), *self.module.buffers()):
                if t.device != self.src_device_obj:
                    raise RuntimeError(
                        f"module must have its parameters and buffers on device {self.src_device_obj} "
                        f"(device_ids[0]) but found one of them on device: {t.device}"
                    )
            inputs, module_kwargs = self.scatter(inputs, kwargs, self.device_ids)
            if not inputs and not module_kwargs:
                inputs, module_kwargs = ((),), ({},)
            replicas = self.replicate(self.module, self.device_ids[: len(inputs)])
            outputs = self.parallel_apply(replicas, inputs, module_kwargs)
            return self.gather(outputs, self.output_device)

    def replicate(self, module: M, device_ids: Sequence[int | str | torch.device]) -> list[M]:
        """Replicates ``module`` on ``device_ids`` (CPU ones included), then runs the replication callbacks."""
        if device_ids and all(_is_cpu_device(d) for d in device_ids):
            replicas = replicate_on_cpu(module, len(device_ids), detach=not torch.is_grad_enabled())
        else:
            replicas = super().replicate(module, device_ids)
        _execute_replication_callbacks(replicas)
        return replicas

    def scatter(
        self,
        inputs: tuple[Any, ...],
        kwargs: dict[str, Any] | None,
        device_ids: Sequence[int | str | torch.device],
    ) -> Any:
        """Splits the inputs and keyword arguments along ``dim``, one slice per device at most."""
        if device_ids and all(_is_cpu_device(d) for d in device_ids):
            return _scatter_kwargs_on_cpu(inputs, kwargs, len(device_ids), self.dim)
        return super().scatter(inputs, kwargs, device_ids)

    def parallel_apply(self, replicas: Sequence[nn.Module], inputs: Sequence[Any], kwargs: Any) -> list[Any]:
        """Runs every replica on its slice concurrently (one thread per replica).

        A replica's failure aborts the replication's barriers; a replica's return tells them it sends no
        more (see :class:`_ReplicaRunner`).
        """
        if self.cpu_replicas:
            return _parallel_apply_on_cpu(replicas, inputs, kwargs)
        return super().parallel_apply(_runners(replicas), inputs, kwargs)

    def gather(self, outputs: Any, output_device: int | torch.device) -> Any:
        """Concatenates the replicas' outputs along ``dim`` on ``output_device``."""
        if self.cpu_replicas:
            return _gather_on_cpu(outputs, self.dim)
        return super().gather(outputs, output_device)


class _ReplicateWithCallbacks:
    """The ``replicate`` that :func:`patch` installs: the previous one, then the replication callbacks.

    A class rather than a closure so that a patched module can still be pickled and deep-copied.
    """

    def __init__(self, replicate: Any) -> None:
        self.replicate = replicate

    def __call__(self, module: nn.Module, device_ids: Sequence[Any]) -> list[nn.Module]:
        replicas = self.replicate(module, device_ids)
        _execute_replication_callbacks(replicas)
        return replicas


def patch(data_parallel: DP) -> DP:
    """Makes an existing ``nn.DataParallel`` run the replication callbacks after each replication.

    Wraps the instance's ``replicate`` (monkey-patching, like the established library's
    ``patch_replication_callback``), so that each forward calls ``__data_parallel_replicate__(ctx,
    copy_id)`` on the new copies. Prefer :class:`DataParallelWithCallback` for new code.

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
    return data_parallel


#: The established library's name for :func:`patch`.
patch_replication_callback = patch
