"""DataParallelWithCallback, CPU replicas and patch()."""

from __future__ import annotations

import collections
import copy
import dataclasses
import io
import pickle
import warnings

import pytest
import torch
from batchnorm_cases import cpu_dp
from hang_guard import call_with_timeout
from replica_faults import RaiseOnMarker
from replica_modules import BatchSum, PersistentBatchSum
from torch import nn

import syncbn_ext
from syncbn_ext import DataParallelWithCallback


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


@dataclasses.dataclass
class _Batch:
    x: torch.Tensor


class _Options:
    def __init__(self) -> None:
        self.class_weights = torch.ones(4)


class _TakesABatchObject(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, batch, options=None):
        return self.linear(batch.x if isinstance(batch, _Batch) else batch)


def test_an_object_holding_the_batch_passed_whole_to_every_replica_warns():
    # As torch.nn.parallel.scatter, objects other than tensors and containers go whole to every replica: on CPU
    # replicas nothing fails (on GPUs replica 1 would meet device 0's tensors), so each saw the whole batch silently.
    dp = DataParallelWithCallback(_TakesABatchObject(), device_ids=["cpu"] * 3)
    message = r"an input of type _Batch holds tensors \(one of shape \(6, 4\)\) .* so it is not split"
    with pytest.warns(UserWarning, match=message) as caught:
        y = dp(_Batch(torch.randn(6, 4)))  # (no synchronized layer: nothing to wait for)
    assert y.shape == (18, 4)  # what it warns of: every replica got all of it
    assert caught[0].filename == __file__  # the code calling the wrapper
    with pytest.warns(UserWarning, match="type _Batch holds tensors"):
        call_with_timeout(dp, torch.randn(6, 4), options=_Batch(torch.randn(6, 2)))  # as long as the batch split
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # Objects holding other tensors than the batch's (constants), and modules, pass whole without a word.
        call_with_timeout(dp, torch.randn(6, 4), options=_Options())
        call_with_timeout(dp, torch.randn(6, 4), options=nn.Linear(6, 6))


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


@pytest.mark.parametrize(
    ("device_ids", "message"),
    [
        (["cpu", "CPU"], r"device_ids\[1\] = 'CPU' is not a device \(Expected one of cpu, "),
        (["cpu", None], r"device_ids\[1\] = None is not a device \(of type NoneType, not an int, a device string "),
        ([1.5, "cpu"], r"device_ids\[0\] = 1.5 is not a device \(of type float, not "),
    ],
)
def test_an_entry_of_device_ids_that_is_no_device_is_named(device_ids, message):
    # (before: "mixes CPU and accelerator devices", sending the user looking for an accelerator)
    with pytest.raises(ValueError, match=message):
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


@needs_two_gpus
def test_gpu_replicas_synchronize_on_the_callers_streams():
    # Current streams are per thread: replica 1 copied the merged statistics from GPU 0 on GPU 0's default stream,
    # not on the caller's stream that computed them (kept busy here), and could read them before they were written.
    torch.manual_seed(0)
    layer = syncbn_ext.SynchronizedBatchNorm2d(3).double().cuda()
    reference = syncbn_ext.revert_model(copy.deepcopy(layer))
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64, device="cuda") * 3 + 1
    dp = DataParallelWithCallback(layer, device_ids=[0, 1])
    streams = [torch.cuda.Stream(device=i) for i in range(2)]
    torch.cuda.synchronize()

    def step():
        with torch.cuda.stream(streams[1]), torch.cuda.stream(streams[0]):
            torch.cuda._sleep(10**8)  # the caller's stream on GPU 0 is busy for a while
            y = dp(x)
        torch.cuda.synchronize()
        return y

    torch.testing.assert_close(call_with_timeout(step), reference(x))
    torch.testing.assert_close(layer.running_mean, reference.running_mean)
    torch.testing.assert_close(layer.running_var, reference.running_var)


def test_parallel_apply_without_devices_takes_each_replica_s_device_from_its_input(monkeypatch):
    # It took every replica for a CPU one (no device made current: all ran on GPU 0's context, on CPU threads' share).
    from syncbn_ext import parallel_apply as module

    assert module._input_device_index((torch.ones(1),), {}) is None
    assert module._input_device_index((), {"x": [1, (torch.ones(1),)]}) is None
    assert module._input_device_index((3, "a"), {}) is None
    # An accelerator's tensor (meta standing in for one here) gives its device index, wherever it is nested.
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda: torch.device("meta"))
    monkeypatch.setattr(torch.accelerator, "current_device_index", lambda: 0)
    assert module._input_device_index(([{"y": torch.empty(1, device="meta")}],), {}) == 0
    assert module._input_device_index((torch.ones(1), torch.empty(1, device="meta")), {}) is None  # the first's
    monkeypatch.undo()
    outputs = module.parallel_apply([nn.Identity(), nn.Identity()], [(torch.ones(1),), (torch.zeros(1),)])
    assert [o.item() for o in outputs] == [1.0, 0.0]


def test_a_wrapper_nested_in_another_s_replicas_is_an_error_and_one_of_one_device_is_the_module():
    # The inner wrapper replicated each outer replica's module, whose copies synchronized among themselves only:
    # BatchNorm over each outer replica's half of the batch, silently.
    torch.manual_seed(4)
    layer = syncbn_ext.SynchronizedBatchNorm2d(3).double()
    reference = syncbn_ext.revert_model(copy.deepcopy(layer))
    x = torch.randn(8, 3, 2, 2, dtype=torch.float64) * torch.arange(1, 9, dtype=torch.float64).view(8, 1, 1, 1)
    before = copy.deepcopy(layer.state_dict())
    nested = DataParallelWithCallback(DataParallelWithCallback(layer, device_ids=["cpu"] * 2), device_ids=["cpu"] * 2)
    with pytest.raises(RuntimeError, match=r"inside a replica of another wrapper \(nested wrappers\)") as raised:
        call_with_timeout(nested, x)
    assert "(raised in replica 0 on device cpu)" in raised.value.__notes__
    for name, value in layer.state_dict().items():
        assert torch.equal(value, before[name]), name
    # An inner wrapper of one device runs its module: its layers are the outer replicas' and see the whole batch.
    single = DataParallelWithCallback(DataParallelWithCallback(layer, device_ids=["cpu"]), device_ids=["cpu"] * 2)
    torch.testing.assert_close(call_with_timeout(single, x), reference(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.running_var, reference.running_var, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device_ids", ["cpu", torch.device("cpu"), 0])
def test_a_single_device_for_device_ids_is_refused(device_ids):
    # "cpu" was read as the devices 'c', 'p', 'u': nn.DataParallel's path, which here ran the module alone.
    with pytest.raises(TypeError, match=r"device_ids is a list of devices, one per replica \(e\.g\. \['cpu'\] \* 4"):
        DataParallelWithCallback(nn.Linear(2, 2), device_ids=device_ids)
