"""The backward of CPU replicas, each on its own worker thread, concurrently.

Autograd runs the backward of CPU tensors on the thread that called it: left alone, the replicas' backward runs
one replica after the other, each on its slice of the batch, which on CPU costs more than the same work on the
whole batch (the forward ran the replicas at once, each with its share of the cores). :func:`join_replicas` cuts
each replica's graph at its boundary (its input slices, its parameters' views, its buffers, and any other leaf
its graph reaches) and joins the replicas' outputs through one node whose backward runs every replica's part of
the graph on a worker thread of its own, at once, and hands the boundary's gradients back to autograd. For
autograd the result is the same graph: ``backward()``, ``torch.autograd.grad`` (also with respect to
parameters), ``retain_graph``, ``create_graph``, hooks and ``DistributedDataParallel``'s reducer see the gradients
they would see without it.

Synchronized layers meet in that backward (their merge node waits for every replica's share of the gradient: see
``ReplicationGroup.parallel_backward``). Replicas whose graphs share nodes (modules that exchange tensors with
gradients between replicas, as the established library's layers do) keep autograd's own single-threaded backward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ._native import _C
from .parallel_apply import caused_by_closing, cpu_intra_op_threads, run_on_workers
from .replicate import Replication

__all__ = ["join_replicas", "wanted"]


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


def _replace_tensors(obj: Any, replace: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``obj`` with every tensor ``t`` (in :func:`_tensors` order) replaced by ``replace(t)``."""
    if isinstance(obj, torch.Tensor):
        return replace(obj)
    if _is_namedtuple(obj):
        return type(obj)(*(_replace_tensors(item, replace) for item in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_replace_tensors(item, replace) for item in obj)
    if isinstance(obj, dict):
        return type(obj)((key, _replace_tensors(value, replace)) for key, value in obj.items())
    return obj


def _unique(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    seen: set[int] = set()
    unique = []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            unique.append(t)
    return unique


def _boundary(replica: torch.nn.Module, inputs: Any, kwargs: Any) -> list[torch.Tensor]:
    """Where a replica's graph is cut: its inputs, its parameters (views of the module's) and buffers."""
    tensors = [*_tensors(inputs), *_tensors(kwargs)]
    for module in replica.modules():
        tensors += [p for p in module.__dict__.get("_former_parameters", {}).values() if p is not None]
        tensors += [b for b in module._buffers.values() if b is not None]
    return _unique([t for t in tensors if t.requires_grad])


class _Plan:
    """What the joining node's backward needs: each replica's outputs (with their graphs) and boundary."""

    def __init__(self, group: Any, outputs: list[list[torch.Tensor]], boundaries: list[list[torch.Tensor]]) -> None:
        self.group = group
        self.outputs: list[list[torch.Tensor]] | None = outputs
        self.boundaries = boundaries


class _BackwardTask:
    """One replica's part of the backward, on a worker: the gradients of its boundary."""

    def __init__(
        self,
        plan: _Plan,
        copy_id: int,
        grads: Sequence[torch.Tensor],
        keep_graph: bool,
        create_graph: bool,
    ) -> None:
        self.plan, self.copy_id, self.grads = plan, copy_id, grads
        self.keep_graph, self.create_graph = keep_graph, create_graph

    def __call__(self) -> tuple[torch.Tensor | None, ...]:
        plan, copy_id = self.plan, self.copy_id
        assert plan.outputs is not None
        try:
            with plan.group.replica(copy_id), torch.set_grad_enabled(self.create_graph):
                return torch.autograd.grad(
                    plan.outputs[copy_id],
                    plan.boundaries[copy_id],
                    self.grads,
                    retain_graph=self.keep_graph,
                    create_graph=self.create_graph,
                    allow_unused=True,
                    materialize_grads=False,
                )
        except BaseException as error:
            plan.group.abort_backward(f"replica {copy_id}'s backward raised {type(error).__name__}: {error}")
            raise
        finally:
            plan.group.backward_done(copy_id)


class _JoinReplicas(torch.autograd.Function):
    """Inputs: every replica's boundary, then its outputs, detached; outputs: those outputs, joined to the graph."""

    @staticmethod
    def forward(ctx: Any, plan: _Plan, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.plan = plan
        ctx.boundary_count = sum(len(b) for b in plan.boundaries)
        return tuple(tensors[ctx.boundary_count :])

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        plan: _Plan = ctx.plan
        if plan.outputs is None:
            raise RuntimeError(
                "Trying to backward through the replicas' graph a second time (or directly access saved tensors "
                "after they have already been freed); specify retain_graph=True the first time"
            )
        keep_graph = _C.current_graph_task_keep_graph()
        create_graph = torch.is_grad_enabled()
        tasks, offset = [], 0
        for copy_id, outputs in enumerate(plan.outputs):
            tasks.append(_BackwardTask(plan, copy_id, grads[offset : offset + len(outputs)], keep_graph, create_graph))
            offset += len(outputs)
        replicas = len(tasks)
        plan.group.begin_backward()
        results = run_on_workers(
            tasks,
            [f"in replica {i} on device cpu, in backward" for i in range(replicas)],
            cpu_intra_op_threads(replicas),
            plan.group.abort_backward,
            caused_by_closing,
        )
        if not keep_graph:
            plan.outputs = None  # the graphs were freed
        boundary_grads = [g for replica_grads in results for g in replica_grads]
        return (None, *boundary_grads, *([None] * len(grads)))


def wanted(module: torch.nn.Module) -> bool:
    """Whether replicas of ``module`` should run their backward in parallel (decided before the forward).

    Not without gradients, and not when a module other than the synchronized layers has a replication hook: such a
    module may exchange tensors with gradients between its copies (as the established library's layers do), which
    joins the replicas' graphs.
    """
    from .nn import _SynchronizedBatchNorm

    if not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
        return False
    return all(
        isinstance(m, _SynchronizedBatchNorm) or getattr(m, "__data_parallel_replicate__", None) is None
        for m in module.modules()
    )


def join_replicas(
    replicas: Sequence[torch.nn.Module], inputs: Sequence[Any], kwargs: Sequence[Any], outputs: Sequence[Any]
) -> list[Any] | None:
    """The replicas' outputs, their backward to run on one worker per replica (see the module's documentation).

    The replication must have been made for it (``group.parallel_backward`` set before the forward: the
    synchronized layers then merge through nodes of each copy's own). Returns ``outputs`` unchanged when no output
    requires grad, and ``None`` when the replicas' graphs share nodes (then they must run again, serially).
    """
    tag = Replication.of(replicas[0])
    assert tag is not None and tag[0].group is not None and tag[0].group.parallel_backward
    group = tag[0].group
    flat = [[t for t in _tensors(output) if t.requires_grad] for output in outputs]
    if not any(flat):
        return list(outputs)
    boundaries = [_boundary(r, i, k) for r, i, k in zip(replicas, inputs, kwargs, strict=True)]
    disjoint, foreign = _C.analyze_replica_graphs(flat, boundaries)
    if not disjoint:
        return None
    boundaries = [_unique([*b, *f]) for b, f in zip(boundaries, foreign, strict=True)]
    plan = _Plan(group, flat, boundaries)
    detached = [t.detach() for replica_outputs in flat for t in replica_outputs]
    joined = iter(_JoinReplicas.apply(plan, *[t for b in boundaries for t in b], *detached))
    replacements = {id(t): next(joined) for replica_outputs in flat for t in replica_outputs}
    return [_replace_tensors(output, lambda t: replacements.get(id(t), t)) for output in outputs]
