"""One forward's replicas after the replication callbacks ran (:class:`Replication`): their replication group, and
replica 0 working on copies of the original's buffers, written back only when every replica succeeded (so a failed,
interrupted or abandoned forward writes nothing to the model)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ._native import _C
from ._tracing import not_compiled

__all__ = ["REPLICATION_TAG", "Replication"]

#: The attribute of a replica (in its ``__dict__``) naming its replication and copy id.
REPLICATION_TAG = "_syncbn_replication"


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
        if key in source._buffers and _is_or_detaches(buf, source._buffers[key])
    ]
    # A buffer that requires grad stays the module's under grad mode (its gradient reaches it through replica 0's
    # graph); without gradients it is copied as any other, and written back into the module's own tensor (not the
    # detached alias replica 0 was given), so the module never holds an alias of its buffer.
    copies_too = not torch.is_grad_enabled()
    shared = [
        (i, source[key])
        for i, (source, _, key, buf) in enumerate(slots)
        if buf is not None and (copies_too or not buf.requires_grad)
    ]
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


def _is_or_detaches(given: Any, buffer: Any) -> bool:
    """Whether replica 0 was given ``buffer`` itself, or (replicated without gradients) a detached alias of it."""
    if given is buffer:
        return True
    if not (isinstance(given, torch.Tensor) and isinstance(buffer, torch.Tensor)):
        return False
    if not buffer.requires_grad or given.requires_grad:
        return False
    try:  # the same storage (also an empty one), the same view of it
        same_storage = given.untyped_storage()._cdata == buffer.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):  # a tensor subclass or wrapper without storage
        return False
    return same_storage and (given.dtype, given.size(), given.stride(), given.storage_offset()) == (
        buffer.dtype,
        buffer.size(),
        buffer.stride(),
        buffer.storage_offset(),
    )


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
    write through one shows through the others. Of that memory, the span the buffers cover is copied (buffers that
    are slices of a large tensor that is not a buffer copy their slices, not the tensor)."""
    key_of = {id(buf): _storage_key(buf) if buf.numel() > 0 else None for buf in buffers}  # once per buffer
    sharing: dict[tuple[Any, int], dict[int, torch.Tensor]] = {}
    for buf in buffers:
        key = key_of[id(buf)]
        if key is not None:
            sharing.setdefault(key, {})[id(buf)] = buf
    span_copies: dict[tuple[Any, int], tuple[int, torch.UntypedStorage]] = {}

    def copy_of(buf: torch.Tensor) -> torch.Tensor:
        key = key_of[id(buf)]
        if key is None or len(sharing[key]) < 2:
            return buf.detach().clone()
        span = span_copies.get(key)
        if span is None:
            span = span_copies[key] = _copy_of_span(list(sharing[key].values()))
        first_byte, storage = span
        copy = torch.empty((0,), dtype=buf.dtype, device=buf.device)
        offset = buf.storage_offset() - first_byte // buf.element_size()
        return copy.set_(storage, offset, buf.size(), buf.stride())

    return copy_of


def _copy_of_span(views: Sequence[torch.Tensor]) -> tuple[int, torch.UntypedStorage]:
    """A copy of the bytes of one storage that ``views`` (non-empty tensors) cover, and the byte it starts at: an
    offset aligned to 64 bytes (a multiple of every element size, so each view's offset in the copy is whole)."""
    starts, ends = [], []
    for view in views:
        extent = sum((n - 1) * stride for n, stride in zip(view.size(), view.stride(), strict=True))
        starts.append(view.storage_offset() * view.element_size())
        ends.append((view.storage_offset() + extent + 1) * view.element_size())
    first_byte = min(starts) // 64 * 64
    return first_byte, views[0].untyped_storage()[first_byte : max(ends)].clone()


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

    # Runs as it is under a compiled wrapper: tensor versions and values are the question.
    @not_compiled("replica 0's buffers are compared with the module's (versions, values) and written back as they are")
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
            if copy.stride() == original.stride() and replaced.dtype == copy.dtype and not overlapping:
                # The same place relative to the buffer (a copy of a span starts elsewhere in its memory).
                offset = original.storage_offset() + replaced.storage_offset() - copy.storage_offset()
                return original.as_strided(replaced.size(), replaced.stride(), offset)
        if links:
            warnings.warn(
                f"DataParallelWithCallback: replica 0 replaced buffer {key!r} with a view of a buffer's copy that "
                "the module's own buffer cannot give alike (another dtype or layout, or elements that overlap): the "
                "module now holds that view of replica 0's copy, which does not follow the buffer",
                RuntimeWarning,
                stacklevel=3,
            )
        return replaced
