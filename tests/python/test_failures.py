"""No hangs, nothing silently wrong: failures, mismatched calls, timeouts and bad inputs under the wrapper."""

from __future__ import annotations

import concurrent.futures
import copy
import threading
import time

import pytest
import torch
from hang_guard import call_with_timeout
from replica_faults import (
    RaiseInCopy,
    UnprintableError,
    assert_state_unchanged,
    state_of,
    wait_for_replica_threads,
)
from replica_modules import CpuDataParallel
from torch import nn

import syncbn_ext
import syncbn_ext.parallel_apply
from syncbn_ext import DataParallelWithCallback, SynchronizedBatchNorm1d
from syncbn_ext.replica_workers import replica_threads_running

C = 3
MARKER = -12345.0


@pytest.fixture(autouse=True)
def long_barrier_timeout(monkeypatch):
    # Long enough that a copy woken only by the timeout would trip run()'s hang guard: a pass must fail by
    # abort or mismatch detection, at once.
    monkeypatch.setenv("SYNCBN_TIMEOUT", "120")


def run(module, *inputs):
    """module(*inputs), failing the test if it hangs: the output, or the exception it raised."""
    try:
        return call_with_timeout(module, *inputs)
    except Exception as error:  # handed to the test
        return error


def no_replica_threads_left():
    return not replica_threads_running()


def make_model(position):
    """Two synchronized layers with a RaiseInCopy(2) before, between or after them."""
    torch.manual_seed(0)
    layers = [
        nn.Linear(C, C).double(),
        SynchronizedBatchNorm1d(C).double(),
        nn.Tanh(),
        SynchronizedBatchNorm1d(C).double(),
    ]
    index = {"before": 0, "between": 3, "after": 4}[position]
    layers.insert(index, RaiseInCopy(2))
    return nn.Sequential(*layers)


@pytest.mark.parametrize("position", ["before", "between", "after"])
def test_a_failing_replica_raises_its_exception_and_the_next_forward_works(position):
    model = make_model(position)
    reference = syncbn_ext.revert_model(copy.deepcopy(model))
    initial = copy.deepcopy(model.state_dict())
    dp = DataParallelWithCallback(model, device_ids=["cpu"] * 4)
    x = torch.randn(8, C, dtype=torch.float64)
    error = run(dp, x)
    assert type(error) is KeyError, repr(error)
    assert error.__notes__ == ["(raised in replica 2 on device cpu)"]
    assert no_replica_threads_left()

    # A failed forward writes nothing to the model: parameters and every buffer as they were, also those of the
    # layers whose passes completed before the failure.
    state = model.state_dict()
    for name, value in initial.items():
        assert torch.equal(state[name], value), name

    # The next forward works and matches the whole-batch reference.
    next(m for m in model.modules() if isinstance(m, RaiseInCopy)).armed = False
    model.load_state_dict(initial)
    reference.load_state_dict(initial)
    x_ok = torch.randn(8, C, dtype=torch.float64)
    torch.testing.assert_close(run(dp, x_ok), reference(x_ok), rtol=1e-10, atol=1e-10)


class NoOutputForOneRow(nn.Module):
    """Returns nothing from the replica whose slice has one row: outputs the gather cannot join."""

    def __init__(self):
        super().__init__()
        self.bn = SynchronizedBatchNorm1d(C).double()

    def forward(self, x):
        y = self.bn(x)
        return None if x.shape[0] == 1 else y


@pytest.mark.parametrize("wrapper", ["serial_backward", "parallel_backward", "patched_subclass"])
def test_outputs_that_cannot_be_gathered_leave_the_model_untouched(wrapper):
    # Before, replica 0's buffers were written back before the gather: its error came with the running statistics
    # already updated.
    model = NoOutputForOneRow()
    before = state_of(model)
    if wrapper == "patched_subclass":
        dp = syncbn_ext.patch(CpuDataParallel(model, 4))
    else:
        dp = DataParallelWithCallback(model, ["cpu"] * 4, parallel_backward=wrapper == "parallel_backward")
    error = run(dp, torch.randn(7, C, dtype=torch.float64))  # 2, 2, 2 and 1 rows
    assert isinstance(error, TypeError), repr(error)
    assert_state_unchanged(model, before)
    assert run(dp, torch.randn(8, C, dtype=torch.float64)).shape == (8, C)
    assert model.bn.num_batches_tracked.item() == 1


class TwoViews(CpuDataParallel):
    """A subclass whose forward runs its replicas once per view (a siamese model), as ``nn.DataParallel``'s would."""

    def forward(self, a, b):
        return super().forward(a), super().forward(b)


class TwoViewsWithCallback(DataParallelWithCallback):
    """The same, derived from the wrapper."""

    def forward(self, a, b):
        return super().forward(a), super().forward(b)


@pytest.mark.parametrize("wrapper", ["patched_subclass", "wrapper_subclass"])
def test_a_forward_that_runs_its_replicas_twice_updates_the_statistics_twice(wrapper):
    # The second replication starts from the buffers the first wrote back: as one BatchNorm called on both views.
    # (The write-back waits for the end of the forward, or for the forward's next replication.)
    torch.manual_seed(0)
    model = SynchronizedBatchNorm1d(C).double()
    reference = syncbn_ext.revert_model(copy.deepcopy(model))
    if wrapper == "patched_subclass":
        dp = syncbn_ext.patch(TwoViews(model, 2))
    else:
        dp = TwoViewsWithCallback(model, ["cpu"] * 2)
    a, b = torch.randn(8, C, dtype=torch.float64), torch.randn(8, C, dtype=torch.float64) + 1
    outputs = run(dp, a, b)
    for output, expected in zip(outputs, (reference(a), reference(b)), strict=True):
        torch.testing.assert_close(output, expected, rtol=1e-10, atol=1e-10)
    assert model.num_batches_tracked.item() == 2
    torch.testing.assert_close(model.running_mean, reference.running_mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(model.running_var, reference.running_var, rtol=1e-10, atol=1e-10)


class RunsReplicasOnItsOwnThreads(DataParallelWithCallback):
    """A subclass with a parallel_apply of its own (CpuDataParallel's), which patch() supports for nn.DataParallel."""

    parallel_apply = CpuDataParallel.parallel_apply


class CallsTheLibrarysParallelApply(DataParallelWithCallback):
    def parallel_apply(self, replicas, inputs, kwargs):
        self.calls = getattr(self, "calls", 0) + 1
        return syncbn_ext.parallel_apply.parallel_apply(replicas, inputs, kwargs)


@pytest.mark.parametrize("subclass", [RunsReplicasOnItsOwnThreads, CallsTheLibrarysParallelApply])
@pytest.mark.parametrize("parallel_backward", [False, True])
def test_a_subclass_with_its_own_parallel_apply_updates_the_statistics_and_fails_fast(subclass, parallel_backward):
    # Before, its replicas' running statistics never reached the module, a failing replica left the others waiting
    # for SYNCBN_TIMEOUT (120 s here: the hang guard's failure), and with the parallel backward its parallel_apply
    # was not called at all.
    model = make_model("between")
    fault = next(m for m in model.modules() if isinstance(m, RaiseInCopy))
    fault.armed = False
    reference = syncbn_ext.revert_model(copy.deepcopy(model))
    dp = subclass(model, ["cpu"] * 4, parallel_backward=parallel_backward)
    for _ in range(2):
        x = torch.randn(8, C, dtype=torch.float64)
        torch.testing.assert_close(run(dp, x), reference(x), rtol=1e-10, atol=1e-10)
    for layer, expected in zip(batchnorms(model), batchnorms(reference), strict=True):
        assert layer.num_batches_tracked.item() == 2
        torch.testing.assert_close(layer.running_mean, expected.running_mean, rtol=1e-10, atol=1e-10)
    if subclass is CallsTheLibrarysParallelApply:
        assert dp.calls == 2

    fault.armed = True
    before = state_of(model)
    error = run(dp, torch.randn(8, C, dtype=torch.float64))
    if subclass is CallsTheLibrarysParallelApply:
        assert type(error) is KeyError, repr(error)
    else:  # its own threads raise the first error in replica order: a replica the failure's closing woke
        assert isinstance(error, syncbn_ext.BarrierAbortedError), repr(error)
        assert "replica 2 raised KeyError" in str(error)
    assert_state_unchanged(model, before)


def batchnorms(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class CallsTwiceOnMarker(nn.Module):
    """Calls its BatchNorm twice in the replica whose slice holds the marker: a call-count mismatch."""

    def __init__(self):
        super().__init__()
        self.bn = SynchronizedBatchNorm1d(C).double()

    def forward(self, x):
        y = self.bn(x.masked_fill(x == MARKER, 0.0))
        return self.bn(y) if (x == MARKER).any() else y


class ErrorWithoutAddNote(ValueError):
    """An exception as Python 3.10 has them: no ``add_note``."""

    def __getattribute__(self, name):
        if name == "add_note":
            raise AttributeError(name)
        return super().__getattribute__(name)


def test_before_python_3_11_the_replica_is_named_in_the_notes_all_the_same():
    model = nn.Sequential(RaiseInCopy(1, lambda: ErrorWithoutAddNote("bad slice")), SynchronizedBatchNorm1d(C))
    error = run(DataParallelWithCallback(model, device_ids=["cpu"] * 2), torch.randn(4, C))
    assert type(error) is ErrorWithoutAddNote and error.args == ("bad slice",)
    assert error.__notes__ == ["(raised in replica 1 on device cpu)"]


def test_a_replicas_exception_whose_str_raises_reaches_the_caller_as_itself():
    # The replication's close reason was formatted with str(error): its __str__'s RuntimeError replaced it.
    model = nn.Sequential(RaiseInCopy(1, UnprintableError), SynchronizedBatchNorm1d(C))
    error = run(DataParallelWithCallback(model, device_ids=["cpu"] * 2), torch.randn(4, C))
    assert type(error) is UnprintableError, repr(type(error))
    assert error.__notes__ == ["(raised in replica 1 on device cpu)"]
    assert no_replica_threads_left()


def test_replicas_calling_a_layer_a_different_number_of_times_get_an_error_naming_it():
    dp = DataParallelWithCallback(CallsTwiceOnMarker(), device_ids=["cpu"] * 3)
    x = torch.randn(6, C, dtype=torch.float64)
    x[3, 0] = MARKER  # replica 1
    error = run(dp, x)
    assert isinstance(error, syncbn_ext.BarrierError), repr(error)
    message = str(error)
    assert "finished its forward after 1 synchronized call(s)" in message
    assert "copy 1 made call 2" in message
    assert "layer 'bn: SynchronizedBatchNorm1d(3)' (synchronized call 2)" in message
    assert no_replica_threads_left()
    y = run(dp, torch.randn(6, C, dtype=torch.float64))  # and the next forward works
    assert y.shape == (6, C)


class ReshapesOnMarker(nn.Module):
    """One SyncBatchNorm(C): the replica whose slice (N, C, 2, 2) holds the marker gives it ``reshape(slice)``."""

    def __init__(self, reshape, **layer_arguments):
        super().__init__()
        self.norm, self.reshape = syncbn_ext.SyncBatchNorm(C, **layer_arguments).double(), reshape

    def forward(self, x):
        marked = bool((x == MARKER).any())
        return self.norm(self.reshape(x) if marked else x).reshape(-1, *x.shape[1:])


def test_replicas_may_give_a_layer_inputs_of_other_numbers_of_dimensions():
    # As ranks may: the statistics are per channel. (N, C, 2, 2) here, (N, C, 4) in the marked replica.
    x = torch.randn(4, C, 2, 2, dtype=torch.float64)
    x[3, 0, 0, 0] = MARKER
    model = ReshapesOnMarker(lambda part: part.flatten(2))
    reference = nn.BatchNorm2d(C).double()
    torch.testing.assert_close(run(DataParallelWithCallback(model, device_ids=["cpu"] * 2), x), reference(x))
    torch.testing.assert_close(model.norm.running_var, reference.running_var)


def test_replicas_giving_a_layer_other_numbers_of_channels_get_an_error_naming_it():
    # Possible without affine parameters or running statistics (nn.BatchNorm then takes any number of channels).
    x = torch.randn(6, C, 2, 2, dtype=torch.float64)
    x[5, 0, 0, 0] = MARKER  # replica 2's slice
    model = ReshapesOnMarker(lambda part: part[:, :2], affine=False, track_running_stats=False)
    error = run(DataParallelWithCallback(model, device_ids=["cpu"] * 3), x)
    assert isinstance(error, syncbn_ext.BarrierError)
    assert str(error).startswith(
        "layer 'norm: SyncBatchNorm(3)' (synchronized call 1): copy 2 has input of size torch.Size([2, 2, 2, 2]) "
        "but copy 0 has torch.Size([2, 3, 2, 2])"
    )
    assert "must have the same number of channels" in str(error)


class SwapsOrderOnMarker(nn.Module):
    """Calls a then b, or b then a in the replica whose slice holds the marker: an order mismatch."""

    def __init__(self):
        super().__init__()
        self.a = SynchronizedBatchNorm1d(C).double()
        self.b = SynchronizedBatchNorm1d(C).double()

    def forward(self, x):
        clean = x.masked_fill(x == MARKER, 0.0)
        if (x == MARKER).any():
            return self.a(self.b(clean))
        return self.b(self.a(clean))


def test_replicas_calling_layers_in_a_different_order_get_an_error_not_mixed_statistics():
    model = SwapsOrderOnMarker()
    before = state_of(model)
    dp = DataParallelWithCallback(model, device_ids=["cpu"] * 2)
    x = torch.randn(4, C, dtype=torch.float64)
    x[3, 2] = MARKER  # replica 1
    error = run(dp, x)
    assert isinstance(error, syncbn_ext.BarrierError), repr(error)
    message = str(error)
    assert "different order or number of times" in message
    assert "copy 0 is at layer 'a: SynchronizedBatchNorm1d(3)' (synchronized call 1)" in message
    assert "copy 1 is at layer 'b: SynchronizedBatchNorm1d(3)' (synchronized call 1)" in message
    assert_state_unchanged(model, before)  # no statistics were paired across layers


class BranchesInThreads(nn.Module):
    """Runs two synchronized layers at once, on threads of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = SynchronizedBatchNorm1d(C).double(), SynchronizedBatchNorm1d(C).double()
        self.pool = concurrent.futures.ThreadPoolExecutor(2)

    def forward(self, x):
        first, second = self.pool.submit(self.a, x), self.pool.submit(self.b, x)
        return first.result(timeout=60) + second.result(timeout=60)


def test_layers_called_from_threads_of_the_forwards_own_are_refused_alike_every_time():
    # Before: calls paired at random (errors naming no cause, or a parallel backward waiting crosswise until the
    # timeout); now every such call is refused, in every replica, before any pass.
    model = BranchesInThreads()
    before = state_of(model)
    dp = DataParallelWithCallback(model, device_ids=["cpu"] * 2)
    try:
        for _ in range(5):
            error = run(dp, torch.randn(4, C, dtype=torch.float64))
            assert isinstance(error, RuntimeError), repr(error)
            assert "was called from a thread other than the one running replica" in str(error), str(error)
            assert_state_unchanged(model, before)
        # Alone, the layers are nn.BatchNorm: any thread will do.
        x = torch.randn(4, C, dtype=torch.float64)
        torch.testing.assert_close(model(x), 2 * nn.BatchNorm1d(C).double()(x))
    finally:
        model.pool.shutdown()


class SlowOnMarker(nn.Module):
    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds

    def forward(self, x):
        if (x == MARKER).any():
            threading.Event().wait(self.seconds)
        return x.masked_fill(x == MARKER, 0.0)


def test_timeout_names_the_layer_that_waited_and_the_missing_copies(monkeypatch):
    monkeypatch.setenv("SYNCBN_TIMEOUT", "0.3")
    model = nn.Sequential(SlowOnMarker(2.5), SynchronizedBatchNorm1d(C).double())
    before = state_of(model)
    dp = DataParallelWithCallback(model, device_ids=["cpu"] * 3)
    x = torch.randn(6, C, dtype=torch.float64)
    x[5, 0] = MARKER  # replica 2 arrives late
    start = time.monotonic()
    error = run(dp, x)
    elapsed = time.monotonic() - start
    assert isinstance(error, syncbn_ext.BarrierTimeoutError), repr(error)
    message = str(error)
    assert "layer '1: SynchronizedBatchNorm1d(3)' (synchronized call 1)" in message
    assert "copies that never arrived: [2]" in message
    assert "SYNCBN_TIMEOUT" in message
    # The forward returned at the timeout plus the grace period, before the late replica woke: it was left behind.
    assert elapsed < 2.5, elapsed
    assert [t.name for t in replica_threads_running()] == ["syncbn-abandoned-replica-2"]
    # When it wakes, it can write nothing (its replication was closed), and its thread ends.
    wait_for_replica_threads(timeout=10)
    assert_state_unchanged(model, before)


def test_nan_and_inf_propagate_as_in_batch_norm():
    torch.manual_seed(1)
    ours = SynchronizedBatchNorm1d(C).double()
    ref = nn.BatchNorm1d(C).double()
    x = torch.randn(8, C, dtype=torch.float64)
    x[1, 0] = float("nan")
    x[6, 2] = float("inf")
    y = run(DataParallelWithCallback(ours, device_ids=["cpu"] * 4), x)
    expected = ref(x)
    torch.testing.assert_close(y, expected, equal_nan=True)
    torch.testing.assert_close(ours.running_mean, ref.running_mean, equal_nan=True)
    torch.testing.assert_close(ours.running_var, ref.running_var, equal_nan=True)


@pytest.mark.parametrize(
    "layer, bad_input",
    [
        (lambda: SynchronizedBatchNorm1d(C), lambda: torch.randn(8, C, 2, 2)),  # wrong dims
        (lambda: SynchronizedBatchNorm1d(C), lambda: torch.randn(8, C + 1)),  # wrong channel count
        (lambda: SynchronizedBatchNorm1d(C), lambda: torch.randn(8, C, dtype=torch.float64)),  # wrong dtype
    ],
)
def test_bad_inputs_raise_batch_norms_errors_without_hanging(layer, bad_input):
    ours = layer()
    ref = syncbn_ext.revert_model(copy.deepcopy(ours))
    x = bad_input()
    with pytest.raises(Exception) as expected:
        ref(x)
    error = run(DataParallelWithCallback(ours, device_ids=["cpu"] * 4), x)
    assert type(error) is type(expected.value), (error, expected.value)
    assert str(expected.value) == str(error)
    assert error.__notes__ == ["(raised in replica 0 on device cpu)"]  # every replica raised it; copy 0's is reported
    assert no_replica_threads_left()


def test_fewer_samples_than_replicas():
    torch.manual_seed(2)
    ours = SynchronizedBatchNorm1d(C).double()
    ref = nn.BatchNorm1d(C).double()
    x = torch.randn(3, C, dtype=torch.float64)
    torch.testing.assert_close(run(DataParallelWithCallback(ours, device_ids=["cpu"] * 8), x), ref(x))
    torch.testing.assert_close(ours.running_var, ref.running_var)
