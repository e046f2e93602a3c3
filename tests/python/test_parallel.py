"""DataParallelWithCallback, CPU replicas and patch()."""

from __future__ import annotations

import collections
import copy
import io
import pickle
import threading
import time

import pytest
import torch
from hang_guard import call_with_timeout
from torch import nn

import syncbn_ext
from syncbn_ext import DataParallelWithCallback, patch, patch_replication_callback, replicate_on_cpu

BARRIER_TIMEOUT = 30.0  # a bug makes a barrier fail after this, never hang the suite


def _sum_messages(messages):
    total = sum(msg for _, msg in messages)
    return [(copy_id, total) for copy_id, _ in messages]


class BatchSum(nn.Module):
    """Adds the batch size summed over every replica (through a SyncMaster) to its input.

    Run alone it adds its own batch size, so a parallel run must equal a plain run on the whole batch. The
    replication hook and each pass record into lists shared by the original and its shallow copies.
    """

    def __init__(self, dim: int = 0) -> None:
        super().__init__()
        self.dim = dim
        self.hook_calls: list[int] = []  # copy ids, in the order the hook saw them
        self.passes: list[tuple[int, int, int]] = []  # (copy id, local size, total)
        self.barrier_errors: list[type] = []
        self.before_barrier = None  # optional callable(copy_id), runs in the replica before the barrier
        self.copy_id = None
        self.master = None
        self.pipe = None

    def __data_parallel_replicate__(self, ctx, copy_id):
        # Runs on the replica: attributes set here stay on that copy.
        self.hook_calls.append(copy_id)
        self.copy_id = copy_id
        if copy_id == 0:
            self.master = syncbn_ext.SyncMaster(_sum_messages, timeout=BARRIER_TIMEOUT)
            ctx.sync_master = self.master
        else:
            self.pipe = ctx.sync_master.register_slave(copy_id)

    def forward(self, x):
        local = x.shape[self.dim]
        if self.before_barrier is not None:
            self.before_barrier(self.copy_id)
        try:
            if self.pipe is not None:
                total = self.pipe.run_slave(local)
            elif self.master is not None:
                total = self.master.run_master(local)
            else:
                total = local
        except syncbn_ext.BarrierError as error:
            self.barrier_errors.append(type(error))
            raise
        self.passes.append((self.copy_id, local, total))
        return x + total


class RaiseOnMarker(nn.Module):
    """Raises ValueError when its input contains MARKER."""

    MARKER = -12345.0

    def forward(self, x):
        if (x == self.MARKER).any():
            raise ValueError("marker found in this slice")
        return x


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


def cpu_dp(module, n, **kwargs):
    return DataParallelWithCallback(module, device_ids=["cpu"] * n, **kwargs)


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
# Replication on CPU
# ---------------------------------------------------------------------------------------------------------------


def test_replicate_on_cpu_shares_parameters_and_buffers_like_gpus():
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.BatchNorm1d(3), shared, nn.Sequential())
    model.register_buffer("rg_buffer", torch.ones(3, requires_grad=True))
    replicas = replicate_on_cpu(model, 3)
    assert len(replicas) == 3

    for j, replica in enumerate(replicas):
        assert replica is not model and type(replica) is nn.Sequential and replica._is_replica
        assert replica[0] is replica[2] and replica[0] is not shared  # shared submodule stays shared
        # Parameters: differentiable views of the originals, plain attributes rather than Parameters.
        assert list(replica.parameters()) == []
        w = replica[0].weight
        assert not isinstance(w, nn.Parameter) and w.requires_grad and w.grad_fn is not None
        assert w.data_ptr() == shared.weight.data_ptr()
        torch.testing.assert_close(w, shared.weight)
        # Buffers: replica 0 uses the original's tensors, the others clones.
        mean = replica[1].running_mean
        if j == 0:
            assert mean is model[1].running_mean and replica.rg_buffer is model.rg_buffer
        else:
            assert mean.data_ptr() != model[1].running_mean.data_ptr() and not mean.requires_grad
            assert replica.rg_buffer.requires_grad and replica.rg_buffer.grad_fn is not None
            torch.testing.assert_close(mean, model[1].running_mean)

    # Gradients through every replica accumulate on the original leaf parameter.
    x = torch.randn(4, 3)
    sum(r[0](x).sum() for r in replicas).backward()
    torch.testing.assert_close(shared.weight.grad, 3 * x.sum(0).expand(3, 3))


def test_replicate_on_cpu_detaches_without_grad():
    model = nn.Linear(2, 2)
    with torch.no_grad():
        replicas = replicate_on_cpu(model, 2)
    assert all(not r.weight.requires_grad and r.weight.grad_fn is None for r in replicas)
    assert all(r.weight.data_ptr() == model.weight.data_ptr() for r in replicas)
    assert replicate_on_cpu(model, 2, detach=True)[1].bias.grad_fn is None


def test_replicate_on_cpu_arguments():
    assert replicate_on_cpu(nn.Linear(1, 1), 0) == []
    with pytest.raises(ValueError, match="non-negative"):
        replicate_on_cpu(nn.Linear(1, 1), -1)
    with pytest.raises(ValueError, match="lazy"):
        replicate_on_cpu(nn.LazyLinear(2), 2)


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
# patch()
# ---------------------------------------------------------------------------------------------------------------


def test_patch_returns_the_instance_and_is_idempotent():
    assert patch_replication_callback is patch
    dp = nn.DataParallel(nn.Linear(2, 2))
    assert patch(dp) is dp
    wrapper = dp.__dict__["replicate"]
    assert patch(dp) is dp and dp.__dict__["replicate"] is wrapper
    x = torch.randn(3, 2)
    torch.testing.assert_close(dp(x), dp.module(x))  # no accelerator: nn.DataParallel runs the module

    ours = cpu_dp(nn.Linear(2, 2), 2)
    assert patch(ours) is ours and "replicate" not in ours.__dict__  # already runs the callbacks


@pytest.mark.parametrize("thing", [nn.Linear(1, 1), None, "model"])
def test_patch_rejects_other_types(thing):
    with pytest.raises(TypeError, match=type(thing).__qualname__):
        patch(thing)


def test_patch_runs_the_callbacks_after_the_original_replicate():
    bs = BatchSum()
    dp = nn.DataParallel(nn.Sequential(nn.Identity(), bs))
    replicate_calls = []

    def fake_replicate(module, device_ids):  # stands in for the GPU replication
        replicate_calls.append(list(device_ids))
        return replicate_on_cpu(module, len(device_ids))

    dp.replicate = fake_replicate
    patch(patch(dp))
    replicas = dp.replicate(dp.module, [0, 1, 2])
    assert replicate_calls == [[0, 1, 2]]
    assert bs.hook_calls == [0, 1, 2]  # once, although patched twice
    masters = [r[1].master for r in replicas]
    assert masters[0] is not None and masters[1:] == [None, None]
    assert masters[0].slave_ids == [1, 2] and [r[1].pipe.copy_id for r in replicas[1:]] == [1, 2]


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))])
def test_a_patched_data_parallel_can_be_copied(clone):
    dp = patch(nn.DataParallel(nn.Linear(2, 2)))
    twin = clone(dp)
    wrapper = twin.__dict__["replicate"]
    assert wrapper is not dp.__dict__["replicate"]
    assert wrapper.replicate.__self__ is twin  # the copy wraps its own replicate
    assert patch(twin) is twin and twin.__dict__["replicate"] is wrapper


# ---------------------------------------------------------------------------------------------------------------
# A SyncMaster kept by the layer across forwards (the established library's pattern)
# ---------------------------------------------------------------------------------------------------------------


class PersistentBatchSum(BatchSum):
    """BatchSum whose one SyncMaster lives on the layer and serves every replication."""

    def __init__(self, use_barrier: bool = True) -> None:
        super().__init__()
        self.use_barrier = use_barrier
        self.persistent_master = syncbn_ext.SyncMaster(_sum_messages, timeout=1.0)

    def __data_parallel_replicate__(self, ctx, copy_id):
        self.hook_calls.append(copy_id)
        self.copy_id = copy_id
        if copy_id == 0:
            self.persistent_master.reset()  # a new replication, maybe with fewer copies than the last
            self.master = ctx.sync_master = self.persistent_master
        else:
            self.pipe = ctx.sync_master.register_slave(copy_id)

    def forward(self, x):
        return super().forward(x) if self.use_barrier else x


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


@needs_two_gpus
def test_gpu_patched_data_parallel():
    bs = BatchSum()
    dp = patch(nn.DataParallel(nn.Sequential(nn.Linear(6, 5), bs).cuda(), device_ids=[0, 1]))
    out = call_with_timeout(dp, torch.zeros(10, 6, device="cuda"))
    assert out.device == torch.device("cuda", 0) and bs.hook_calls == [0, 1]
    assert sorted(bs.passes) == [(0, 5, 10), (1, 5, 10)]
