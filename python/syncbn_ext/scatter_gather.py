"""Scatter and gather for CPU replicas: ``torch.nn.parallel.scatter`` / ``gather`` without an accelerator."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch

from .synchronized_base import _TORCH_AND_OUR_FILES, _stacklevel_outside

__all__ = ["gather_on_cpu", "scatter_kwargs_on_cpu"]


def _is_namedtuple(obj: Any) -> bool:
    return isinstance(obj, tuple) and hasattr(obj, "_asdict") and hasattr(obj, "_fields")


def _tensors(obj: Any) -> list[torch.Tensor]:
    """The tensors in ``obj`` (tensors, and tuples, lists and dicts of them), depth first."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in _tensors(item)]
    return []


def _held_tensors(obj: Any) -> list[torch.Tensor]:
    """The tensors an object of another kind holds as attributes (a dataclass, a class of the user's own); modules'
    parameters are not a batch."""
    attributes = getattr(obj, "__dict__", None)
    if isinstance(obj, (torch.nn.Module, type)) or not isinstance(attributes, dict):
        return []
    return _tensors(list(attributes.values()))


def _warn_of_a_batch_passed_whole(
    passed_whole: list[tuple[Any, list[torch.Tensor]]], batch_sizes: set[int], dim: int
) -> None:
    """Warns of objects scatter gave whole to every replica (with the tensors they hold) that seem to hold the batch:
    a tensor as long along ``dim`` as the tensors split (or any tensor with that dimension, where none was split).
    Silent on CPU replicas, where nothing fails (on GPUs, replica 1's layers would meet tensors on device 0)."""
    for obj, tensors in passed_whole:
        for tensor in tensors:
            axis = dim if dim >= 0 else dim + tensor.dim()
            if 0 <= axis < tensor.dim() and (not batch_sizes or tensor.size(axis) in batch_sizes):
                warnings.warn(
                    f"DataParallelWithCallback: an input of type {type(obj).__name__} holds tensors (one of shape "
                    f"{tuple(tensor.shape)}) but is not a tensor, tuple, list, dict or namedtuple, so it is not split: "
                    "every replica gets all of it, as torch.nn.parallel.scatter passes such objects on, and sees its "
                    "batch whole. Pass its tensors as arguments, or as a dict or namedtuple",
                    UserWarning,
                    stacklevel=_stacklevel_outside(_TORCH_AND_OUR_FILES),
                )
                return


def _scatter(
    obj: Any, n: int, dim: int, passed_whole: list[tuple[Any, list[torch.Tensor]]], batch_sizes: set[int]
) -> list[Any]:
    """``torch.nn.parallel.scatter`` for CPU: tensors split with ``chunk(n, dim)``, containers recursed. Adds the
    objects of other kinds holding tensors (with those) to ``passed_whole``, the lengths of the tensors split to
    ``batch_sizes``."""

    def scatter_map(obj: Any) -> list[Any]:
        if isinstance(obj, torch.Tensor):
            chunks = obj.chunk(n, dim)  # (torch's error for a 0-dim tensor)
            batch_sizes.add(obj.size(dim))
            # Each replica gets its own copy of its slice (as each GPU does): an in-place layer must neither
            # write into the caller's tensor nor rewrite the autograd history of a base shared by the threads.
            return [chunk.clone() for chunk in chunks]
        if _is_namedtuple(obj):
            return [type(obj)(*args) for args in zip(*map(scatter_map, obj), strict=False)]
        if isinstance(obj, tuple) and len(obj) > 0:
            return list(zip(*map(scatter_map, obj), strict=False))
        if isinstance(obj, list) and len(obj) > 0:
            return [list(i) for i in zip(*map(scatter_map, obj), strict=False)]
        if isinstance(obj, dict) and len(obj) > 0:
            return [type(obj)(i) for i in zip(*map(scatter_map, obj.items()), strict=False)]
        held = _held_tensors(obj)
        if held:
            passed_whole.append((obj, held))
        return [obj for _ in range(n)]

    try:
        return scatter_map(obj)
    finally:
        scatter_map = None  # type: ignore[assignment]  # breaks the closure's reference cycle


def scatter_kwargs_on_cpu(
    inputs: tuple[Any, ...], kwargs: dict[str, Any] | None, n: int, dim: int
) -> tuple[tuple[Any, ...], tuple[dict[str, Any], ...]]:
    """Positional and keyword inputs split into at most ``n`` slices along ``dim`` (``scatter_kwargs`` on CPU)."""
    passed_whole: list[tuple[Any, list[torch.Tensor]]] = []
    batch_sizes: set[int] = set()
    scattered_inputs = _scatter(inputs, n, dim, passed_whole, batch_sizes) if inputs else []
    scattered_kwargs = _scatter(kwargs, n, dim, passed_whole, batch_sizes) if kwargs else []
    _warn_of_a_batch_passed_whole(passed_whole, batch_sizes, dim)
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


def gather_on_cpu(outputs: Sequence[Any], dim: int) -> Any:
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
            # Joined as they are: under the caller's CPU autocast, cat promotes, and refuses the 16-bit type other
            # than autocast's (float16 outputs under bfloat16 autocast), which one module on the batch returns.
            with torch.autocast("cpu", enabled=False):
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
