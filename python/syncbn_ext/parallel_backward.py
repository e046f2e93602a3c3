"""The backward of CPU replicas, each on its own worker thread, concurrently.

Autograd runs the backward of CPU tensors on the thread that called it: left alone, the replicas' backward runs
one replica after the other, each on its slice of the batch with all of the caller's intra-op threads. That leaves
cores idle when the caller has fewer intra-op threads than there are replicas (``torch.set_num_threads(1)``: the
forward ran the replicas at once, one thread each); otherwise it is the faster way, since it needs no meeting at
the synchronized layers (see :func:`faster_than_serial`). :func:`join_replicas` cuts each replica's graph at its
boundary (its input slices, its handles on the parameters, its buffers, the tensors with a graph its modules held as
attributes before the forward, and any other leaf its graph reaches) and joins the replicas' outputs through one node
whose backward runs every replica's part of the graph on a worker thread of its own, at once, and hands the
boundary's gradients back to autograd. For autograd the result is the same graph: ``backward()``,
``torch.autograd.grad`` (also with respect to parameters), ``retain_graph``, hooks and ``DistributedDataParallel``'s
reducer see the gradients they would see without it.

A second backward (``create_graph=True``) can retrace it only in part. The workers' gradients then have graphs
that lead into the replicas' graphs directly, and a second backward runs those in the calling thread, one replica
after the other: right for plain layers, but a synchronized layer's merge, which waits for every replica, cannot
run that way (it raises an error that says so). And when the gradients coming into the joining node have graphs
of their own (the outer loss depends on the outputs non-linearly), a second backward would reach the replicas'
graphs both ways, through the joining node and directly; then the workers compute the gradients without a graph
and a double backward through them raises an error. Both errors say to use
``DataParallelWithCallback(..., parallel_backward=False)``: autograd's serial backward, which a second backward
retraces.

Synchronized layers meet in that backward (their merge node waits for every replica's share of the gradient: see
``ReplicationGroup.parallel_backward``). Replicas whose graphs share nodes (modules that exchange tensors with
gradients between replicas, as the established library's layers do) keep autograd's own single-threaded backward.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.autograd.graph import GradientEdge

from ._native import _C
from .backward_boundaries import Boundaries, call_roots, meeting_calls, reached_boundaries, targets_below_merges, unique
from .parallel_apply import ABORT_TAG, caused_by_closing, described, run_on_workers
from .parameter_sums import ParameterSums
from .replica_workers import cpu_intra_op_threads
from .replicate import _parameter_handles
from .replication import Replication
from .scatter_gather import _is_namedtuple, _tensors
from .synchronized_base import _SynchronizedBatchNorm

__all__ = ["BOUNDARY_LEADS_TO_ANOTHER", "GRAPHS_MEET", "Boundaries", "faster_than_serial", "join_replicas", "wanted"]


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


class _Plan:
    """What the joining node's backward needs: each replica's outputs (with their graphs) and boundary."""

    def __init__(
        self,
        group: Any,
        outputs: list[list[torch.Tensor]],
        views: list[list[torch.Tensor]],
        others: list[list[torch.Tensor]],
        merges: list[list[torch.Tensor | None]],
        anchors: list[list[torch.Tensor]],
    ) -> None:
        self.group = group
        self.outputs: list[list[torch.Tensor]] | None = outputs
        # (copy, output index) of the outputs a backward without retain_graph went through: their graphs are freed.
        self.freed: set[tuple[int, int]] = set()
        # Per copy, each synchronized call's merged (mean, var), leading to its merge node (None without a graph).
        self.merges: list[list[torch.Tensor | None]] | None = merges
        self.views, self.others = views, others
        self.parameter_targets = _parameter_targets(views[0])
        # Per copy, leaves its merge nodes lead to where its statistics have no graph: its task asks their gradients,
        # so that autograd runs those merges (see ReplicationGroup::keep_merge).
        self.anchors = anchors
        self.sums = ParameterSums(views) if views[0] else None
        # Backwards of this forward's outputs from several threads at once (torch allows them) run one after
        # another: a run's tasks, meeting points and parameter sums are the plan's.
        self.one_backward_at_a_time = threading.Lock()

    def boundary(self, copy_id: int) -> list[torch.Tensor]:
        return [*self.views[copy_id], *self.others[copy_id]]

    def boundaries(self) -> list[list[torch.Tensor]]:
        """Per copy, where its graph is cut."""
        return [self.boundary(c) for c in range(len(self.views))]

    def calls_met(self, starts: list[list[torch.Tensor]]) -> list[bool] | None:
        """The synchronized calls some copy's backward from ``starts`` meets at (see :func:`meeting_calls`)."""
        assert self.merges is not None
        return meeting_calls(self.merges, self.boundaries(), starts)

    def edges_to_ask(self, chosen: list[list[bool]], meeting: list[bool]) -> list[list[GradientEdge]]:
        """Per copy, what its task asks for besides its ``chosen`` boundary tensors (see
        :func:`targets_below_merges`)."""
        assert self.merges is not None
        boundaries = self.boundaries()
        asked = [[t for t, w in zip(b, c, strict=True) if w] for b, c in zip(boundaries, chosen, strict=True)]
        return targets_below_merges(self.merges, boundaries, asked, meeting)

    def inputs(self) -> list[torch.Tensor]:
        """The joining node's boundary inputs: per replica, each parameter's target (see :func:`_parameter_targets`),
        then every replica's others."""
        targets = [t for _ in self.views for t in self.parameter_targets]
        return [*targets, *(t for others in self.others for t in others)]


def _parameter_targets(views: list[torch.Tensor]) -> list[torch.Tensor]:
    """Where the joining node hands each parameter's summed gradient: a handle of its own on the parameter (as a
    replica's: see ``replicate_on_cpu``), not a replica's. A hook the replica's forward registers on its handle (or
    its ``retain_grad``) then runs once, where the worker takes that replica's gradient, as in the serial backward;
    through a replica's handle it ran again with the sum. ``views``: one replica's handles."""
    targets = list(views)
    originals = {}
    for index, view in enumerate(views):
        node = view.grad_fn
        # Down to the parameter's AccumulateGrad: one node below a plain handle, more below a view of a tensor type
        # of its own (a subclass overriding __torch_function__ aliases, then views).
        while node is not None and not hasattr(node, "variable") and len(node.next_functions) == 1:
            node = node.next_functions[0][0]
        original = getattr(node, "variable", None)
        if isinstance(original, torch.Tensor):
            originals[index] = original
    for index, handle in zip(originals, _parameter_handles(list(originals.values())), strict=True):
        targets[index] = handle
    return targets


class _SkippedOnWorkers:
    """A hook of a tensor where the replicas' graphs are cut (an input slice, a buffer, an attribute tensor, a leaf
    their graphs reach), skipped where a worker takes that tensor's gradient: the joining node hands the gradient
    back through autograd, where the hook runs once, with what the serial backward gives it (a leaf the replicas
    share: the sum of their gradients). Skipped by thread, not by taking the hook away: a backward of another output
    of the same forward, on another thread, may hand gradients back meanwhile."""

    __slots__ = ("hook",)

    def __init__(self, hook: Callable[[torch.Tensor], torch.Tensor | None]) -> None:
        self.hook = hook

    def __call__(self, grad: torch.Tensor) -> torch.Tensor | None:
        if getattr(_worker_backward, "running", False):
            return None  # the gradient unchanged
        return self.hook(grad)


_worker_backward = threading.local()  # .running: a worker thread is running a replica's part of the backward


@contextlib.contextmanager
def _hooks_left_to_the_join(tensors: Sequence[torch.Tensor]) -> Iterator[None]:
    """While the workers run: the hooks (``register_hook``) of the replicas' other boundary tensors skip the workers
    (see :class:`_SkippedOnWorkers`), and what a worker's capture adds to a retained gradient (``retain_grad``) is
    taken back afterwards, the joining node's handing back adding it once."""
    retained_before: list[tuple[torch.Tensor, Any]] = []
    for t in unique(tensors):
        hooks = t._backward_hooks
        if hooks:
            for key, hook in hooks.items():
                if not isinstance(hook, _SkippedOnWorkers):
                    hooks[key] = _SkippedOnWorkers(hook)
        if t.grad_fn is not None and t.retains_grad:
            retained_before.append((t, t.grad))
    try:
        yield
    finally:
        for t, retained in retained_before:
            t.grad = retained


@contextlib.contextmanager
def _running_on_worker() -> Iterator[None]:
    _worker_backward.running = True
    try:
        yield
    finally:
        _worker_backward.running = False


class _BackwardTask:
    """One replica's part of the backward, on a worker: the gradients of its boundary (its parameters' go to
    the plan's sums instead)."""

    def __init__(
        self,
        plan: _Plan,
        copy_id: int,
        run: int,
        roots: list[tuple[torch.Tensor, torch.Tensor]],
        keep_graph: bool,
        create_graph: bool,
        thread_state: Any,
        wanted: list[bool] | None = None,
        below_merges: list[GradientEdge] | None = None,
    ) -> None:
        self.plan, self.copy_id = plan, copy_id
        self.wanted = wanted  # which of the copy's boundary tensors to compute gradients for (None: all)
        # Asked for too, their gradients unused: where only some boundary tensors are wanted, edges below the merges
        # the copy must run (see targets_below_merges); else the copy's anchors (see _Plan).
        self.below_merges = plan.anchors[copy_id] if below_merges is None else below_merges
        # The backward run this task belongs to (group.begin_backward): a task its caller gave up on may outlive it,
        # and is then refused everywhere (meeting points, parameter sums, failure reports) by a later run.
        self.run = run
        self.roots = roots  # (tensor, its gradient): where this copy's backward starts
        self.keep_graph, self.create_graph = keep_graph, create_graph
        self.thread_state = thread_state  # the backward's thread's (the profiler, dispatch modes...)

    def __call__(self) -> tuple[torch.Tensor | None, ...]:
        plan, copy_id, run = self.plan, self.copy_id, self.run
        try:
            boundary = plan.boundary(copy_id)
            chosen = boundary if self.wanted is None else [t for t, w in zip(boundary, self.wanted, strict=True) if w]
            below_merges = self.below_merges
            if not self.roots or not (chosen or below_merges):
                return (None,) * len(plan.others[copy_id])
            with (
                _running_on_worker(),
                self.thread_state.applied(),
                plan.group.replica(copy_id),
                plan.group.backward_run(run),
                plan.sums.task(run) if plan.sums is not None else contextlib.nullcontext(),
                torch.set_grad_enabled(self.create_graph),
            ):
                computed = iter(
                    torch.autograd.grad(
                        [root for root, _ in self.roots],
                        [*chosen, *below_merges],  # (their gradients, last, are not used)
                        [grad for _, grad in self.roots],
                        retain_graph=self.keep_graph,
                        create_graph=self.create_graph,
                        allow_unused=True,
                        materialize_grads=False,
                    )
                )
                grads = (
                    [next(computed) for _ in boundary]
                    if self.wanted is None
                    else [next(computed) if w else None for w in self.wanted]
                )
            return tuple(grads[len(plan.views[copy_id]) :])  # the parameters' placeholders dropped
        except BaseException as error:
            failure = _barrier_failure(plan.group, copy_id, run)
            cause = failure if failure is not None else error
            try:
                if isinstance(failure, _C.BarrierAbortedError):
                    # Woken by another copy's failure (or the caller's interrupt): that one is the error to report.
                    raise _C.BarrierAbortedError(f"{ABORT_TAG}: {failure}") from error
                plan.group.abort_backward(f"replica {copy_id}'s backward raised {described(cause)}", run)
                if failure is not None:
                    raise failure from error  # its type (BarrierTimeoutError); autograd turned it into RuntimeError
                if type(error) is RuntimeError and _REENTRANT_CHECKPOINT_REFUSAL in str(error):
                    raise RuntimeError(_REENTRANT_CHECKPOINT_MESSAGE) from error
                raise
            finally:
                # The error raised keeps this frame in its traceback: its locals must not keep the error (a cycle
                # only the garbage collector frees, holding the replicas' frames and process groups until then).
                del failure, cause
        finally:
            plan.group.backward_done(copy_id, run)


def _barrier_failure(group: Any, copy_id: int, run: int) -> BaseException | None:
    """The barrier error copy ``copy_id`` got waiting in parallel backward run ``run``, typed; ``None`` if none."""
    try:
        group.raise_backward_failure(copy_id, run)
    except _C.BarrierError as failure:
        return failure
    return None


# torch's refusal of torch.autograd.grad, which each replica's task calls, through a reentrant checkpoint: it
# suggests not passing `inputs`, which the user never did.
_REENTRANT_CHECKPOINT_REFUSAL = "use_reentrant=True, torch.utils.checkpoint is incompatible with .grad()"
_REENTRANT_CHECKPOINT_MESSAGE = (
    "DataParallelWithCallback: a block under torch.utils.checkpoint(use_reentrant=True) was reached in the CPU "
    "replicas' parallel backward: that form recomputes each replica on its own, so the whole batch's gradients "
    "cannot be formed (and torch refuses it inside the per-replica torch.autograd.grad this backward runs). Use "
    "torch.utils.checkpoint(..., use_reentrant=False), which synchronized layers recompute with the whole batch's "
    "statistics"
)

_SECOND_BACKWARD_MESSAGE = (
    "Trying to backward through the replicas' graph a second time (or directly access saved tensors after they have "
    "already been freed); specify retain_graph=True the first time"
)

_DOUBLE_BACKWARD_MESSAGE = (
    "DataParallelWithCallback: this double backward (create_graph=True) cannot retrace the CPU replicas' parallel "
    "backward (the gradients that reached the replicas had graphs of their own, as under a loss not linear in the "
    "outputs or torch.autograd.functional.hessian, hvp and jvp: a second backward would run the replicas' graphs "
    "twice over). Build the wrapper with parallel_backward=False (or set its parallel_backward "
    "attribute to False before the forward): autograd's serial backward, which a double backward retraces"
)


def _same_strides(tensor: torch.Tensor) -> torch.Tensor:
    """A view of ``tensor`` with its very strides."""
    if tensor.layout != torch.strided:
        return tensor
    return tensor.as_strided(tensor.size(), tensor.stride(), tensor.storage_offset())


class _JoinReplicas(torch.autograd.Function):
    """Inputs: every replica's boundary, then its outputs, detached; outputs: those outputs, joined to the graph."""

    @staticmethod
    def forward(ctx: Any, plan: _Plan, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.plan = plan
        ctx.boundary_count = len(plan.inputs())
        ctx.set_materialize_grads(False)  # an output the loss does not use: None, not zeros (see _BackwardTask)
        # Returned as they are, autograd would re-alias them with a size-1 dimension's stride renormalized (a
        # channels_last slice of one sample), and the gather's cat would lose their memory format.
        return tuple(_same_strides(t) for t in tensors[ctx.boundary_count :])

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        plan: _Plan = ctx.plan
        # Which boundary inputs this backward wants gradients for (backward(inputs=...), torch.autograd.grad of some
        # parameters): the serial engine would prune the rest, and so must the replicas' (see _wanted_boundaries).
        wanted = [_will_execute(node) for node, _ in ctx.next_functions[: ctx.boundary_count]]
        with plan.one_backward_at_a_time:
            return _parallel_backward(plan, grads, wanted)


def _will_execute(node: Any) -> bool:
    """Whether the running backward will execute ``node`` (one of the join's next nodes); ``None``: no gradient."""
    if node is None:
        return False
    try:
        return torch._C._will_engine_execute_node(node)
    except RuntimeError:
        # torch cannot tell for a leaf's AccumulateGrad under torch.autograd.grad (a buffer or module attribute that
        # requires grad, asked for by name): wanted, as every boundary input was before.
        return True


def _wanted_boundaries(plan: _Plan, wanted: list[bool]) -> list[list[bool]] | None:
    """Per copy, which of its boundary tensors its task computes gradients for; ``None``: all of them.

    A backward that wants only some gradients (``torch.autograd.grad(loss, [bn.weight])``, a GradNorm-style step;
    ``torch.autograd.grad(loss, [x])``, an adversarial example's) must not compute the rest: the serial engine would
    not, and a synchronized layer's backward exchange across processes happens only where its merge runs, so a rank
    running the parallel backward would make an exchange the others (one replica, or the serial backward) skip. A
    parameter is wanted for every copy if for one (each copy's handle leads to its sum); inputs, buffers and
    attribute tensors copy by copy. Each copy runs the merges the serial engine would, whatever it is asked for (see
    :func:`targets_below_merges`).
    """
    if all(wanted):
        return None
    per_parameter = len(plan.views[0])
    parameter_wanted = [
        any(wanted[c * per_parameter + j] for c in range(len(plan.views))) for j in range(per_parameter)
    ]
    chosen, offset = [], sum(len(v) for v in plan.views)
    for others in plan.others:
        chosen.append(parameter_wanted + wanted[offset : offset + len(others)])
        offset += len(others)
    return chosen


def _parallel_backward(
    plan: _Plan, grads: tuple[torch.Tensor, ...], wanted: list[bool]
) -> tuple[torch.Tensor | None, ...]:
    """The replicas' backward from the joined outputs' gradients ``grads``, each replica's on its worker, for the
    boundary inputs ``wanted``."""
    if plan.outputs is None:
        raise RuntimeError(_SECOND_BACKWARD_MESSAGE)
    chosen = _wanted_boundaries(plan, wanted)
    keep_graph = _C.current_graph_task_keep_graph()
    # create_graph: the gradients get a graph when only the direct way leads to the replicas' graphs (the
    # gradients coming in have none), else none and a second backward through them fails (see the module).
    create_graph = torch.is_grad_enabled()
    once_differentiable = create_graph and any(g is not None and g.requires_grad for g in grads)
    # Outputs the loss does not use get no gradient (not zeros: their parameters keep a None gradient, as the
    # whole batch's would, which optimizers such as Adam tell apart from a zero one); the meeting points each
    # copy must reach are roots too, with a zero gradient (see backward_boundaries.reached_boundaries).
    used, used_ids, offset = [], set(), 0
    for copy_id, outputs in enumerate(plan.outputs):
        copy_grads = grads[offset : offset + len(outputs)]
        used.append([(output, g) for output, g in zip(outputs, copy_grads, strict=True) if g is not None])
        used_ids.update((copy_id, i) for i, g in enumerate(copy_grads) if g is not None)
        offset += len(outputs)
    # Outputs whose graphs an earlier backward freed: torch's error. (Others, e.g. another head's, can still run;
    # a node they share with the freed graphs raises torch's own error, as the whole batch's would.)
    if used_ids & plan.freed:
        raise RuntimeError(_SECOND_BACKWARD_MESSAGE)
    assert plan.merges is not None
    meeting = plan.calls_met([[output for output, _ in copy_used] for copy_used in used])
    meeting_roots = call_roots(plan.merges, meeting)
    # (The copies' calls differ only where the forward failed: then every copy asks for its anchors, as before.)
    below_merges = None if chosen is None or meeting is None else plan.edges_to_ask(chosen, meeting)
    thread_state = _C.ThreadLocalState()
    task_graph = create_graph and not once_differentiable
    run = plan.group.begin_backward()
    tasks = [
        _BackwardTask(
            plan,
            copy_id,
            run,
            [*copy_used, *((merge, torch.zeros_like(merge)) for merge in copy_merges)],
            keep_graph,
            task_graph,
            thread_state,
            None if chosen is None else chosen[copy_id],
            None if below_merges is None else below_merges[copy_id],
        )
        for copy_id, (copy_used, copy_merges) in enumerate(zip(used, meeting_roots, strict=True))
    ]
    replicas = len(tasks)
    if plan.sums is not None:
        plan.sums.start(run)
    try:
        with _hooks_left_to_the_join([t for others in plan.others for t in others]):
            results = run_on_workers(
                tasks,
                [f"in replica {i} on device cpu, in backward" for i in range(replicas)],
                cpu_intra_op_threads(replicas),
                lambda reason: plan.group.abort_backward(reason, run),
                caused_by_closing,
            )
    finally:
        # Each parameter's summed gradient goes back through replica 0's place (the others' get none).
        param_grads = plan.sums.finish(run) if plan.sums is not None else []
    if not keep_graph:
        plan.freed |= used_ids
        if len(plan.freed) == offset:
            plan.outputs = plan.merges = None  # every graph was freed: let go of them
    views = [*param_grads, *([None] * sum(len(v) for v in plan.views[1:]))]
    others = [g for replica_grads in results for g in replica_grads]
    boundary_grads = [*views, *others]
    if once_differentiable:
        # Linked to the gradients that came in: a second backward toward what they depend on (the input, for
        # torch.autograd.functional.hessian/hvp/jvp) reaches the error, instead of skipping it and getting zeros.
        computed_from = [g for g in grads if g is not None and g.requires_grad]
        boundary_grads = _C.once_differentiable(boundary_grads, _DOUBLE_BACKWARD_MESSAGE, computed_from)
    return (None, *boundary_grads, *([None] * len(grads)))


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def faster_than_serial(replicas: int) -> bool:
    """Whether the backward of ``replicas`` CPU replicas at once should beat autograd's serial backward.

    The serial backward runs every replica's part one after the other with all of the caller's intra-op threads
    (``torch.get_num_threads()``); the parallel one runs them at once with their share each (at least one) and
    meets at every synchronized layer, where replicas wait for each other. Measured side by side
    (``benchmarks/wrapper_cost.py``, a ResNet-18-style step on 2 cores): with as many intra-op threads as cores,
    the serial backward was faster in each of six runs (2 replicas 1.13-1.23x the whole batch's step against
    1.22-1.35x, 4 replicas 1.40-1.49x against 1.52-1.66x); with one intra-op thread, the parallel one (0.70x
    against 1.00x, 0.92x against 1.24x), whose replicas use cores the serial backward leaves idle. So: parallel
    when the replicas would use more cores than the caller's intra-op threads, which happens only with fewer of
    those than replicas.
    """
    threads = torch.get_num_threads()
    return replicas > threads and _usable_cores() > threads


def wanted(module: torch.nn.Module) -> bool:
    """Whether replicas of ``module`` should run their backward in parallel (decided before the forward).

    Not without gradients, and not when a module other than the synchronized layers has a replication hook: such a
    module may exchange tensors with gradients between its copies (as the established library's layers do), which
    joins the replicas' graphs.
    """
    if not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
        return False
    return all(
        isinstance(m, _SynchronizedBatchNorm) or getattr(m, "__data_parallel_replicate__", None) is None
        for m in module.modules()
    )


# Why the replicas' graphs cannot be cut (see join_replicas), and what to do about it.
GRAPHS_MEET = (
    "the CPU replicas' autograd graphs meet at a tensor every replica used that is not a parameter, buffer, input or "
    "module attribute (one with a graph, e.g. computed before the forward and reached through a global or closure)",
    "Hold such a tensor as a module attribute",
)
BOUNDARY_LEADS_TO_ANOTHER = (
    "a tensor a module holds as an attribute (or the input) has a graph leading to another tensor the forward uses "
    "(e.g. self.a = leaf + 1 computed before the forward, the forward using self.a and leaf)",
    "Compute such a tensor in the forward",
)


def _leads_to_another(boundary: list[torch.Tensor]) -> bool:
    """Whether the graph of one of a replica's boundary tensors reaches another: a worker taking the latter's
    gradient would go through the former's graph, and the joining node's handing the former's gradient back would go
    there again (the latter's gradient counted twice)."""
    if len(boundary) < 2:
        return False
    for start in (t for t in boundary if t.grad_fn is not None):
        rest = [t for t in boundary if t is not start and t.grad_fn is not start.grad_fn]  # (a, b = t.chunk(2))
        if any(_C.reaches([start], rest, rest)):
            return True
    return False


def join_replicas(
    replicas: Sequence[torch.nn.Module], boundaries: Boundaries, outputs: Sequence[Any]
) -> list[Any] | tuple[str, str]:
    """The replicas' outputs, their backward to run on one worker per replica (see the module's documentation).

    The replication must have been made for it (``group.parallel_backward`` set before the forward: the
    synchronized layers then merge through nodes of each copy's own), and ``boundaries`` taken before its forward.
    Returns ``outputs`` unchanged when no output requires grad; where the replicas' graphs cannot be cut (then they
    must run again, serially), why and what to do: they share nodes (:data:`GRAPHS_MEET`), or a replica's graph leads
    from one of its boundary tensors to another (:data:`BOUNDARY_LEADS_TO_ANOTHER`: the worker's backward would go
    through it and autograd again after it).
    """
    tag = Replication.of(replicas[0])
    assert tag is not None and tag[0].group is not None and tag[0].group.parallel_backward
    group = tag[0].group
    merges, anchors = group.take_merges()  # first: the group must not keep them (they hold the graph)
    flat = [[t for t in _tensors(output) if t.requires_grad] for output in outputs]
    if not any(flat):
        return list(outputs)
    views, others = reached_boundaries(flat, merges, boundaries)
    disjoint, foreign = _C.analyze_replica_graphs(flat, [[*v, *o] for v, o in zip(views, others, strict=True)])
    if not disjoint:
        return GRAPHS_MEET
    others = [unique([*o, *f]) for o, f in zip(others, foreign, strict=True)]
    if any(_leads_to_another(copy_others) for copy_others in others):
        return BOUNDARY_LEADS_TO_ANOTHER
    plan = _Plan(group, flat, views, others, merges, anchors)
    detached = [t.detach() for replica_outputs in flat for t in replica_outputs]
    joined = iter(_JoinReplicas.apply(plan, *plan.inputs(), *detached))
    replacements = {id(t): next(joined) for replica_outputs in flat for t in replica_outputs}
    return [_replace_tensors(output, lambda t: replacements.get(id(t), t)) for output in outputs]
