"""Failures across processes (ranks on localhost, gloo): ranks that disagree, are late, never come, exit or are
interrupted; every rank gets an error naming our layer and the group, never a hang, and the ranks pair again where
they can."""

from __future__ import annotations

import itertools
import json
import os
import signal
import sys
from pathlib import Path

import child_processes
import pytest
from distributed_launch import LAUNCH_TIMEOUT, WORKER, launch, measures

pytestmark = pytest.mark.usefixtures("no_shared_memory_left_behind")


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
            # Its own timeout, or the other waiting rank's, who gave up first, taking its row back.
            said = record["message"]
            assert (
                "timed out after 3000 ms (the group's timeout) waiting for rank 1" in said
                or f"rank {2 - rank} gave up this exchange or an earlier one" in said
                and "rank 1 has not reached this exchange either" in said
            ), record


@pytest.mark.parametrize("replicas", [1, 2])
def test_a_rank_that_comes_after_the_others_timed_out_fails_there_too_writing_nothing(tmp_path, replicas):
    # The group's timeout is 3 s: rank 0 gives up waiting for rank 1, which then comes (a training step without
    # grad: no later exchange would have told it). Through shared memory, rank 0's row was left published, and rank
    # 1 completed the exchange with it, writing its running statistics.
    results = launch(tmp_path, 2, replicas, [4, 4], ["late_past_the_timeout"], timeout=3.0)
    waited, late = (measures(results["late_past_the_timeout"][rank]) for rank in (0, 1))
    assert waited.get("error") == "DistBackendError" and "waiting for rank 1" in waited["message"], waited
    assert waited["untouched"], waited
    assert late.get("error") == "DistBackendError", late
    assert "rank 0 gave up this exchange or an earlier one" in late["message"], late
    assert late["untouched"], late


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
        assert "rank 0 gave up this exchange or an earlier one" in peer["message"], peer


def test_ctrl_c_during_the_communicators_set_up_marks_the_group_failed(tmp_path):
    # The group's timeout is 4 s: without the mark, the next call set up again on the spent keys and waited 4 s more.
    results = launch(tmp_path, 2, 1, [4, 4], ["interrupted_set_up"], timeout=4.0)
    outcome = measures(results["interrupted_set_up"][0])
    assert outcome["first"] == "KeyboardInterrupt", outcome
    assert outcome["after"] == "DistBackendError", outcome
    assert "could not be set up (an earlier set-up on this process was interrupted)" in outcome["message"], outcome
    assert outcome["after_seconds"] < 2, outcome


@pytest.mark.parametrize("replicas", [1, 2])
def test_ctrl_c_before_the_first_synchronized_call_leaves_no_ranks_paired_a_step_apart(tmp_path, replicas):
    # The group's timeout is 4 s. Rank 0 is interrupted before its forward's first synchronized call (replicas: under
    # the wrapper; one: in an announcing_failure block), rank 1 waiting at its own: rank 0's next forward paired with
    # it, the ranks one step apart from then on, silently.
    results = launch(tmp_path, 2, replicas, [4, 4], ["interrupted_before_first_call"], timeout=4.0)
    outcome = measures(results["interrupted_before_first_call"][0])
    assert outcome["interrupted"], outcome
    assert outcome["after"] == "DistBackendError" and outcome["after_seconds"] < 2, outcome
    assert "interrupted (KeyboardInterrupt) before its first synchronized call" in outcome["message"], outcome
    assert "out of step" in outcome["message"], outcome
    assert not any("telling" in note for note in outcome["notes"]), outcome["notes"]  # (not tried: it fails alike)
    peer = measures(results["interrupted_before_first_call"][1])
    assert peer["step"] != "returned", peer


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


def test_a_rank_late_in_backward_is_waited_for_after_a_replicas_task_returned(tmp_path):
    # On rank 0 one replica's parallel backward task returns early (it ran a layer without grad) while the other waits
    # for the late rank 1 in that layer's merge: it was given up on $SYNCBN_TIMEOUT after the first task's return.
    results = launch(tmp_path, 2, 2, [4, 4], ["slow_rank_in_backward"], timeout=30.0, env={"SYNCBN_TIMEOUT": "1"})
    for rank in (0, 1):
        outcome = measures(results["slow_rank_in_backward"][rank])
        assert outcome["num_batches_tracked"] == [2, 2], outcome
        assert outcome["buffers_equal_on_every_rank"], outcome  # bitwise
    assert measures(results["slow_rank_in_backward"][0])["seconds"] > 2.5  # it did wait for rank 1


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


def test_two_calls_of_one_checkpointed_block_alike_on_one_rank_fail_its_backward_saying_so(tmp_path):
    # Rank 1 alone in its process: its two calls' local statistics match, their whole-batch statistics differ.
    scenario = "checkpoint_two_alike_calls_in_one_block"
    results = launch(tmp_path, 2, 1, [4, 4], [scenario])[scenario]
    one = results[1]
    assert one.get("error") == "RuntimeError", one
    assert "match several of its calls in one checkpointed block" in one["message"], one
    assert "checkpoint a block that calls the layer once" in one["message"], one
    assert "error" in results[0], results[0]  # rank 1 failed its backward: rank 0's waits no longer


@pytest.mark.parametrize("replicas, transport", [(1, "shared_memory"), ([1, 2], "c10d")])
def test_under_ddp_without_buffer_broadcasts_a_forward_raising_between_layers_is_made_up_and_the_ranks_pair_again(
    tmp_path, replicas, transport
):
    # Rank 1 raises between the two layers at step 1 and goes on: rank 0 waits at the second layer, meets rank 1's
    # step 2 at the first and both fail; then they pair again. (README: with DDP's default broadcast_buffers=True,
    # rank 1's next forward would start with DDP's broadcast instead: both wait for the group's timeout.)
    results = launch(tmp_path, 2, replicas, [4, 4], ["ddp_failed_forward"], transport=transport)["ddp_failed_forward"]
    zero, one = measures(results[0]), measures(results[1])
    assert sorted(zero["errors"]) == ["1"] and sorted(one["errors"]) == ["1", "2"], (zero, one)
    assert one["errors"]["1"][0] == "ValueError" and "a bad batch" in one["errors"]["1"][1], one
    for error in (zero["errors"]["1"], one["errors"]["2"]):
        assert error[0] == "BarrierError" and "different order or number of times" in error[1], (zero, one)
    for outcome in (zero, one):
        assert outcome["parameters_equal_on_every_rank"], outcome
    # The first layer counts rank 1's failed step where it ran alone in its process (its update was written then),
    # not where replicas ran it (a failed forward writes nothing: README says the buffers then differ by that step).
    alone = replicas == 1
    assert zero["num_batches_tracked"] == [4, 3] and one["num_batches_tracked"] == [4 if alone else 3, 3], (zero, one)
    assert zero["buffers_equal_on_every_rank"] == alone, zero


def test_a_checkpointed_layer_alone_in_its_process_called_more_than_it_keeps_fails_its_backward_saying_so(tmp_path):
    # checkpoint_forgotten_among_alike (last: its ranks end out of step): rank 1's forgotten call has others alike.
    results = launch(tmp_path, 2, 1, [4, 3], ["checkpoint_forgotten", "checkpoint_forgotten_among_alike"])
    for rank in range(2):
        outcome = measures(results["checkpoint_forgotten"][rank])
        kept = outcome["kept"]
        assert "the statistics of that call were forgotten" in outcome[str(kept + 1)].get("error", ""), outcome
        assert outcome[str(kept)] == {"num_batches_tracked": kept}, outcome  # once per call, not once more
    among_alike = measures(results["checkpoint_forgotten_among_alike"][1])
    assert "the statistics of that call were forgotten" in (among_alike["error"] or ""), among_alike


@pytest.mark.parametrize("replicas, transport", [(1, "shared_memory"), (2, "c10d")])
def test_errors_in_a_subgroup_say_which_global_ranks_its_rank_numbers_are(tmp_path, replicas, transport):
    # Before, they named the subgroup's own ranks 0 and 1 only: global ranks 1 and 2 read as ranks 0 and 1.
    scenario = "channels_differ_in_subgroup"
    results = launch(tmp_path, 3, replicas, [4, 4, 4], [scenario], transport=transport)[scenario]
    for rank in (1, 2):
        kind, message = measures(results[rank])["error"]
        assert kind == "BarrierError" and "rank 0: 3, rank 1: 4;" in message, message
        mapped = f"the group's ranks 0..1 are global ranks 1, 2 (this process: global rank {rank})"
        assert f"(rank {rank - 1} of 2, gloo; {mapped})" in message, message
        assert f"(rank {rank - 1} of 2, gloo; {mapped})" in measures(results[rank])["set_up_where"]


@pytest.mark.parametrize("replicas, transport", [(1, "shared_memory"), ([2, 1], "c10d")])
def test_an_input_one_rank_refuses_fails_that_step_on_every_rank_and_the_next_steps_pair(tmp_path, replicas, transport):
    # Before, rank 1 raised alone, before exchanging: rank 0 merged its step with rank 1's next one (silently wrong
    # statistics), and its last step waited for the group's timeout. (Rank 1 runs its layers alone in its process:
    # a rank with replicas does not announce, see README.)
    results = launch(tmp_path, 2, replicas, [4, 4], ["refused_input"], transport=transport)["refused_input"]
    zero, one = measures(results[0]), measures(results[1])
    assert sorted(zero["errors"]) == sorted(one["errors"]) == ["1", "2", "4", "5"], (zero, one)
    assert one["errors"]["1"][0] == "ValueError" and "expected 2D or 3D input" in one["errors"]["1"][1], one
    assert one["errors"]["2"][0] == "RuntimeError" and "should contain" in one["errors"]["2"][1], one
    assert one["errors"]["4"][0] == "ValueError" and "expected at least 2D input" in one["errors"]["4"][1], one
    assert one["errors"]["5"] == ["NotImplementedError", "\"batch_norm\" not implemented for 'Float8_e4m3fn'"], one
    for step in ("1", "2", "4", "5"):
        assert zero["errors"][step][0] == "BarrierError", zero
        assert "rank(s) 1 raised in this call before exchanging their statistics" in zero["errors"][step][1], zero
    for outcome in (zero, one):
        assert outcome["buffers_equal_on_every_rank"], outcome  # steps 0 and 3 (and 6) merged alike, bitwise
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
        assert "its inputs' channels (dim 1) differ" in record["message"], record


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
        said = record["message"]
        assert (  # its own timeout, or the other waiting rank's, who gave up first, taking its row back
            "timed out after 3000 ms (the group's timeout) waiting for rank 0" in said
            or f"rank {3 - rank} gave up this exchange or an earlier one" in said
            and "rank 0 has not reached this exchange either" in said
        ), record
        assert "in synchronized BatchNorm SyncBatchNorm(3)" in said, record
