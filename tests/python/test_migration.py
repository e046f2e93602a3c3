"""Migrating a model from the established library (Synchronized-BatchNorm-PyTorch, ``sync_batchnorm``): its layers
and wrapper converted to ours with their state, subclasses of its layers warned of, and overrides of its layers'
internals in subclasses of ours warned of (they would be ignored).

The established package is not installed here: a stand-in with its classes' names, places and state is made per
test (installed as ``sync_batchnorm`` or vendored into a project as ``<project>.sync_batchnorm``)."""

from __future__ import annotations

import copy
import sys
import types
import warnings

import pytest
import torch
from hang_guard import call_with_timeout
from torch import nn

import syncbn_ext
from syncbn_ext import DataParallelWithCallback, SyncBatchNorm, SynchronizedBatchNorm1d, SynchronizedBatchNorm2d

ESTABLISHED_BATCHNORM = '''
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm


class _SynchronizedBatchNorm(_BatchNorm):
    """The established layer's state: nn.BatchNorm's, and its own replication state (a barrier bound to it)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine)
        self._sync_master = ("its own barrier of", self)
        self._is_parallel = False
        self._parallel_id = None
        self._slave_pipe = None

    def forward(self, input):
        return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                            self.momentum, self.eps)

    def __data_parallel_replicate__(self, ctx, copy_id):
        raise AssertionError("the established layer's own replication ran")

    def _data_parallel_master(self, intermediates):
        raise AssertionError("the established layer's own master ran")


class SynchronizedBatchNorm1d(_SynchronizedBatchNorm):
    pass


class SynchronizedBatchNorm2d(_SynchronizedBatchNorm):
    pass
'''

ESTABLISHED_REPLICATE = """
from torch import nn


class DataParallelWithCallback(nn.DataParallel):
    def replicate(self, module, device_ids):
        raise AssertionError("the established wrapper's own replication ran")
"""


def _install(monkeypatch, package: str) -> tuple[types.ModuleType, types.ModuleType]:
    """The stand-ins of the established library's modules, as ``<package>.batchnorm`` and ``.replicate``."""
    made = []
    for name, source in (("batchnorm", ESTABLISHED_BATCHNORM), ("replicate", ESTABLISHED_REPLICATE)):
        module = types.ModuleType(f"{package}.{name}")
        monkeypatch.setitem(sys.modules, module.__name__, module)
        exec(compile(source, module.__name__, "exec"), module.__dict__)
        made.append(module)
    return made[0], made[1]


# Installed, vendored into a project, or vendored as CSAIL's semantic segmentation code does (its lib/nn/modules).
PACKAGES = ["sync_batchnorm", "project.lib.sync_batchnorm", "mit_semseg.lib.nn.modules"]


def _established_model(batchnorm: types.ModuleType) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        batchnorm.SynchronizedBatchNorm2d(4, momentum=None),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5),
        batchnorm.SynchronizedBatchNorm1d(5, eps=1e-3),
    ).double()
    for layer in (model[1], model[4]):
        layer.running_mean.uniform_(-1, 1)
        layer.weight.data.uniform_(0.5, 1.5)
    model[4].eval()
    return model


@pytest.mark.parametrize("package", PACKAGES)
def test_convert_model_makes_the_established_librarys_layers_ours_with_their_state(monkeypatch, package):
    batchnorm, _ = _install(monkeypatch, package)
    model = _established_model(batchnorm)
    reference = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=None), nn.Flatten(), nn.Linear(4 * 4 * 4, 5), nn.BatchNorm1d(5)
    ).double()
    reference[4].eps = 1e-3
    reference.load_state_dict(model.state_dict())
    reference[4].eval()
    tensors = {name: id(tensor) for name, tensor in model.state_dict(keep_vars=True).items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left behind to warn of
        converted = syncbn_ext.convert_model(model)
    assert converted is model
    assert (type(model[1]), type(model[4])) == (SynchronizedBatchNorm2d, SynchronizedBatchNorm1d)
    assert (model[1].momentum, model[4].eps, model[4].training) == (None, 1e-3, False)
    assert {name: id(tensor) for name, tensor in model.state_dict(keep_vars=True).items()} == tensors
    for layer in (model[1], model[4]):
        assert not {"_sync_master", "_is_parallel", "_parallel_id", "_slave_pipe"} & set(vars(layer))
    # Replicated: the whole batch's statistics.
    x = torch.randn(6, 3, 6, 6, dtype=torch.float64)
    out = call_with_timeout(DataParallelWithCallback(model, device_ids=["cpu"] * 2), x)
    torch.testing.assert_close(out, reference(x))
    torch.testing.assert_close(model.state_dict(), reference.state_dict())


@pytest.mark.parametrize("package", PACKAGES)
def test_convert_model_makes_the_established_librarys_wrapper_ours(monkeypatch, package):
    batchnorm, replicate = _install(monkeypatch, package)
    wrapped = replicate.DataParallelWithCallback(_established_model(batchnorm))
    wrapped.eval()
    converted = syncbn_ext.convert_model(wrapped)
    assert type(converted) is DataParallelWithCallback and not converted.training
    assert converted.device_ids == wrapped.device_ids and converted.module is wrapped.module
    assert type(converted.module[1]) is SynchronizedBatchNorm2d


def test_its_layers_training_on_cpu_replicas_unconverted_are_refused_saying_to_convert(monkeypatch):
    # Its master callback reduces on GPUs only: before, one replica raised an AssertionError from
    # torch.cuda.comm and the other stayed blocked in its queue, a thread left behind per forward.
    batchnorm, _ = _install(monkeypatch, "project.lib.sync_batchnorm")
    model = _established_model(batchnorm)  # model[1] trains, model[4] is in eval mode
    before = copy.deepcopy(model.state_dict())
    message = (
        r"DataParallelWithCallback: '1' is Synchronized-BatchNorm-PyTorch's SynchronizedBatchNorm2d "
        r"\(project.lib.sync_batchnorm.batchnorm\), whose synchronization runs on GPUs only; .*"
        r"model = syncbn_ext.convert_model\(model\)"
    )
    with pytest.raises(TypeError, match=message):
        DataParallelWithCallback(model, device_ids=["cpu"] * 2)(torch.randn(4, 3, 6, 6, dtype=torch.float64))
    torch.testing.assert_close(model.state_dict(), before, rtol=0, atol=0)
    converted = syncbn_ext.convert_model(model)  # as told
    DataParallelWithCallback(converted, device_ids=["cpu"] * 2)(torch.randn(4, 3, 6, 6, dtype=torch.float64))


def test_convert_sync_batchnorm_makes_the_established_librarys_layers_sync_batch_norm(monkeypatch):
    batchnorm, _ = _install(monkeypatch, "sync_batchnorm")
    model = _established_model(batchnorm)
    weight = model[1].weight
    syncbn_ext.SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(model[1]) is SyncBatchNorm and type(model[4]) is SyncBatchNorm and model[1].weight is weight


def test_subclasses_of_the_established_librarys_layers_are_left_and_warned_of(monkeypatch):
    # They keep its own synchronization (GPU only, no timeouts): converting them would drop what they add.
    batchnorm, _ = _install(monkeypatch, "sync_batchnorm")

    class FrozenStatistics(batchnorm.SynchronizedBatchNorm2d):
        pass

    model = nn.Sequential(FrozenStatistics(4), batchnorm.SynchronizedBatchNorm2d(4))
    with pytest.warns(UserWarning, match=r"left 1 layer\(s\) of Synchronized-BatchNorm-PyTorch's design.*'0'"):
        syncbn_ext.convert_model(model)
    assert type(model[0]) is FrozenStatistics and type(model[1]) is SynchronizedBatchNorm2d


def test_a_subclass_overriding_the_established_layers_internals_is_warned_that_they_are_ignored():
    with pytest.warns(UserWarning, match="defines _compute_mean_std, _data_parallel_master, method.*no effect"):

        class WrittenForTheEstablishedLayer(SynchronizedBatchNorm2d):
            def _compute_mean_std(self, sum_, ssum, size):
                raise AssertionError("never called")

            def _data_parallel_master(self, intermediates):
                raise AssertionError("never called")

    class EstablishedInternals:
        def _compute_mean_std(self, sum_, ssum, size):
            raise AssertionError("never called")

    with pytest.warns(UserWarning, match="ThroughAMixin defines _compute_mean_std"):

        class ThroughAMixin(EstablishedInternals, SynchronizedBatchNorm2d):
            pass

    with warnings.catch_warnings():
        warnings.simplefilter("error")

        class OwnForward(SynchronizedBatchNorm2d):
            def forward(self, input):
                return super().forward(input)

        class Further(WrittenForTheEstablishedLayer):  # told once, where the methods came
            pass

    x = torch.randn(4, 2, 3, 3)
    torch.testing.assert_close(WrittenForTheEstablishedLayer(2)(x), OwnForward(2)(x))
    torch.testing.assert_close(Further(2)(x), ThroughAMixin(2)(x))


SHIM_BATCHNORM = """
import syncbn_ext


class SynchronizedBatchNorm2d(syncbn_ext.SynchronizedBatchNorm2d):
    def forward(self, input):
        return super().forward(input) + 1


class Frozen(SynchronizedBatchNorm2d):
    pass
"""


def test_a_projects_shim_deriving_from_ours_under_the_established_name_is_left_as_it_is(monkeypatch):
    # A project keeping its vendored import path, its file now deriving from our layers: already ours.
    shim = types.ModuleType("project.sync_batchnorm.batchnorm")
    monkeypatch.setitem(sys.modules, shim.__name__, shim)
    exec(compile(SHIM_BATCHNORM, shim.__name__, "exec"), shim.__dict__)
    model = nn.Sequential(shim.SynchronizedBatchNorm2d(2), shim.Frozen(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        syncbn_ext.convert_model(model)
    assert (type(model[0]), type(model[1])) == (shim.SynchronizedBatchNorm2d, shim.Frozen)
