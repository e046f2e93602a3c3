"""Scenarios of the multi-process test under torch's distributed wrappers (DistributedDataParallel, its gradient
accumulation, torch.compile around or inside it, FSDP2): every rank must still match one nn.BatchNorm model on the
global batch. Run by ``distributed_worker.py``; the models and the comparison are ``distributed_parity``'s."""

from __future__ import annotations

import contextlib
import gc

import torch
import torch.distributed as dist
from distributed_parity import (
    compare_step,
    global_batch,
    make_models,
    max_error,
    measure_buffers,
    run_steps,
    with_final_state,
    wrap,
)
from torch import nn

import syncbn_ext


def scenario_ddp(rank, world, replicas, sizes):
    """DistributedDataParallel over the replicas, with either way of running their backward (the ranks' single
    intra-op thread would choose the parallel one). A rank with one replica (the module itself, which has neither
    way) runs the same steps twice all the same: the ranks' layers meet at every step, whatever their replicas."""
    results = {}
    for parallel_backward in (False, True):
        model, reference = make_models("SyncBatchNorm", None)
        ddp = nn.parallel.DistributedDataParallel(wrap(model, replicas, parallel_backward))
        results[f"parallel_backward={parallel_backward}"] = run_steps(
            model, reference, ddp, sizes, rank, steps=2, ddp_world=world
        )
    return results


def scenario_ddp_mixed_backward(rank, world, replicas, sizes):
    """DistributedDataParallel with several gradient buckets while the ranks run their backward differently: a rank
    with one replica runs autograd's serial backward (DDP's bucket all-reduces start between our layers' backward
    exchanges), a rank with replicas their parallel backward (its all-reduces start only after all of them). Our
    layers exchange on a communicator of their own, so neither pairs with DDP's all-reduces (on the group itself
    they did, from the second step, when DDP has rebuilt its buckets: every rank waited until the group's timeout).
    That communicator is not one of torch's groups: none is registered meanwhile."""
    from torch.distributed import distributed_c10d as c10d

    groups_before = len(c10d._world.pg_map)
    model, reference = make_models("SyncBatchNorm", None)
    ddp = nn.parallel.DistributedDataParallel(wrap(model, replicas, parallel_backward=True), bucket_cap_mb=1e-4)
    errors = run_steps(model, reference, ddp, sizes, rank, steps=3, ddp_world=world)
    errors["buckets"] = len(ddp.reducer._get_zeros_like_grad_buckets())
    errors["groups_registered"] = len(c10d._world.pg_map) - groups_before
    errors["transport"] = syncbn_ext.cross_process_transport()
    return errors


def scenario_ddp_accumulate(rank, world, replicas, sizes):
    """Gradient accumulation under DistributedDataParallel: two micro-batches a step, the first's backward in
    ``ddp.no_sync()`` (no gradient all-reduce, while our layers still synchronize their statistics across the
    ranks, forward and backward), the second's synchronized. Each rank must end with the gradients of one model run
    on both global micro-batches, averaged over the ranks (DDP's mean), and its running statistics."""
    model, reference = make_models("SyncBatchNorm", None)
    ddp = nn.parallel.DistributedDataParallel(wrap(model, replicas))
    total, start = sum(sizes), sum(sizes[:rank])
    mine = slice(start, start + sizes[rank])
    errors = {"output": 0.0, "input_grad": 0.0, "param_grad": 0.0, "buffers": 0.0}
    for step in range(2):
        model.zero_grad()
        reference.zero_grad()
        for micro_batch in range(2):
            x, grad = global_batch(10 * step + micro_batch, total)
            with ddp.no_sync() if micro_batch == 0 else contextlib.nullcontext():
                compare_step(errors, ddp, reference, x, grad, mine)
        for p, p_ref in zip(model.parameters(), reference.parameters(), strict=True):
            errors["param_grad"] = max(errors["param_grad"], max_error(p.grad, p_ref.grad / world))
        measure_buffers(errors, model, reference)
    return with_final_state(errors, model, dist.group.WORLD)


def scenario_ddp_compiled(rank, world, replicas, sizes):
    """torch.compile with DistributedDataParallel, both ways round (the compiled DDP, and DDP of the compiled
    model): the layers' synchronized forward runs eagerly between compiled graphs, still across the ranks."""
    results = {}
    for way in ("compile(ddp)", "ddp(compile)"):
        torch._dynamo.reset()
        model, reference = make_models("SyncBatchNorm", None)
        if way == "compile(ddp)":
            run = torch.compile(nn.parallel.DistributedDataParallel(wrap(model, replicas)))
        else:
            run = nn.parallel.DistributedDataParallel(torch.compile(wrap(model, replicas)))
        results[way] = run_steps(model, reference, run, sizes, rank, steps=2, ddp_world=world)
    # The compiled graphs hold the DDP, and so the group, in reference cycles: released here, so that the worker's
    # destroy_process_group() ends gloo's threads (else they live into the interpreter's exit, where torch 2.13 may
    # abort the process: README, "Ending the script"; seen once in a loaded full run).
    del run
    torch._dynamo.reset()
    gc.collect()
    return results


def scenario_fsdp(rank, world, replicas, sizes):
    """FSDP2 (``fully_shard``, on CPU over gloo): the layers get the gathered parameters in forward, their buffers
    stay whole on every rank, and FSDP reduce-scatters the parameter gradients (averaged over the ranks) while our
    layers exchange their statistics and gradients, in the same backward. One replica per process."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model, reference = make_models("SyncBatchNorm", None)
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    total = sum(sizes)
    mine = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    errors = {"output": 0.0, "input_grad": 0.0, "param_grad": 0.0, "buffers": 0.0}
    for step in range(2):
        model.zero_grad()
        reference.zero_grad()
        x, grad = global_batch(step, total)
        compare_step(errors, model, reference, x, grad, mine)
        for p, p_ref in zip(model.parameters(), reference.parameters(), strict=True):
            errors["param_grad"] = max(errors["param_grad"], max_error(p.grad.full_tensor(), p_ref.grad / world))
        measure_buffers(errors, model, reference)
    return with_final_state(errors, model, dist.group.WORLD)
