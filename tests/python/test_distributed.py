"""Synchronization across processes: ranks on localhost (gloo), each with 1 or 2 CPU replicas, against one
nn.BatchNorm model on the global batch (float64). Failures across processes: test_distributed_failures.py."""

from __future__ import annotations

import os
import pickle
import re
import sys
from datetime import timedelta

import child_processes
import pytest
import torch
import torch.distributed as dist
from distributed_launch import (
    TOLERANCE,
    WORKER,
    assert_parity,
    collect,
    free_port,
    initialized_alone,
    launch,
    measures,
)

import syncbn_ext

pytestmark = pytest.mark.usefixtures("no_shared_memory_left_behind")


@pytest.mark.parametrize(
    "world, replicas, sizes, transport",
    [
        (2, 1, [3, 5], "shared_memory"),
        (2, 2, [4, 5], "shared_memory"),
        (3, 1, [3, 5, 0], "shared_memory"),  # uneven slices, an empty rank
        (3, 2, [2, 6, 0], "shared_memory"),
        (2, 1, [3, 5], "c10d"),
        (3, 2, [2, 6, 0], "c10d"),
        (3, [2, 1, 3], [4, 5, 3], "shared_memory"),  # machines with different numbers of devices
        (2, [3, 1], [4, 5], "c10d"),
    ],
)
def test_every_rank_matches_one_batchnorm_on_the_global_batch(tmp_path, world, replicas, sizes, transport):
    scenarios = ["parity", "ddp", "ddp_accumulate", "eval", "channels", "wide", "double_backward", "large_mean"]
    scenarios += ["subgroup"] if world == 3 else []
    results = launch(tmp_path, world, replicas, sizes, scenarios, transport=transport)
    for rank in range(world):
        for case, result in measures(results["parity"][rank]).items():  # both layers, momentum 0.1 and None
            assert_parity(result, steps=3), case
        # Running statistics; batch statistics (track_running_stats=False) with rank 0 evaluating alone, then a step.
        for case, error in measures(results["eval"][rank]).items():
            assert error < TOLERANCE, case
        channels = measures(results["channels"][rank])  # widths 3, 5, 3, 3; the middle two skipped at step 2
        assert_parity(channels, steps=5, tracked=[5, 4, 4, 5])
        # One exchange forward and one backward per synchronized call, through the transport asked for.
        other = "c10d" if transport == "shared_memory" else "shared_memory"
        assert channels["exchanges_per_step"] == {transport: 2 * 4, other: 0}
        assert channels["transport"] == {"shared_memory": "shared memory", "c10d": "process group"}[transport]
        # Rows too large for the shared-memory slots go through the group's backend, on every rank alike (their
        # sizes through shared memory first, where it is used).
        wide = measures(results["wide"][rank])
        assert wide["output"] < TOLERANCE and wide["running_var"] < TOLERANCE and wide["input_grad"] < TOLERANCE
        assert wide["exchanges_per_step"] == {"c10d": 2, "shared_memory": 2 if transport == "shared_memory" else 0}
        if sizes[rank] > 0:  # DistributedDataParallel needs a batch on every rank
            for case, result in measures(results["ddp"][rank]).items():  # the replicas' backward serial or not
                assert_parity(result, steps=2), case
            # Two micro-batches a step, the first in no_sync(): both counted by the running statistics.
            assert_parity(measures(results["ddp_accumulate"][rank]), steps=4)
        # float32 data of a large mean: the merge across processes keeps the local statistics' precision (float64),
        # at least nn.BatchNorm's own on the global batch (local means rounded to float32: 10x less precise).
        large_mean = measures(results["large_mean"][rank])
        ours, plain = large_mean["ours"], large_mean["nn.BatchNorm"]
        assert ours["var"] <= min(plain["var"], 1e-6) and ours["mean"] <= plain["mean"], large_mean
        # A gradient penalty through a merge across processes: its second derivatives too (an empty rank's as well).
        for quantity, error in measures(results["double_backward"][rank]).items():
            assert error < TOLERANCE, (quantity, error)
    if world == 3:  # a subgroup of ranks 0 and 1: rank 2 normalizes alone
        for rank in range(world):
            assert_parity(measures(results["subgroup"][rank]), steps=2)


@pytest.mark.parametrize("backend", ["gloo", "none", "cpu:gloo"])  # a gloo group whatever it was made with
def test_ddp_and_ranks_running_their_backward_differently_do_not_pair_our_exchanges_with_its_all_reduces(
    tmp_path, backend
):
    # Rank 0: the model itself (autograd's serial backward: DDP's bucket all-reduces start between our backward
    # all-gathers); rank 1: 2 replicas, parallel backward (they start after all of ours); several buckets; through
    # gloo. On one communicator the collectives paired up wrongly: every rank waited until the group's timeout.
    results = launch(
        tmp_path, 2, [1, 2], [3, 4], ["ddp_mixed_backward"], timeout=15.0, transport="c10d", backend=backend
    )
    for rank in range(2):
        result = measures(results["ddp_mixed_backward"][rank])
        assert_parity(result, steps=3)
        assert result["buckets"] > 2 and result["transport"] == "process group", result
        assert result["groups_registered"] == 0, result  # torch's registry (and its groups' names) untouched


@pytest.mark.parametrize("rendezvous", ["file", "tcp"])
def test_two_groups_first_used_from_two_threads_in_other_orders_on_the_ranks(tmp_path, rendezvous):
    # Each group's set-up of the layers' communicator waits for that group's ranks only: under one process-wide
    # lock, and over one shared TCPStore connection, each waited for the other until the timeout.
    results = launch(tmp_path, 2, 1, [3, 4], ["two_groups_in_threads"], timeout=10.0, rendezvous=rendezvous)
    for rank in range(2):
        for name, result in measures(results["two_groups_in_threads"][rank]).items():
            assert "error" not in result, (rank, name, result)
            assert_parity(result, steps=2)


def test_compiled_distributed_data_parallel_matches_one_batchnorm_on_the_global_batch(tmp_path):
    results = launch(tmp_path, 2, 1, [3, 5], ["ddp_compiled"], timeout=120.0)
    for rank in range(2):
        for way, result in measures(results["ddp_compiled"][rank]).items():  # compile(ddp), ddp(compile)
            assert_parity(result, steps=2), way


@pytest.mark.parametrize("world, sizes, transport", [(2, [3, 5], "shared_memory"), (3, [2, 6, 0], "c10d")])
def test_fully_sharded_data_parallel_matches_one_batchnorm_on_the_global_batch(tmp_path, world, sizes, transport):
    results = launch(tmp_path, world, 1, sizes, ["fsdp"], transport=transport, timeout=60.0)
    for rank in range(world):
        assert_parity(measures(results["fsdp"][rank]), steps=2)


@pytest.mark.parametrize("replicas, transport", [(1, "shared_memory"), (2, "c10d")])
def test_destroy_process_group_frees_a_group_our_layers_synchronized_over(tmp_path, replicas, transport):
    # Once DDP and the layers given the group are gone, nothing of ours holds it: destroy_process_group frees it
    # at once (no garbage collection), and gloo's threads for it end there, not at interpreter exit.
    results = launch(tmp_path, 2, replicas, [3, 4], ["released"], transport=transport)
    for rank in range(2):
        result = measures(results["released"][rank])
        assert_parity(result["parity"], steps=2)
        assert result["transport"] == {"shared_memory": "shared memory", "c10d": "process group"}[transport]
        assert result["freed"], result
        # Its threads, and as many for the layers' own communicator over its ranks (freed with it).
        assert result["group_threads"] > 0 and result["threads_ended"] == 2 * result["group_threads"], result


@pytest.mark.parametrize("replicas, transport", [([2, 1], "shared_memory"), ([1, 1], "c10d"), ([1, 2], "c10d")])
def test_checkpointed_blocks_match_the_global_batch_with_and_without_replicas_and_count_each_batch_once(
    tmp_path, replicas, transport
):
    # A layer alone in its process exchanged again when its checkpointed block was recomputed, where a replica reuses
    # its channel's statistics: with replicas on some ranks only, every step failed; on all ranks alike, each batch
    # was counted twice in the running statistics. checkpoint_after_failed_backward: a layer alone in its process
    # recalled a failed backward's call, or another forward's, at steps whose batch repeated it on that rank
    # (silently wrong). Its model: 3 steps (the first failed in backward), then 2 forwards before one backward.
    # checkpoint_stop_gradient_view: a call under torch.no_grad() in the block was exchanged again in backward.
    # checkpoint_selective: selective activation checkpointing (its replay failed on the layer's recomputation).
    scenarios = {
        "checkpoint": 2,
        "checkpoint_after_failed_backward": 5,
        "checkpoint_stop_gradient_view": 4,
        "checkpoint_selective": 2,
    }
    results = launch(tmp_path, 2, replicas, [4, 3], list(scenarios), transport=transport)
    for scenario, steps in scenarios.items():
        for rank in range(2):
            outcome = measures(results[scenario][rank])
            for quantity in ("output", "input_grad", "param_grad", "buffers"):
                assert outcome[quantity] < TOLERANCE, (scenario, quantity, outcome)
            assert outcome["buffers_equal_on_every_rank"] and outcome["num_batches_tracked"] == [steps], outcome


@pytest.mark.parametrize("replicas, transport", [([2, 1], "shared_memory"), ([2, 2], "c10d"), ([1, 2], "c10d")])
def test_gradients_of_some_parameters_pair_whatever_the_ranks_backward(tmp_path, replicas, transport):
    # With the parallel backward on some ranks only, asking for the BatchNorm weight's gradient alone made those
    # ranks exchange for the input's gradient, which the others' engines pruned: an error on one rank, or every rank
    # waiting for the group's timeout when a collective followed.
    results = launch(tmp_path, 2, replicas, [4, 3], ["some_parameters_grads"], transport=transport)
    for rank in range(2):
        outcome = measures(results["some_parameters_grads"][rank])
        assert outcome["grad_error"] < TOLERANCE and outcome["inputs_error"] < TOLERANCE, outcome
        assert outcome["others_untouched"], outcome
        assert outcome["buffers_equal_on_every_rank"] and outcome["num_batches_tracked"] == [3], outcome


@pytest.mark.parametrize("replicas, transport", [([2, 1], "shared_memory"), ([2, 2], "c10d")])
def test_gradients_of_some_parameters_where_a_replica_skips_a_layer(tmp_path, replicas, transport):
    # Rank 0's first replica skips the layer below the synchronized one. Asking for that layer's weight only, its
    # parallel backward task skipped the synchronized layer's merge (its share of the statistics' gradient missed
    # the others': wrong gradients); asking for the BatchNorm weight only, with that replica's statistics without
    # a graph, its task exchanged with the other ranks where their engines did not.
    results = launch(tmp_path, 2, replicas, [4, 3], ["some_parameters_below_a_skipped_layer"], transport=transport)
    for rank in range(2):
        outcome = measures(results["some_parameters_below_a_skipped_layer"][rank])
        assert all(error < TOLERANCE for error in outcome.values()), outcome


def test_the_input_gradient_alone_pairs_whatever_the_ranks_backward(tmp_path):
    # Asking for the input's gradient only, a rank with the parallel backward ran the merge of a layer whose
    # statistics lead to parameters only, which the other rank's engine pruned: an error naming a different order
    # of the layers, or a wait until the group's timeout.
    results = launch(tmp_path, 2, [2, 1], [4, 3], ["input_grad_only"])
    for rank in range(2):
        outcome = measures(results["input_grad_only"][rank])
        assert outcome["input_error"] < TOLERANCE and outcome["parameters_untouched"], outcome


def test_torchrun_with_two_nodes_on_one_machine(tmp_path):
    port = free_port()
    processes = []
    for node in (0, 1):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"]
        command += ["--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port)]
        command += [str(WORKER), "--replicas", "2", "--sizes", "3", "4", "--scenarios", "parity"]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        processes.append(child_processes.Child(command, env=env))
    results = collect(processes)
    assert sorted(results["parity"]) == [0, 1]
    for rank in (0, 1):
        for result in measures(results["parity"][rank]).values():
            assert_parity(result, steps=3)


def test_without_torch_distributed_sync_batchnorm_is_a_single_process_layer():
    assert not dist.is_initialized()
    assert syncbn_ext.cross_process_transport() == "none"
    layer = syncbn_ext.SyncBatchNorm(3)
    assert layer.sync_group() is None
    reference = torch.nn.BatchNorm1d(3)
    x = torch.randn(6, 3)
    torch.testing.assert_close(layer(x), reference(x))
    torch.testing.assert_close(layer.running_var, reference.running_var)
    # Our in-process layers ignore torch.distributed unless given a group.
    assert syncbn_ext.SynchronizedBatchNorm1d(3).sync_group() is None


def test_without_a_group_an_announcing_block_tells_nobody_and_passes_every_error_on_unchanged():
    # No process group (torch.distributed not initialized): nothing to tell, nothing waited for, no note added.
    assert not dist.is_initialized()
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), syncbn_ext.SyncBatchNorm(3))
    with syncbn_ext.announcing_failure(model):
        out = model(torch.randn(6, 4))
    assert out.shape == (6, 3)
    for raised in (ValueError("a bad batch"), KeyboardInterrupt()):
        with pytest.raises(type(raised)) as caught, syncbn_ext.announcing_failure(model):
            raise raised
        assert caught.value is raised and not getattr(caught.value, "__notes__", None)


def test_the_layers_communicator_follows_its_groups_timeout_and_names_it_once_destroyed(tmp_path):
    # Its own gloo group over the ranks kept the timeout of its set-up: raised later (torch's _set_pg_timeout, as
    # torchtitan does after a first step), a rank late by less than the new timeout failed our exchange only.
    from torch.distributed import distributed_c10d as c10d

    from syncbn_ext import distributed

    with initialized_alone(tmp_path, timeout=timedelta(seconds=3)):
        group = dist.group.WORLD
        own = distributed.exchange_group(group, "SyncBatchNorm(3)")
        ours = own._get_backend(torch.device("cpu"))
        assert ours.options._timeout == timedelta(seconds=3)
        c10d._set_pg_timeout(timedelta(seconds=30), group)
        assert distributed.exchange_group(group, "SyncBatchNorm(3)") is own
        assert ours.options._timeout == timedelta(seconds=30)
        # A group whose set-up failed, destroyed since: our error still (torch's get_backend refuses such a group).
        distributed._own_groups[group] = distributed._FailedSetUp("a rank never came")
        dist.destroy_process_group()
        failed = r"(?s)could not be set up \(a rank never came\).*gloo, destroyed"
        with pytest.raises(dist.DistBackendError, match=failed):
            distributed.exchange_group(group, "SyncBatchNorm(3)")


def test_a_layer_on_a_rank_outside_its_group_normalizes_alone_also_once_pickled():
    # new_group returns torch's marker on ranks outside the group (an int in torch 2.13): an unpickled layer holds
    # another object of the same value (torch.save, a spawned process), which is still "not a member".
    outside = pickle.loads(pickle.dumps(dist.GroupMember.NON_GROUP_MEMBER))
    layer = pickle.loads(pickle.dumps(syncbn_ext.SyncBatchNorm(3, process_group=dist.GroupMember.NON_GROUP_MEMBER)))
    assert layer.sync_group() is None and syncbn_ext.cross_process_transport(outside) == "none"
    x = torch.randn(6, 3)
    torch.testing.assert_close(layer(x), torch.nn.BatchNorm1d(3)(x))


class _PlaysRankZeroOfTwo(dist.ProcessGroup):
    """A group of this process alone that plays rank 0 of 2 (rank 1 sends what rank 0 sends), recording for each
    all-gather whether the calling thread held torch's per-backward Python object ("context") when it started."""

    def __init__(self) -> None:
        super().__init__(0, 2)
        self.held_python_objects: list[bool] = []

    def getBackendName(self) -> str:
        return "test"

    def allgather(self, output_tensors, input_tensors, opts=None):
        self.held_python_objects.append(torch._C._is_key_in_tls("context"))
        for output in output_tensors[0]:
            output.copy_(input_tensors[0])
        future = torch.futures.Future()
        future.set_result(output_tensors)
        return torch._C._distributed_c10d._create_work_from_future(future)


def test_our_collectives_start_without_the_python_objects_torch_keeps_in_the_thread(monkeypatch, tmp_path):
    # torch keeps a Python object in the thread's state during a backward, and a collective captures that state:
    # gloo's worker releases its copy a moment after the work completes, which aborts the process when it falls in
    # the interpreter's shutdown. Ours start without them (README's "Ending the script").
    monkeypatch.setenv("SYNCBN_SHARED_MEMORY", "0")  # the group's own all-gathers only
    with initialized_alone(tmp_path):
        _check_collectives_start_without_torchs_python_objects()


@pytest.mark.parametrize("value", ["0", "false", " Off ", "NO"])
def test_shared_memory_is_switched_off_by_any_usual_spelling_of_no(monkeypatch, tmp_path, value):
    monkeypatch.setenv("SYNCBN_SHARED_MEMORY", value)
    with initialized_alone(tmp_path):
        group = _PlaysRankZeroOfTwo()
        layer = syncbn_ext.SyncBatchNorm(3, process_group=group)
        layer(torch.randn(4, 3))
        assert syncbn_ext.cross_process_transport(group) == "process group"


def test_a_shared_memory_setting_that_is_no_yes_or_no_fails_every_rank_at_the_first_call(monkeypatch, tmp_path):
    # Not read as on or off silently; every rank says which ranks have it (here both rows are this rank's).
    monkeypatch.setenv("SYNCBN_SHARED_MEMORY", "maybe")
    with initialized_alone(tmp_path):
        group = _PlaysRankZeroOfTwo()
        layer = syncbn_ext.SyncBatchNorm(3, process_group=group)
        with pytest.raises(ValueError, match=r"SYNCBN_SHARED_MEMORY must be 1 .* on ranks 0, 1 \(here: 'maybe'\)"):
            layer(torch.randn(4, 3))


def _check_collectives_start_without_torchs_python_objects() -> None:
    group = _PlaysRankZeroOfTwo()
    layer = syncbn_ext.SyncBatchNorm(3, process_group=group)
    x = torch.randn(4, 3, 5, requires_grad=True)
    torch._C._stash_obj_in_tls("context", object())  # as a backward does, here around the forward too
    try:
        y = layer(x)
    finally:
        torch._C._remove_obj_from_tls("context")
    assert group.held_python_objects and not any(group.held_python_objects)
    forward_calls = len(group.held_python_objects)
    held_in_backward = []
    y.register_hook(lambda grad: held_in_backward.append(torch._C._is_key_in_tls("context")))
    torch._C._stash_obj_in_tls("context", object())  # torch 2.13 puts its own there for the backward anyway
    try:
        y.square().sum().backward()
    finally:
        if torch._C._is_key_in_tls("context"):
            torch._C._remove_obj_from_tls("context")
    assert held_in_backward == [True]
    assert len(group.held_python_objects) > forward_calls and not any(group.held_python_objects)
    # The statistics and gradients are those of the whole batch of both ranks (rank 1's slice a copy of rank 0's).
    x_reference = x.detach().clone().requires_grad_()
    reference = torch.nn.BatchNorm1d(3)
    out = reference(torch.cat([x_reference, x.detach()]))
    out.square().sum().backward()
    torch.testing.assert_close(y, out[:4])
    torch.testing.assert_close(x.grad, x_reference.grad)
    torch.testing.assert_close(layer.running_var, reference.running_var)


def test_once_torch_distributed_is_not_initialized_a_layer_given_a_group_normalizes_alone(tmp_path):
    # As torch's nn.SyncBatchNorm: after destroy_process_group() (a re-calibration of the statistics on one rank
    # after training), the layer no longer exchanges; it went on exchanging with the other ranks on the communicator
    # it held (waiting for them as long as they lived).
    group = _PlaysRankZeroOfTwo()
    layer = syncbn_ext.SyncBatchNorm(3, process_group=group)
    assert layer.sync_group() is None  # never initialized
    with initialized_alone(tmp_path):
        assert layer.sync_group() is group
    reference = torch.nn.BatchNorm1d(3)
    x = torch.randn(6, 3, 4)
    torch.testing.assert_close(layer(x), reference(x))
    torch.testing.assert_close(layer.running_var, reference.running_var)
    assert group.held_python_objects == []  # no collective
    assert syncbn_ext.cross_process_transport(group) == "none"


@pytest.mark.parametrize("wrong", [[0, 1], "gloo", 0, torch.tensor([0, 1])])
def test_a_process_group_that_is_no_group_is_a_type_error_naming_it(tmp_path, wrong):
    # (before: "AttributeError: 'list' object has no attribute 'size'" from inside the package)
    layer = syncbn_ext.SynchronizedBatchNorm2d(3, process_group=wrong)
    x = torch.randn(4, 3, 2, 2)
    with initialized_alone(tmp_path):
        message = (
            r"process_group must be a torch.distributed ProcessGroup \(e.g. dist.new_group\(ranks\)\) or None, "
            rf"got {re.escape(repr(wrong))} of type {type(wrong).__name__}"
        )
        with pytest.raises(TypeError, match=message):
            layer(x)
        with pytest.raises(TypeError, match="cross_process_transport: group " + message.removeprefix("process_group ")):
            syncbn_ext.cross_process_transport(wrong)
        assert layer.num_batches_tracked.item() == 0
        # An input SyncBatchNorm refuses: that error, not the group's, as with a group that is one.
        with pytest.raises(ValueError, match="expected at least 2D input"):
            syncbn_ext.SyncBatchNorm(3, process_group=wrong)(torch.randn(3))


class _TellsNothing(_PlaysRankZeroOfTwo):
    """A group whose collectives fail (a store or connection gone)."""

    def allgather(self, output_tensors, input_tensors, opts=None):
        raise RuntimeError("the connection is gone")


class _ErrorWithoutAddNote(ValueError):
    """An exception as Python 3.10 has them: no ``add_note``."""

    def __getattribute__(self, name):
        if name == "add_note":
            raise AttributeError(name)
        return super().__getattribute__(name)


@pytest.mark.parametrize("error_type", [ValueError, _ErrorWithoutAddNote])
def test_a_failed_forward_that_cannot_be_told_raises_its_own_error_with_a_note_saying_so(tmp_path, error_type):
    # Before, on Python 3.10 (no add_note), the note's AttributeError replaced the user's error.
    with initialized_alone(tmp_path):
        model = torch.nn.Sequential(torch.nn.Linear(3, 3), syncbn_ext.SyncBatchNorm(3, process_group=_TellsNothing()))
        with pytest.raises(error_type, match="bad batch") as caught:
            with syncbn_ext.announcing_failure(model):
                raise error_type("bad batch")
    (note,) = caught.value.__notes__
    assert "failed before its first synchronized call, and telling the other ranks of the process group" in note
    assert "the connection is gone" in note and note.endswith("restart")
