"""Scenarios of the multi-process test with synchronized layers under torch.utils.checkpoint: recomputations must
pair with the right calls of the other ranks (after failures, repeated batches, forgotten or alike calls) and give
the whole batch's results. Run by ``distributed_worker.py``.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from distributed_parity import C, with_final_state, wrap
from torch import nn

import syncbn_ext


def add_step_errors(errors, out, expected, x, whole, mine, weight, reference_weight):
    """Raises ``errors``' output, input-gradient (where ``x`` has one) and weight-gradient entries (the weight's
    gradient summed over the group) to this step's differences from the whole-batch reference."""
    grad = weight.grad.clone()
    dist.all_reduce(grad)
    errors["output"] = max(errors["output"], (out - expected[mine]).abs().max().item())
    if x.grad is not None:
        errors["input_grad"] = max(errors["input_grad"], (x.grad - whole.grad[mine]).abs().max().item())
    errors["param_grad"] = max(errors["param_grad"], (grad - reference_weight.grad).abs().max().item())


def with_buffer_error(errors, model, reference):
    """``errors`` with the largest difference of ``model``'s buffers from ``reference``'s, and the final state."""
    errors["buffers"] = max(
        (a - b).abs().max().item() for a, b in zip(model.buffers(), reference.buffers(), strict=True)
    )
    return with_final_state(errors, model, dist.group.WORLD)


class CheckpointedBlock(nn.Module):
    """A block with a synchronized layer under torch.utils.checkpoint(use_reentrant=False), then a head."""

    def __init__(self, norm, checkpointed=True, **options):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, C, 1), norm(C), nn.Tanh())
        self.head = nn.Conv2d(C, 2, 1)
        self.checkpointed = checkpointed
        self.options = options  # more arguments of torch.utils.checkpoint

    def forward(self, x):
        if not self.checkpointed:
            return self.head(self.block(x))
        return self.head(torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False, **self.options))


def scenario_checkpoint(rank, world, replicas, sizes, **options):
    """Ranks with and without replicas checkpoint a block together: a replica's recomputation reuses its channel's
    statistics, and a layer alone in its process must too (before, it exchanged again, which the ranks with replicas
    did not: every step failed; and alike on every rank it counted each batch twice)."""
    torch.manual_seed(0)
    reference = CheckpointedBlock(nn.BatchNorm2d, checkpointed=False).double()  # (checkpointed, it counts twice)
    model = CheckpointedBlock(syncbn_ext.SyncBatchNorm, **options).double()
    model.load_state_dict(reference.state_dict())
    run = wrap(model, replicas)
    errors = {"output": 0.0, "input_grad": 0.0, "param_grad": 0.0}
    for step in range(2):
        batches = [
            torch.randn(sizes[r], 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(10 * step + r))
            for r in range(world)
        ]
        model.zero_grad()
        reference.zero_grad()
        x = batches[rank].clone().requires_grad_()
        out = run(x)
        out.square().sum().backward()
        whole = torch.cat(batches).requires_grad_()
        expected = reference(whole)
        expected.square().sum().backward()
        mine = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
        add_step_errors(errors, out, expected, x, whole, mine, model.block[0].weight, reference.block[0].weight)
    return with_buffer_error(errors, model, reference)


def save_convolutions(ctx, op, *args, **kwargs):
    """A selective activation checkpointing policy: keep the convolutions' outputs, recompute the rest."""
    if op == torch.ops.aten.convolution.default:
        return torch.utils.checkpoint.CheckpointPolicy.MUST_SAVE
    return torch.utils.checkpoint.CheckpointPolicy.PREFER_RECOMPUTE


def scenario_checkpoint_selective(rank, world, replicas, sizes):
    """scenario_checkpoint under selective activation checkpointing, which replays the block's ops in its
    recomputation: the layer's differ there (its original call's statistics, no exchange), so it steps out of
    those modes (before: "aten.abs.default encountered during backward but not found in storage")."""
    policy = functools.partial(torch.utils.checkpoint.create_selective_checkpoint_contexts, save_convolutions)
    return scenario_checkpoint(rank, world, replicas, sizes, context_fn=policy)


class FrozenFirstInCheckpointedBlock(CheckpointedBlock):
    """A frozen synchronized layer (no trainable parameters, an input without gradients: its output has no graph)
    first in a checkpointed block whose trainable conv saves its output."""

    def __init__(self, norm):
        super().__init__(norm)
        self.block = nn.Sequential(norm(3), nn.Conv2d(3, C, 1), nn.Tanh())
        self.block[0].requires_grad_(False)


def batches_repeating_on_rank_0(step, sizes):
    """Each rank's batch of ``step``: rank 0's is the same at every step, the others' change."""
    return [
        torch.randn(
            sizes[r], 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0 if r == 0 else step + 1)
        )
        for r in range(len(sizes))
    ]


def scenario_checkpoint_after_failed_backward(rank, world, replicas, sizes):
    """Checkpointed steps in which rank 0's batch repeats (its local statistics match earlier calls', whose
    whole-batch statistics differ): each recomputation must get its own step's statistics. Step 0's backward fails
    on every rank (in a hook, before reaching the layers) and its exception is kept (its traceback keeps the step's
    graph alive). Before, a layer alone in its process recalled the failed step's call in preference to its own:
    wrong gradients at every later step, silently; also with a frozen layer (no graph to tell by); and two
    checkpointed forwards before one backward, (loss1 + loss2).backward(), got each other's statistics."""
    errors = {"output": 0.0, "input_grad": 0.0, "param_grad": 0.0}
    kept = []

    def refuse(grad):
        raise ValueError("refused in a hook")

    mine = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    models = []
    for cls, weight in ((CheckpointedBlock, lambda m: m.block[0].weight), (FrozenFirstInCheckpointedBlock, None)):
        weight = weight or (lambda m: m.block[1].weight)
        torch.manual_seed(0)
        reference = cls(nn.BatchNorm2d).double()
        reference.checkpointed = False
        model = cls(syncbn_ext.SyncBatchNorm).double()
        model.load_state_dict(reference.state_dict())
        run = wrap(model, replicas)
        frozen = cls is FrozenFirstInCheckpointedBlock
        for step in range(3):
            batches = batches_repeating_on_rank_0(step, sizes)
            model.zero_grad()
            reference.zero_grad()
            x = batches[rank].clone().requires_grad_(not frozen)
            whole = torch.cat(batches).requires_grad_(not frozen)
            expected = reference(whole)
            out = run(x)
            if step == 0:
                out.register_hook(refuse)
                try:
                    out.square().sum().backward()
                except ValueError as error:
                    kept.append(error)
                else:
                    raise AssertionError("the hook did not fail the backward")
                continue
            out.square().sum().backward()
            expected.square().sum().backward()
            add_step_errors(errors, out, expected, x, whole, mine, weight(model), weight(reference))
        models.append(model)
    # Two checkpointed forwards before one backward (two views of a batch): the second's nodes run first.
    model, reference = models[0], CheckpointedBlock(nn.BatchNorm2d).double()
    reference.checkpointed = False
    reference.load_state_dict(model.state_dict())
    model.zero_grad()
    firsts, seconds = batches_repeating_on_rank_0(10, sizes), batches_repeating_on_rank_0(11, sizes)
    x, y = firsts[rank].clone().requires_grad_(), seconds[rank].clone().requires_grad_()
    run = wrap(model, replicas)
    out_x, out_y = run(x), run(y)
    (out_x.square().sum() + out_y.pow(4).sum()).backward()
    whole_x, whole_y = torch.cat(firsts).requires_grad_(), torch.cat(seconds).requires_grad_()
    expected_x, expected_y = reference(whole_x), reference(whole_y)
    (expected_x.square().sum() + expected_y.pow(4).sum()).backward()
    errors["input_grad"] = max(errors["input_grad"], (y.grad - whole_y.grad[mine]).abs().max().item())
    add_step_errors(errors, out_x, expected_x, x, whole_x, mine, model.block[0].weight, reference.block[0].weight)
    errors["kept_exceptions"] = len(kept)
    return with_buffer_error(errors, model, reference)


class TwoViewsInOneCheckpoint(nn.Module):
    """One checkpointed block sending two views through one encoder (a synchronized layer): two calls of the layer in
    parallel branches of one recomputation."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(C, C, 1, bias=False), syncbn_ext.SyncBatchNorm(C), nn.ReLU())

    def both(self, a, b):
        return self.encoder(a), self.encoder(b)

    def forward(self, a, b):
        return torch.utils.checkpoint.checkpoint(self.both, a, b, use_reentrant=False)


def scenario_checkpoint_two_alike_calls_in_one_block(rank, world, replicas, sizes):
    """Rank 1's two views are alike (zero padding), rank 0's are not: the two calls' local statistics match on rank
    1, their whole-batch statistics differ, and which one is recomputed cannot be told there. Rank 1's backward
    raises saying so (before: the first call silently got the second's statistics)."""
    model = TwoViewsInOneCheckpoint().double()
    generator = torch.Generator().manual_seed(rank)
    views = [
        torch.randn(4, C, 4, 4, dtype=torch.float64, generator=generator) if rank == 0 else torch.zeros(4, C, 4, 4)
        for _ in range(2)
    ]
    a, b = (view.double().requires_grad_() for view in views)
    out_a, out_b = model(a, b)
    (out_a.square().sum() + out_b.pow(4).sum()).backward()
    return {"ran": True}


class CallsTheLayerInACheckpoint(nn.Module):
    """A checkpointed block that calls one synchronized layer ``times`` times."""

    def __init__(self, times):
        super().__init__()
        self.norm = syncbn_ext.SyncBatchNorm(C)
        self.times = times

    def block(self, x):
        for _ in range(self.times):
            x = self.norm(x).tanh()
        return x

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False)


def scenario_checkpoint_forgotten(rank, world, replicas, sizes):
    """A layer alone in its process keeps a bounded number of calls for recomputation: one call more in a
    checkpointed forward fails its backward on every rank, saying so (before: it exchanged again, counting the batch
    twice, or failed on ranks with replicas); as many as it keeps work, counting each batch once."""
    kept = syncbn_ext._C.CallRecords().capacity
    x = torch.randn(4, C, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    outcome = {}
    for times in (kept + 1, kept):
        model = CallsTheLayerInACheckpoint(times).double()
        try:
            model(x).square().sum().backward()
            outcome[str(times)] = {"num_batches_tracked": model.norm.num_batches_tracked.item()}
        except RuntimeError as error:
            outcome[str(times)] = {"error": str(error)}
    outcome["kept"] = kept
    return outcome


def scenario_checkpoint_forgotten_among_alike(rank, world, replicas, sizes):
    """One checkpointed forward more than a layer alone in its process keeps, then their backwards in order: rank 1's
    batch is the same every time, rank 0 alternates two. Rank 1's first recomputation finds only other forwards'
    calls alike (its own was forgotten) and fails saying so (before: it silently took one of them)."""
    kept = syncbn_ext._C.CallRecords().capacity
    model = CheckpointedBlock(syncbn_ext.SyncBatchNorm).double()
    batches = [
        torch.randn(4, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0 if rank else i % 2))
        for i in range(kept + 1)
    ]
    losses = [model(x).square().sum() for x in batches]
    try:
        for loss in losses:
            loss.backward()
    except RuntimeError as error:
        return {"error": str(error)}
    return {"error": None}


def scenario_checkpoint_stop_gradient_view(rank, world, replicas, sizes):
    """A checkpointed block calling the layer under torch.no_grad() (a stop-gradient target view, as BYOL's) and with
    gradients: its recomputation reuses both calls (before, the one without gradients exchanged again in backward,
    counting that batch twice in the running statistics)."""
    torch.manual_seed(0)

    class TargetAndOnline(nn.Module):
        def __init__(self, norm, checkpointed):
            super().__init__()
            self.encoder = nn.Sequential(nn.Conv2d(3, C, 1, bias=False), norm(C), nn.ReLU())
            self.checkpointed = checkpointed

        def both(self, online, target):
            with torch.no_grad():
                target = self.encoder(target)
            return self.encoder(online) - target

        def forward(self, online, target):
            if not self.checkpointed:
                return self.both(online, target)
            return torch.utils.checkpoint.checkpoint(self.both, online, target, use_reentrant=False)

    reference = TargetAndOnline(nn.BatchNorm2d, checkpointed=False).double()
    model = TargetAndOnline(syncbn_ext.SyncBatchNorm, checkpointed=True).double()
    model.load_state_dict(reference.state_dict())
    run = wrap(model, replicas)
    errors = {"output": 0.0, "input_grad": 0.0, "param_grad": 0.0}
    mine = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    for _ in range(2):
        # (torch.manual_seed(0) above: alike on every rank)
        views = [[torch.randn(size, 3, 4, 4, dtype=torch.float64) for size in sizes] for _ in range(2)]
        model.zero_grad()
        reference.zero_grad()
        online, whole = views[0][rank].clone().requires_grad_(), torch.cat(views[0]).requires_grad_()
        out = run(online, views[1][rank])
        out.square().sum().backward()
        expected = reference(whole, torch.cat(views[1]))
        expected.square().sum().backward()
        add_step_errors(
            errors, out, expected, online, whole, mine, model.encoder[0].weight, reference.encoder[0].weight
        )
    return with_buffer_error(errors, model, reference)
