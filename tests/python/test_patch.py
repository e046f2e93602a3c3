"""patch() (patch_replication_callback): nn.DataParallel running the replication callbacks."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
import torch.distributed as dist
from batchnorm_cases import cpu_dp
from distributed_launch import initialized_alone
from hang_guard import call_with_timeout
from replica_modules import BatchSum, CpuDataParallel, SlowSynchronizedBatchNorm1d, forwards_from_threads
from torch import nn

from syncbn_ext import SynchronizedBatchNorm1d, patch, patch_replication_callback, replicate_on_cpu

# ---------------------------------------------------------------------------------------------------------------
# patch()
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="nn.DataParallel without an accelerator runs its module")
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
    assert wrapper.replicate.__self__ is twin  # the copy wraps its own replicate and forward
    assert twin.__dict__["forward"].forward.__self__ is twin
    assert patch(twin) is twin and twin.__dict__["replicate"] is wrapper


def test_patch_keeps_a_forward_the_user_set_on_the_instance_before():
    torch.manual_seed(0)
    dp = CpuDataParallel(SynchronizedBatchNorm1d(3).double(), 2)
    calls = []
    own_forward = dp.forward

    def logged_forward(*args, **kwargs):
        calls.append(len(args))
        return own_forward(*args, **kwargs)

    dp.forward = logged_forward  # a plain function, not a method of the instance
    patch(dp)
    x = torch.randn(6, 3, dtype=torch.float64)
    torch.testing.assert_close(call_with_timeout(dp, x), nn.BatchNorm1d(3).double()(x))
    assert calls == [1] and dp.module.num_batches_tracked.item() == 1


def test_a_patched_data_parallel_runs_training_forwards_from_several_threads_one_after_another():
    torch.manual_seed(0)
    bn = SlowSynchronizedBatchNorm1d(3, momentum=None).double()  # a cumulative average: the same in any order
    dp = patch(CpuDataParallel(bn, 2))
    batches = [torch.randn(6, 3, dtype=torch.float64) + i for i in range(24)]
    forwards_from_threads(dp, batches)
    # Replica 0's buffers are written back after each forward: at once, the forwards would overwrite each other's.
    assert bn.num_batches_tracked.item() == 24
    torch.testing.assert_close(bn.running_mean, torch.stack([x.mean(0) for x in batches]).mean(0))


needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")


@needs_two_gpus
def test_gpu_patched_data_parallel():
    bs = BatchSum()
    dp = patch(nn.DataParallel(nn.Sequential(nn.Linear(6, 5), bs).cuda(), device_ids=[0, 1]))
    out = call_with_timeout(dp, torch.zeros(10, 6, device="cuda"))
    assert out.device == torch.device("cuda", 0) and bs.hook_calls == [0, 1]
    assert sorted(bs.passes) == [(0, 5, 10), (1, 5, 10)]


def test_replicas_made_without_the_callbacks_warn_and_are_refused_across_processes(tmp_path):
    # A plain nn.DataParallel (GPUs) or torch.nn.parallel.replicate makes replicas (Module._replicate_for_data_parallel,
    # as replicate_on_cpu does) and runs no callback: each replica normalized its slice alone, silently.
    layer = SynchronizedBatchNorm1d(3)
    replica = replicate_on_cpu(layer, 2)[1]
    x = torch.randn(4, 3)
    with pytest.warns(
        RuntimeWarning,
        match=r"SynchronizedBatchNorm1d\(3\) #\d+ runs in a replica whose replication "
        "callbacks did not run .* syncbn_ext.patch",
    ) as caught:
        y = replica(x)
    assert caught[0].filename == __file__  # the code calling the layer, not torch's or ours
    torch.testing.assert_close(y, nn.BatchNorm1d(3)(x))  # its slice alone, as said
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        replica.eval()(x)  # running statistics: nothing to synchronize
        layer(x)  # not a replica
        detached = replicate_on_cpu(layer, 2, detach=True)[1]  # (a copy needs leaf parameters)
        copy.deepcopy(detached).train()(x)  # a copy of a replica is a layer of its own
        pickle.loads(pickle.dumps(detached))(x)
    # Across processes, each replica would exchange on its own: an error before any exchange (groups are used
    # while torch.distributed is initialized: here a world of one, and a group that says it has two ranks).
    across = replicate_on_cpu(SynchronizedBatchNorm1d(3, process_group=dist.ProcessGroup(0, 2)), 2)[0]
    with initialized_alone(tmp_path), pytest.raises(RuntimeError, match="replication callbacks did not run.*each"):
        across(x)
