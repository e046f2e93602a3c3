"""CPU DataParallelWithCallback: the caller's thread state the replicas run under, and threads around them (training
forwards from several threads, others running meanwhile). The buffers they write back: test_replica_buffers.py."""

from __future__ import annotations

import collections
import contextlib
import copy
import json
import sys
import threading
import time
from pathlib import Path

import child_processes
import pytest
import torch
from batchnorm_cases import cpu_dp
from hang_guard import call_with_timeout
from replica_modules import BatchSum, SlowSynchronizedBatchNorm1d, forwards_from_threads
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import syncbn_ext
import syncbn_ext.replica_workers
from syncbn_ext.forward_locks import TrainingForwardLocks, training_forward_lock
from syncbn_ext.replication import Replication


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
