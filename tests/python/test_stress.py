"""No hangs, nothing silently wrong: long training runs, memory and object leaks, concurrent wrappers, clones.

Every check compares with a plain PyTorch run: the same model with ``nn.BatchNorm1d/2d`` (``revert_model`` of a deep
copy: the same initial weights) trained as one module on the whole batch. The defaults take about a minute on two
cores; the ``slow`` soaks run only with SYNCBN_RUN_SLOW=1 (see conftest.py).
"""

from __future__ import annotations

import copy
import gc
import threading
import time
import weakref

import psutil
import pytest
import torch
import torch.nn.functional as F
from batchnorm_cases import CLONES, sync_layers
from torch import nn

import syncbn_ext
from syncbn_ext import DataParallelWithCallback, SynchronizedBatchNorm1d, SynchronizedBatchNorm2d
from syncbn_ext.replica_workers import replica_threads_running

BARRIER_TIMEOUT = "60"  # SYNCBN_TIMEOUT: a lost copy fails its barrier after this instead of waiting 300 s
STALL_TIMEOUT = 90.0  # a guarded loop that makes no progress for this long has deadlocked (> BARRIER_TIMEOUT)
# Whole-batch parity after many float64 SGD steps. The synchronized layers merge statistics with Chan's formula and
# the replicas' gradient contributions are summed in thread order, so results differ from nn.BatchNorm's in the last
# bits. The dynamics do not amplify that: after 2000 steps of 8 replicas the largest difference measured was 3e-13
# relative, 6e-15 absolute, at lr 0.1 (4e-14 / 2e-15 at lr 0.01).
PARITY = {"rtol": 1e-9, "atol": 1e-12}
LR = 0.05
MB = 1024 * 1024


@pytest.fixture(autouse=True)
def barrier_timeout(monkeypatch):
    """Barriers are made per forward and read SYNCBN_TIMEOUT then: a bug fails a pass instead of hanging."""
    monkeypatch.setenv("SYNCBN_TIMEOUT", BARRIER_TIMEOUT)


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------


class _Progress:
    def __init__(self):
        self.count = 0

    def tick(self):
        self.count += 1


def run_guarded(*fns, stall_timeout=STALL_TIMEOUT, total_timeout=None):
    """Runs every ``fn(tick)`` at once, each on a thread of its own, and returns their results.

    ``fn`` calls ``tick()`` after each step. The test fails, instead of hanging, when a thread makes no progress for
    ``stall_timeout`` seconds or is still running after ``total_timeout``; an exception in a thread is raised here.
    """
    progress = [_Progress() for _ in fns]
    results = [{} for _ in fns]

    def target(fn, tick, result):
        try:
            result["value"] = fn(tick)
        except BaseException as error:  # handed back to the test thread
            result["error"] = error

    threads = [
        threading.Thread(target=target, args=(fn, p.tick, r), name=f"stress-{i}", daemon=True)
        for i, (fn, p, r) in enumerate(zip(fns, progress, results, strict=True))
    ]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    seen = [-1] * len(fns)
    since = [start] * len(fns)
    while any(thread.is_alive() for thread in threads):
        threads[[t.is_alive() for t in threads].index(True)].join(0.25)
        now = time.monotonic()
        for i, thread in enumerate(threads):
            if not thread.is_alive():
                continue
            if progress[i].count != seen[i]:
                seen[i], since[i] = progress[i].count, now
            elif now - since[i] > stall_timeout:
                pytest.fail(f"thread {i}: no progress for {stall_timeout} s after {seen[i]} steps (deadlock?)")
        if total_timeout is not None and now - start > total_timeout:
            counts = [p.count for p in progress]
            pytest.fail(f"still running after {total_timeout} s (steps done per thread: {counts})")
    for result in results:
        if "error" in result:
            raise result["error"]
    return [result["value"] for result in results]


def stress_net(seed=0):
    """Linear -> SyncBN1d -> ReLU -> Linear -> SyncBN1d -> Linear, float64, random BatchNorm affine parameters."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(4, 8),
        SynchronizedBatchNorm1d(8),
        nn.ReLU(),
        nn.Linear(8, 8),
        SynchronizedBatchNorm1d(8),
        nn.Linear(8, 1),
    ).double()
    randomize_batchnorm(model)
    return model


def conv_net(seed=0):
    """Conv2d -> SyncBN2d -> ReLU -> Linear, float64: input (N, 2, 4, 4), output (N, 1)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        SynchronizedBatchNorm2d(4, momentum=None),  # the cumulative average: num_batches_tracked matters
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64, 1),
    ).double()
    randomize_batchnorm(model)
    return model


def randomize_batchnorm(model):
    with torch.no_grad():
        for layer in sync_layers(model):
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.uniform_(-0.5, 0.5)


def whole_batch_reference(model):
    """The model with plain nn.BatchNormNd layers (same initial weights), to train as one module."""
    reference = syncbn_ext.revert_model(copy.deepcopy(model))
    assert not sync_layers(reference)
    assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in reference.modules())
    return reference


def vector_batch(generator, size):
    x = torch.randn(size, 4, generator=generator, dtype=torch.float64)
    target = torch.sin(x[:, :1]) + x[:, 1:2] * x[:, 2:3] - 0.5 * x[:, 3:4]
    return x, target


def image_batch(generator, size):
    x = torch.randn(size, 2, 4, 4, generator=generator, dtype=torch.float64) * 2 + 1
    target = x[:, 0].mean((1, 2)).unsqueeze(1) - x[:, 1, 0, :1].cos()
    return x, target


class Trainer:
    """SGD on an MSE loss through ``forward`` (a wrapper, or the module itself)."""

    def __init__(self, forward, module, lr=LR, momentum=0.0):
        self.forward = forward
        self.optimizer = torch.optim.SGD(module.parameters(), lr=lr, momentum=momentum)

    def step(self, x, target):
        self.optimizer.zero_grad()
        loss = F.mse_loss(self.forward(x), target)
        loss.backward()
        self.optimizer.step()
        return loss.detach()


def train_side_by_side(dp, reference, steps, make_batch, batch_size, seed, tick=None):
    """``steps`` SGD steps of the wrapper and of the whole-batch reference on the same batches; their losses."""
    ours, ref = Trainer(dp, dp.module), Trainer(reference, reference)
    generator = torch.Generator().manual_seed(seed)
    losses = torch.empty(steps, 2, dtype=torch.float64)
    for step in range(steps):
        x, target = make_batch(generator, batch_size)
        losses[step, 0] = ours.step(x, target)
        losses[step, 1] = ref.step(x, target)
        if tick is not None:
            tick()
    return losses


def assert_models_match(ours, ref, tol=None):
    """Parameters, running statistics and num_batches_tracked (exactly) of two models with the same state_dict keys."""
    tol = tol or PARITY
    ours_state, ref_state = ours.state_dict(), ref.state_dict()
    assert list(ours_state) == list(ref_state)
    for name, a in ours_state.items():
        b = ref_state[name]
        if a.is_floating_point():
            torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}", **tol)
        else:
            assert torch.equal(a, b), (name, a, b)


def assert_independent(a, b):
    """No tensor of one model's state shares storage with the other's."""
    pointers = {t.untyped_storage().data_ptr() for t in a.state_dict().values()}
    assert not pointers & {t.untyped_storage().data_ptr() for t in b.state_dict().values()}


def rss():
    gc.collect()
    return psutil.Process().memory_info().rss


# ---------------------------------------------------------------------------------------------------------------
# 1. Stress: 8 replicas x many steps, no deadlock, whole-batch parity at the end
# ---------------------------------------------------------------------------------------------------------------


def check_long_training(steps, parallel_backward=None, replicas=8, batch_size=16):
    model = stress_net(seed=0)
    reference = whole_batch_reference(model)
    dp = DataParallelWithCallback(model, device_ids=["cpu"] * replicas, parallel_backward=parallel_backward)

    (losses,) = run_guarded(
        lambda tick: train_side_by_side(dp, reference, steps, vector_batch, batch_size, 1, tick),
        total_timeout=0.3 * steps,  # ~0.015 s a step here, 0.09 s on a heavily loaded machine
    )

    torch.testing.assert_close(losses[:, 0], losses[:, 1], msg=lambda m: f"losses: {m}", **PARITY)
    assert losses[-100:, 0].mean() < losses[:100, 0].mean()  # it did train
    assert_models_match(model, reference)
    for layer in sync_layers(model):
        assert layer.num_batches_tracked.item() == steps


def test_eight_replicas_2000_steps_match_the_whole_batch(parallel_backward):
    check_long_training(2000, parallel_backward)


@pytest.mark.slow
def test_soak_eight_replicas_many_steps_match_the_whole_batch():
    check_long_training(8000)


# ---------------------------------------------------------------------------------------------------------------
# 2. Leaks: memory over many forwards, and no replica, context, channel or pipe outliving its forward
# ---------------------------------------------------------------------------------------------------------------


class Sentinel:
    """A weakly referenceable object: hidden in a C++-held container, its death shows the container was freed."""


class SumCallback:
    """A SyncMaster callback (weakly referenceable): every copy gets the batch size summed over the copies."""

    def __call__(self, intermediates):
        total = sum(msg for _, msg in intermediates)
        return [(copy_id, total) for copy_id, _ in intermediates]


class Tracker:
    """Shared by a module and its replicas: when ``refs`` is a list, collects weak references to what replication
    makes, with a label each."""

    def __init__(self):
        self.refs = None

    def record(self, label, obj):
        if self.refs is not None:
            self.refs.append((label, weakref.ref(obj)))


class BatchCount(nn.Module):
    """Written against the established library's API, with a new SyncMaster per replication: checks that the batch
    sizes summed over the copies make the whole batch (``expected``), and returns its input."""

    def __init__(self, tracker, expected):
        super().__init__()
        self.tracker = tracker
        self.expected = expected
        self.copy_id = None

    def __data_parallel_replicate__(self, ctx, copy_id):
        self.copy_id = copy_id
        if copy_id == 0:
            callback = SumCallback()
            self.master = syncbn_ext.SyncMaster(callback)
            ctx.sync_master = self.master
            ctx.group.add_barrier(self.master)
            self.tracker.record("SyncMaster's callback", callback)
        else:
            self.pipe = ctx.sync_master.register_slave(copy_id)
            self.tracker.record("SlavePipe", self.pipe)
        ctx.sentinel = Sentinel()
        self.tracker.record("BatchCount replica", self)
        self.tracker.record("BatchCount CallbackContext", ctx)
        self.tracker.record("sentinel in a BatchCount CallbackContext", ctx.sentinel)

    def forward(self, x):
        if self.copy_id is None:
            return x
        n = self.master.run_master(x.shape[0]) if self.copy_id == 0 else self.pipe.run_slave(x.shape[0])
        if n != self.expected:
            raise AssertionError(f"BatchCount: the copies' batch sizes add up to {n}, not {self.expected}")
        return x


class RecordingBatchNorm1d(SynchronizedBatchNorm1d):
    """SynchronizedBatchNorm1d that records its replicas, their channels and contexts in a Tracker."""

    def __init__(self, num_features, tracker, **kwargs):
        super().__init__(num_features, **kwargs)
        self.tracker = tracker

    def __data_parallel_replicate__(self, ctx, copy_id):
        super().__data_parallel_replicate__(ctx, copy_id)
        if self.tracker.refs is None:
            return
        self.tracker.record("SynchronizedBatchNorm1d replica", self)
        self.tracker.record("BatchNormChannel", self._channel)
        self.tracker.record("SynchronizedBatchNorm1d CallbackContext", ctx)
        ctx.sentinel = Sentinel()
        self.tracker.record("sentinel in a SynchronizedBatchNorm1d CallbackContext", ctx.sentinel)
        if copy_id == 0:
            shared = ctx.group.shared  # the replication group's storage, which holds the BatchNorm channels
            shared.stress_sentinel = Sentinel()
            self.tracker.record("sentinel in the ReplicationGroup's shared context", shared.stress_sentinel)


def leak_net(tracker, batch_size):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 8),
        RecordingBatchNorm1d(8, tracker),
        nn.ReLU(),
        BatchCount(tracker, batch_size),
        nn.Linear(8, 1),
    ).double()


def check_no_leaks(passes, parallel_backward=None, warmup=200, replicas=4, batch_size=8, limit=5 * MB):
    tracker = Tracker()
    model = leak_net(tracker, batch_size)
    dp = DataParallelWithCallback(model, device_ids=["cpu"] * replicas, parallel_backward=parallel_backward)
    x = torch.randn(batch_size, 4, dtype=torch.float64)

    def train(count):
        def loop(tick):
            for _ in range(count):
                dp(x).square().mean().backward()  # training mode, autograd graph through every replica
                tick()

        return loop

    run_guarded(train(warmup))  # also starts the pool's persistent workers, if this is the process's first wrapper
    before = rss()
    threads_before = set(threading.enumerate())
    run_guarded(train(passes))
    growth = rss() - before
    assert growth < limit, f"RSS grew by {growth / MB:.2f} MB over {passes} forward+backward passes"
    # No new thread (idle workers of other tests' replica counts may have ended meanwhile: unused for a minute).
    assert set(threading.enumerate()) <= threads_before, "replica threads outlived their forward"
    assert not replica_threads_running(), "replica threads outlived their forward"

    # One more pass of each kind, recording weak references to everything replication makes.
    def forward_backward(tick):
        dp(x).square().mean().backward()

    def forward_only(tick):  # grad enabled: the output holds the graph, then is dropped
        out = dp(x)
        assert out.grad_fn is not None

    for kind in (forward_backward, forward_only):
        tracker.refs = []
        gc.disable()
        try:
            run_guarded(kind)
            refs, tracker.refs = tracker.refs, None
            alive_before_gc = sorted({label for label, ref in refs if ref() is not None})
        finally:
            gc.enable()
        labels = {label for label, _ in refs}
        # Per copy: 4 for the BatchNorm layer, 3 for BatchCount, and its callback (copy 0) or its pipe; plus the group.
        assert len(refs) == 8 * replicas + 1, sorted(labels)
        gc.collect()
        alive = sorted({label for label, ref in refs if ref() is not None})
        assert not alive, f"{kind.__name__}: alive after the pass and gc.collect(): {alive}"
        # Freed by reference counting alone, with no cycle to wait for: on GPUs a replica holds parameter copies.
        assert not alive_before_gc, f"{kind.__name__}: freed only by gc.collect(): {alive_before_gc}"


def test_no_memory_growth_or_surviving_replicas_over_5000_passes(parallel_backward):
    check_no_leaks(5000, parallel_backward)


@pytest.mark.slow
def test_soak_no_memory_growth_over_many_passes():
    check_no_leaks(30000)


# ---------------------------------------------------------------------------------------------------------------
# 3. Two wrapped models trained at once from two threads
# ---------------------------------------------------------------------------------------------------------------


def test_two_wrapped_models_trained_concurrently_do_not_interfere():
    steps = 100
    setups = [(stress_net(seed=1), vector_batch, 10), (conv_net(seed=2), image_batch, 6)]
    runs = []
    for seed, (model, make_batch, batch_size) in enumerate(setups):
        reference = whole_batch_reference(model)
        dp = DataParallelWithCallback(model, device_ids=["cpu"] * 2)
        runs.append((model, reference, dp, make_batch, batch_size, 10 + seed))

    start = threading.Barrier(len(runs))

    def trainer(run):
        _, reference, dp, make_batch, batch_size, seed = run

        def loop(tick):
            start.wait(STALL_TIMEOUT)  # both loops at the same time
            return train_side_by_side(dp, reference, steps, make_batch, batch_size, seed, tick)

        return loop

    all_losses = run_guarded(*(trainer(run) for run in runs))

    for (model, reference, *_), losses in zip(runs, all_losses, strict=True):
        torch.testing.assert_close(losses[:, 0], losses[:, 1], **PARITY)
        assert_models_match(model, reference)
        for layer in sync_layers(model):
            assert layer.num_batches_tracked.item() == steps


# ---------------------------------------------------------------------------------------------------------------
# 4. deepcopy, pickle and torch.save/torch.load of a trained wrapper
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("clone", list(CLONES.values()), ids=list(CLONES))
def test_a_cloned_trained_wrapper_keeps_training_like_the_original(clone):
    replicas, batch_size, momentum = 4, 12, 0.9
    model = stress_net(seed=3)
    reference = whole_batch_reference(model)
    dp = DataParallelWithCallback(model, device_ids=["cpu"] * replicas)
    ours, ref = Trainer(dp, model, momentum=momentum), Trainer(reference, reference, momentum=momentum)
    generator = torch.Generator().manual_seed(4)
    batches = [vector_batch(generator, batch_size) for _ in range(8)]

    def train_before(tick):
        for x, target in batches[:5]:
            ours.step(x, target)
            ref.step(x, target)
            tick()

    run_guarded(train_before)

    copied = clone(dp)
    assert type(copied) is DataParallelWithCallback and copied is not dp
    assert copied.cpu_replicas and copied.device_ids == dp.device_ids
    assert_independent(copied.module, dp.module)
    assert_models_match(copied.module, model, tol={"rtol": 0, "atol": 0})
    for layer in sync_layers(copied):
        assert layer._channel is None and layer._copy_id is None  # not a replica
    copied_trainer = Trainer(copied, copied.module, momentum=momentum)
    copied_trainer.optimizer.load_state_dict(copy.deepcopy(ours.optimizer.state_dict()))  # own momentum

    def train_after(tick):
        losses = []
        for x, target in batches[5:]:
            losses.append((ours.step(x, target), copied_trainer.step(x, target), ref.step(x, target)))
            tick()
        return torch.tensor(losses)

    (losses,) = run_guarded(train_after)

    torch.testing.assert_close(losses[:, 1], losses[:, 0], **PARITY)
    torch.testing.assert_close(losses[:, 0], losses[:, 2], **PARITY)
    assert_models_match(copied.module, model)
    assert_models_match(model, reference)
    for layer in (*sync_layers(model), *sync_layers(copied)):
        assert layer.num_batches_tracked.item() == len(batches)
