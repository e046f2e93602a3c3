"""Shared by the layer tests: the kinds of layers and inputs, replicated runs, and comparisons with nn.BatchNorm."""

from __future__ import annotations

import copy
import io
import pickle
import threading

import pytest
import torch
from hang_guard import HANG_TIMEOUT, call_with_timeout
from torch import nn

import syncbn_ext
from syncbn_ext import (
    DataParallelWithCallback,
    SynchronizedBatchNorm1d,
    SynchronizedBatchNorm2d,
    SynchronizedBatchNorm3d,
    replicate_on_cpu,
)

F64 = {"rtol": 1e-10, "atol": 1e-10}

# kind: (synchronized class, torch class, non-batch non-channel dims of the input)
KINDS = {
    "1d-NC": (SynchronizedBatchNorm1d, nn.BatchNorm1d, ()),
    "1d-NCL": (SynchronizedBatchNorm1d, nn.BatchNorm1d, (5,)),
    "2d": (SynchronizedBatchNorm2d, nn.BatchNorm2d, (4, 3)),
    "3d": (SynchronizedBatchNorm3d, nn.BatchNorm3d, (3, 2, 2)),
}
CHANNELS = 3


def torch_save_load(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


# The ways a model or a wrapper gets copied: @pytest.mark.parametrize("clone", list(CLONES.values()), ids=list(CLONES))
CLONES = {"pickle": lambda m: pickle.loads(pickle.dumps(m)), "deepcopy": copy.deepcopy, "torch.save": torch_save_load}


def sync_layers(module):
    return [m for m in module.modules() if isinstance(m, syncbn_ext.synchronized_base._SynchronizedBatchNorm)]


def cpu_dp(module, n, **kwargs):
    return DataParallelWithCallback(module, device_ids=["cpu"] * n, **kwargs)


def run_in_threads(replicas, slices):
    """Runs replica i on slices[i], each in a thread of its own. Returns per replica its output or the exception
    it raised; fails the test when they do not all return within HANG_TIMEOUT (a deadlock)."""
    results = [None] * len(slices)

    def work(i):
        try:
            results[i] = replicas[i](slices[i])
        except BaseException as error:  # compared by the test
            results[i] = error

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(slices))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(HANG_TIMEOUT)
        if thread.is_alive():
            pytest.fail(f"replicas did not return within {HANG_TIMEOUT} s (deadlock?)")
    return results


def run_replicas(module, slices):
    """Replicates ``module`` on len(slices) CPU replicas, runs the callbacks, runs replica i on slices[i] in a
    thread of its own (see :func:`run_in_threads`)."""
    replicas = replicate_on_cpu(module, len(slices))
    syncbn_ext.execute_replication_callbacks(replicas)
    return run_in_threads(replicas, slices)


def concatenated(results):
    """The replicas' outputs concatenated, or the first exception one of them raised."""
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return torch.cat(results)


def run_split(module, x, sizes):
    """The output of ``module`` replicated over slices of ``x`` of the given sizes (0 allowed), concatenated."""
    return concatenated(run_replicas(module, list(x.split(sizes))))


def split_forward(module, sizes):
    """A forward of ``module`` replicated over slices of the given sizes (see :func:`run_split`)."""
    return lambda x: run_split(module, x, sizes)


def randomize_batchnorm(layer, num_batches_tracked):
    """Non-trivial parameters and running statistics for a BatchNorm layer (those it has), in place; returns it."""
    with torch.no_grad():
        if layer.weight is not None:
            layer.weight.uniform_(0.5, 1.5)
        if layer.bias is not None:
            layer.bias.uniform_(-0.5, 0.5)
        if layer.running_mean is not None:
            layer.running_mean.uniform_(-1, 1)
            layer.running_var.uniform_(0.5, 2)
            layer.num_batches_tracked.fill_(num_batches_tracked)
    return layer


def make_pair(kind, dtype=torch.float64, seed=0, **options):
    """(nn.BatchNormNd, synchronized layer) with the same random parameters and running statistics."""
    sync_cls, torch_cls, _ = KINDS[kind]
    torch.manual_seed(seed)
    ref = randomize_batchnorm(torch_cls(CHANNELS, dtype=dtype, **options), num_batches_tracked=3)
    ours = sync_cls(CHANNELS, dtype=dtype, **options)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def make_input(kind, batch, dtype=torch.float64, seed=1):
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, CHANNELS, *KINDS[kind][2])
    offsets = torch.tensor([0.5, -2.0, 10.0], dtype=dtype).view(1, CHANNELS, *([1] * len(KINDS[kind][2])))
    scales = torch.tensor([1.0, 0.3, 3.0], dtype=dtype).view_as(offsets)
    return torch.randn(shape, generator=generator, dtype=dtype) * scales + offsets


def assert_buffers_match(ours, ref, **tol):
    for name in ("running_mean", "running_var"):
        a, b = getattr(ours, name), getattr(ref, name)
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, msg=name, **tol)
    a, b = ours.num_batches_tracked, ref.num_batches_tracked
    assert (a is None) == (b is None)
    if a is not None:
        assert torch.equal(a, b), (a, b)


def assert_grads_equal(model, reference, rtol=1e-10, atol=1e-10):
    """Every parameter's gradient of ``model`` against ``reference``'s, in order (``None`` only against ``None``)."""
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=rtol, atol=atol, msg=name)


def assert_grads_match(ours, ref, x_ours, x_ref, **tol):
    torch.testing.assert_close(x_ours.grad, x_ref.grad, msg="input grad", **tol)
    for name in ("weight", "bias"):
        a, b = getattr(ours, name), getattr(ref, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.grad is not None, name
            torch.testing.assert_close(a.grad, b.grad, msg=f"{name} grad", **tol)


def step_and_compare(ref, ours, forward, x, seed=2, **tol):
    """One forward and backward (random grad_output) of ``ref`` on x and of ``forward`` (ours), compared."""
    tol = tol or F64
    x_ref = x.clone().requires_grad_()
    x_ours = x.clone().requires_grad_()
    y_ref = ref(x_ref)
    y_ours = call_with_timeout(forward, x_ours)
    assert y_ours.shape == y_ref.shape
    torch.testing.assert_close(y_ours, y_ref, msg="output", **tol)
    grad_output = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(seed), dtype=y_ref.dtype)
    y_ref.backward(grad_output)
    y_ours.backward(grad_output)
    assert_grads_match(ours, ref, x_ours, x_ref, **tol)
    assert_buffers_match(ours, ref, **tol)


def joined(output):
    """Whether the output's backward goes through the node that runs the replicas' backward in parallel."""
    pending, seen = [output.grad_fn], set()
    while pending:
        node = pending.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if type(node).__name__ == "_JoinReplicasBackward":
            return True
        pending += [next_node for next_node, _ in node.next_functions]
    return False
