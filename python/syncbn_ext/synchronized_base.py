"""The synchronized BatchNorm layers' common base, :class:`_SynchronizedBatchNorm`: its synchronization state
(replication, pickling, numbering across processes) and its synchronized forward. The public layers:
:mod:`syncbn_ext.nn`."""

from __future__ import annotations

import copy
import itertools
import numbers
import os
import sys
import warnings
from typing import Any

import torch
from torch import Tensor
from torch.autograd import forward_ad
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import UninitializedTensorMixin
from torch.nn.utils import parametrize

from ._native import _C
from ._tracing import being_traced, not_compiled, outside_selective_checkpointing
from .distributed import exchange_group, resolve_group
from .eps_mode import get_sbn_eps_mode

__all__ = ["_SynchronizedBatchNorm"]

# torch.compile runs the synchronized forward (C++, with a barrier) eagerly, between compiled graphs: an expected
# graph break, not worth Dynamo's warning about an unknown C++ function.
warnings.filterwarnings("ignore", message=r"Dynamo does not know how to trace the builtin `syncbn_ext\._C")

# Where the code calling a layer starts, for warnings: the frames of torch's and of ours are skipped.
_TORCH_AND_OUR_FILES = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(__file__) + os.sep)


def _stacklevel_outside(prefixes: tuple[str, ...]) -> int:
    """The ``stacklevel`` of the first frame, from the caller of the function that warns outward, of a file under none
    of ``prefixes`` (the user's code)."""
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_code.co_filename.startswith(prefixes):
        frame, level = frame.f_back, level + 1
    return level


# The synchronization state of a layer that is not a replica: set by __init__, restored by pickling, dropped by
# revert_model. Replicas get theirs from the replication hook.
_SYNC_STATE_DEFAULTS: dict[str, Any] = {
    "_copy_id": None,
    "_replicated": False,
    "_channel": None,
    "_layer": (-1, ""),
    "_recent_calls": None,
}

# Layers are known across processes by their construction order, the same on every rank that builds the same model.
_layer_ids = itertools.count()


def _traced_as_a_leaf(layer: _BatchNorm, input: torch.fx.Proxy) -> torch.fx.Proxy:
    """Under ``torch.fx`` symbolic tracing: one ``call_module`` node for the layer, as ``nn.BatchNorm`` gets.

    FX records the insides of modules from outside ``torch.nn``; ours hold Python state (replica, process group)
    and cannot be recorded: the traced ``GraphModule`` keeps the layer itself, synchronization included.
    """
    tracer = input.tracer
    return tracer.create_proxy("call_module", tracer.path_of_module(layer), (input,), {})


def _how_it_normalizes(copy_id: int | None, group: object) -> str:
    """What takes a layer off ``nn.BatchNorm``'s forward, for the errors of the transforms that cannot follow it."""
    return "in the clamp eps mode" if copy_id is None and group is None else "across replicas or processes"


def _own_context(ctx: Any, layer: str) -> Any:
    """Our ``CallbackContext`` for the hook's ``ctx``: itself, or one kept on another library's context.

    The hook protocol is shared: another wrapper (the established library's ``DataParallelWithCallback``,
    jactorch's) calls it with its own plain context object, one per module position and replication, copy 0
    first. The copies then meet on a context of ours stored on it (no replication group: the barrier's timeout
    is their only failure handling).
    """
    if isinstance(ctx, _C.CallbackContext):
        return ctx
    own = getattr(ctx, "_syncbn_context", None)
    if own is None:
        try:
            own = ctx._syncbn_context = _C.CallbackContext()
        except AttributeError:
            raise TypeError(
                f"{layer}.__data_parallel_replicate__: the replication context must be syncbn_ext's CallbackContext "
                f"or an object that takes attributes, got {type(ctx).__name__}; wrap the model with "
                "syncbn_ext.DataParallelWithCallback (or syncbn_ext.patch(nn.DataParallel(...)))"
            ) from None
    return own


def _carries_a_tangent(*tensors: Tensor | None) -> bool:
    """Whether one of ``tensors`` is a forward-mode AD dual tensor at the open level (none open: no, at once; the
    level is what ``forward_ad.unpack_dual`` itself reads, and the full check would cost each call a microsecond)."""
    if getattr(forward_ad, "_current_level", 0) < 0:
        return False
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


# The established library's layer methods a subclass written for it may override; ours have none of them.
_ESTABLISHED_INTERNALS = frozenset({"_data_parallel_master", "_compute_mean_std", "_add_weighted"})


def _alternatives(first: str, has_running_statistics: bool, lone: bool) -> str:
    """What to do instead of what a layer normalizing with batch statistics cannot do: ``first`` in eval mode (where
    it has running statistics: with ``track_running_stats=False`` it normalizes with batch statistics there too), the
    "plus" eps mode (a lone layer in the "clamp" mode), or a reverted copy. ``lone``: not replicated, no group."""
    clamp = get_sbn_eps_mode() == "clamp"
    ways = [f"{first} in eval mode (running statistics: nn.BatchNorm's forward)"] if has_running_statistics else []
    if clamp and lone:
        ways.append("use set_sbn_eps_mode('plus')")
    ways.append(
        "revert_model() a copy (nn.BatchNorm layers: 1/sqrt(var + eps), not the 'clamp' mode's numbers)"
        if clamp
        else "revert_model() a copy"
    )
    text = ", ".join(ways[:-1]) + ", or " + ways[-1] if len(ways) > 1 else ways[0]
    return text[0].upper() + text[1:]


class _SynchronizedBatchNorm(_BatchNorm):
    """The common base of the synchronized layers: everything but the input-dimension check.

    State beside ``nn.BatchNorm``'s (plain attributes, not in the ``state_dict``), set on each replica by the
    replication hook; ``None`` on a module that was never replicated (the original one, or one unpickled or
    deep-copied):

    * ``_copy_id``: the replica's copy id.
    * ``_channel``: the copy's ``_C.BatchNormChannel``: its end of the replication's one BatchNorm barrier,
      shared by every synchronized layer of the replica; never pickled.
    * ``_layer``: (position, name) of the layer in the replica: every statistics message carries it with the
      copy's call index, so replicas that call the layers in a different order or number of times get an
      error naming the layers instead of a hang or statistics paired across layers.
    * ``_layer_id``: the layer's construction order in its process, its identity across processes (checked
      alike).
    * ``process_group``: the ``torch.distributed`` group its statistics are merged across, or ``None`` (see
      :meth:`sync_group`).
    """

    #: Whether ``process_group=None`` means the default group (``SyncBatchNorm``) or no cross-process step.
    _default_to_world = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # A subclass written for the established library's layer, its import changed to ours: overrides of that
        # layer's internals would be ignored, silently.
        # (Told once: where the class brings them, itself or through a mixin, not where a synchronized base did.)
        inherited = {name for base in cls.__bases__ if issubclass(base, _SynchronizedBatchNorm) for name in dir(base)}
        ignored = sorted(name for name in _ESTABLISHED_INTERNALS - inherited if hasattr(cls, name))
        if ignored:
            warnings.warn(
                f"{cls.__qualname__} defines {', '.join(ignored)}, method(s) of Synchronized-BatchNorm-PyTorch's "
                "layers that syncbn_ext's layers never call: an override written for that library has no effect "
                "(override forward, or write a module of your own with a SyncMaster; a replica's copy id is "
                "self._copy_id)",
                UserWarning,
                stacklevel=2,
            )

    def _call_impl(self, *args: Any, **kwargs: Any) -> Any:
        # Under torch.fx symbolic tracing: one call_module node, made before the hooks run, as nn.BatchNorm gets
        # (a leaf). FX records the hooks of a module from outside torch.nn into the graph, and the node would run
        # them again at run time (twice in all).
        input = args[0] if args else kwargs.get("input")
        if isinstance(input, torch.fx.Proxy):
            return _traced_as_a_leaf(self, input)
        return super()._call_impl(*args, **kwargs)

    def __init__(
        self,
        num_features: int,
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
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.process_group = process_group
        self._init_sync_state()

    def _init_sync_state(self, layer_id: int | None = None) -> None:
        """The synchronization state of a layer that is not a replica (a new, converted or unpickled one).

        ``layer_id``: the number of the layer it stands for (a copy, or a conversion, is that layer), else a new one.
        """
        self.__dict__.update(_SYNC_STATE_DEFAULTS)
        self._layer_id = next(_layer_ids) if layer_id is None else layer_id
        self._name_unreplicated(type(self).__name__)
        self.__dict__.setdefault("process_group", None)

    def _name_unreplicated(self, class_name: str) -> None:
        """How error messages name the layer while it is not a replica: its name in the model a converter found it
        in (if any), its class, width and construction order."""
        path = self.__dict__.get("_converted_at")
        where = f"'{path}': " if path else ""
        self._layer = (-1, f"{where}{class_name}({self._width()}) #{self._layer_id}")

    def _width(self) -> int:
        """The layer's number of channels: ``num_features``, or its tensors' length where a lazy layer was
        materialized by ``load_state_dict`` (torch's lazy layers keep ``num_features`` 0 then)."""
        if self.num_features == 0:
            for tensor in (self.running_mean, self.weight):
                if tensor is not None and not isinstance(tensor, UninitializedTensorMixin):
                    return tensor.numel()
        return self.num_features

    def sync_group(self) -> Any:
        """The process group this layer merges its statistics across, or ``None`` (this process only).

        While ``torch.distributed`` is initialized: ``process_group`` if given (``None`` on a rank outside it), else,
        for :class:`SyncBatchNorm`, the default group. A group of one rank is ``None``, and so is every group while
        ``torch.distributed`` is not initialized (as torch's ``nn.SyncBatchNorm``). A ``process_group`` that is not
        a ``ProcessGroup`` raises a ``TypeError`` (while initialized).
        """
        return resolve_group(self.process_group, self._default_to_world)

    # ---- replication ------------------------------------------------------------------------------------

    def __data_parallel_replicate__(self, ctx: Any, copy_id: int) -> None:
        """The replication hook: joins the copy's channel of the replication's BatchNorm barrier.

        Runs on each replica (a shallow copy), copy 0 first; attributes set here stay on that replica.
        """
        own = _own_context(ctx, type(self).__name__)
        self._copy_id = copy_id
        self._replicated = True
        self._channel = _C.BatchNormChannel.of(own, copy_id)
        if own is not ctx:  # another library's context says nothing of the module's place: keep its own name
            self._layer = (-1, self._layer[1])
            return
        name = ctx.module_name or "<root>"
        self._layer = (ctx.position, f"{name}: {type(self).__name__}({self._width()})")

    # ---- pickling -----------------------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        # A channel belongs to one replication; an unpickled (or deep-copied) layer is not a replica.
        state.update(_SYNC_STATE_DEFAULTS)
        state.pop("_is_replica", None)  # (torch's mark of a replica)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # Not a replica; the same layer across processes (its number kept), so that a copy or an unpickling made on
        # some ranks only (an EMA model's deepcopy on rank 0) does not number the layers built later differently.
        self._init_sync_state(state.get("_layer_id"))

    def __deepcopy__(self, memo: dict[int, Any]) -> _SynchronizedBatchNorm:
        # A process group is a process-wide handle: the copy uses the same one (it cannot be copied).
        group = self.__dict__.get("process_group")
        if group is not None:
            memo[id(group)] = group
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        # The state by the layer's own class (a subclass may leave something out), also for a parametrized layer,
        # whose class (torch.nn.utils.parametrize's) refuses __getstate__ to refuse pickling, not copying.
        state = parametrize.type_before_parametrizations(self).__getstate__(self)
        new.__setstate__(copy.deepcopy(state, memo))
        return new

    # ---- scripting --------------------------------------------------------------------------------------

    def __prepare_scriptable__(self) -> _SynchronizedBatchNorm:
        raise RuntimeError(
            f"torch.jit.script does not support {type(self).__name__} (its synchronization is Python and C++ "
            "that TorchScript cannot compile). For deployment, script a plain copy: "
            "torch.jit.script(syncbn_ext.revert_model(copy.deepcopy(model), sync_batch_norm_as=nn.BatchNorm2d)) "
            "(nn.BatchNorm layers: the same results as long as the model is not replicated and the eps mode is "
            "'plus'; sync_batch_norm_as is what SyncBatchNorm layers become, the nn.BatchNormNd of your inputs' "
            "dimensionality or a mapping from layer names to classes, since torch's nn.SyncBatchNorm, their default, "
            "does not script), or use torch.jit.trace / torch.export in eval mode"
        )

    # ---- forward ------------------------------------------------------------------------------------------

    def forward(self, input: Tensor) -> Tensor:
        """BatchNorm of ``input``, with the batch statistics merged over every replica when replicated.

        Follows ``nn.BatchNorm.forward``: batch statistics are used in training mode and in eval mode when
        the running statistics are ``None``; the running statistics (and ``num_batches_tracked``) are updated
        in training mode when ``track_running_stats`` is set, by copy 0 (which holds the buffers), once the merged
        statistics arrived. Across the process group (:meth:`sync_group`) only in training mode, as
        ``torch.nn.SyncBatchNorm``: in eval mode the batch statistics are those of this process's replicas.
        Inside backward (``torch.utils.checkpoint(..., use_reentrant=False)`` recomputing a block), a replica
        reuses its original call's statistics and updates nothing.
        """
        if isinstance(input, torch.fx.Proxy):
            return _traced_as_a_leaf(self, input)
        # Whether it is a replica, not which one: torch.compile guards on what this frame reads, and a copy id read
        # here would compile the frame again for every replica.
        replicated = self.__dict__.get("_replicated", False)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        eps_mode = get_sbn_eps_mode()
        # Across processes only in training, as torch.nn.SyncBatchNorm: an eval-mode forward with batch statistics
        # (track_running_stats=False) normalizes with its process's batch, so evaluating on one rank works.
        group = self.sync_group() if self.training else None
        if not replicated and use_batch_stats and self.__dict__.get("_is_replica"):
            self._unsynchronized_replica(group)
        if not use_batch_stats or (not replicated and eps_mode == "plus" and group is None):
            # Running statistics, or a lone module with nn.BatchNorm's eps: nn.BatchNorm itself.
            return super().forward(input)

        if being_traced():
            instead = _alternatives("trace or export", self.running_mean is not None, not replicated and group is None)
            raise RuntimeError(
                f"{type(self).__name__} cannot be traced or exported while it normalizes with batch statistics "
                f"{_how_it_normalizes(self.__dict__.get('_copy_id'), group)}: its synchronized forward is opaque "
                f"C++ to the tracer. {instead}"
            )
        return self._forward_with_batch_statistics(input, group, eps_mode)

    def _unsynchronized_replica(self, group: Any) -> None:
        """A replica whose replication callbacks did not run (a plain nn.DataParallel, torch.nn.parallel.replicate):
        warned, as it normalizes with its own slice; refused across processes, where every replica of the process
        would exchange with the other ranks on its own (pairing with their replicas in any order)."""
        what = (
            f"{self._layer[1]} runs in a replica whose replication callbacks did not run (a plain "
            "nn.DataParallel or torch.nn.parallel.replicate): wrap the model in syncbn_ext.DataParallelWithCallback, "
            "or call syncbn_ext.patch() on the nn.DataParallel"
        )
        if group is not None:
            raise RuntimeError(
                f"{what}. Across processes each replica would exchange with the other ranks on its own, pairing "
                "with their replicas in any order"
            )
        warnings.warn(
            f"{what}; it normalizes with its replica's slice of the batch only",
            RuntimeWarning,
            stacklevel=_stacklevel_outside(_TORCH_AND_OUR_FILES),
        )

    # Opaque to Dynamo: torch.compile breaks the graph at this call and compiles around it. (Traced, its torch.func
    # check read true, and Dynamo, meeting that error, ran the whole calling frame eagerly from then on.)
    @not_compiled("synchronized BatchNorm merges its batch statistics outside the graph (in C++)")
    def _forward_with_batch_statistics(self, input: Tensor, group: Any, eps_mode: str) -> Tensor:
        """The synchronized forward: batch statistics merged over the replicas and the process group."""
        copy_id = self.__dict__.get("_copy_id")
        try:
            self._check_arguments(input, copy_id, group)
        except BaseException:
            self._announce_failure(input, copy_id, group)
            raise
        holds_buffers = copy_id is None or copy_id == 0
        update_running_stats = self.training and self.track_running_stats and holds_buffers

        # As nn.BatchNorm: the factor is momentum, or 1 / num_batches_tracked for the cumulative average. But
        # num_batches_tracked moves only with the running statistics, once the merged statistics arrived: a
        # failed pass leaves every buffer untouched.
        count_batch = update_running_stats and self.num_batches_tracked is not None
        exponential_average_factor = 0.0 if self.momentum is None else self.momentum
        if count_batch and self.momentum is None:
            exponential_average_factor = 1.0 / float(self.num_batches_tracked + 1)

        layer, layer_name = self._layer
        with outside_selective_checkpointing():  # its recomputation is ours (see the helper)
            return _C.sync_batch_norm_train(
                input,
                self.weight,
                self.bias,
                self.running_mean if update_running_stats else None,
                self.running_var if update_running_stats else None,
                self.num_batches_tracked if count_batch else None,
                exponential_average_factor,
                self.eps,
                eps_mode,
                self._channel,
                layer,
                layer_name,
                exchange_group(group, layer_name, input.device),  # the layers' own communicator (gloo groups)
                self._layer_id,
                self._recent_calls_across(group, copy_id),
            )

    def _recent_calls_across(self, group: Any, copy_id: int | None) -> Any:
        """Alone in its process but across processes: the calls this layer made in a checkpointed forward, whose
        recomputation inside backward then reuses the merged statistics (a replica's channel keeps its own)."""
        if group is None or copy_id is not None:
            return None
        if self.__dict__.get("_recent_calls") is None:
            self._recent_calls = _C.CallRecords()
        return self._recent_calls

    def _check_arguments(self, input: Tensor, copy_id: int | None, group: Any) -> None:
        """nn.BatchNorm's checks this path would otherwise miss, and the transforms it cannot run under."""
        self._check_input_dim(input)
        # F.batch_norm's argument checks, which this path does not go through (C++ would name its own signature).
        for position, name, value in ((7, "momentum", self.momentum), (8, "eps", self.eps)):
            number = isinstance(value, numbers.Real) or (isinstance(value, Tensor) and value.dim() == 0)
            if not (number or (name == "momentum" and value is None)):
                raise TypeError(
                    f"batch_norm(): argument '{name}' (position {position}) must be float, not {type(value).__name__}"
                )
        if self.eps <= 0.0:  # F.batch_norm's check, which this path does not go through
            raise ValueError(f"batch_norm eps must be positive during training, but got {self.eps}")
        if torch._C._functorch.peek_interpreter_stack() is not None:
            raise RuntimeError(
                f"{type(self).__name__} cannot run under torch.func transforms (grad, vmap, jacrev, ...) while it "
                f"normalizes with batch statistics {_how_it_normalizes(copy_id, group)}: its synchronized forward is "
                "a C++ autograd function, which torch.func does not support. torch.autograd.grad(..., "
                "create_graph=True) gives its second derivatives (torch.autograd.functional.hessian and hvp too). "
                + _alternatives("use it", self.running_mean is not None, copy_id is None and group is None)
            )
        if _carries_a_tangent(input, self.weight, self.bias):
            raise RuntimeError(
                f"{type(self).__name__} cannot compute forward-mode derivatives (torch.autograd.forward_ad dual "
                f"tensors) while it normalizes with batch statistics {_how_it_normalizes(copy_id, group)}: its "
                "synchronized forward is a C++ autograd function without a forward-mode formula. "
                "torch.autograd.functional.jvp gives the same Jacobian-vector products (through double backward). "
                + _alternatives("use it", self.running_mean is not None, copy_id is None and group is None)
            )

    def _announce_failure(self, input: Tensor, copy_id: int | None, group: Any) -> None:
        """Tells the other ranks that this rank's call failed before its exchange, so that they fail this call too
        instead of pairing it with this rank's next one. Alone in its process only: a replica's refusal closes its
        replication at once, which would cut copy 0's announcement short while the other ranks are on their way."""
        if group is None or copy_id is not None:
            return
        device = input.device if isinstance(input, Tensor) else torch.device("cpu")
        label = self._layer[1]
        with torch._C._DisableFuncTorch():  # a refusal under torch.func: the exchange's own tensors are plain
            exchanging = exchange_group(group, label, device)
            _C.announce_failed_call(exchanging, self._layer_id, self._width(), label, device)
