"""torch.utils.checkpoint around synchronized layers under the CPU wrapper: whole-batch gradients, or a clear error."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from hang_guard import call_with_timeout
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

import syncbn_ext
from syncbn_ext import DataParallelWithCallback, SynchronizedBatchNorm1d, SynchronizedBatchNorm2d

C = 4


class Checkpointed(nn.Module):
    """Runs `block` under torch.utils.checkpoint (use_reentrant as given; None: no checkpoint)."""

    def __init__(self, block: nn.Module, use_reentrant: bool | None = False, **options) -> None:
        super().__init__()
        self.block = block
        self.use_reentrant = use_reentrant
        self.options = options

    def forward(self, x):
        if self.use_reentrant is None:
            return self.block(x)
        return checkpoint(self.block, x, use_reentrant=self.use_reentrant, **self.options)


def mlp_block(momentum=0.1):
    return nn.Sequential(
        nn.Linear(C, C),
        SynchronizedBatchNorm1d(C, momentum=momentum),
        nn.Tanh(),
        nn.Linear(C, C),
        SynchronizedBatchNorm1d(C, momentum=momentum),
    )


class ConvNet(nn.Module):
    """A checkpointed conv block between plain layers; the block's layer is applied twice."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, C, 3, padding=1)
        self.bn = SynchronizedBatchNorm2d(C)
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.use_checkpoint = True

    def block(self, x):
        x = torch.relu(self.bn(x))
        return self.bn(self.conv(x))  # the same layer twice in the checkpointed region

    def forward(self, x):
        x = self.stem(x)
        x = checkpoint(self.block, x, use_reentrant=False) if self.use_checkpoint else self.block(x)
        return x.mean((2, 3))


def train_step(module, x, grad):
    x = x.clone().requires_grad_()
    y = call_with_timeout(module, x)
    y.backward(grad)
    return y.detach(), x.grad


def assert_parity(model, reference, x, replicas, parallel_backward, steps=2):
    dp = DataParallelWithCallback(model, device_ids=["cpu"] * replicas, parallel_backward=parallel_backward)
    for step in range(steps):
        torch.manual_seed(step)
        grad = torch.randn(x.shape[0], C, dtype=x.dtype)
        model.zero_grad()
        reference.zero_grad()
        y, x_grad = train_step(dp, x + step, grad)
        y_ref, x_grad_ref = train_step(reference, x + step, grad)
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(x_grad, x_grad_ref, rtol=1e-10, atol=1e-10)
        for (name, p), p_ref in zip(model.named_parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-10, atol=1e-10, msg=name)
        # The recomputation in backward updated nothing: the running statistics are the single forward's.
        for (name, b), b_ref in zip(model.named_buffers(), reference.buffers(), strict=True):
            torch.testing.assert_close(b, b_ref, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("replicas", [2, 3])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_non_reentrant_checkpoint_gives_the_whole_batch_gradients(replicas, momentum, parallel_backward):
    torch.manual_seed(0)
    model = Checkpointed(mlp_block(momentum)).double()
    reference = syncbn_ext.revert_model(copy.deepcopy(model))
    reference.use_reentrant = None  # the reference runs without checkpointing
    assert_parity(model, reference, torch.randn(9, C, dtype=torch.float64), replicas, parallel_backward)
    assert model.block[1].num_batches_tracked.item() == 2  # one count per forward, none per recomputation


def save_matmuls(ctx, op, *args, **kwargs):
    """A selective activation checkpointing policy: keep the matrix products, recompute the rest."""
    if op in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


@pytest.mark.parametrize("replicas", [2, 3])
def test_selective_activation_checkpointing_gives_the_whole_batch_gradients(replicas, parallel_backward):
    # Selective activation checkpointing replays the block's ops in its recomputation, where a synchronized layer
    # takes its original call's statistics instead (other ops): before, "aten.abs.default encountered during
    # backward but not found in storage". The layer now steps out of its modes.
    torch.manual_seed(0)
    context_fn = functools.partial(create_selective_checkpoint_contexts, save_matmuls)
    model = Checkpointed(mlp_block(), context_fn=context_fn).double()
    reference = Checkpointed(mlp_block(), use_reentrant=None).double()
    reference.load_state_dict(model.state_dict())
    assert_parity(model, reference, torch.randn(9, C, dtype=torch.float64), replicas, parallel_backward)
    assert model.block[1].num_batches_tracked.item() == 2  # one count per forward, none per recomputation


def test_a_layer_applied_twice_in_a_checkpointed_block(parallel_backward):
    torch.manual_seed(1)
    model = ConvNet().double()
    reference = syncbn_ext.revert_model(copy.deepcopy(model))
    reference.use_checkpoint = False
    assert_parity(model, reference, torch.randn(6, 3, 5, 5, dtype=torch.float64), 2, parallel_backward)


def test_reentrant_checkpoint_raises_an_error_that_says_what_to_do(parallel_backward):
    model = Checkpointed(mlp_block(), use_reentrant=True).double()
    dp = DataParallelWithCallback(model, device_ids=["cpu"] * 2, parallel_backward=parallel_backward)
    x = torch.randn(6, C, dtype=torch.float64, requires_grad=True)
    y = call_with_timeout(dp, x)
    with pytest.raises(RuntimeError, match=r"use_reentrant=True(.|\n)*use_reentrant=False") as raised:
        call_with_timeout(y.sum().backward)
    assert "recomputes each replica on its own" in str(raised.value)  # ours, not torch's advice about `inputs`


def test_checkpointing_around_the_wrapper_is_an_error_saying_to_checkpoint_inside(parallel_backward):
    # Its saved-tensor hooks ran in every replica's thread at once and paired one replica's recomputed tensors with
    # another's: wrong gradients (2 replicas) or torch's CheckpointError about metadata (uneven slices).
    torch.manual_seed(2)
    model = mlp_block().double()
    reference = syncbn_ext.revert_model(copy.deepcopy(model))
    dp = DataParallelWithCallback(model, device_ids=["cpu"] * 2, parallel_backward=parallel_backward)
    x = torch.randn(6, C, dtype=torch.float64, requires_grad=True)
    before = copy.deepcopy(model.state_dict())
    message = r"checkpoint\(\.\.\., use_reentrant=False\) around the replicas(.|\n)*inside the wrapped module"
    with pytest.raises(RuntimeError, match=message):
        call_with_timeout(checkpoint, dp, x, use_reentrant=False)
    with pytest.raises(RuntimeError, match=message):  # around a module that calls the wrapper
        call_with_timeout(Checkpointed(dp), x)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert_parity(model, reference, x.detach(), 2, parallel_backward, steps=1)  # and the next step is right


class Noisy(nn.Module):
    """Adds fresh noise: a block that does not recompute what its forward computed (without saved RNG state)."""

    def forward(self, x):
        return x + torch.randn_like(x)


def test_a_recomputation_that_differs_from_the_forward_is_an_error_naming_checkpointing(parallel_backward):
    block = nn.Sequential(Noisy(), SynchronizedBatchNorm1d(C))
    model = Checkpointed(block, preserve_rng_state=False).double()
    dp = DataParallelWithCallback(model, device_ids=["cpu"] * 2, parallel_backward=parallel_backward)
    x = torch.randn(6, C, dtype=torch.float64, requires_grad=True)
    y = call_with_timeout(dp, x)
    with pytest.raises(RuntimeError, match=r"torch\.utils\.checkpoint(.|\n)*no call of its forward"):
        call_with_timeout(y.sum().backward)


def test_a_lone_layer_under_checkpoint_is_nn_batchnorm():
    # Not replicated, the layer is nn.BatchNorm (which counts the batch again when recomputed).
    torch.manual_seed(2)
    model = Checkpointed(mlp_block()).double()
    reference = copy.deepcopy(syncbn_ext.revert_model(copy.deepcopy(model)))
    x = torch.randn(6, C, dtype=torch.float64)
    grad = torch.randn(6, C, dtype=torch.float64)
    y, x_grad = train_step(model, x, grad)
    y_ref, x_grad_ref = train_step(reference, x, grad)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(x_grad, x_grad_ref)
    assert model.block[1].num_batches_tracked.item() == reference.block[1].num_batches_tracked.item()
