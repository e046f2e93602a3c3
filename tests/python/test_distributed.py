"""Synchronization across processes: ranks on localhost (gloo), each with 1 or 2 CPU replicas, against one
nn.BatchNorm model on the global batch (float64). Every launch is bounded in time and leaves no process behind."""

from __future__ import annotations

import itertools
import json
import os
import pickle
import signal
import socket
import sys
from collections import defaultdict
from pathlib import Path

import child_processes
import pytest
import torch
import torch.distributed as dist

import syncbn_ext

HERE = Path(__file__).resolve().parent
WORKER = HERE / "distributed_worker.py"
LAUNCH_TIMEOUT = 240  # seconds, for a whole launch
TOLERANCE = 1e-12


@pytest.fixture(autouse=True)
def no_shared_memory_left_behind():
    """The launches' shared-memory segments are unlinked: once every rank mapped one, or when its set-up failed."""
    folder = Path("/dev/shm")
    before = set(folder.glob("syncbn-*")) if folder.is_dir() else set()
    yield
    after = set(folder.glob("syncbn-*")) if folder.is_dir() else set()
    assert after <= before, sorted(map(str, after - before))


def collect(children: list[child_processes.Child]) -> dict[str, dict[int, dict]]:
    """Waits for every process (stopping all of them past the time limit); {scenario: {rank: line}}."""
    results: dict[str, dict[int, dict]] = defaultdict(dict)
    for finished in child_processes.wait_all(children, LAUNCH_TIMEOUT):
        assert finished.returncode == 0, finished.stderr[-3000:]
        for line in finished.stdout.splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                results[record["scenario"]][record["rank"]] = record
    return results


# How the ranks exchange: through shared memory (ranks on one host, the default) or the group's backend only.
TRANSPORTS = {"shared_memory": {}, "c10d": {"SYNCBN_SHARED_MEMORY": "0"}}


def launch(
    tmp_path,
    world,
    replicas,
    sizes,
    scenarios,
    timeout=30.0,
    transport="shared_memory",
    env=None,
    backend="gloo",
    rendezvous="file",
):
    """``world`` ranks, each running ``scenarios`` with ``replicas`` CPU replicas (one count, or one per rank)
    (``env``: more environment variables; ``backend``: init_process_group's, "none" for none named;
    ``rendezvous``: a FileStore, or "tcp": env://, a TCPStore on 127.0.0.1)."""
    per_rank = replicas if isinstance(replicas, list) else [replicas] * world
    command = [sys.executable, str(WORKER), "--backend", backend]
    command += ["--sizes", *map(str, sizes), "--timeout", str(timeout), "--scenarios", *scenarios]
    env = dict(os.environ, **TRANSPORTS[transport], **(env or {}))
    if rendezvous == "tcp":
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world))
        children = [
            child_processes.Child([*command, "--replicas", str(per_rank[rank])], env=dict(env, RANK=str(rank)))
            for rank in range(world)
        ]
        return collect(children)
    command += ["--world", str(world), "--store", str(tmp_path / "store")]
    children = [
        child_processes.Child([*command, "--rank", str(rank), "--replicas", str(per_rank[rank])], env=env)
        for rank in range(world)
    ]
    return collect(children)


def measures(record: dict) -> dict:
    assert "error" not in record, record
    return record["result"]


def assert_parity(result: dict, steps: int, tracked: list[int] | None = None) -> None:
    """Every quantity within TOLERANCE, buffers bitwise alike on every rank; ``tracked``: each synchronized layer's
    num_batches_tracked (default: ``steps`` for both layers of the parity model)."""
    for quantity in ("output", "input_grad", "param_grad", "buffers"):
        assert result[quantity] < TOLERANCE, (quantity, result)
    assert result["buffers_equal_on_every_rank"], result  # bitwise
    assert result["num_batches_tracked"] == (tracked if tracked is not None else [steps, steps])


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


@pytest.mark.parametrize("replicas, transport", [(1, "shared_memory"), (2, "shared_memory"), (1, "c10d")])
def test_ranks_at_different_layers_get_an_error_naming_every_ranks_layer(tmp_path, replicas, transport):
    # mismatch: each rank at another layer of the same width. mismatch_widths (on the same group, after it): the
    # layers' widths differ too, after steps in which every rank learned them: every rank's exchange still has the
    # same size whatever its layer's width, so it is the error too, not a broken gloo exchange.
    # copied_on_one_rank: rank 0 alone deep-copied and unpickled a model first (an EMA copy): no mismatch.
    scenarios = ["mismatch", "mismatch_widths", "copied_on_one_rank"]
    results = launch(tmp_path, 2, replicas, [4, 4], scenarios, transport=transport)
    assert measures(results["copied_on_one_rank"][0])["ids"] == measures(results["copied_on_one_rank"][1])["ids"]
    for rank in (0, 1):
        record = results["mismatch"][rank]
        assert record.get("error") == "BarrierError", record
        message = record["message"]
        # Its own layer by name (under the wrapper, with the layer's path in the replica), every rank's by id.
        assert f"rank {rank} is at " in message and "SyncBatchNorm(3)" in message
        assert "rank 0: synchronized call 1 on this group" in message
        assert "rank 1: synchronized call 1 on this group" in message
        assert "every rank must call the synchronized layers the same number of times" in message
        assert "only the layers' numbers differ" in message and "construct them in the same order" in message

        record = results["mismatch_widths"][rank]
        assert record.get("error") == "BarrierError", record
        # Calls 2-5: two agreeing steps of two layers; call 6: rank 0 at a (3 channels), rank 1 at b (5).
        assert "rank 0: synchronized call 6 on this group, layer #" in record["message"], record
        assert "(3 channels), rank 1: synchronized call 6" in record["message"], record
        assert "(5 channels);" in record["message"], record


@pytest.mark.parametrize(
    "scenario, transport",
    [
        ("absent", "shared_memory"),  # at the group's first exchange: the set-up, through the group's backend
        ("absent_later", "shared_memory"),  # after a step: the shared-memory exchange's own wait
        ("absent_later", "c10d"),
    ],
)
@pytest.mark.parametrize("replicas", [1, 2])
def test_a_rank_that_never_comes_is_caught_by_the_groups_timeout_naming_our_layer(
    tmp_path, scenario, transport, replicas
):
    # With replicas, $SYNCBN_TIMEOUT (1 s) is shorter than the group's timeout (3 s): the replicas waiting for their
    # master, which waits for rank 1, wait on, and the group's timeout (which names the rank) ends every wait.
    results = launch(
        tmp_path, 3, replicas, [2, 2, 2], [scenario], timeout=3.0, transport=transport, env={"SYNCBN_TIMEOUT": "1"}
    )
    for rank in (0, 2):  # rank 1 is stuck (it leaves when the others gave up)
        record = results[scenario][rank]
        assert record.get("error") == "DistBackendError", record
        assert "in synchronized BatchNorm " in record["message"] and "SyncBatchNorm(3)" in record["message"], record
        assert "across the process group" in record["message"]
        if scenario == "absent_later" and transport == "shared_memory":
            assert "timed out after 3000 ms (the group's timeout) waiting for rank 1" in record["message"], record


@pytest.mark.parametrize("transport", ["shared_memory", "c10d"])
def test_a_rank_whose_process_exits_is_reported_without_waiting_for_the_timeout(tmp_path, transport):
    # The group's timeout is 60 s: the launch's own limit (LAUNCH_TIMEOUT) would fail the test if the others waited.
    results = launch(tmp_path, 3, 1, [2, 2, 2], ["exited"], timeout=60.0, transport=transport)
    assert 1 not in results["exited"]  # rank 1 left without a word
    for rank in (0, 2):
        record = results["exited"][rank]
        assert record.get("error") == "DistBackendError", record
        assert "in synchronized BatchNorm SyncBatchNorm(3)" in record["message"]
        if transport == "shared_memory":
            assert "rank 1 (process " in record["message"], record
            assert "exited before reaching this exchange" in record["message"], record


@pytest.mark.parametrize(
    "replicas, transport, reason",
    [
        (1, "shared_memory", "a rank's wait was interrupted"),
        (2, "shared_memory", "a rank's replicas gave up waiting"),
        # Over gloo (1 replica: the main thread waits there, deaf to Ctrl-C until the group's timeout) the master
        # replica's thread cannot leave its wait: the next exchange fails at once instead of queueing behind it.
        (2, "c10d", "an earlier exchange was abandoned while it waited for the other ranks"),
    ],
)
def test_ctrl_c_while_waiting_for_another_rank_interrupts_the_wait(tmp_path, replicas, transport, reason):
    # The group's timeout is 60 s; rank 0 is interrupted 1 s into its wait for rank 1 (which exits afterwards). With
    # replicas, the master replica's thread waits in the exchange: through shared memory it stops once the
    # interrupted forward closed its replication, so that the next forward fails at once instead of finding that
    # wait still going.
    results = launch(tmp_path, 2, replicas, [4, 4], ["interrupted"], timeout=60.0, transport=transport)
    outcome = measures(results["interrupted"][0])
    assert outcome["interrupted"], outcome
    assert outcome["seconds"] < 30, outcome  # the signal, not the group's timeout, ended the wait
    assert outcome["after"] == "DistBackendError", outcome
    assert outcome["after_seconds"] < 30, outcome
    assert reason in outcome["message"] and "out of step" in outcome["message"], outcome
    if transport == "shared_memory":  # rank 1, told (it waited the group's timeout before)
        peer = measures(results["interrupted"][1])
        assert peer["after"] == "DistBackendError" and peer["after_seconds"] < 10, peer
        assert "rank 0 gave up an earlier exchange" in peer["message"], peer


def test_ctrl_c_during_the_communicators_set_up_marks_the_group_failed(tmp_path):
    # The group's timeout is 4 s: without the mark, the next call set up again on the spent keys and waited 4 s more.
    results = launch(tmp_path, 2, 1, [4, 4], ["interrupted_set_up"], timeout=4.0)
    outcome = measures(results["interrupted_set_up"][0])
    assert outcome["first"] == "KeyboardInterrupt", outcome
    assert outcome["after"] == "DistBackendError", outcome
    assert "could not be set up (an earlier set-up on this process was interrupted)" in outcome["message"], outcome
    assert outcome["after_seconds"] < 2, outcome


def test_a_rank_0_killed_while_the_others_are_late_leaves_no_shared_memory_behind(tmp_path):
    command = [sys.executable, str(WORKER), "--world", "2", "--store", str(tmp_path / "store"), "--sizes", "4", "4"]
    command += ["--scenarios", "killed_in_set_up"]
    children = [child_processes.Child([*command, "--rank", str(rank)], env=dict(os.environ)) for rank in range(2)]
    finished = child_processes.wait_all(children, LAUNCH_TIMEOUT)
    assert finished[0].returncode == -signal.SIGKILL, finished[0].stderr[-3000:]
    assert finished[1].returncode == 0, finished[1].stderr[-3000:]
    leftovers = sorted(Path("/dev/shm").glob(f"syncbn-{children[0].process.pid}-*"))
    for leftover in leftovers:
        leftover.unlink()
    assert leftovers == []


def test_a_shared_memory_segment_that_cannot_be_created_is_said_not_silent(tmp_path):
    # Leaked segments (ranks killed during a set-up) can fill a small /dev/shm; later jobs then fell back to the
    # group's backend without a word.
    command = [sys.executable, str(WORKER), "--world", "2", "--store", str(tmp_path / "store"), "--sizes", "4", "4"]
    command += ["--scenarios", "shared_memory_unavailable"]
    children = [child_processes.Child([*command, "--rank", str(rank)], env=dict(os.environ)) for rank in range(2)]
    finished = child_processes.wait_all(children, LAUNCH_TIMEOUT)
    for outcome in finished:
        assert outcome.returncode == 0, outcome.stderr[-3000:]
        (line,) = [line for line in outcome.stdout.splitlines() if line.startswith("{")]
        assert measures(json.loads(line)) == {"transport": "process group", "finite": True}
    assert "rank 0 could not create a segment in /dev/shm (reserving" in finished[0].stderr, finished[0].stderr
    assert "File too large" in finished[0].stderr


def test_the_layers_communicator_is_made_under_torch_distributed_debug_detail(tmp_path):
    # TORCH_DISTRIBUTED_DEBUG=DETAIL wraps each backend (a _ProcessGroupWrapper): the group is gloo all the same.
    env = {"TORCH_DISTRIBUTED_DEBUG": "DETAIL"}
    results = launch(tmp_path, 2, 1, [3, 4], ["own_communicator"], transport="c10d", env=env)
    for rank in range(2):
        result = measures(results["own_communicator"][rank])
        assert result["own_communicator"] and result["user_group_collectives"] == 0, result
        assert result["other_device_unchanged"], result


@pytest.mark.parametrize("replicas", [1, 2])
def test_a_rank_later_than_syncbn_timeout_but_within_the_groups_timeout_is_waited_for(tmp_path, replicas):
    results = launch(tmp_path, 2, replicas, [4, 4], ["slow_rank"], timeout=30.0, env={"SYNCBN_TIMEOUT": "1"})
    for rank in (0, 1):
        outcome = measures(results["slow_rank"][rank])
        assert outcome["num_batches_tracked"] == [2], outcome
        assert outcome["buffers_equal_on_every_rank"], outcome  # bitwise
    assert measures(results["slow_rank"][0])["seconds"] > 2.5  # it did wait for rank 1


@pytest.mark.parametrize("replicas, transport", [(1, "shared_memory"), (2, "shared_memory"), (2, "c10d")])
def test_ranks_at_different_steps_get_an_error_saying_so(tmp_path, replicas, transport):
    # Rank 0 sums its gradients (backward) while rank 1 exchanges its next forward's statistics. Over gloo too: the
    # backward's rows carry a header and have the forward's size, so the exchange completes and the headers tell
    # (before, gloo's own size-mismatch error could abort a process).
    # unused_output: the usual cause, rank 1's loss not using the layer's output (its backward skips the exchange).
    # Each on a group of its own: after the error the ranks' groups are out of step.
    results = {}
    for scenario in ("steps", "unused_output"):
        (tmp_path / scenario).mkdir()
        results[scenario] = launch(tmp_path / scenario, 2, replicas, [4, 4], [scenario], transport=transport)[scenario]
    for rank, scenario in itertools.product((0, 1), ("steps", "unused_output")):
        record = results[scenario][rank]
        # Rank 0's in backward: torch's autograd engine passes our BarrierError on as a RuntimeError (its base).
        assert record.get("error") == ("RuntimeError" if rank == 0 else "BarrierError"), record
        message = record["message"]
        # The same through either transport: the headers tell.
        assert "rank 0: backward exchange 1 on this group (summing gradients), layer #" in message, message
        assert "rank 1: synchronized call 2 on this group, layer #" in message, message
        assert "The ranks are at different steps" in message, message
        assert "a rank that skipped the backward, whose loss does not use a synchronized call's output" in message
        assert "SyncBatchNorm(3)" in message and "across the process group" in message, message  # the layer named


@pytest.mark.parametrize("replicas, transport", [(1, "shared_memory"), (2, "shared_memory"), (1, "c10d")])
def test_after_a_step_one_rank_skipped_the_ranks_pair_again(tmp_path, replicas, transport):
    # Rank 1 raises in its loss at step 1 and goes on (a training loop that skips a bad batch): rank 0's backward
    # meets rank 1's step 2 forward and both fail; then rank 0's steps 2-3 pair with rank 1's 3-4. Before, the
    # ranks stayed one call apart: every later step failed on both.
    results = launch(tmp_path, 2, replicas, [4, 4], ["skipped_step"], transport=transport)["skipped_step"]
    zero, one = measures(results[0]), measures(results[1])
    assert sorted(zero["errors"]) == ["1"] and sorted(one["errors"]) == ["1", "2"], (zero, one)
    assert zero["errors"]["1"][0] == "RuntimeError"  # in backward: torch's autograd engine keeps the message only
    assert one["errors"]["1"] == ["ValueError", "a bad batch"]
    assert one["errors"]["2"][0] == "BarrierError"
    for message in (zero["errors"]["1"][1], one["errors"]["2"][1]):
        assert "The ranks are at different steps" in message and "the next steps pair again" in message, message
    for outcome in (zero, one):
        assert outcome["buffers_equal_on_every_rank"], outcome  # the same merges, bitwise
        assert outcome["num_batches_tracked"] == [4, 4], outcome  # every forward that got its statistics


@pytest.mark.parametrize("replicas, transport", [([2, 1], "shared_memory"), ([1, 1], "c10d"), ([1, 2], "c10d")])
def test_checkpointed_blocks_match_the_global_batch_with_and_without_replicas_and_count_each_batch_once(
    tmp_path, replicas, transport
):
    # A layer alone in its process exchanged again when its checkpointed block was recomputed, where a replica reuses
    # its channel's statistics: with replicas on some ranks only, every step failed; on all ranks alike, each batch
    # was counted twice in the running statistics.
    results = launch(tmp_path, 2, replicas, [4, 3], ["checkpoint"], transport=transport)
    for rank in range(2):
        outcome = measures(results["checkpoint"][rank])
        for quantity in ("output", "input_grad", "param_grad", "buffers"):
            assert outcome[quantity] < TOLERANCE, (quantity, outcome)
        assert outcome["buffers_equal_on_every_rank"] and outcome["num_batches_tracked"] == [2], outcome


def test_a_checkpointed_layer_alone_in_its_process_called_more_than_it_keeps_fails_its_backward_saying_so(tmp_path):
    results = launch(tmp_path, 2, 1, [4, 3], ["checkpoint_forgotten"])
    for rank in range(2):
        outcome = measures(results["checkpoint_forgotten"][rank])
        kept = outcome["kept"]
        assert "the statistics of that call were forgotten" in outcome[str(kept + 1)].get("error", ""), outcome
        assert outcome[str(kept)] == {"num_batches_tracked": kept}, outcome  # once per call, not once more


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


@pytest.mark.parametrize("replicas, transport", [(1, "shared_memory"), ([2, 1], "c10d")])
def test_an_input_one_rank_refuses_fails_that_step_on_every_rank_and_the_next_steps_pair(tmp_path, replicas, transport):
    # Before, rank 1 raised alone, before exchanging: rank 0 merged its step with rank 1's next one (silently wrong
    # statistics), and its last step waited for the group's timeout. (Rank 1 runs its layers alone in its process:
    # a rank with replicas does not announce, see README.)
    results = launch(tmp_path, 2, replicas, [4, 4], ["refused_input"], transport=transport)["refused_input"]
    zero, one = measures(results[0]), measures(results[1])
    assert sorted(zero["errors"]) == sorted(one["errors"]) == ["1", "2", "4"], (zero, one)
    assert one["errors"]["1"][0] == "ValueError" and "expected 2D or 3D input" in one["errors"]["1"][1], one
    assert one["errors"]["2"][0] == "RuntimeError" and "should contain" in one["errors"]["2"][1], one
    assert one["errors"]["4"][0] == "ValueError" and "expected at least 2D input" in one["errors"]["4"][1], one
    for step in ("1", "2", "4"):
        assert zero["errors"][step][0] == "BarrierError", zero
        assert "rank(s) 1 raised in this call before exchanging their statistics" in zero["errors"][step][1], zero
    for outcome in (zero, one):
        assert outcome["buffers_equal_on_every_rank"], outcome  # steps 0 and 3 merged alike, bitwise
        assert outcome["num_batches_tracked"] == [2], outcome
        assert outcome["drop_in"]["buffers_equal_on_every_rank"], outcome
        assert outcome["drop_in"]["num_batches_tracked"] == [1], outcome


@pytest.mark.parametrize("replicas, transport", [(1, "shared_memory"), (2, "c10d")])
def test_ranks_whose_calls_differ_in_requires_grad_or_channels_get_an_error_saying_so(tmp_path, replicas, transport):
    # input_grad_on_one_rank: before, rank 1 skipped the backward exchange rank 0 waited in (an error naming other
    # causes at the next step, or the group's timeout where rank 1 went into another collective).
    # channels_differ: before, the error said the layers were called in a different order or number of times.
    scenarios = ["input_grad_on_one_rank", "channels_differ"]
    results = launch(tmp_path, 2, replicas, [4, 4], scenarios, transport=transport)
    for rank in (0, 1):
        outcome = measures(results["input_grad_on_one_rank"][rank])
        assert outcome.get("error") == "BarrierError", outcome  # in the forward, on every rank
        assert "its statistics require grad on rank(s) 0 but not on rank(s) 1" in outcome["message"], outcome
        assert outcome["buffers_equal_on_every_rank"] and outcome["num_batches_tracked"] == [1], outcome
        record = results["channels_differ"][rank]
        assert record.get("error") == "BarrierError", record
        assert (
            "has different numbers of channels on the ranks of the process group: rank 0: 3, rank 1: 4;"
            in (record["message"])
        ), record
        assert "different order" not in record["message"], record


@pytest.mark.parametrize("replicas", [1, 2])
def test_uneven_inputs_under_join_with_throw_on_early_termination_end_together_and_stay_in_step(tmp_path, replicas):
    # Rank 0 has one batch, the others two: every rank raises Join's error where rank 0 ran out, before our layers
    # exchange anything, and a step together afterwards still gives every rank the same statistics.
    results = launch(tmp_path, 3, replicas, [4, 4, 4], ["join_throw"])
    for rank in range(3):
        outcome = measures(results["join_throw"][rank])
        assert outcome["join_error"] == "RuntimeError", outcome
        expected = "Rank 0 exhausted all inputs" if rank == 0 else "Detected at least one rank that exhausted inputs"
        assert expected in outcome["join_message"], outcome
        assert outcome["num_batches_tracked"] == [2], outcome  # rank 0: 1 + 1, the others: 1 + 1 (their 2nd raised)
        assert outcome["buffers_equal_on_every_rank"], outcome  # bitwise


def test_uneven_inputs_under_join_without_throwing_end_at_the_groups_timeout_naming_our_layer(tmp_path):
    # Rank 0, out of inputs, shadows only DDP's collectives: the others wait in our layer until the group's timeout.
    results = launch(tmp_path, 3, 1, [4, 4, 4], ["join_shadowing"], timeout=3.0)
    assert measures(results["join_shadowing"][0])["error"] == "RuntimeError", results  # gloo's, in DDP's join hook
    for rank in (1, 2):
        record = measures(results["join_shadowing"][rank])
        assert record.get("error") == "DistBackendError", record
        assert "timed out after 3000 ms (the group's timeout) waiting for rank 0" in record["message"], record
        assert "in synchronized BatchNorm SyncBatchNorm(3)" in record["message"], record


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def test_our_collectives_start_without_the_python_objects_torch_keeps_in_the_thread(monkeypatch):
    # torch keeps a Python object in the thread's state during a backward, and a collective captures that state:
    # gloo's worker releases its copy a moment after the work completes, which aborts the process when it falls in
    # the interpreter's shutdown. Ours start without them (README's "Ending the script").
    monkeypatch.setenv("SYNCBN_SHARED_MEMORY", "0")  # the group's own all-gathers only
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
