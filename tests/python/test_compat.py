"""Nothing silently wrong: nn.BatchNorm's errors on the replicated path, tracing, scripting, exporting, torch's own
SyncBatchNorm, and the exceptions replicas raise (compiled modules: test_compiled.py)."""

from __future__ import annotations

import copy
import errno

import pytest
import torch
from hang_guard import call_with_timeout
from replica_faults import RaiseInCopy
from torch import nn
from torch.nn.utils import prune

import syncbn_ext
from syncbn_ext import (
    DataParallelWithCallback,
    SyncBatchNorm,
    SynchronizedBatchNorm1d,
    SynchronizedBatchNorm2d,
    SynchronizedBatchNorm3d,
)

C = 3


def outcome(fn, *args):
    """(exception type, message) of fn(*args), or (None, None)."""
    try:
        fn(*args)
    except Exception as error:
        return type(error), str(error)
    return None, None


def replicated(layer, replicas=2):
    return DataParallelWithCallback(layer, device_ids=["cpu"] * replicas)


# ---------------------------------------------------------------------------------------------------------------
# nn.BatchNorm's errors, on the replicated path too
# ---------------------------------------------------------------------------------------------------------------

ERROR_CASES = {
    "eps zero": (dict(eps=0.0), lambda: torch.randn(6, C)),
    "eps negative": (dict(eps=-1e-3), lambda: torch.randn(6, C)),
    "eps zero, batch statistics in eval": (dict(eps=0.0, track_running_stats=False), lambda: torch.randn(6, C)),
    "wrong dimensions": ({}, lambda: torch.randn(6, C, 2, 2)),
    "wrong channel count": ({}, lambda: torch.randn(6, C + 1)),
    "wrong dtype": ({}, lambda: torch.randn(6, C, dtype=torch.float64)),
    "integer input": ({}, lambda: torch.ones(6, C, dtype=torch.long)),
    "one value per channel": ({}, lambda: torch.randn(1, C)),
    # (before: pybind11's dump of a C++ signature and of every argument, the whole batch included)
    "momentum a string": (dict(momentum="0.1"), lambda: torch.randn(6, C)),
    "momentum complex": (dict(momentum=0.1 + 0j), lambda: torch.randn(6, C)),
    "momentum a tensor of one element": (dict(momentum=torch.tensor([0.1])), lambda: torch.randn(6, C)),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
@pytest.mark.parametrize("replicas", [1, 2])
def test_replicated_layers_raise_nn_batchnorms_errors(case, replicas):
    options, make_input = ERROR_CASES[case]
    ours = SynchronizedBatchNorm1d(C, **options)
    reference = nn.BatchNorm1d(C, **options)
    if "eval" in case:
        ours.eval()
        reference.eval()
    x = make_input()
    expected_type, expected_message = outcome(reference, x)
    assert expected_type is not None, case
    error_type, message = outcome(call_with_timeout, replicated(ours, replicas), x)
    assert (error_type, message) == (expected_type, expected_message), case
    if ours.num_batches_tracked is not None:
        # Alone (one device) the layer is nn.BatchNorm, which counts the batch before it fails; replicated, a failed
        # forward writes nothing.
        expected = reference.num_batches_tracked.item() if replicas == 1 else 0
        assert ours.num_batches_tracked.item() == expected


@pytest.mark.parametrize("cls", [SynchronizedBatchNorm1d, SynchronizedBatchNorm2d, SynchronizedBatchNorm3d])
def test_constructor_errors_are_nn_batchnorms(cls):
    torch_cls = syncbn_ext.revert_model(cls(1)).__class__
    for args in [(0,), (-1,), ("3",)]:
        assert outcome(cls, *args)[0] is outcome(torch_cls, *args)[0], args


def test_clamp_mode_rejects_non_positive_eps_too():
    syncbn_ext.set_sbn_eps_mode("clamp")
    try:
        error_type, message = outcome(SynchronizedBatchNorm1d(C, eps=0.0), torch.randn(6, C))
        wrong_momentum = outcome(SynchronizedBatchNorm1d(C, momentum="0.1"), torch.randn(6, C))
    finally:
        syncbn_ext.set_sbn_eps_mode("plus")
    assert error_type is ValueError and message == "batch_norm eps must be positive during training, but got 0.0"
    assert wrong_momentum == outcome(nn.BatchNorm1d(C, momentum="0.1"), torch.randn(6, C))


@pytest.mark.parametrize("buffer", ["running_mean", "running_var"])
@pytest.mark.parametrize("eps_mode", ["plus", "clamp"])
@pytest.mark.parametrize("replicas", [1, 2])
def test_running_statistics_requiring_grad_are_refused_as_batchnorm_does(buffer, eps_mode, replicas):
    # torch's autograd refuses them while gradients are recorded (accepted replicated before: they trained).
    ours, reference = SynchronizedBatchNorm1d(C), nn.BatchNorm1d(C)
    for layer in (ours, reference):
        getattr(layer, buffer).requires_grad_()
    x = torch.randn(6, C)
    expected = outcome(reference, x)
    assert expected[0] is RuntimeError and "not differentiable with respect to argument" in expected[1]
    syncbn_ext.set_sbn_eps_mode(eps_mode)
    try:
        assert outcome(call_with_timeout, replicated(ours, replicas), x) == expected
        # (alone in the plus mode the layer is nn.BatchNorm, which counts the batch before it fails)
        counted = reference.num_batches_tracked.item() if replicas == 1 and eps_mode == "plus" else 0
        assert ours.num_batches_tracked.item() == counted
        # As torch's: nothing to refuse without gradients (the call runs in a thread of its own: its grad mode).
        without_grad = torch.no_grad()(replicated(ours, replicas))
        expected = torch.no_grad()(reference)(x)  # (the clamp mode's eps differs by ~eps / var)
        torch.testing.assert_close(call_with_timeout(without_grad, x), expected, rtol=1e-4, atol=1e-4)
    finally:
        syncbn_ext.set_sbn_eps_mode("plus")


@pytest.mark.parametrize("eps_mode", ["plus", "clamp"])
@pytest.mark.parametrize("replicas", [1, 2])
def test_a_weight_of_the_right_size_but_not_1d_is_refused_before_anything_is_written(eps_mode, replicas):
    # (torch's forward takes it, its backward refuses it; ours refused it with a message about broadcasting, and
    # the layer alone in the clamp mode had written its running statistics first.)
    layer = SynchronizedBatchNorm2d(4)
    layer.weight = nn.Parameter(torch.ones(2, 2))
    x = torch.randn(6, 4, 3, 3)
    syncbn_ext.set_sbn_eps_mode(eps_mode)
    try:
        if replicas == 1 and eps_mode == "plus":  # nn.BatchNorm itself
            assert outcome(layer, x) == outcome(nn.BatchNorm2d(4), x) == (None, None)
            return
        with pytest.raises(RuntimeError, match=r"weight should be a 1-D tensor of 4 elements .*shape \[2, 2\]"):
            call_with_timeout(replicated(layer, replicas), x)
    finally:
        syncbn_ext.set_sbn_eps_mode("plus")
    assert layer.num_batches_tracked.item() == 0 and not layer.running_mean.any() and layer.running_var.eq(1).all()


@pytest.mark.parametrize("eps", [float("nan"), float("inf")])
@pytest.mark.parametrize("eps_mode", ["plus", "clamp"])
def test_nan_and_infinite_eps_give_nn_batchnorms_result_replicated_too(eps, eps_mode):
    # torch refuses eps <= 0 only: a NaN eps normalizes to NaN, an infinite one to zeros; the statistics are kept.
    torch.manual_seed(0)
    ours, reference = SynchronizedBatchNorm1d(C, eps=eps).double(), nn.BatchNorm1d(C, eps=eps).double()
    x = torch.randn(6, C, dtype=torch.float64) * 2 + 1
    syncbn_ext.set_sbn_eps_mode(eps_mode)
    try:
        got = call_with_timeout(replicated(ours), x)
    finally:
        syncbn_ext.set_sbn_eps_mode("plus")
    torch.testing.assert_close(got, reference(x), equal_nan=True)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(reference, name))


# ---------------------------------------------------------------------------------------------------------------
# Tracing, exporting, scripting
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def clamp_mode():
    syncbn_ext.set_sbn_eps_mode("clamp")
    yield
    syncbn_ext.set_sbn_eps_mode("plus")


def test_tracing_in_the_clamp_mode_with_batch_statistics_is_a_clear_error(clamp_mode):
    layer = SynchronizedBatchNorm2d(C)
    with pytest.raises(RuntimeError, match="cannot be traced or exported.*clamp eps mode"):
        torch.jit.trace(layer, torch.randn(4, C, 3, 3), check_trace=False)
    assert layer.num_batches_tracked.item() == 0


def test_exporting_in_the_clamp_mode_with_batch_statistics_is_a_clear_error(clamp_mode):
    with pytest.raises(Exception, match="cannot be traced or exported.*clamp eps mode"):
        torch.export.export(SynchronizedBatchNorm2d(C), (torch.randn(4, C, 3, 3),))


def test_the_tracing_error_advises_only_what_would_work(clamp_mode):
    # A layer without running statistics normalizes with batch statistics in eval mode too: before, the first
    # advice was to trace in eval mode; and a reverted copy gives nn.BatchNorm's numbers, not the clamp mode's.
    tracked = SynchronizedBatchNorm2d(C)
    with pytest.raises(RuntimeError) as caught:
        torch.jit.trace(tracked, torch.randn(4, C, 3, 3), check_trace=False)
    advice = str(caught.value).split("C++ to the tracer. ")[1]
    assert advice.startswith("Trace or export in eval mode (running statistics")
    assert "use set_sbn_eps_mode('plus')" in advice and "1/sqrt(var + eps), not the 'clamp' mode's numbers" in advice
    untracked = SynchronizedBatchNorm2d(C, track_running_stats=False).eval()
    with pytest.raises(RuntimeError) as caught:
        torch.jit.trace(untracked, torch.randn(4, C, 3, 3), check_trace=False)
    advice = str(caught.value).split("C++ to the tracer. ")[1]
    assert advice.startswith("Use set_sbn_eps_mode('plus'), or revert_model() a copy") and "eval mode" not in advice


@pytest.mark.parametrize("eps_mode", ["plus", "clamp"])
def test_tracing_and_exporting_in_eval_give_the_eager_result(eps_mode):
    syncbn_ext.set_sbn_eps_mode(eps_mode)
    try:
        torch.manual_seed(0)
        layer = SynchronizedBatchNorm2d(C)
        layer(torch.randn(8, C, 3, 3) * 2 + 1)  # some running statistics
        layer.eval()
        x = torch.randn(4, C, 3, 3)
        torch.testing.assert_close(torch.jit.trace(layer, x)(x), layer(x))
        torch.testing.assert_close(torch.export.export(layer, (x,)).module()(x), layer(x))
    finally:
        syncbn_ext.set_sbn_eps_mode("plus")


def test_tracing_a_lone_layer_in_training_gives_nn_batchnorms_trace():
    layer = SynchronizedBatchNorm2d(C)
    reference = nn.BatchNorm2d(C)
    x = torch.randn(4, C, 3, 3)
    traced = torch.jit.trace(layer, x, check_trace=False)
    x2 = torch.randn(5, C, 3, 3) * 3
    torch.testing.assert_close(traced(x2), reference(x2))


@pytest.mark.parametrize("training", [True, False])
def test_tracing_or_exporting_the_wrapper_of_cpu_replicas_is_a_clear_error(training):
    # In training, tracing a synchronized layer on the replicas' worker threads crashed the process (a stack
    # overflow); in eval, torch's own errors said nothing of the wrapper.
    model = nn.Sequential(nn.Conv2d(C, C, 1), SynchronizedBatchNorm2d(C)).train(training)
    dp = replicated(model, 2)
    x = torch.randn(6, C, 4, 4)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="with 2 CPU replicas cannot be traced or exported.*its .module"):
        torch.jit.trace(dp, (x,), check_trace=False)
    with pytest.raises(Exception, match="with 2 CPU replicas cannot be traced or exported"):
        torch.export.export(dp, (x,))
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
    torch.testing.assert_close(torch.jit.trace(dp.module.eval(), (x,))(x), model(x))  # what the error says works


def test_make_fx_or_fake_tensors_around_the_wrapper_or_a_clamped_layer_is_a_clear_error(clamp_mode):
    # make_fx recorded each replica's statistics and normalization but not the merge (C++, through the barrier):
    # the graph read uninitialized tensors where the merged statistics belong, and its replay wrote them to the
    # model. Under FakeTensorMode the replicas raised a different internal error each run.
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    model = nn.Sequential(nn.Linear(C, C), SynchronizedBatchNorm1d(C))
    dp = replicated(model, 2)
    x = torch.randn(8, C)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="with 2 CPU replicas cannot be traced or exported"):
        make_fx(lambda t: dp(t))(x)
    with pytest.raises(RuntimeError, match="cannot be traced or exported.*clamp eps mode"):
        make_fx(lambda t: model(t))(x)  # a lone layer in the clamp mode: our C++ path too
    with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(RuntimeError, match="cannot be traced"):
        dp(x)
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name


def test_torch_func_through_the_wrapper_chooses_the_serial_backward_or_says_what_to_do():
    # The parallel backward (chosen when the replicas have fewer intra-op threads than there are of them) failed
    # under torch.func with torch's message about an autograd.Function's setup_context, naming nothing of ours.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(C, 6), nn.Tanh(), nn.Linear(6, 3))
    x = torch.randn(8, C)
    expected = torch.func.grad(lambda t: model(t).pow(2).sum())(x)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dp = replicated(model, 2)  # parallel_backward=None
        torch.testing.assert_close(torch.func.grad(lambda t: dp(t).pow(2).sum())(x), expected)
        dp.parallel_backward = True
        with pytest.raises(RuntimeError, match=r"parallel_backward=True\) cannot run under torch.func transforms"):
            torch.func.grad(lambda t: dp(t).pow(2).sum())(x)
    finally:
        torch.set_num_threads(threads)


def test_scripting_is_a_clear_error_that_says_what_to_do():
    model = nn.Sequential(nn.Linear(C, C), SynchronizedBatchNorm1d(C))
    with pytest.raises(RuntimeError, match=r"torch.jit.script does not support SynchronizedBatchNorm1d(.|\n)*revert"):
        torch.jit.script(model)
    assert isinstance(model[1], SynchronizedBatchNorm1d)  # the model was left as it was
    scripted = torch.jit.script(syncbn_ext.revert_model(copy.deepcopy(model)))
    x = torch.randn(4, C)
    model.eval()
    scripted.eval()
    torch.testing.assert_close(scripted(x), model(x))
    # SyncBatchNorm reverts to torch's nn.SyncBatchNorm by default, which TorchScript cannot compile: the message
    # gives the argument that makes it an nn.BatchNormNd, and following it works, whichever layer TorchScript meets
    # first (each layer's message is its own: here a SynchronizedBatchNorm2d's).
    model = nn.Sequential(
        nn.Conv2d(3, C, 1), SynchronizedBatchNorm2d(C), nn.Conv2d(C, C, 1), syncbn_ext.SyncBatchNorm(C)
    ).eval()
    with pytest.raises(
        RuntimeError,
        match=r"BatchNorm2d(.|\n)*revert_model\(copy.deepcopy\(model\), sync_batch_norm_as=nn.BatchNorm2d\)",
    ):
        torch.jit.script(model)
    scripted = torch.jit.script(syncbn_ext.revert_model(copy.deepcopy(model), sync_batch_norm_as=nn.BatchNorm2d))
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(scripted(x), model(x))


@pytest.mark.parametrize(
    ("layer_type", "shape"),
    [
        (SynchronizedBatchNorm1d, (8, C)),
        (SynchronizedBatchNorm2d, (8, C, 4, 4)),
        (SynchronizedBatchNorm3d, (8, C, 2, 3, 3)),
        (SyncBatchNorm, (8, C, 5)),
    ],
)
def test_fx_symbolic_tracing_keeps_the_layer_as_one_call_module_node(layer_type, shape):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Identity(), layer_type(C), nn.ReLU())
    reference = syncbn_ext.revert_model(copy.deepcopy(model))  # nn.BatchNorm: a leaf to torch.fx
    traced = torch.fx.symbolic_trace(model)
    layer_nodes = [n for n in traced.graph.nodes if n.op == "call_module" and n.target == "1"]
    assert len(layer_nodes) == 1 and isinstance(traced.get_submodule("1"), layer_type)
    assert [n.op for n in traced.graph.nodes] == [n.op for n in torch.fx.symbolic_trace(reference).graph.nodes]

    # The GraphModule keeps the layer, synchronization included: replicated, it normalizes the whole batch.
    x = torch.randn(shape, dtype=torch.float64) * 2 + 1
    traced.double()
    reference.double()
    out = call_with_timeout(replicated(traced, 2), x)
    torch.testing.assert_close(out, reference(x))
    torch.testing.assert_close(model[1].running_mean, reference[1].running_mean)
    torch.testing.assert_close(model[1].running_var, reference[1].running_var)


def test_fx_symbolic_tracing_leaves_the_layers_hooks_to_run_time_as_nn_batchnorms():
    # The layer is one call_module node before its hooks run, as nn.BatchNorm (a leaf) is. Before, FX recorded the
    # hooks into the graph (a module from outside torch.nn) and the node ran them again: each hook twice, silently;
    # a pruning pre-hook left the original model's weight a Proxy.
    def hooked(model: nn.Module) -> tuple[nn.Module, list[str]]:
        calls = []
        norm = model[1]
        norm.register_forward_pre_hook(lambda module, args: (calls.append("pre") or args[0] + 1.0,))
        norm.register_forward_hook(lambda module, args, out: calls.append("forward") or out * 2)
        norm.register_full_backward_hook(lambda module, grad_in, grad_out: calls.append("backward"))
        prune.l1_unstructured(norm, "weight", amount=1)
        return model, calls

    torch.manual_seed(0)
    x = torch.randn(8, C, 4, 4)
    for train in (True, False):
        model = nn.Sequential(nn.Conv2d(C, C, 1), SynchronizedBatchNorm2d(C), nn.ReLU()).train(train)
        reference, reference_calls = hooked(syncbn_ext.revert_model(copy.deepcopy(model)))
        model, calls = hooked(model)
        traced = torch.fx.symbolic_trace(model)
        reference_traced = torch.fx.symbolic_trace(reference)
        assert type(model[1].weight) is torch.Tensor  # the pruning hook did not run on a Proxy
        assert [(n.op, n.target) for n in traced.graph.nodes] == [
            (n.op, n.target) for n in reference_traced.graph.nodes
        ]
        assert calls == [] and reference_calls == []  # no hook ran while tracing
        traced(x).sum().backward()
        reference_traced(x).sum().backward()
        assert calls == reference_calls == ["pre", "forward", "backward"]
        traced.eval()
        reference.eval()
        torch.testing.assert_close(traced(x), reference(x))


# ---------------------------------------------------------------------------------------------------------------
# torch's own nn.SyncBatchNorm, and our drop-in for it
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(8, C), (8, C, 5), (8, C, 4, 4), (8, C, 2, 3, 3)])
def test_convert_model_turns_torchs_sync_batchnorm_into_ours_with_its_state(shape):
    torch.manual_seed(0)
    torch_layer = nn.SyncBatchNorm(C, momentum=None).double()
    with torch.no_grad():
        torch_layer.weight.uniform_(0.5, 1.5)
        torch_layer.running_mean.uniform_(-1, 1)
    torch_layer.num_batches_tracked += 3
    weight = torch_layer.weight
    reference = nn.BatchNorm1d(C, momentum=None).double() if len(shape) < 4 else None
    state = copy.deepcopy(torch_layer.state_dict())
    model = nn.Sequential(torch_layer)
    converted = syncbn_ext.convert_model(model)
    layer = converted[0]
    assert type(layer) is SyncBatchNorm and layer.weight is weight and layer.momentum is None
    for key, value in state.items():
        assert torch.equal(layer.state_dict()[key], value), key
    # Under the wrapper, the whole batch's statistics, whatever the input's dimensionality.
    x = torch.randn(*shape, dtype=torch.float64)
    y = call_with_timeout(replicated(converted, 3), x)
    ref = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape)](C, momentum=None)
    ref = ref.double()
    ref.load_state_dict(state)
    torch.testing.assert_close(y, ref(x))
    torch.testing.assert_close(layer.running_mean, ref.running_mean)
    assert layer.num_batches_tracked.item() == 4
    del reference


def test_sync_batchnorm_is_a_drop_in_for_torchs():
    ours, theirs = SyncBatchNorm(C, eps=1e-3, momentum=0.2, affine=False), nn.SyncBatchNorm(C, 1e-3, 0.2, False)
    assert repr(ours) == repr(theirs)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for bad in [torch.randn(4), torch.randn(4, 0, 2)]:
        assert outcome(ours, bad) == outcome(theirs, bad)


def test_convert_sync_batchnorm_converts_every_kind_of_batchnorm():
    model = nn.Sequential(
        nn.BatchNorm1d(C), nn.BatchNorm2d(C), nn.SyncBatchNorm(C), SynchronizedBatchNorm3d(C), nn.InstanceNorm2d(C)
    )
    weights = [m.weight for m in model[:4]]
    converted = SyncBatchNorm.convert_sync_batchnorm(model, process_group="group")
    assert [type(m) for m in converted] == [SyncBatchNorm] * 4 + [nn.InstanceNorm2d]
    assert [m.weight for m in converted[:4]] == weights
    assert all(m.process_group == "group" for m in converted[:4])


# ---------------------------------------------------------------------------------------------------------------
# Tensor subclasses
# ---------------------------------------------------------------------------------------------------------------


class Wrapped(torch.Tensor):
    """A ``__torch_dispatch__`` wrapper subclass without storage of its own, as tensor-subclass libraries make."""

    @staticmethod
    def __new__(cls, inner: torch.Tensor) -> Wrapped:
        return torch.Tensor._make_wrapper_subclass(
            cls, inner.shape, strides=inner.stride(), dtype=inner.dtype, device=inner.device
        )

    def __init__(self, inner: torch.Tensor) -> None:
        self.inner = inner

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        unwrap = lambda t: t.inner if isinstance(t, Wrapped) else t  # noqa: E731
        out = func(*torch.utils._pytree.tree_map(unwrap, args), **torch.utils._pytree.tree_map(unwrap, kwargs or {}))
        return torch.utils._pytree.tree_map(lambda t: Wrapped(t) if isinstance(t, torch.Tensor) else t, out)


def test_replicas_of_a_tensor_subclass_input_merge_through_the_ops_dispatcher():
    # The merge's CPU fast path reads plain tensors' memory; statistics of a subclass go through the ops (which
    # unwrap them), and the replicas still normalize with the whole batch's statistics.
    x = torch.randn(8, C, 5, dtype=torch.float64)
    layer = SynchronizedBatchNorm1d(C).double()
    reference = nn.BatchNorm1d(C).double()
    y = call_with_timeout(replicated(layer, 2), Wrapped(x), timeout=60)
    assert isinstance(y, Wrapped)
    torch.testing.assert_close(y.inner, reference(x))
    torch.testing.assert_close(layer.running_var, reference.running_var)


# ---------------------------------------------------------------------------------------------------------------
# A replica's exception reaches the caller as it was raised
# ---------------------------------------------------------------------------------------------------------------


class TwoArgumentError(Exception):
    def __init__(self, code: int, detail: str) -> None:
        super().__init__(code, detail)
        self.code = code
        self.detail = detail


@pytest.mark.parametrize(
    "make_error, check",
    [
        (lambda: TwoArgumentError(7, "seven"), lambda e: (e.code, e.detail, e.args) == (7, "seven", (7, "seven"))),
        (lambda: OSError(errno.ENOENT, "missing", "file.txt"), lambda e: (e.errno, e.filename) == (2, "file.txt")),
        (lambda: SystemExit(3), lambda e: e.code == 3),
    ],
)
def test_a_replicas_exception_is_re_raised_as_the_same_object_with_a_note(make_error, check):
    raised = []

    def make():
        raised.append(make_error())
        return raised[-1]

    dp = replicated(nn.Sequential(RaiseInCopy(1, make), SynchronizedBatchNorm1d(C)), 3)
    with pytest.raises(BaseException) as info:
        call_with_timeout(dp, torch.randn(6, C))
    assert info.value is raised[0]
    assert check(info.value)
    assert info.value.__notes__ == ["(raised in replica 1 on device cpu)"]
