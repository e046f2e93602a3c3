"""Compiled modules: replicating a torch.compile'd module, compiling the wrapper, and compiled models around a
synchronizing layer (Dynamo breaks the graph there); a process that never compiles never imports Dynamo."""

from __future__ import annotations

import collections
import copy
import functools
import sys
import threading

import child_processes
import pytest
import torch
from hang_guard import call_with_timeout
from torch import nn

import syncbn_ext
from syncbn_ext import (
    DataParallelWithCallback,
    SynchronizedBatchNorm1d,
)

C = 3


def replicated(layer, replicas=2):
    return DataParallelWithCallback(layer, device_ids=["cpu"] * replicas)


def test_replicating_a_compiled_module_matches_the_whole_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(C, C), SynchronizedBatchNorm1d(C), nn.ReLU(), nn.Linear(C, 2)).double()
    reference = syncbn_ext.revert_model(copy.deepcopy(model))
    compiled = torch.compile(model)
    dp = replicated(compiled, 2)
    x = torch.randn(8, C, dtype=torch.float64)
    y = call_with_timeout(dp, x, timeout=300)
    y_ref = reference(x)
    torch.testing.assert_close(y, y_ref)
    y.sum().backward()
    y_ref.sum().backward()
    for p, p_ref in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad)
    torch.testing.assert_close(model[1].running_mean, reference[1].running_mean)
    # The original compiled module was left intact (torch's replicate would have rewired it into itself).
    assert list(compiled._orig_mod) == list(model)
    torch.testing.assert_close(compiled(x), reference(x))


def two_steps_match_the_whole_batch(run, model: nn.Module, reference: nn.Module) -> torch.Tensor:
    """Two training steps of ``run`` (``model`` replicated, compiled somehow) against ``reference`` on the whole
    batch: the outputs, then the gradients. Returns the last batch."""
    for step in range(2):
        x = torch.randn(8, C, dtype=torch.float64) + step
        y = call_with_timeout(run, x, timeout=300)
        y_ref = reference(x)
        torch.testing.assert_close(y, y_ref)
        y.square().sum().backward()
        y_ref.square().sum().backward()
    for p, p_ref in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad)
    return x


def test_compiling_the_wrapper_matches_the_whole_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(C, C), SynchronizedBatchNorm1d(C), nn.ReLU(), nn.Linear(C, 2)).double()
    reference = syncbn_ext.revert_model(copy.deepcopy(model))
    compiled = torch.compile(replicated(model, 2))
    two_steps_match_the_whole_batch(compiled, model, reference)
    torch.testing.assert_close(model[1].running_mean, reference[1].running_mean)
    assert model[1].num_batches_tracked.item() == 2


class GraphRecorder:
    """A ``torch.compile`` backend that counts the functions called in the graphs it is given (and runs them as they
    are)."""

    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()  # replicas compile on their threads

    def __call__(self, graph_module, example_inputs):
        with self.lock:
            self.calls.update(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return graph_module.forward

    def count(self, name: str) -> int:
        with self.lock:
            return sum(n for target, n in self.calls.items() if name in target)


class LinearNormLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.norm, self.second = nn.Linear(C, C), SynchronizedBatchNorm1d(C), nn.Linear(C, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.norm(self.first(x)).relu())


def test_compiled_models_compile_around_a_synchronizing_layer(eps_mode):
    # A synchronizing forward is opaque to Dynamo (one graph break), not a reason to run the whole model eagerly.
    # Before, Dynamo took the layer's torch.func check for true, met its error, and gave up on the model's forward for
    # good: no graph compiled, and every later compile of that code skipped (fullgraph=True: "found no compiled
    # frames").
    torch._dynamo.reset()
    x = torch.randn(8, C, dtype=torch.float64)

    def model() -> nn.Module:
        return LinearNormLinear().double()  # not an nn.Sequential: Dynamo compiles no torch.nn container's frame

    eps_mode("clamp")
    lone = GraphRecorder()
    torch.compile(model(), backend=lone)(x).sum().backward()
    assert lone.count("linear") == 2, lone.calls  # the graphs before and after the layer
    eps_mode("plus")
    replicas = GraphRecorder()
    call_with_timeout(replicated(torch.compile(model(), backend=replicas), 2), x, timeout=300).sum().backward()
    assert replicas.count("linear") >= 2, replicas.calls
    # A lone layer in the default eps mode is nn.BatchNorm: the whole model is one graph.
    whole = GraphRecorder()
    torch.compile(model(), backend=whole, fullgraph=True)(x).sum().backward()
    assert whole.count("linear") == 2 and whole.count("batch_norm") == 1, whole.calls


NEVER_COMPILING = """
import sys
import torch
from torch import nn
import syncbn_ext

def loaded():
    return "torch._dynamo" in sys.modules

class LinearNormLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.norm, self.second = nn.Linear(3, 3), syncbn_ext.SynchronizedBatchNorm1d(3), nn.Linear(3, 2)

    def forward(self, x):
        return self.second(self.norm(self.first(x)).relu())

assert not loaded(), "import"
torch.manual_seed(0)
model = LinearNormLinear().double()
x = torch.randn(8, 3, dtype=torch.float64)
syncbn_ext.DataParallelWithCallback(model, device_ids=["cpu"] * 2)(x).sum().backward()
syncbn_ext.set_sbn_eps_mode("clamp")  # a lone layer synchronizing (its own statistics), opaque to Dynamo
eager = model(x)
assert not loaded(), "training"
graphs = []

def backend(graph_module, example_inputs):
    graphs.append(sum(node.op == "call_function" and "linear" in str(node.target) for node in graph_module.graph.nodes))
    return graph_module.forward

compiled = torch.compile(model, backend=backend)(x)
torch.testing.assert_close(compiled, eager)
assert sorted(graphs) == [1, 1], graphs  # compiled around the layer: one graph before it, one after
torch._dynamo.reset()  # (else the graphs above are reused)
try:
    torch.compile(model, backend=backend, fullgraph=True)(x)
    raise AssertionError("fullgraph=True compiled a synchronizing layer")
except torch._dynamo.exc.Unsupported as error:  # as torch.compiler.disable says it, with the reason
    assert "torch.compiler.disable" in str(error) and "merges its batch statistics" in str(error), error
print("ok")
"""

# torch._dynamo as another thread importing it leaves it meanwhile: in sys.modules, its modules not yet made.
DYNAMO_BEING_IMPORTED = """
import sys, types
import torch
import syncbn_ext
from syncbn_ext.replicate import _optimized_module_type

sys.modules["torch._dynamo"] = types.ModuleType("torch._dynamo")
assert _optimized_module_type() is None
assert "torch._dynamo.eval_frame" not in sys.modules
print("ok")
"""


def test_a_process_that_never_compiles_never_imports_dynamo_and_one_compiling_later_compiles_around_the_layer():
    # torch.compiler.disable imports torch._dynamo where it decorates: over a second of every import of this package
    # (and every process of a multi-process run), compiling or not. A process compiling after eager forwards still
    # gets its graphs around the synchronizing layer (a graph break at it, not Dynamo tracing it).
    result = child_processes.run([sys.executable, "-c", NEVER_COMPILING], timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout[-3000:] + result.stderr[-3000:]


def test_replicating_never_imports_dynamo_modules_another_thread_may_be_importing():
    # Before, replicating imported torch._dynamo.eval_frame once "torch._dynamo" was in sys.modules: while another
    # thread was importing Dynamo (its first torch.compile), both ran its half-made modules (an ImportError in both
    # threads, and every later compile of the process failing). The compiled-module class is looked up instead.
    result = child_processes.run([sys.executable, "-c", DYNAMO_BEING_IMPORTED], timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout[-3000:] + result.stderr[-3000:]


def test_replicating_a_module_compiled_in_place_matches_the_whole_batch():
    # Module.compile() keeps a compiled call bound to the module in its __dict__: copied as it is, every replica ran
    # the *original* module on its slice (its buffers written by every thread, its layers not synchronized).
    torch.manual_seed(0)
    model = LinearNormLinear().double()
    reference = syncbn_ext.revert_model(copy.deepcopy(model))
    recorder = GraphRecorder()
    model.compile(backend=recorder)
    dp = replicated(model, 2)
    x = two_steps_match_the_whole_batch(dp, model, reference)
    torch.testing.assert_close(model.norm.running_var, reference.norm.running_var)
    assert model.norm.num_batches_tracked.item() == 2
    assert recorder.count("linear") >= 2, recorder.calls  # the replicas ran compiled
    model.eval(), reference.eval()
    torch.testing.assert_close(model(x), reference(x))  # the original's own compiled call is intact


def test_a_compiled_call_whose_options_cannot_be_found_leaves_the_replicas_eager_with_a_warning():
    # A compiled call without torch.compile's context where this torch keeps it: the replicas run their own forward
    # eagerly (right, not compiled) rather than the original's.
    torch.manual_seed(0)
    model = LinearNormLinear().double()
    reference = syncbn_ext.revert_model(copy.deepcopy(model))
    model.__dict__["_compiled_call_impl"] = functools.partial(model._call_impl)
    x = torch.randn(8, C, dtype=torch.float64)
    with pytest.warns(UserWarning, match="cannot recompile the replicas of a LinearNormLinear.*run eagerly"):
        y = call_with_timeout(replicated(model, 2), x)
    torch.testing.assert_close(y, reference(x))
    torch.testing.assert_close(model.norm.running_mean, reference.norm.running_mean)
