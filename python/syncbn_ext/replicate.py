"""Replication: CPU replicas of a module, and the replication callbacks that let the copies find each other.

* :func:`replicate_on_cpu`: ``torch.nn.parallel.replicate`` for CPU replicas.
* :class:`Replication`: one forward's replicas (any device) after the replication callbacks ran: their
  replication group, and replica 0 working on copies of the original's buffers, written back only when every
  replica succeeded (so a failed, interrupted or abandoned forward writes nothing to the model).
* :func:`training_forward_lock`: training forwards of one module (or of modules sharing a module with buffers)
  from several threads, one after another (each replicates the buffers the previous one wrote back).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from ._native import _C

__all__ = ["Replication", "replicate_on_cpu", "training_forward_lock"]

M = TypeVar("M", bound=nn.Module)

#: The attribute of a replica (in its ``__dict__``) naming its replication and copy id.
REPLICATION_TAG = "_syncbn_replication"


_training_forward_locks: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_training_forward_locks_guard = threading.Lock()


def _forget_training_forward_locks_after_fork() -> None:
    # A forked child has only the thread that forked: a lock another thread held at the fork (a training forward
    # running there) would never be released in the child.
    global _training_forward_locks, _training_forward_locks_guard
    _training_forward_locks = weakref.WeakKeyDictionary()
    _training_forward_locks_guard = threading.Lock()


os.register_at_fork(after_in_child=_forget_training_forward_locks_after_fork)


class TrainingForwardLocks:
    """The locks of a module and of every module of its tree that holds buffers, taken in one global order (so
    that forwards of overlapping trees cannot deadlock) and released together. Reentrant, as each lock is."""

    def __init__(self, locks: list[threading.RLock]) -> None:
        self._locks = locks

    def acquire(self, blocking: bool = True) -> bool:
        """Takes every lock (waits for them unless ``blocking`` is false); False if one was held elsewhere. An
        exception while waiting (Ctrl-C) releases those already taken."""
        with contextlib.ExitStack() as taken:  # releases them on False or an exception
            for lock in self._locks:
                if not lock.acquire(blocking):
                    return False
                taken.callback(lock.release)
            taken.pop_all()
        return True

    def release(self) -> None:
        # ExitStack releases each one (last taken first), even should an exception (Ctrl-C) arrive in between.
        with contextlib.ExitStack() as taken:
            for lock in self._locks:
                taken.callback(lock.release)

    def __enter__(self) -> TrainingForwardLocks:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def training_forward_lock(module: nn.Module) -> contextlib.AbstractContextManager[Any]:
    """What a replicated forward of ``module`` holds from its replication to its write-back.

    Replica 0 updates copies of the module's buffers, copied back at the forward's end: two training forwards at
    once from two threads would each write back its own update over the other's (a running mean missing a
    batch, ``num_batches_tracked`` counting half of them). So training forwards of one module run one after
    another, as if called in turn, and so do those of two modules whose trees share a module holding buffers
    (a wrapper of a model and one of its block, two models sharing a layer): each module with buffers has its
    lock, and a forward holds those of its tree. A forward in eval mode (no module of the tree training: no
    running statistics to update) holds nothing and runs alongside any other. Reentrant: a forward that calls the
    same wrapper again from its own thread goes on. (A forward that calls, from its own thread, a wrapper of another
    model sharing modules with its own takes the locks it lacks after those it holds, out of the global order: two
    threads doing so crosswise could wait for each other.)
    """
    modules = list(module.modules())
    if not any(m.training for m in modules):
        return contextlib.nullcontext()
    holders = [module, *(m for m in modules if m is not module and any(b is not None for b in m._buffers.values()))]
    with _training_forward_locks_guard:
        locks = {}
        for holder in holders:
            lock = _training_forward_locks.get(holder)
            if lock is None:
                lock = _training_forward_locks[holder] = threading.RLock()
            locks[id(lock)] = lock
    return TrainingForwardLocks([locks[key] for key in sorted(locks)])


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
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
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
    """torch.compile's module wrapper class, once torch._dynamo is loaded (no compiled module exists before)."""
    if "torch._dynamo" not in sys.modules:
        return None
    from torch._dynamo.eval_frame import OptimizedModule

    return OptimizedModule


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


# (a module's buffer, replica 0's copy, the buffer's version, the copy's version): what _C.write_back_buffers takes.
_BufferCopy = tuple[torch.Tensor, torch.Tensor, int | None, int | None]
# (a module's _buffers, those of its copy in replica 0, the buffer's name, what replica 0 was given there): to find
# the buffers replica 0 replaced (self.steps = self.steps + 1) rather than wrote. The dictionaries, not the modules:
# a replica holds its replication, which must not hold the replica (a cycle only the garbage collector frees).
_BufferSlot = tuple[dict[str, Any], dict[str, Any], str, torch.Tensor | None]


def _isolate_buffers(original: nn.Module, replica: nn.Module) -> tuple[list[_BufferCopy], list[_BufferSlot]]:
    """Gives ``replica`` copies of the buffers it shares with ``original``.

    Returns (original, copy, the original's version, the copy's version) per buffer (``None``: an inference tensor,
    which has no version), and every buffer slot the two share (``None`` ones too).
    """
    slots: list[_BufferSlot] = [
        (source._buffers, target._buffers, key, buf)
        for source, target in zip(original.modules(), replica.modules(), strict=False)
        if source._buffers is not target._buffers
        for key, buf in target._buffers.items()
        if key in source._buffers and source._buffers[key] is buf
    ]
    shared = [(i, buf) for i, (_, _, _, buf) in enumerate(slots) if buf is not None and not buf.requires_grad]
    copy_of = _copier_keeping_views([buf for _, buf in shared])
    links: list[_BufferCopy] = []
    copies: dict[int, torch.Tensor] = {}
    for i, buf in shared:
        copy = copies.get(id(buf))
        if copy is None:
            copy = copies[id(buf)] = copy_of(buf)
            links.append((buf, copy, _C.version_of(buf), _C.version_of(copy)))
        source, target, key, _ = slots[i]
        target[key] = copy
        slots[i] = (source, target, key, copy)
    return links, slots


def _storage_key(tensor: torch.Tensor) -> tuple[Any, int] | None:
    """What identifies ``tensor``'s memory, for a dense tensor with some; else ``None``."""
    if tensor.layout != torch.strided or tensor.is_nested or tensor.is_quantized or tensor.device.type == "meta":
        return None  # (a quantized tensor's copy through set_ would have no quantizer)
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):  # a tensor subclass or wrapper without storage
        return None
    return (tensor.device, storage.data_ptr()) if storage.nbytes() > 0 else None


def _copier_keeping_views(buffers: Sequence[torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function that copies each of ``buffers``: a clone, except that buffers sharing memory (one a view of the
    other, or both views of one tensor) get copies that share a copy of that memory, as in the module, so that a
    write through one shows through the others."""
    key_of = {id(buf): _storage_key(buf) for buf in buffers}  # once per buffer: each forward runs this
    tensors_of: dict[tuple[Any, int], set[int]] = {}
    for buf_id, key in key_of.items():
        if key is not None:
            tensors_of.setdefault(key, set()).add(buf_id)
    storage_copies: dict[tuple[Any, int], torch.UntypedStorage] = {}

    def copy_of(buf: torch.Tensor) -> torch.Tensor:
        key = key_of[id(buf)]
        if key is None or len(tensors_of[key]) < 2:
            return buf.detach().clone()
        storage = storage_copies.get(key)
        if storage is None:
            storage = storage_copies[key] = buf.untyped_storage().clone()
        copy = torch.empty((0,), dtype=buf.dtype, device=buf.device)
        return copy.set_(storage, buf.storage_offset(), buf.size(), buf.stride())

    return copy_of


class Replication:
    """One forward's replicas after the replication callbacks ran.

    Runs ``__data_parallel_replicate__(ctx, copy_id)`` on every module of every replica (see
    :func:`syncbn_ext.execute_replication_callbacks`) and tags each replica with this replication and its copy id.
    Given ``original`` (the replicated module), replica 0's buffers that are the original's become copies,
    which :meth:`write_back` copies into the original's once the forward succeeded: nothing else a replica does
    reaches the user's module, so a replica left running after its forward was given up can write nothing.

    Attributes:
        group: the ``ReplicationGroup`` shared by every context (``None`` without replicas).
    """

    def __init__(self, replicas: Sequence[nn.Module], original: nn.Module | None = None) -> None:
        self.group: Any = None
        self._links: list[_BufferCopy] = []
        self._slots: list[_BufferSlot] = []
        if not replicas:
            return
        if original is not None:
            self._links, self._slots = _isolate_buffers(original, replicas[0])
        self.group = _C.execute_replication_callbacks(list(replicas))[0].group
        for copy_id, replica in enumerate(replicas):
            replica.__dict__[REPLICATION_TAG] = (self, copy_id)

    @staticmethod
    def of(replica: Any) -> tuple[Replication, int] | None:
        """(replication, copy id) of a replica made by a replication with callbacks, else ``None``."""
        return getattr(replica, "__dict__", {}).get(REPLICATION_TAG)

    @torch.compiler.disable  # runs as it is under a compiled wrapper: tensor versions and values are the question
    def write_back(self) -> None:
        """Copies each buffer replica 0 changed into the original's tensor (in place, resized as replica 0 resized
        it; see ``syncbn::write_back_buffers`` for what counts as changed), and gives the original each buffer
        replica 0 replaced (``self.steps = self.steps + 1``, as the module alone would hold it), unless closed."""
        if self.group is not None and self.group.closed:
            return
        _C.write_back_buffers(self._links)
        replaced = []
        for source, target, key, given in self._slots:
            now = target.get(key, given)
            if now is not given:
                replaced.append((source, key, now))
        if not replaced:
            return
        by_copy = {id(copy): original for original, copy, _, _ in self._links}
        by_storage: dict[Any, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for original, copy, _, _ in self._links:
            storage = _storage_key(copy)
            if storage is not None:
                by_storage.setdefault(storage, []).append((original, copy))
        for source, key, now in replaced:
            source[key] = self._as_the_modules(key, now, by_copy, by_storage)

    def _as_the_modules(
        self,
        key: str,
        replaced: Any,
        by_copy: dict[int, torch.Tensor],
        by_storage: dict[Any, list[tuple[torch.Tensor, torch.Tensor]]],
    ) -> Any:
        """What the module holds for a buffer replica 0 replaced with ``replaced``: a copy replica 0 was given, or a
        view of one (``self.head = self.counts[:2]``), becomes the module's own buffer or the same view of it, as the
        module alone would hold (else it would view replica 0's copy, which no longer follows the buffer)."""
        if not isinstance(replaced, torch.Tensor):
            return replaced
        if self.group is not None and replaced.grad_fn is not None and self.group.parallel_backward:
            warnings.warn(
                f"DataParallelWithCallback: replica 0 replaced buffer {key!r} with a tensor that has a graph (a loss "
                "term kept in a buffer?): a backward through it and through the wrapper's output runs replica 0's "
                "part twice under the parallel backward ('Trying to backward through the graph a second time'); "
                "build the wrapper with parallel_backward=False, or keep the tensor out of the buffers",
                RuntimeWarning,
                stacklevel=2,
            )
        original = by_copy.get(id(replaced))
        if original is not None:
            return original
        storage = _storage_key(replaced)
        links = by_storage.get(storage, []) if storage is not None else []
        overlapping = bool(links) and torch._debug_has_internal_overlap(replaced) != 0  # an expand(): not writable
        for original, copy in links:
            same_layout = copy.stride() == original.stride() and copy.storage_offset() == original.storage_offset()
            if same_layout and replaced.dtype == copy.dtype and not overlapping:
                return original.as_strided(replaced.size(), replaced.stride(), replaced.storage_offset())
        if links:
            warnings.warn(
                f"DataParallelWithCallback: replica 0 replaced buffer {key!r} with a view of a buffer's copy that "
                "the module's own buffer cannot give alike (another dtype or layout, or elements that overlap): the "
                "module now holds that view of replica 0's copy, which does not follow the buffer",
                RuntimeWarning,
                stacklevel=3,
            )
        return replaced
