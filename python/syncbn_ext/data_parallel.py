"""Data parallelism that runs the replication callbacks, on GPUs and on CPU replicas.

``nn.DataParallel`` copies the module to every device on each forward, but gives the copies no way to find
each other. :class:`DataParallelWithCallback` (or :func:`patch` applied to an existing ``nn.DataParallel``)
calls ``__data_parallel_replicate__(ctx, copy_id)`` on every module of every copy right after each
replication (see :func:`syncbn_ext.execute_replication_callbacks`), which is how synchronized layers share a
:class:`syncbn_ext.SyncMaster` between their copies, and runs the replicas with
:func:`syncbn_ext.parallel_apply.parallel_apply`: failures, interrupts and stuck replicas end the forward promptly
and write nothing to the model.

``nn.DataParallel`` needs an accelerator; on a machine without one it silently runs the module as is.
``DataParallelWithCallback(module, device_ids=["cpu"] * n)`` instead runs ``n`` real replicas on CPU threads,
with the same scatter / replicate / parallel apply / gather steps: a way to use and test synchronized layers
without a GPU.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from ._native import _C
from ._tracing import being_traced
from .established_library import established_layer
from .forward_across_processes import announcing_failure
from .forward_locks import training_forward_lock
from .parallel_apply import ABORT_TAG, parallel_apply, reporting_outcome, running_a_replica
from .parallel_backward import Boundaries, faster_than_serial, join_replicas
from .parallel_backward import wanted as parallel_backward_wanted
from .replicate import compiled_modules_replicable, rebind_compiled_modules, replicate_on_cpu
from .replication import Replication
from .scatter_gather import gather_on_cpu, scatter_kwargs_on_cpu
from .synchronized_base import _TORCH_AND_OUR_FILES, _stacklevel_outside

__all__ = ["DataParallelWithCallback"]

M = TypeVar("M", bound=nn.Module)
T = TypeVar("T", bound=nn.Module)  # the wrapped module's type: ``dp.module`` is a ``T``, as with nn.DataParallel[T]

_CPU = torch.device("cpu")


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


def _not_a_device(device: Any) -> str | None:
    """Why ``device`` is not a device ``DataParallel`` takes (an int, a device string, a ``torch.device``), or None."""
    if isinstance(device, torch.device) or (isinstance(device, int) and not isinstance(device, bool)):
        return None
    if isinstance(device, str):
        try:
            torch.device(device)
        except RuntimeError as error:
            return str(error).splitlines()[0]
        return None
    return f"of type {type(device).__name__}, not an int, a device string or a torch.device"


# Per calling thread: the replications whose write-back waits for the end of the forward (None: none waits).
_deferred = threading.local()


@contextlib.contextmanager
def _one_forward(module: nn.Module, wrapper: nn.DataParallel) -> Iterator[None]:
    """A forward of ``wrapper`` around ``module``: under its :func:`~syncbn_ext.forward_locks.training_forward_lock`,
    and with the replicas' buffers written back only once the whole forward succeeded, the gather included (so outputs
    the gather cannot join leave the module untouched), or when the same forward replicates again (a forward that
    runs its replicas twice, e.g. once per view, replicates the second time from the first's buffers). Across
    processes, a failure before its first synchronized call is told to the other ranks (:func:`announcing_failure`,
    entered once the lock is held, so that another thread's forward it waited for counts no call of its own)."""
    with _telling_a_failure_before_the_first_call(module, wrapper):
        outer = getattr(_deferred, "replications", None)
        _deferred.replications = []
        try:
            yield
            _write_back_deferred()
        finally:
            _deferred.replications = outer


@contextlib.contextmanager
def _telling_a_failure_before_the_first_call(module: nn.Module, wrapper: nn.DataParallel) -> Iterator[None]:
    """Under ``module``'s :func:`~syncbn_ext.forward_locks.training_forward_lock`, an :func:`announcing_failure`
    block for ``wrapper``'s forward (entered once the lock is held, so that another thread's forward it waited for
    counts no call of its own)."""
    device = wrapper.__dict__.get("src_device_obj", _CPU)
    with training_forward_lock(module), announcing_failure(module, device, f"{type(wrapper).__name__}'s forward"):
        yield


def _call_telling_failed_pre_hooks(wrapper: nn.DataParallel, call: Any, *args: Any, **kwargs: Any) -> Any:
    """``call(*args, **kwargs)``, ``wrapper``'s module call: where it runs forward pre-hooks (the wrapper's own, or
    global ones) and nothing compiles, in the block that tells the other ranks a forward failing before its first
    synchronized call (the hooks run before the forward: a hook raising on one rank would otherwise leave the
    others' call of that step to pair with this rank's next forward)."""
    hooks = wrapper._forward_pre_hooks or nn.modules.module._global_forward_pre_hooks
    if hooks and not torch.compiler.is_compiling():
        with _telling_a_failure_before_the_first_call(wrapper.module, wrapper):
            return call(*args, **kwargs)
    return call(*args, **kwargs)


def _write_back_deferred() -> None:
    """Writes back the replications of the calling thread's forward that are still waiting (see _one_forward)."""
    deferred = getattr(_deferred, "replications", None)
    while deferred:
        deferred.pop(0).write_back()


def _write_back(replicas: Sequence[Any]) -> None:
    """Writes replica 0's changed buffers into the module (called only after every replica succeeded); inside a
    wrapper's forward, once that forward succeeded (see :func:`_one_forward`)."""
    tag = Replication.of(replicas[0]) if replicas else None
    if tag is None:
        return
    deferred = getattr(_deferred, "replications", None)
    if deferred is not None:
        if tag[0] not in deferred:  # a subclass's parallel_apply around ours hands it on twice
            deferred.append(tag[0])
    else:
        tag[0].write_back()


def _check_parallel_backward(value: Any) -> None:
    # A truthy string ("false" from a config file) would choose the parallel backward.
    if value is not None and not isinstance(value, bool):
        raise TypeError(
            f"DataParallelWithCallback: parallel_backward must be None (choose), True or False, got {value!r}"
        )


def _apply_and_write_back(replicas: Sequence[Any], inputs: Sequence[Any], kwargs: Any, devices: Any) -> list[Any]:
    """Runs the replicas, then writes replica 0's changed buffers into the module (only after a success; inside a
    wrapper's forward, once that succeeded: see :func:`_one_forward`)."""
    outputs = parallel_apply(replicas, inputs, kwargs, devices)
    _write_back(replicas)
    return outputs


def _refuse_established_layers_training(module: nn.Module) -> None:
    """Refuses the established library's own layers in training mode on CPU replicas: they reduce on GPUs only
    (its master callback), and one replica failing there leaves the others waiting in its queue, which nothing can
    wake (in eval mode they normalize alone, as nn.BatchNorm)."""
    for name, layer in module.named_modules():
        if layer.training and established_layer(type(layer)) is not None:
            cls, where = type(layer), repr(name) if name else "the module"
            raise TypeError(
                f"DataParallelWithCallback: {where} is Synchronized-BatchNorm-PyTorch's {cls.__name__} "
                f"({cls.__module__}), whose synchronization runs on GPUs only; convert the model to this library's "
                "layers first, keeping their state: model = syncbn_ext.convert_model(model)"
            )


def _replicate_with_callbacks(replicate: Any, module: M, device_ids: Sequence[Any]) -> list[M]:
    """``replicate(module, device_ids)`` (torch's, compiled modules included), then the replication callbacks."""
    with compiled_modules_replicable(module):
        replicas = replicate(module, device_ids)
    rebind_compiled_modules(replicas)
    Replication(replicas, module)
    return replicas


def _warn_of_parameters_written(versions: list[tuple[str, torch.Tensor, int | None]]) -> None:
    """Warns of the parameters a forward of CPU replicas wrote in place (their version moved).

    CPU replicas use the module's parameters themselves (their gradients must reach it): a write in place from a
    replica's forward reaches the module from every replica, at once, also when the forward fails, where on GPUs only
    device 0's would (the others write copies), as the buffers' isolation gives for buffers.
    """
    written = [name for name, p, version in versions if version is not None and _C.version_of(p) != version]
    if written:
        warnings.warn(
            f"DataParallelWithCallback: the forward of the CPU replicas wrote parameter(s) {written} in place. The "
            "replicas share the module's parameters, so every replica's write reached the module, even if the "
            "forward failed (on GPUs only device 0's write would: the others write copies). State a forward updates "
            "(a moving average, a counter) belongs in a buffer (register_buffer): replica 0's update reaches the "
            "module after a successful forward, as on GPUs",
            RuntimeWarning,
            stacklevel=_stacklevel_outside(_TORCH_AND_OUR_FILES),
        )


class DataParallelWithCallback(nn.DataParallel[T]):
    """``nn.DataParallel`` that calls ``__data_parallel_replicate__(ctx, copy_id)`` after each replication.

    With accelerator ``device_ids`` (or ``None``) this is ``nn.DataParallel`` plus the replication callbacks and
    :mod:`syncbn_ext.parallel_apply`'s failure handling; on a machine without an accelerator and
    ``device_ids=None`` it is, like ``nn.DataParallel``, a wrapper that runs the module as is (``device_ids ==
    []``).

    With ``device_ids=["cpu"] * n`` (strings or ``torch.device("cpu")``), the forward runs ``n`` CPU
    replicas, each on its own worker thread: the inputs are split along ``dim`` with ``chunk(n, dim)`` semantics
    (a batch smaller than ``n`` uses fewer replicas, as ``nn.DataParallel`` does), the module is copied
    with :func:`replicate_on_cpu`, the callbacks run, the replicas run concurrently and their outputs are
    concatenated along ``dim``. Parameter gradients accumulate on the original module. Their backward is
    autograd's, one replica after the other with all of torch's intra-op threads, or runs each replica's on its
    thread at once (see :mod:`syncbn_ext.parallel_backward`) where that is faster: with fewer intra-op threads
    than replicas (``parallel_backward=None``, the default), or always (``True``).

    Buffers: replica 0 works on copies of the module's buffers, copied back into the module's own tensors once
    every replica succeeded and their outputs were gathered (running statistics land on the module, as device
    0's do with ``nn.DataParallel``). A forward that fails, is interrupted or times out, or whose outputs cannot
    be gathered, leaves every buffer untouched, and a replica left running on its thread afterwards can write
    nothing.

    Args:
        module: the module to parallelize.
        device_ids: accelerator devices (ints or devices; default: all), or ``n`` CPU devices.
        output_device: where outputs are gathered (default ``device_ids[0]``); ``None`` or CPU in CPU mode.
        dim: the dimension inputs are split along and outputs concatenated along.
        parallel_backward: CPU replicas only. ``True``: run the replicas' backward on their threads, at once,
            except for a model whose replicas exchange tensors with gradients between them (a module with a
            replication hook of its own, as the established library's layers) or under a subclass with its own
            ``parallel_apply``: those always get autograd's serial backward. A second backward cannot retrace it:
            under ``create_graph=True`` the gradients it gives are right, but a double backward through them
            raises an error. ``False``: autograd's own serial backward through every replica, which a double
            backward retraces (as far as the layers allow). ``None`` (default): parallel
            only where it is faster, when ``torch.get_num_threads()`` at the forward is smaller than the number of
            replicas and the process has more cores than that (see
            :func:`syncbn_ext.parallel_backward.faster_than_serial`). The attribute of the same name can be
            changed between forwards.

    Raises:
        ValueError: ``device_ids`` mixes CPU and accelerator devices, or in CPU mode ``output_device`` is
            not the CPU.
        TypeError: ``parallel_backward`` is not ``None``, ``True`` or ``False``.
    """

    def __init__(
        self,
        module: T,
        device_ids: Sequence[int | str | torch.device] | None = None,
        output_device: int | str | torch.device | None = None,
        dim: int = 0,
        *,
        parallel_backward: bool | None = None,
    ) -> None:
        _check_parallel_backward(parallel_backward)
        if isinstance(device_ids, (str, torch.device, int)):
            # A bare "cpu" would be read as the devices 'c', 'p', 'u' (nn.DataParallel then runs the module alone).
            raise TypeError(
                "DataParallelWithCallback: device_ids is a list of devices, one per replica (e.g. ['cpu'] * 4 or "
                f"[0, 1]), got the single device {device_ids!r}"
            )
        if device_ids is not None:
            device_ids = list(device_ids)
        cpu_entries = [_is_cpu_device(d) for d in device_ids] if device_ids is not None else []
        if not any(cpu_entries):
            super().__init__(module, device_ids, output_device, dim)
            self._cpu_replicas = False
            self.parallel_backward = parallel_backward
            self._adopt_own_parallel_apply()
            return
        if not all(cpu_entries):
            for i, device in enumerate(device_ids):
                why = _not_a_device(device)
                if why is not None:
                    raise ValueError(
                        f'DataParallelWithCallback: device_ids[{i}] = {device!r} is not a device ({why}); give "cpu" '
                        "for each CPU replica, or accelerator indices"
                    )
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
        self.parallel_backward = parallel_backward
        self._adopt_own_parallel_apply()

    def _adopt_own_parallel_apply(self) -> None:
        """A subclass's own ``parallel_apply`` runs the replicas as :func:`patch` runs an ``nn.DataParallel``
        subclass's: each replica closes its replication when it fails (the others stop waiting) and finishes its
        copy when it returns, and replica 0's buffers are written back after a success (else a subclass running
        the replicas on its own threads lost every running-statistics update, and a failure waited for the
        timeout)."""
        if self._has_own_parallel_apply:
            self.parallel_apply = _PatchedParallelApply(self.parallel_apply)

    @property
    def _has_own_parallel_apply(self) -> bool:
        """Whether this instance's class overrides ``parallel_apply``."""
        return type(self).parallel_apply is not DataParallelWithCallback.parallel_apply

    @property
    def cpu_replicas(self) -> bool:
        """True when this wrapper runs CPU replicas (``device_ids`` are CPU devices)."""
        return self.__dict__.get("_cpu_replicas", False)

    def _call_impl(self, *args: Any, **kwargs: Any) -> Any:
        return _call_telling_failed_pre_hooks(self, super()._call_impl, *args, **kwargs)

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        """Scatters the inputs, replicates the module, runs the callbacks and the replicas, gathers.

        Across processes, a forward that fails before its first synchronized call tells the other ranks, which fail
        that call too (see :func:`~syncbn_ext.forward_across_processes.announcing_failure`)."""
        if not self.cpu_replicas:
            with _one_forward(self.module, self):
                return super().forward(*inputs, **kwargs)
        with torch.autograd.profiler.record_function("DataParallelWithCallback.forward"):
            if len(self.device_ids) == 1:
                with _one_forward(self.module, self):
                    return self.module(*inputs, **kwargs)
            if running_a_replica():
                # Its replicas would make a replication of their own, synchronizing among themselves only.
                raise RuntimeError(
                    f"{type(self).__name__} was called inside a replica of another wrapper (nested wrappers): its "
                    "replicas would synchronize their BatchNorm statistics among themselves only, not over the whole "
                    "batch. Wrap the model once (the outer wrapper's replicas already split the batch)"
                )
            if being_traced():
                # The replicas run on worker threads, out of the tracer's sight (a synchronized layer traced there
                # recursed until the thread's stack overflowed).
                raise RuntimeError(
                    f"{type(self).__name__} with {len(self.device_ids)} CPU replicas cannot be traced or exported: "
                    "its replicas run on worker threads the tracer does not follow. Trace or export the module it "
                    "wraps (its .module), in eval mode where it has synchronized layers"
                )
            with _one_forward(self.module, self):
                return self._forward_on_cpu_replicas(inputs, kwargs)

    def _forward_on_cpu_replicas(self, inputs: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Scatters, replicates on CPU, runs the replicas and gathers (then replica 0's buffers are written back)."""
        parameters = list(self.module.named_parameters())
        for t in (*(p for _, p in parameters), *self.module.buffers()):
            if t.device != self.src_device_obj:
                raise RuntimeError(
                    f"module must have its parameters and buffers on device {self.src_device_obj} "
                    f"(device_ids[0]) but found one of them on device: {t.device}"
                )
        versions = [(name, p, _C.version_of(p)) for name, p in parameters]
        try:
            return self._run_cpu_replicas(inputs, kwargs)
        finally:
            _warn_of_parameters_written(versions)

    def _run_cpu_replicas(self, inputs: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        inputs, module_kwargs = self.scatter(inputs, kwargs, self.device_ids)
        if not inputs and not module_kwargs:
            inputs, module_kwargs = ((),), ({},)
        module_kwargs = module_kwargs or tuple({} for _ in inputs)
        parallel = self.__dict__.get("parallel_backward")
        _check_parallel_backward(parallel)  # (an attribute, which can be set between forwards)
        # torch.func's transforms (grad, vjp, jacrev, vmap) cannot see into the join of the parallel backward (an
        # autograd.Function without setup_context): the serial one, which they can.
        under_transforms = torch._C._are_functorch_transforms_active()
        if parallel is None:
            parallel = faster_than_serial(len(inputs)) and not under_transforms
        elif parallel and under_transforms and len(inputs) > 1:
            raise RuntimeError(
                f"{type(self).__name__}(parallel_backward=True) cannot run under torch.func transforms (grad, vjp, "
                "jacrev, vmap, ...): its parallel backward is opaque to them. Build the wrapper with "
                "parallel_backward=None (which then chooses the serial backward) or False"
            )
        if len(inputs) > 1 and parallel and not self._has_own_parallel_apply and parallel_backward_wanted(self.module):
            outputs = self._apply_with_parallel_backward(inputs, module_kwargs)
            if not isinstance(outputs, tuple):
                return self.gather(outputs, self.output_device)
            # The replicas' graphs cannot be cut: from now on this wrapper keeps autograd's serial backward.
            why, advice = outputs
            warnings.warn(
                f"DataParallelWithCallback: {why}, so the replicas' backward cannot run at once: this forward ran "
                "again (its hooks and other side effects twice) with autograd's serial backward, and this wrapper "
                f"keeps that from now on (parallel_backward=False). {advice}, or build the wrapper with "
                "parallel_backward=False",
                RuntimeWarning,
                stacklevel=_stacklevel_outside(_TORCH_AND_OUR_FILES),
            )
            self.parallel_backward = False
        replicas = self.replicate(self.module, self.device_ids[: len(inputs)])
        outputs = self.parallel_apply(replicas, inputs, module_kwargs)
        return self.gather(outputs, self.output_device)

    def _apply_with_parallel_backward(
        self, inputs: Sequence[Any], kwargs: Sequence[Any]
    ) -> list[Any] | tuple[str, str]:
        """Runs CPU replicas made for a parallel backward; where it cannot apply (the replication discarded), why and
        what to do (see :func:`syncbn_ext.parallel_backward.join_replicas`)."""
        replicas = self.replicate(self.module, self.device_ids[: len(inputs)])
        replication = Replication.of(replicas[0])[0]
        replication.group.parallel_backward = True
        boundaries = Boundaries(replicas, inputs, kwargs)
        outputs = parallel_apply(replicas, inputs, kwargs, ["cpu"] * len(replicas))
        joined = join_replicas(replicas, boundaries, outputs)
        if isinstance(joined, tuple):
            replication.group.close("DataParallelWithCallback: run again with a serial backward")
            return joined
        _write_back(replicas)
        return joined

    def replicate(self, module: M, device_ids: Sequence[int | str | torch.device]) -> list[M]:
        """Replicates ``module`` on ``device_ids`` (CPU ones included), then runs the replication callbacks."""
        _write_back_deferred()  # a forward replicating again starts from its previous replicas' buffers
        if device_ids and all(_is_cpu_device(d) for d in device_ids):
            _refuse_established_layers_training(module)
            replicas = replicate_on_cpu(module, len(device_ids), detach=not torch.is_grad_enabled())
            Replication(replicas, module)
            return replicas
        return _replicate_with_callbacks(super().replicate, module, device_ids)

    def scatter(
        self,
        inputs: tuple[Any, ...],
        kwargs: dict[str, Any] | None,
        device_ids: Sequence[int | str | torch.device],
    ) -> Any:
        """Splits the inputs and keyword arguments along ``dim``, one slice per device at most."""
        if device_ids and all(_is_cpu_device(d) for d in device_ids):
            return scatter_kwargs_on_cpu(inputs, kwargs, len(device_ids), self.dim)
        return super().scatter(inputs, kwargs, device_ids)

    def parallel_apply(self, replicas: Sequence[nn.Module], inputs: Sequence[Any], kwargs: Any) -> list[Any]:
        """Runs every replica on its slice concurrently (see :func:`syncbn_ext.parallel_apply.parallel_apply`),
        then writes replica 0's changed buffers back into the module (within this wrapper's forward: once the
        forward succeeded, or the forward replicates again)."""
        devices = ["cpu"] * len(replicas) if self.cpu_replicas else self.device_ids[: len(replicas)]
        return _apply_and_write_back(replicas, inputs, kwargs, devices)

    def gather(self, outputs: Any, output_device: int | torch.device) -> Any:
        """Concatenates the replicas' outputs along ``dim`` on ``output_device``."""
        if self.cpu_replicas:
            return gather_on_cpu(outputs, self.dim)
        return super().gather(outputs, output_device)


class _PatchedParallelApply:
    """The ``parallel_apply`` that :func:`patch` installs, around the instance's previous one.

    Where that is ``nn.DataParallel``'s own: :func:`syncbn_ext.parallel_apply.parallel_apply` (failure, interrupt
    and timeout handling, as :class:`DataParallelWithCallback`). Where a subclass brings its own: that method,
    given each replica wrapped so that a failing replica closes its replication (the others stop waiting) and a
    returning one finishes its copy. Either way, replica 0's buffers are written back only after a success. A
    class rather than a closure so that a patched module can still be pickled and deep-copied.
    """

    def __init__(self, parallel_apply: Any) -> None:
        self.parallel_apply = parallel_apply

    def __call__(self, replicas: Sequence[nn.Module], inputs: Sequence[Any], kwargs: Any) -> list[Any]:
        if getattr(self.parallel_apply, "__func__", None) is nn.DataParallel.parallel_apply:
            owner = self.parallel_apply.__self__
            return _apply_and_write_back(replicas, inputs, kwargs, owner.device_ids[: len(replicas)])
        outputs = self.parallel_apply([_FinishingReplica(r) for r in replicas], inputs, kwargs)
        _write_back(replicas)
        return outputs


class _FinishingReplica:
    """A replica as a subclass's own ``parallel_apply`` runs it: tells its replication how it ended."""

    def __init__(self, replica: nn.Module) -> None:
        self.replica = replica

    def __getattr__(self, name: str) -> Any:
        return getattr(self.replica, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        tag = Replication.of(self.replica)
        if tag is None:
            return self.replica(*args, **kwargs)
        replication, copy_id = tag
        # Tagged as our closings are, so that syncbn_ext's parallel_apply, if it runs this, tells the errors the
        # closing caused in the other replicas from the failure itself.
        with reporting_outcome(replication.group, copy_id, f"{ABORT_TAG}: "):
            return self.replica(*args, **kwargs)
