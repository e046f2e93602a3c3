"""Where each CPU replica's graph is cut for the parallel backward (:mod:`syncbn_ext.parallel_backward`), and which
synchronized calls' merges a backward from given tensors meets.

A replica's graph is cut at its boundary: its handles on the parameters, its inputs, buffers and the tensors with a
graph its modules held as attributes before the forward (:class:`Boundaries`), less those its backward cannot reach
(:func:`reached_boundaries`). Its backward starts from its outputs and from the merged statistics of the synchronized
calls some copy's backward meets (:func:`meeting_calls`), and asks for edges below the merges the serial engine would
run where only some gradients are wanted (:func:`targets_below_merges`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.autograd.graph import GradientEdge

from ._native import _C
from .scatter_gather import _tensors

__all__ = ["Boundaries", "call_roots", "meeting_calls", "reached_boundaries", "targets_below_merges", "unique"]


def unique(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` without repeats (the same tensor object), in order."""
    seen: set[int] = set()
    kept = []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            kept.append(t)
    return kept


def _parameter_views(replica: torch.nn.Module) -> list[torch.Tensor]:
    """A replica's parameters (handles on the module's: see ``replicate_on_cpu``), in the same order for every
    replica. Autograd hands each its gradient as soon as that is complete, so the sums (see
    :mod:`syncbn_ext.parameter_sums`) go on during the backward."""
    views = [p for m in replica.modules() for p in m.__dict__.get("_former_parameters", {}).values() if p is not None]
    return unique([v for v in views if v.requires_grad])


# A module's own dicts of tensors: its parameters (and a replica's handles on them), buffers and submodules.
_MODULE_DICTS = frozenset({"_parameters", "_buffers", "_modules", "_former_parameters"})


def _attribute_tensors(replica: torch.nn.Module, views: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors with a graph a replica's modules hold as plain attributes, other than its parameter handles:
    e.g. one computed from the parameters once, before the forward. Every replica shares them (a replica is a
    shallow copy), so their graph is common to all: the cut goes there, and autograd sums the replicas' gradients."""
    handles = {id(v) for v in views}
    return [
        t
        for m in replica.modules()
        for key, value in m.__dict__.items()
        if key not in _MODULE_DICTS
        for t in _tensors(value)
        if t.grad_fn is not None and id(t) not in handles
    ]


def _other_boundary(
    replica: torch.nn.Module, inputs: Any, kwargs: Any, views: list[torch.Tensor]
) -> list[torch.Tensor]:
    """The rest of where a replica's graph is cut: its inputs, buffers and attribute tensors requiring grad."""
    tensors = [*_tensors(inputs), *_tensors(kwargs)]
    tensors += [b for m in replica.modules() for b in m._buffers.values() if b is not None]
    tensors += _attribute_tensors(replica, views)
    return unique([t for t in tensors if t.requires_grad])


def _calls(merges: list[list[torch.Tensor | None]]) -> list[list[tuple[torch.Tensor | None, torch.Tensor | None]]]:
    """Per copy, each synchronized call's merged (mean, var)."""
    return [list(zip(m[0::2], m[1::2], strict=True)) for m in merges]


def call_roots(merges: list[list[torch.Tensor | None]], needed: list[bool] | None) -> list[list[torch.Tensor]]:
    """Per copy, the merged statistics (with a graph) of the calls ``needed`` (``None``: every call)."""
    if needed is None:
        return [[t for t in m if t is not None] for m in merges]
    return [
        [t for call, pair in zip(needed, copy_calls, strict=True) if call for t in pair if t is not None]
        for copy_calls in _calls(merges)
    ]


def meeting_calls(
    merges: list[list[torch.Tensor | None]], boundaries: list[list[torch.Tensor]], starts: list[list[torch.Tensor]]
) -> list[bool] | None:
    """Which synchronized calls' merges some copy's backward from ``starts`` reaches (directly, or below another
    such call); ``None``: every call (the copies' calls differ, which should fail elsewhere). ``merges``: per copy,
    each call's merged (mean, var), None without a graph; ``boundaries``: per copy, where its graph is cut."""
    calls = _calls(merges)
    if len({len(c) for c in calls}) != 1:
        return None
    needed = [False] * len(calls[0])
    search = starts
    while True:
        found = list(needed)
        for copy_id, copy_calls in enumerate(calls):
            reached = _C.reaches(search[copy_id], [mean for mean, _ in copy_calls], boundaries[copy_id])
            found = [f or r for f, r in zip(found, reached, strict=True)]
        if found == needed or all(found):
            return found
        needed = found
        search = [[*s, *r] for s, r in zip(starts, call_roots(merges, needed), strict=True)]


def _meeting_roots(
    merges: list[list[torch.Tensor | None]], boundaries: list[list[torch.Tensor]], starts: list[list[torch.Tensor]]
) -> list[list[torch.Tensor]]:
    """Per copy, the merged statistics of the synchronized calls whose merge some copy's backward from ``starts``
    reaches (:func:`meeting_calls`), for every copy to start from too: each meets there, and the other copies'
    share of the statistics' gradient reaches its input even where its own outputs do not lead there (the layer's
    output unused by that copy). A call no copy reaches is left out, so that parameters only it leads to keep a
    None gradient, as in the whole batch's backward."""
    return call_roots(merges, meeting_calls(merges, boundaries, starts))


def targets_below_merges(
    merges: list[list[torch.Tensor | None]],
    boundaries: list[list[torch.Tensor]],
    asked: list[list[torch.Tensor]],
    meeting: list[bool],
) -> list[list[GradientEdge]]:
    """For a backward asking each copy for ``asked`` only: per copy, edges below its merges that its task must ask
    for too, so that it runs every merge the serial engine would and no other. The serial engine runs a call's
    merge (one node for every copy) where some copy's way from it leads to an asked-for tensor, directly or through
    another call's merge that does (there to other copies' tensors). A copy whose own way does not (its samples skip
    a layer in a data-dependent branch) would skip the merge, and its share of the statistics' gradient would miss
    the others' (or the copies would wait for each other at two merges, crosswise); a copy's merge run where the
    serial engine's is not would exchange with other processes where theirs do not."""
    calls = _calls(merges)
    # In call order: a merge's graph holds only earlier calls' merges, whose need is known by then.
    needed = [False] * len(meeting)
    runs: list[list[bool]] = [[False] * len(meeting) for _ in calls]  # whether the copy's task runs it unasked
    for k, met in enumerate(meeting):
        if not met:
            continue
        for copy_calls, copy_asked, boundary, copy_runs in zip(calls, asked, boundaries, runs, strict=True):
            mean, var = copy_calls[k]
            if mean is None:
                continue
            earlier = [m for (m, _), n in zip(copy_calls[:k], needed, strict=False) if n and m is not None]
            copy_runs[k] = any(_C.reaches([mean, var], [*copy_asked, *earlier], boundary))
        needed[k] = any(copy_runs[k] for copy_runs in runs)
    return [
        [
            GradientEdge(node, output_nr)
            for k, (mean, _) in enumerate(copy_calls)
            if needed[k] and not copy_runs[k] and mean is not None
            for node, output_nr in mean.grad_fn.next_functions
            if node is not None
        ]
        for copy_calls, copy_runs in zip(calls, runs, strict=True)
    ]


class Boundaries:
    """Where each replica's graph is cut, taken before the forward: its parameter handles, and its inputs, buffers and
    attribute tensors requiring grad. A tensor the forward itself stores on a module (an old-style ``spectral_norm``'s
    weight, an activation a hook or a forward caches) is inside the replica's graph, not at its edge: cut there too,
    the worker's backward would go through it and autograd again after it (a freed graph, or gradients twice)."""

    def __init__(self, replicas: Sequence[torch.nn.Module], inputs: Sequence[Any], kwargs: Sequence[Any]) -> None:
        self.views = [_parameter_views(r) for r in replicas]
        self.others = [
            _other_boundary(r, i, k, v) for r, i, k, v in zip(replicas, inputs, kwargs, self.views, strict=True)
        ]


def _reached(outputs: list[torch.Tensor], views: list[torch.Tensor], others: list[torch.Tensor]) -> list[bool]:
    """Which of a replica's boundary tensors (``views``, then ``others``) its graph from ``outputs`` reaches (leaves
    counted as reached)."""
    boundary = [*views, *others]
    reached = _C.reaches(outputs, [t if t.grad_fn is not None else None for t in boundary], boundary)
    return [r or t.grad_fn is None for t, r in zip(boundary, reached, strict=True)]


def reached_boundaries(
    outputs: list[list[torch.Tensor]], merges: list[list[torch.Tensor | None]], boundaries: Boundaries
) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """Per replica, the parameter handles and other boundary tensors its backward reaches: the join's inputs.

    Its backward starts from its outputs and from the merges of the synchronized calls some copy's outputs reach
    (through which the other copies' share of the statistics' gradient comes: an input or parameter that only
    those statistics lead to, its layer's output unused by this copy, still gets its gradient). Autograd runs
    whatever the join has an edge to, with hooks: an edge to a parameter nothing reaches (a module the forward did
    not call, an auxiliary head) would call that parameter's hooks with ``None``, and an edge to an attribute tensor
    not reached (left from an earlier step, whose backward freed its graph) would run that graph. A parameter is
    kept for every replica where some replica reaches it (the sums go by position)."""
    cut = [[*v, *o] for v, o in zip(boundaries.views, boundaries.others, strict=True)]
    starts = [[*f, *r] for f, r in zip(outputs, _meeting_roots(merges, cut, outputs), strict=True)]
    reached = [_reached(s, v, o) for s, v, o in zip(starts, boundaries.views, boundaries.others, strict=True)]
    count = len(boundaries.views[0])
    kept = [any(r[j] for r in reached) for j in range(count)]
    views = [[v for v, k in zip(vs, kept, strict=True) if k] for vs in boundaries.views]
    others = [
        [t for t, r in zip(os, rs[count:], strict=True) if r] for os, rs in zip(boundaries.others, reached, strict=True)
    ]
    return views, others
