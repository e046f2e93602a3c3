"""DataParallelWithCallback, CPU replicas and patch()."""

from __future__ import annotations

import collections
import contextlib
import copy
import io
import pickle
import threading
import time

import pytest
import torch
from batchnorm_cases import cpu_dp
from hang_guard import call_with_timeout
from replica_faults import RaiseOnMarker
from replica_modules import BatchSum, PersistentBatchSum, SlowSynchronizedBatchNorm1d, forwards_from_threads
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import syncbn_ext
from syncbn_ext import DataParallelWithCallback
from syncbn_ext.replicate import Replication, training_forward_lock


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


def mlp():
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double()


def conv_net():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3), nn.Flatten()).double()


def assert_matches_single_module(make_model, x, n):
    torch.manual_seed(0)
    model = make_model()
    reference = copy.deepcopy(model)
    x_ref = x.clone().requires_grad_()
    x_par = x.clone().requires_grad_()

    y_ref = reference(x_ref)
    y_par = call_with_timeout(cpu_dp(model, n), x_par)
    torch.testing.assert_close(y_par, y_ref)

    grad_output = torch.randn_like(y_ref)
    y_ref.backward(grad_output)
    y_par.backward(grad_output)
    torch.testing.assert_close(x_par.grad, x_ref.grad)
    for (name, p_par), p_ref in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert p_par.grad is not None, name
        torch.testing.assert_close(p_par.grad, p_ref.grad, msg=name)


# ---------------------------------------------------------------------------------------------------------------
# CPU DataParallelWithCallback: results
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 4])
def test_mlp_matches_single_module(n):
    assert_matches_single_module(mlp, torch.randn(12, 6, dtype=torch.float64), n)


@pytest.mark.parametrize("n", [2, 4])
def test_conv_matches_single_module(n):
    assert_matches_single_module(conv_net, torch.randn(8, 3, 5, 5, dtype=torch.float64), n)


@pytest.mark.parametrize("batch", [10, 2])
def test_uneven_and_small_batches(batch):
    assert_matches_single_module(mlp, torch.randn(batch, 6, dtype=torch.float64), 4)
    bs = BatchSum()
    dp = cpu_dp(nn.Sequential(mlp(), bs), 4)
    call_with_timeout(dp, torch.randn(batch, 6, dtype=torch.float64))
    # chunk(4) semantics: 10 -> 3, 3, 3, 1 over 4 replicas; 2 -> 1, 1 over 2 replicas.
    sizes = [3, 3, 3, 1] if batch == 10 else [1, 1]
    assert bs.hook_calls == list(range(len(sizes)))
    assert sorted(bs.passes) == [(i, size, batch) for i, size in enumerate(sizes)]


def test_callbacks_run_and_replicas_meet_in_a_barrier():
    torch.manual_seed(0)
    bs = BatchSum()
    model = nn.Sequential(nn.Linear(6, 5), bs, nn.Tanh(), bs).double()  # one layer, two passes per forward
    x = torch.randn(12, 6, dtype=torch.float64)
    expected = model(x)  # plain run: adds the whole batch size, twice
    assert bs.hook_calls == [] and bs.passes == [(None, 12, 12)] * 2
    bs.passes.clear()

    out = call_with_timeout(cpu_dp(model, 4), x)
    torch.testing.assert_close(out, expected)
    assert bs.hook_calls == [0, 1, 2, 3]  # once per copy (the shared layer is one position), copy 0 first
    assert sorted(bs.passes) == sorted([(i, 3, 12) for i in range(4)] * 2)
    # The hook ran on the replicas: the original holds no barrier.
    assert bs.master is None and bs.pipe is None and bs.copy_id is None


def test_next_forward_replicates_again():
    bs = BatchSum()
    dp = cpu_dp(bs, 3)
    for batch in (9, 6, 2):
        out = call_with_timeout(dp, torch.zeros(batch, 1))
        torch.testing.assert_close(out, torch.full((batch, 1), float(batch)))
    assert bs.hook_calls == [0, 1, 2, 0, 1, 2, 0, 1]


def test_one_device_runs_the_module_itself():
    bs = BatchSum()
    out = cpu_dp(bs, 1)(torch.zeros(5, 2))
    torch.testing.assert_close(out, torch.full((5, 2), 5.0))
    assert bs.hook_calls == []  # no replication, as nn.DataParallel with one device


Pair = collections.namedtuple("Pair", ["first", "second"])


class Structured(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2).double()

    def forward(self, inputs, extra=None, *, scale=1.0, offset=None):
        a, b = inputs["a"], inputs["b"]
        out = self.linear(a) * scale + b.sum(1, keepdim=True)
        if extra is not None:
            out = out + extra[0]
        if offset is not None:
            out = out + offset
        return {"out": out, "pair": Pair(out * 2, [a[:, :1], None]), "none": None}


def test_structured_inputs_kwargs_and_outputs():
    torch.manual_seed(0)
    model = Structured()
    inputs = {"a": torch.randn(7, 4, dtype=torch.float64), "b": torch.randn(7, 3, dtype=torch.float64)}
    extra = [torch.randn(7, 1, dtype=torch.float64)]
    offset = torch.randn(7, 1, dtype=torch.float64)
    expected = model(inputs, extra, scale=3.0, offset=offset)

    out = call_with_timeout(cpu_dp(model, 3), inputs, extra, scale=3.0, offset=offset)
    assert set(out) == {"out", "pair", "none"} and out["none"] is None
    assert isinstance(out["pair"], Pair) and isinstance(out["pair"].second, list) and out["pair"].second[1] is None
    torch.testing.assert_close(out["out"], expected["out"])
    torch.testing.assert_close(out["pair"].first, expected["pair"].first)
    torch.testing.assert_close(out["pair"].second[0], expected["pair"].second[0])


def test_keyword_only_inputs():
    model = Structured()
    inputs = {"a": torch.randn(5, 4, dtype=torch.float64), "b": torch.randn(5, 3, dtype=torch.float64)}
    out = call_with_timeout(cpu_dp(model, 2), inputs=inputs)
    torch.testing.assert_close(out["out"], model(inputs=inputs)["out"])


def test_no_inputs_runs_one_replica():
    class Constant(nn.Module):
        def forward(self):
            return torch.ones(2)

    torch.testing.assert_close(cpu_dp(Constant(), 3)(), torch.ones(2))


class RowScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(2, 1, dtype=torch.float64))

    def forward(self, x):
        return x * self.scale


def test_scatter_and_gather_along_dim_1():
    torch.manual_seed(0)
    bs = BatchSum(dim=1)
    model = nn.Sequential(RowScale(), bs)
    reference = copy.deepcopy(model)
    x = torch.randn(2, 10, dtype=torch.float64)
    expected = reference(x)

    out = call_with_timeout(DataParallelWithCallback(model, device_ids=["cpu"] * 4, dim=1), x)
    assert sorted(bs.passes) == [(0, 3, 10), (1, 3, 10), (2, 3, 10), (3, 1, 10)]
    torch.testing.assert_close(out, expected)
    grad_output = torch.randn_like(out)
    out.backward(grad_output)
    expected.backward(grad_output)
    torch.testing.assert_close(model[0].scale.grad, reference[0].scale.grad)


def test_zero_dim_outputs_are_unsqueezed_with_a_warning():
    class Total(nn.Module):
        def forward(self, x):
            return x.sum()

    x = torch.arange(6.0)
    with pytest.warns(UserWarning, match="scalars"):
        out = call_with_timeout(cpu_dp(Total(), 3), x)
    torch.testing.assert_close(out, torch.tensor([1.0, 5.0, 9.0]))


# ---------------------------------------------------------------------------------------------------------------
# CPU DataParallelWithCallback: state, modes, threads
# ---------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------
# Exceptions
# ---------------------------------------------------------------------------------------------------------------


def marked_input(batch, marked_rows):
    x = torch.zeros(batch, 2)
    for row in marked_rows:
        x[row, 0] = RaiseOnMarker.MARKER
    return x


@pytest.mark.parametrize("failing", [0, 2])
def test_a_failing_replica_raises_its_exception_and_the_next_forward_works(failing):
    bs = BatchSum()
    dp = cpu_dp(nn.Sequential(RaiseOnMarker(), bs), 4)
    with pytest.raises(ValueError, match="marker found") as raised:
        call_with_timeout(dp, marked_input(8, [2 * failing + 1]))
    assert raised.value.__notes__ == [f"(raised in replica {failing} on device cpu)"]
    # The other copies were waiting for it in the barrier: they were woken by an abort, not a timeout.
    assert bs.barrier_errors == [syncbn_ext.BarrierAbortedError] * 3

    out = call_with_timeout(dp, torch.zeros(8, 2))
    torch.testing.assert_close(out, torch.full((8, 2), 8.0))


def test_several_failing_replicas_raise_the_lowest_copy_id():
    dp = cpu_dp(nn.Sequential(RaiseOnMarker(), BatchSum()), 4)
    with pytest.raises(ValueError, match="replica 1 on device cpu"):
        call_with_timeout(dp, marked_input(8, [7, 2]))


def test_exception_type_is_kept_without_barriers():
    class Boom(nn.Module):
        def forward(self, x):
            if (x == 1).any():
                raise KeyError("boom")
            return x

    x = torch.zeros(4, 1)
    x[3, 0] = 1
    with pytest.raises(KeyError, match="replica 1 on device cpu"):
        call_with_timeout(cpu_dp(Boom(), 2), x)


# ---------------------------------------------------------------------------------------------------------------
# Construction, serialization
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cpu", "cpu:0", torch.device("cpu")])
def test_cpu_device_ids(device):
    dp = DataParallelWithCallback(nn.Linear(2, 2), device_ids=[device, device], output_device=device)
    assert dp.cpu_replicas
    assert dp.device_ids == [torch.device("cpu")] * 2
    assert dp.output_device == torch.device("cpu") and dp.src_device_obj == torch.device("cpu") and dp.dim == 0


@pytest.mark.parametrize("device_ids", [["cpu", 0], [torch.device("cpu"), "cuda:0"], ["cuda:1", "cpu"]])
def test_mixed_device_ids_are_rejected(device_ids):
    with pytest.raises(ValueError, match="mixes CPU and accelerator"):
        DataParallelWithCallback(nn.Linear(2, 2), device_ids=device_ids)


@pytest.mark.parametrize("output_device", [0, "cuda:0", torch.device("cuda", 1)])
def test_accelerator_output_device_is_rejected_with_cpu_replicas(output_device):
    with pytest.raises(ValueError, match="output device must be the CPU"):
        DataParallelWithCallback(nn.Linear(2, 2), device_ids=["cpu"] * 2, output_device=output_device)


def test_state_dict_keys_are_those_of_data_parallel():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    dp = cpu_dp(model, 2)
    keys = list(dp.state_dict())
    assert keys == ["module." + k for k in model.state_dict()]
    assert keys == list(nn.DataParallel(model).state_dict())
    dp.load_state_dict(cpu_dp(copy.deepcopy(model), 3).state_dict())


def _round_trip_torch_save(module):
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m)), _round_trip_torch_save])
def test_copies_of_the_wrapper_still_run(clone):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), BatchSum()).double()
    dp = cpu_dp(model, 3)
    x = torch.randn(6, 3, dtype=torch.float64)
    expected = call_with_timeout(dp, x)

    twin = clone(dp)
    assert type(twin) is DataParallelWithCallback and twin.cpu_replicas
    assert twin.device_ids == [torch.device("cpu")] * 3 and twin.module is not model
    torch.testing.assert_close(call_with_timeout(twin, x), expected)
    assert twin.module[1].hook_calls[-3:] == [0, 1, 2]


def test_parameters_off_cpu_are_rejected():
    dp = cpu_dp(nn.Linear(2, 2, device="meta"), 2)
    with pytest.raises(RuntimeError, match="on device cpu"):
        dp(torch.zeros(4, 2))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without an accelerator")
def test_default_without_accelerator_is_a_plain_wrapper():
    bs = BatchSum()
    dp = DataParallelWithCallback(bs)
    assert dp.device_ids == [] and not dp.cpu_replicas
    torch.testing.assert_close(dp(torch.zeros(3, 1)), torch.full((3, 1), 3.0))
    assert bs.hook_calls == []


# ---------------------------------------------------------------------------------------------------------------
# A SyncMaster kept by the layer across forwards (the established library's pattern)
# ---------------------------------------------------------------------------------------------------------------


def test_persistent_master_across_forwards():
    dp = cpu_dp(PersistentBatchSum(), 3)
    for batch in (6, 4, 6):
        torch.testing.assert_close(call_with_timeout(dp, torch.zeros(batch, 1)), torch.full((batch, 1), float(batch)))


def test_persistent_master_when_the_batch_is_smaller_than_the_replicas():
    dp = cpu_dp(PersistentBatchSum(), 3)
    call_with_timeout(dp, torch.zeros(6, 1))
    torch.testing.assert_close(call_with_timeout(dp, torch.zeros(1, 1)), torch.ones(1, 1))


def test_persistent_master_when_a_forward_skips_the_barrier():
    layer = PersistentBatchSum(use_barrier=False)  # e.g. a synchronized BatchNorm in eval mode
    dp = cpu_dp(layer, 2)
    for _ in range(2):
        torch.testing.assert_close(call_with_timeout(dp, torch.ones(4, 1)), torch.ones(4, 1))


# ---------------------------------------------------------------------------------------------------------------
# On GPUs
# ---------------------------------------------------------------------------------------------------------------

needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")


@needs_two_gpus
def test_gpu_data_parallel_with_callback():
    torch.manual_seed(0)
    bs = BatchSum()
    model = nn.Sequential(nn.Linear(6, 5), bs).cuda()
    x = torch.randn(10, 6, device="cuda")
    expected = model(x)
    bs.passes.clear()
    out = call_with_timeout(DataParallelWithCallback(model, device_ids=[0, 1]), x)
    torch.testing.assert_close(out, expected)
    assert bs.hook_calls == [0, 1] and sorted(bs.passes) == [(0, 5, 10), (1, 5, 10)]
