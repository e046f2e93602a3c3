"""CPU DataParallelWithCallback: the state the replicas work with and write back (buffers, parameters written in
place), the caller's thread state they run under, and threads around them (training forwards from several threads,
others running meanwhile)."""

from __future__ import annotations

import collections
import contextlib
import copy
import json
import sys
import threading
import time
import warnings
from pathlib import Path

import child_processes
import pytest
import torch
from batchnorm_cases import cpu_dp
from hang_guard import call_with_timeout
from replica_faults import RaiseOnMarker
from replica_modules import BatchSum, SlowSynchronizedBatchNorm1d, forwards_from_threads
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import syncbn_ext
import syncbn_ext.replica_workers
from syncbn_ext import DataParallelWithCallback
from syncbn_ext.replicate import Replication, TrainingForwardLocks, training_forward_lock


class Record(nn.Module):
    """Records per call the thread-local modes the replica ran under."""

    def __init__(self) -> None:
        super().__init__()
        self.modes: list[tuple[bool, bool, bool]] = []

    def forward(self, x):
        self.modes.append(
            (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), torch.is_autocast_enabled("cpu"))
        )
        return x


def test_replica_zero_updates_the_running_statistics():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(3).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    call_with_timeout(cpu_dp(bn, 2), x)
    # As on GPUs: replica 0's statistics (of the first slice) land on the module; the others are discarded.
    torch.testing.assert_close(bn.running_mean, 0.1 * x[:4].mean(0))
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * x[:4].var(0))
    assert bn.num_batches_tracked.item() == 1


def test_training_forwards_from_several_threads_run_one_after_another():
    torch.manual_seed(0)
    bn = SlowSynchronizedBatchNorm1d(3, momentum=None).double()  # a cumulative average: the same in any order
    batches = [torch.randn(6, 3, dtype=torch.float64) * (1 + i % 3) + i for i in range(24)]
    forwards_from_threads(cpu_dp(bn, 2), batches)
    # At once, each forward would write back its replica 0's update over the others' (8 of 24 counted):
    # one after another, each replicates the buffers the previous one wrote back.
    assert bn.num_batches_tracked.item() == 24
    torch.testing.assert_close(bn.running_mean, torch.stack([x.mean(0) for x in batches]).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([x.var(0) for x in batches]).mean(0))


@pytest.mark.parametrize("overlap", ["a block of the model", "a layer shared by two models"])
def test_training_forwards_of_overlapping_models_from_several_threads_run_one_after_another(overlap):
    # A wrapper of a model and one of its block (or of two models sharing a layer) write back the shared layer's
    # buffers: at once, each would write its update over the other's.
    torch.manual_seed(0)
    bn = SlowSynchronizedBatchNorm1d(3, momentum=None).double()  # a cumulative average: the same in any order
    if overlap == "a block of the model":
        models = [nn.Sequential(nn.Sequential(bn), nn.Identity()), bn]
    else:
        models = [nn.Sequential(nn.Identity(), bn), nn.Sequential(bn, nn.Identity())]
    batches = [torch.randn(6, 3, dtype=torch.float64) * (1 + i % 3) + i for i in range(24)]
    forwards_from_threads([cpu_dp(model, 2) for model in models], batches, threads=4)
    assert bn.num_batches_tracked.item() == 24
    torch.testing.assert_close(bn.running_mean, torch.stack([x.mean(0) for x in batches]).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([x.var(0) for x in batches]).mean(0))


class InterruptedLock:
    """A lock whose acquire (or release) raises KeyboardInterrupt, as Ctrl-C does in a thread waiting for it."""

    def __init__(self, fail_in: str) -> None:
        self.fail_in = fail_in

    def acquire(self, blocking: bool = True) -> bool:
        if self.fail_in == "acquire":
            raise KeyboardInterrupt
        return True

    def release(self) -> None:
        if self.fail_in == "release":
            raise KeyboardInterrupt


@pytest.mark.parametrize("fail_in", ["acquire", "release"])
def test_an_interrupt_while_taking_or_releasing_the_forward_locks_leaves_none_held(fail_in):
    first, last = threading.RLock(), threading.RLock()
    locks = TrainingForwardLocks([first, InterruptedLock(fail_in), last])
    with pytest.raises(KeyboardInterrupt):
        with locks:
            pass
    taken = []
    other = threading.Thread(target=lambda: taken.extend(lock.acquire(blocking=False) for lock in (first, last)))
    other.start()
    other.join()
    assert taken == [True, True]  # not held by this thread any more


def test_a_training_forward_holds_its_module_and_an_eval_forward_nothing():
    seen = []

    class Probe(nn.Module):
        """Replica 0 tries, from another thread, to take the module's lock while the forward runs."""

        def forward(self, x):
            if Replication.of(self)[1] == 0:
                lock = training_forward_lock(dp.module)
                if isinstance(lock, contextlib.nullcontext):
                    seen.append((self.training, None))
                else:
                    taken = []
                    other = threading.Thread(target=lambda: taken.append(lock.acquire(blocking=False)))
                    other.start()
                    other.join()
                    seen.append((self.training, taken[0]))
            return x

    dp = cpu_dp(Probe(), 2)
    call_with_timeout(dp, torch.randn(4, 2))
    dp.eval()
    call_with_timeout(dp, torch.randn(4, 2))
    assert seen == [(True, False), (False, None)]  # training: held, another thread waits; eval: nothing held

    dp.train()

    def forward_inside_the_lock():  # reentrant: a forward that calls its wrapper again goes on
        with training_forward_lock(dp.module):
            return dp(torch.randn(4, 2))

    assert call_with_timeout(forward_inside_the_lock).shape == (4, 2)


def test_grad_inference_and_autocast_modes_reach_the_replicas():
    rec = Record()
    dp = cpu_dp(nn.Sequential(nn.Linear(4, 4), rec), 3)
    x = torch.randn(6, 4)

    assert call_with_timeout(dp, x).requires_grad
    with torch.no_grad():
        assert not dp(x).requires_grad
    with torch.inference_mode():
        assert dp(x).is_inference()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert dp(x).dtype == torch.bfloat16
    assert (
        rec.modes
        == [(True, False, False)] * 3
        + [(False, False, False)] * 3
        + [(False, True, False)] * 3
        + [(True, False, True)] * 3
    )


@pytest.mark.parametrize(
    ("module_dtype", "autocast_dtype"), [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16)]
)
def test_outputs_of_the_other_16_bit_type_than_autocasts_are_gathered(module_dtype, autocast_dtype):
    # autocast leaves BatchNorm and ReLU in the module's type; cat under CPU autocast refused the other 16-bit type.
    model = syncbn_ext.convert_model(nn.Sequential(nn.BatchNorm2d(3), nn.ReLU())).to(module_dtype)
    reference = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU()).to(module_dtype)
    x = torch.randn(4, 3, 5, 5, dtype=module_dtype)
    dp = cpu_dp(model, 2)

    def under_autocast(module):  # in the thread call_with_timeout runs it on: autocast's state is per thread
        with torch.autocast("cpu", dtype=autocast_dtype):
            return module(x)

    expected = under_autocast(reference)
    out = call_with_timeout(under_autocast, dp)
    assert out.dtype == expected.dtype == module_dtype
    # 16-bit rounding of statistics merged from two halves against one pass over the batch
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(model[0].running_var, reference[0].running_var, atol=2e-2, rtol=2e-2)


class CountOps(TorchDispatchMode):
    """Counts the aten ops it sees, and the threads they ran on."""

    def __init__(self):
        super().__init__()
        self.ops, self.threads = collections.Counter(), set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        self.threads.add(threading.current_thread().name)
        return func(*args, **(kwargs or {}))


def test_the_callers_saved_tensor_hooks_dispatch_modes_and_profiler_reach_the_replicas(parallel_backward):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), syncbn_ext.SynchronizedBatchNorm1d(4), nn.ReLU())
    dp = cpu_dp(model, 2, parallel_backward=parallel_backward)
    x = torch.randn(6, 4)

    def packs(run):
        packed = []

        def pack(tensor):
            packed.append(threading.current_thread().name)
            return tensor

        def forward():
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                return run(x)

        call_with_timeout(forward).sum().backward()
        return packed

    # Each replica saves what the whole module saves, through the caller's hooks (save_on_cpu, compression...).
    whole, replicated = packs(model), packs(dp)
    assert whole and len(replicated) == 2 * len(whole)
    assert all(name.startswith("syncbn-worker-") for name in replicated)

    def counted():
        with CountOps() as forward_mode:
            y = dp(x)
        with CountOps() as backward_mode:
            y.sum().backward()
        return forward_mode, backward_mode

    forward_mode, backward_mode = call_with_timeout(counted)
    assert forward_mode.ops["addmm"] == 2 and forward_mode.ops["local_stats"] == 2  # one per replica
    assert backward_mode.ops["mm"] == 2  # each replica's weight gradient, wherever its backward ran
    assert any(name.startswith("syncbn-worker-") for name in backward_mode.threads) == parallel_backward

    def profiled():
        with torch.profiler.profile() as profile:
            dp(x).sum().backward()
        return {event.key: event.count for event in profile.key_averages()}

    events = call_with_timeout(profiled)
    assert events.get("syncbn::local_stats") == 2 and events.get("aten::addmm") == 2


def test_other_threads_run_while_replicas_wait_in_the_barrier():
    counter = [0]
    stop = threading.Event()

    def count():
        while not stop.is_set():
            counter[0] += 1
            time.sleep(0.001)

    seen = {}

    def before_barrier(copy_id):
        # The master arrives last: the slaves wait in run_slave meanwhile. If that wait held the GIL,
        # neither this thread nor the counter could move until the barrier's timeout.
        if copy_id == 0:
            seen["start"] = counter[0]
            time.sleep(0.2)
            seen["end"] = counter[0]

    bs = BatchSum()
    bs.before_barrier = before_barrier
    counter_thread = threading.Thread(target=count, daemon=True)
    counter_thread.start()
    try:
        out = call_with_timeout(cpu_dp(bs, 4), torch.zeros(8, 1))
    finally:
        stop.set()
        counter_thread.join()
    torch.testing.assert_close(out, torch.full((8, 1), 8.0))
    assert bs.barrier_errors == []
    assert seen["end"] > seen["start"]


def test_without_random_ops_runs_repeat_bit_for_bit(parallel_backward):
    # Statistics are merged, and gradients summed, in replica order whatever order the threads finish in.
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), syncbn_ext.SynchronizedBatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4)
    )
    x = torch.randn(12, 3, 8, 8)

    def run():
        replicated = copy.deepcopy(model)
        y = call_with_timeout(cpu_dp(replicated, 4, parallel_backward=parallel_backward), x)
        call_with_timeout(y.square().sum().backward)
        return [y.detach(), *(p.grad for p in replicated.parameters()), *replicated.buffers()]

    first = run()
    for _ in range(3):
        assert all(torch.equal(a, b) for a, b in zip(first, run(), strict=True))


def test_a_forked_child_trains_on_the_parents_wrapper():
    # The parent's worker threads and a training forward running in another thread at the fork are not in the
    # child: the child's forward must not wait for them.
    scenario = Path(__file__).resolve().parent / "fork_scenario.py"
    result = child_processes.run([sys.executable, str(scenario)], timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["child_exit"] == 0, result.stderr  # 1: it hung (threads dumped above); 3: a wrong step
    assert report["parent_error"] < 1e-5


# Buffers and parameters a replica's forward writes, and what reaches the module


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
