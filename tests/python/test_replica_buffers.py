"""CPU DataParallelWithCallback: the buffers and parameters a replica's forward writes, and what of them reaches the
module (as on GPUs, where replica 0 holds the module's own buffers)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from batchnorm_cases import cpu_dp
from hang_guard import call_with_timeout
from replica_faults import RaiseOnMarker
from torch import nn

import syncbn_ext
from syncbn_ext import DataParallelWithCallback


class FunctionalRunningStats(nn.Module):
    """Running statistics of its own, kept by ``F.batch_norm`` (not an nn.BatchNorm): the kernel writes them in place
    without counting a version."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x):
        return nn.functional.batch_norm(x, self.running_mean, self.running_var, training=True, momentum=0.5)


class KeepsItsLastBatch(nn.Module):
    """Resizes a buffer in place (as torch's per-channel observers do), counts in a buffer another one views and
    scales through the view; holds a sparse one too (which ``torch.equal`` cannot compare)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("last", torch.empty(0))
        self.register_buffer("pairs", torch.eye(2).to_sparse())
        self.register_buffer("counts", torch.zeros(4))
        self.register_buffer("first_counts", self.counts[:2])

    def forward(self, x):
        self.last.resize_(x.shape[0]).copy_(x[:, 0])
        self.counts.add_(1)
        self.first_counts.mul_(10)  # seen by counts too
        return x


class MarksThroughAnAlias(nn.Module):
    """Writes its buffer through a plain attribute that refers to it: every replica writes the module's tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mark", torch.zeros(2))
        self.alias = self.mark

    def forward(self, x):
        self.alias.fill_(7.0)
        return x


@pytest.mark.parametrize("n", [2, 3])
def test_every_buffer_replica_0_changes_reaches_the_module_as_on_gpus(n):
    # On GPUs replica 0 holds the module's own buffers; on CPU it writes copies, copied back after the forward: also
    # those a kernel writes without counting a version, resized in place if replica 0 resized them; views of one
    # another stay views in replica 0's copies; none taken for changed because it views one that was, or because the
    # module's tensor was written directly (its copy would undo the write).
    model = nn.Sequential(FunctionalRunningStats(3), KeepsItsLastBatch(), MarksThroughAnAlias())
    reference = copy.deepcopy(model)
    x = torch.randn(6, 3) * 3 + 1
    for step in range(2):
        call_with_timeout(cpu_dp(model, n), x + step)
        reference(x[: 6 // n] + step)  # replica 0's slice
        for name, expected in reference.state_dict().items():
            torch.testing.assert_close(model.state_dict()[name], expected, msg=name)
    counts = model[1].counts
    assert model[1].first_counts.data_ptr() == counts.data_ptr()
    assert torch.equal(counts, torch.tensor([110.0, 110.0, 2.0, 2.0]))


class SlicesOfATable(nn.Module):
    """Buffers that are overlapping slices, of two dtypes, of a large tensor that is not a buffer; records the size
    of the memory replica 0's copies share."""

    def __init__(self) -> None:
        super().__init__()
        table = torch.zeros(1_000_000)
        self.register_buffer("counts", table[1000:1004])
        self.register_buffer("tail", table[1002:1006])  # overlaps counts
        self.register_buffer("bits", table[1006:1008].view(torch.int32))
        self.register_buffer("head", None)
        self.copied_bytes: list[int] = []

    def forward(self, x):
        self.copied_bytes.append(self.counts.untyped_storage().nbytes())
        if self.head is None:
            self.head = self.counts[:2]  # replaced with a view of a copy: the module's head views its counts
        self.counts.add_(1)  # seen through tail
        self.bits.add_(3)
        return x


def test_buffers_sliced_from_a_large_tensor_copy_their_span_only():
    # Replica 0 copied the whole 4 MB storage per forward for 40 bytes of buffers.
    model = SlicesOfATable()
    reference = copy.deepcopy(model)
    for step in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # (the view replica 0 put in head follows the module's counts)
            call_with_timeout(cpu_dp(model, 2), torch.randn(4, 3))
        reference(torch.randn(2, 3))
        for name, expected in reference.state_dict().items():
            assert torch.equal(model.state_dict()[name], expected), (step, name)
    assert max(model.copied_bytes) < 128, model.copied_bytes  # (either replica; replica 0: the span, 64 bytes)
    assert model.tail.tolist() == [2.0, 2.0, 0.0, 0.0] and model.tail.data_ptr() == model.counts.data_ptr() + 8
    assert model.head.data_ptr() == model.counts.data_ptr() and model.head.tolist() == [2.0, 2.0]


class ReplacesItsBuffers(nn.Module):
    """Replaces its buffers instead of writing them (as the established library's layers update their running
    statistics, ``self.running_mean = ...``), one of them registered as None; raises on a marked input."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("mean", torch.zeros(3))
        self.register_buffer("last", None)

    def forward(self, x):
        self.steps = self.steps + 1
        self.mean = 0.9 * self.mean + 0.1 * x.mean(0)
        self.last = x[-1].clone()
        if (x == RaiseOnMarker.MARKER).any():
            raise ValueError("marked")
        return x


@pytest.mark.parametrize("n", [2, 3])
def test_buffers_replica_0_replaces_reach_the_module_as_alone(n):
    # Replica 0 was given copies of the buffers; one it replaced (not wrote) was lost, silently (as with
    # nn.DataParallel, which documents it): the established library's style of layer, its master made in copy 0's
    # hook as README advises, kept its running statistics at their initial values.
    model = nn.Sequential(nn.Identity(), ReplacesItsBuffers())
    reference = copy.deepcopy(model)
    x = torch.randn(6, 3)
    for step in range(2):
        call_with_timeout(cpu_dp(model, n), x + step)
        reference(x[: 6 // n] + step)  # replica 0's slice
        for name, expected in reference.state_dict().items():
            torch.testing.assert_close(model.state_dict()[name], expected, msg=name)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    marked = x.clone()
    marked[-1, 0] = RaiseOnMarker.MARKER  # the last replica raises; replica 0 replaced its buffers all the same
    with pytest.raises(ValueError, match="marked"):
        call_with_timeout(cpu_dp(model, n), marked)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


class CountsInABufferThatRequiresGrad(nn.Module):
    """Counts its calls in place in a buffer that requires grad (run under no_grad); raises on a marked input."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(2, requires_grad=True))

    def forward(self, x):
        self.calls.add_(1)
        if (x == RaiseOnMarker.MARKER).any():
            raise ValueError("marked")
        return x * self.calls[0]


def test_a_buffer_that_requires_grad_is_isolated_in_forwards_without_gradients():
    # Under torch.no_grad() replica 0 wrote the module's own tensor: a failed forward's count reached the module.
    model = CountsInABufferThatRequiresGrad()
    dp = cpu_dp(model, 2)

    def without_gradients(x):
        with torch.no_grad():
            return dp(x)

    x = torch.randn(4, 3)
    call_with_timeout(without_gradients, x)
    assert model.calls.tolist() == [1.0, 1.0]
    marked = x.clone()
    marked[-1, 0] = RaiseOnMarker.MARKER  # the last replica raises; replica 0 counted all the same
    with pytest.raises(ValueError, match="marked"):
        call_with_timeout(without_gradients, marked)
    assert model.calls.tolist() == [1.0, 1.0] and model.calls.requires_grad and model.calls.is_leaf


class KeepsBuffersThatRequireGrad(nn.Module):
    """Buffers that require grad, in forwards without gradients: one aliased into another slot, one filled lazily
    from empty, and (``resize``) one resized in place, which torch refuses for such a tensor."""

    def __init__(self, resize: bool = False) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(3, requires_grad=True))
        self.register_buffer("alias", None)
        self.register_buffer("stats", torch.empty(0, requires_grad=True))
        self.register_buffer("marks", torch.zeros(2, requires_grad=True))
        self.resize = resize

    def forward(self, x):
        if self.alias is None:
            self.alias = self.scale
        if self.stats.numel() == 0:
            self.stats = x.mean(0)
        if self.resize:
            self.marks.resize_(4).fill_(7.0)
        return x * self.alias


def test_buffers_that_require_grad_replaced_or_resized_without_gradients_end_as_alone():
    # Replica 0 was given detached aliases of them: the module's alias slot got a detached alias (a later training
    # step's gradient never reached the buffer), an empty one filled lazily was lost, and a resize torch refuses
    # wrote the buffer partly.
    model, alone = KeepsBuffersThatRequireGrad(), KeepsBuffersThatRequireGrad()
    dp = cpu_dp(model, 2)

    def without_gradients(run, x):
        with torch.no_grad():
            return run(x)

    x = torch.ones(4, 3)
    call_with_timeout(without_gradients, dp, x)
    without_gradients(alone, x)
    assert model.alias is model.scale and model.alias.requires_grad
    assert model.stats.tolist() == alone.stats.tolist() == [1.0, 1.0, 1.0]
    call_with_timeout(lambda: dp(torch.randn(4, 3)).sum().backward())
    assert model.scale.grad is not None
    resizing = KeepsBuffersThatRequireGrad(resize=True)
    with pytest.raises(RuntimeError, match="cannot resize variables that require grad"):
        without_gradients(KeepsBuffersThatRequireGrad(resize=True), x)  # alone
    with pytest.raises(RuntimeError, match="cannot resize variables that require grad"):
        call_with_timeout(without_gradients, cpu_dp(resizing, 2), x)
    assert resizing.marks.tolist() == [0.0, 0.0] and resizing.alias is None  # nothing written


class ViewsItsCounts(nn.Module):
    """Counts in place, and at its first forward replaces two buffers with views of (and an alias to) the counts."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("counts", torch.zeros(4))
        self.register_buffer("head", None)
        self.register_buffer("alias", None)

    def forward(self, x):
        self.counts.add_(1)
        if self.head is None:
            self.head = self.counts[:2]
            self.alias = self.counts
        return x * self.head.sum()


def test_buffers_replica_0_replaces_with_views_of_its_copies_view_the_modules_buffers():
    # Given as they were, they viewed replica 0's copies: the module's head no longer followed its counts.
    model = ViewsItsCounts()
    reference = copy.deepcopy(model)
    x = torch.ones(4, 1)
    for _ in range(3):
        out = call_with_timeout(cpu_dp(model, 2), x)
        torch.testing.assert_close(out[:2], reference(x[:2]))  # replica 0's (the others' copies do not view)
    assert model.alias is model.counts
    assert model.head.data_ptr() == model.counts.data_ptr() and model.head.shape == (2,)
    model.counts.fill_(7)
    assert torch.equal(model.head, torch.full((2,), 7.0))


class ExpandsItsCounts(nn.Module):
    """Replaces a buffer with an expanded view of another (elements that overlap: not writable)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("counts", torch.zeros(4))
        self.register_buffer("first", None)

    def forward(self, x):
        self.counts.add_(1)
        self.first = self.counts[:1].expand(4)
        return x * self.first


def test_a_buffer_replaced_with_an_expanded_view_keeps_forwards_working():
    # Made the same view of the module's buffer, it overlapped: the next forward's write-back raised, after the
    # replicas succeeded, having written part of the buffers.
    model = ExpandsItsCounts()
    for step in range(3):
        with pytest.warns(RuntimeWarning, match="elements that overlap"):
            call_with_timeout(cpu_dp(model, 2), torch.ones(4, 4))
        assert torch.equal(model.counts, torch.full((4,), step + 1.0))
        assert torch.equal(model.first, torch.full((4,), step + 1.0))


class KeepsALossTerm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3)
        self.register_buffer("penalty", None)

    def forward(self, x):
        y = self.linear(x)
        self.penalty = y.square().mean()
        return y


def test_a_buffer_replaced_with_a_graph_under_the_parallel_backward_warns():
    # Its backward through the buffer and the output ran replica 0's part twice: torch's "backward through the
    # graph a second time", which names nothing of ours.
    model = KeepsALossTerm()
    with pytest.warns(RuntimeWarning, match="replaced buffer 'penalty' with a tensor that has a graph"):
        call_with_timeout(cpu_dp(model, 2, parallel_backward=True), torch.randn(4, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = call_with_timeout(cpu_dp(model, 2, parallel_backward=False), torch.randn(4, 3))
    (out.sum() + model.penalty).backward()


class CountsInAParameter(nn.Module):
    """Counts the samples it saw in a frozen parameter, in place (state that belongs in a buffer)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3)
        self.seen = nn.Parameter(torch.zeros(()), requires_grad=False)

    def forward(self, x):
        self.seen.add_(x.shape[0])
        if (x == RaiseOnMarker.MARKER).any():
            raise ValueError("marked")
        return self.linear(x)


@pytest.mark.parametrize("parallel_backward", [False, True])
def test_a_forward_writing_a_parameter_in_place_warns_that_every_replica_wrote_it(parallel_backward):
    # The replicas share the module's parameters (their gradients must reach it): each replica's write reaches it,
    # also from a failed forward, where on GPUs only device 0's would. Not silently.
    model = CountsInAParameter()
    dp = DataParallelWithCallback(model, device_ids=["cpu"] * 2, parallel_backward=parallel_backward)
    with pytest.warns(RuntimeWarning, match=r"wrote parameter\(s\) \['seen'\] in place.*register_buffer"):
        call_with_timeout(dp, torch.randn(8, 3)).sum().backward()
    assert model.seen.item() == 8  # both replicas' 4
    x = torch.randn(8, 3)
    x[6, 0] = RaiseOnMarker.MARKER
    with pytest.warns(RuntimeWarning, match=r"\['seen'\].*even if the forward failed"):
        with pytest.raises(ValueError, match="marked"):
            call_with_timeout(dp, x)
    # A forward that writes no parameter in place warns of nothing (gradients, buffers, frozen parameters).
    quiet = nn.Sequential(nn.Linear(3, 3), syncbn_ext.SynchronizedBatchNorm1d(3))
    quiet[0].bias.requires_grad_(False)
    dp = DataParallelWithCallback(quiet, device_ids=["cpu"] * 2, parallel_backward=parallel_backward)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            call_with_timeout(dp, torch.randn(8, 3)).sum().backward()


def under_inference_mode(forward):
    """``forward`` called under ``torch.inference_mode()`` (thread-local: call_with_timeout calls it on a thread)."""

    def call(*args):
        with torch.inference_mode():
            return forward(*args)

    return call


@pytest.mark.parametrize("training", [True, False])
def test_inference_mode_forwards_update_and_read_the_buffers_as_on_gpus(training):
    # Under torch.inference_mode() replica 0's copies of the buffers are inference tensors, which count no version:
    # they are compared instead. As on GPUs, the synchronized layer gives the whole batch's outputs and statistics,
    # the other modules' buffers get replica 0's updates, and in eval mode nothing changes.
    torch.manual_seed(0)
    synchronized = nn.Sequential(nn.Linear(3, 3), syncbn_ext.SynchronizedBatchNorm1d(3)).train(training)
    writers = nn.Sequential(FunctionalRunningStats(3), KeepsItsLastBatch(), MarksThroughAnAlias()).train(training)
    whole_batch = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).train(training)
    whole_batch.load_state_dict(synchronized.state_dict())
    writers_reference = copy.deepcopy(writers)
    x = torch.randn(6, 3) * 3 + 1
    for step in range(2):
        with torch.inference_mode():
            out = call_with_timeout(under_inference_mode(cpu_dp(synchronized, 2)), x + step)
            expected = whole_batch(x + step)
            call_with_timeout(under_inference_mode(cpu_dp(writers, 2)), x + step)
            writers_reference(x[:3] + step)  # replica 0's slice
        torch.testing.assert_close(out, expected)
        for name, tensor in whole_batch.state_dict().items():
            torch.testing.assert_close(synchronized.state_dict()[name], tensor, msg=name)
        for name, tensor in writers_reference.state_dict().items():
            torch.testing.assert_close(writers.state_dict()[name].to_dense(), tensor.to_dense(), msg=name)

    with torch.inference_mode():  # a module built under inference mode: its own buffers are inference tensors
        built_inside = nn.Sequential(nn.Linear(3, 3), syncbn_ext.SynchronizedBatchNorm1d(3)).train(training)
        whole_batch = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).train(training)
        whole_batch.load_state_dict(built_inside.state_dict())
        out = call_with_timeout(under_inference_mode(cpu_dp(built_inside, 2)), x)
        expected = whole_batch(x)
    torch.testing.assert_close(out, expected)
    for name, tensor in whole_batch.state_dict().items():
        torch.testing.assert_close(built_inside.state_dict()[name], tensor, msg=name)


def test_fake_quantization_observers_under_the_replicas_observe_as_on_gpus():
    # Quantization-aware training: torch's fused observers update (and resize) their buffers without counting a
    # version. As on GPUs, the module's observers observe replica 0's slice.
    quantization = pytest.importorskip("torch.ao.quantization")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    model.qconfig = quantization.get_default_qat_qconfig("x86")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation, its observers' reduce_range
        model = quantization.prepare_qat(model.train())
    reference = copy.deepcopy(model)
    x = torch.randn(8, 3, 6, 6)
    call_with_timeout(cpu_dp(model, 2), x).sum().backward()
    reference(x[:4])
    observed = {name: t for name, t in model.state_dict().items() if "fake_quant" in name or "post_process" in name}
    assert any(t.numel() == 4 for t in observed.values())  # the weight's per-channel observer grew to 4 channels
    for name, tensor in observed.items():
        torch.testing.assert_close(tensor, reference.state_dict()[name], msg=name)
