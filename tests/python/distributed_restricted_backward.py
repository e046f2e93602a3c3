"""Scenarios of the multi-process test in which every rank asks for some gradients only (``torch.autograd.grad``,
``backward(inputs=...)``) while its replicas' graphs differ: each rank must run exactly the backward exchanges the
other ranks' engines run, and get the serial backward's gradients. Run by ``distributed_worker.py``; each scenario
returns its measures or raises.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from distributed_parity import C, with_final_state, wrap
from torch import nn

import syncbn_ext


def scenario_some_parameters_grads(rank, world, replicas, sizes):
    """GradNorm-style steps: every rank asks for the synchronized layer's weight gradient only (torch.autograd.grad,
    then backward(inputs=...)), ranks with several replicas through the parallel backward. Before, those computed the
    gradients of their whole boundary, so their layer made a backward exchange the other ranks' engines pruned."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, C, 1), syncbn_ext.SyncBatchNorm(C)).double()
    reference = nn.Sequential(nn.Conv2d(3, C, 1), nn.BatchNorm2d(C)).double()
    reference.load_state_dict(model.state_dict())
    run = wrap(model, replicas, parallel_backward=True if replicas > 1 else None)
    batches = [
        torch.randn(sizes[r], 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(r))
        for r in range(world)
    ]
    weight = model[1].weight
    (by_grad,) = torch.autograd.grad(run(batches[rank]).square().sum(), [weight])
    dist.all_reduce(by_grad)  # a collective right after: before, it met the other ranks' pruned exchange
    run(batches[rank]).square().sum().backward(inputs=[weight])
    by_inputs = weight.grad.clone()
    dist.all_reduce(by_inputs)
    (expected,) = torch.autograd.grad(reference(torch.cat(batches)).square().sum(), [reference[1].weight])
    outcome = {
        "grad_error": (by_grad - expected).abs().max().item(),
        "inputs_error": (by_inputs - expected).abs().max().item(),
        "others_untouched": model[0].weight.grad is None and model[1].bias.grad is None,
    }
    run(batches[rank]).square().sum().backward()  # and a whole backward after them pairs as ever
    return with_final_state(outcome, model, dist.group.WORLD)


class SkipsALayerWhereMarked(nn.Module):
    """Where its batch is marked, a replica's samples skip ``p`` (a data-dependent branch); then ``bn`` and ``q``."""

    def __init__(self):
        super().__init__()
        self.p, self.q = nn.Linear(C, C), nn.Linear(C, C)
        self.bn = syncbn_ext.SyncBatchNorm(C)

    def forward(self, x):
        h = x if bool(x[0, 0] > 100) else self.p(x)
        return self.q(self.bn(h))


def seeded_model_and_batch(model_class, rank, replicas, sizes, parallel_backward):
    """A ``model_class`` alike on every rank (float64), run through ``replicas`` CPU replicas with
    ``parallel_backward``, and this rank's batch: (model, run, batch)."""
    torch.manual_seed(0)
    model = model_class().double()
    run = wrap(model, replicas, parallel_backward=parallel_backward if replicas > 1 else None)
    batch = torch.randn(sizes[rank], C, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    return model, run, batch


def scenario_some_parameters_below_a_skipped_layer(rank, world, replicas, sizes):
    """Asking for ``p``'s gradient only, where rank 0's first replica skips ``p``: that replica's backward task
    reached nothing it was asked for below the synchronized layer, skipped the layer's merge, and its share of the
    statistics' gradient missed the others' (wrong gradients, silently). Asking for ``bn``'s weight only, where that
    replica's statistics have no graph (the input requires no grad): its task ran the merge anyway, exchanging with
    the other ranks, whose engines pruned it. Compared with the serial backward on the same ranks."""
    outcome = {}
    for input_requires_grad in (True, False):
        grads = {}
        for parallel_backward in (False, True):
            model, run, x = seeded_model_and_batch(SkipsALayerWhereMarked, rank, replicas, sizes, parallel_backward)
            if rank == 0:
                x[0, 0] += 1000
            x.requires_grad_(input_requires_grad)
            (p_grad,) = torch.autograd.grad(run(x).pow(3).sum(), [model.p.weight])
            dist.all_reduce(p_grad)  # a collective right after each: a backward exchange some rank pruned meets it
            run(x).pow(3).sum().backward(inputs=[model.bn.weight])
            bn_grad = model.bn.weight.grad
            dist.all_reduce(bn_grad)
            grads[parallel_backward] = (p_grad, bn_grad)
        for name, serial, parallel in zip(("p", "bn"), grads[False], grads[True], strict=True):
            outcome[f"{name}_error_{'with' if input_requires_grad else 'without'}_input_grad"] = (
                (parallel - serial).abs().max().item()
            )
    return outcome


class InputAndADetachedBranch(nn.Module):
    """``a`` normalizes the input; ``b`` a detached path through ``lin``, whose statistics lead to parameters only."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(C, C)
        self.a, self.b = syncbn_ext.SyncBatchNorm(C), syncbn_ext.SyncBatchNorm(C)

    def forward(self, x):
        return self.a(x) + self.b(self.lin(x.detach()))


def scenario_input_grad_only(rank, world, replicas, sizes):
    """Asking for the input's gradient only (an adversarial example's step): the serial engine runs ``a``'s merge
    only; ranks with several replicas through the parallel backward computed every replica's whole boundary, running
    ``b``'s merge too, an exchange the other ranks' engines pruned. Compared with the serial backward."""
    grads = {}
    for parallel_backward in (False, True):
        model, run, x = seeded_model_and_batch(InputAndADetachedBranch, rank, replicas, sizes, parallel_backward)
        x.requires_grad_()
        (grads[parallel_backward],) = torch.autograd.grad(run(x).pow(3).sum(), [x])
        dist.barrier()  # a collective right after: an exchange some rank pruned meets it
    return {
        "input_error": (grads[True] - grads[False]).abs().max().item(),
        "parameters_untouched": all(p.grad is None for p in model.parameters()),
    }
