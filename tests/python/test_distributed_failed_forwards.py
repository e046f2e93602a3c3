"""A forward failing on one rank before its first synchronized call (its own code, a hook, a replica refusing the
first layer's input) fails that step on every rank, told over each group its layers use, and the ranks pair again."""

from __future__ import annotations

import pytest
from distributed_launch import launch, measures

pytestmark = pytest.mark.usefixtures("no_shared_memory_left_behind")


BEFORE_FIRST_CALL = "rank(s) 1 raised in their forward before its first synchronized call"


def check_failed_before_first_call(zero, one, refusal_said=BEFORE_FIRST_CALL):
    """Steps 1 and 3 failed on both ranks: rank 1 with its own error (its forward before its first synchronized call:
    its code, a replica refusing the first layer's input), rank 0 with a BarrierError naming rank 1 (at step 3:
    ``refusal_said``); the other steps paired (every rank's buffers the same, bitwise, each layer updated by the 4
    steps that ran)."""
    assert sorted(zero["errors"]) == sorted(one["errors"]) == ["1", "3"], (zero, one)
    assert one["errors"]["1"][0] == "ValueError" and "a bad batch" in one["errors"]["1"][1], one
    assert one["errors"]["3"][0] == "RuntimeError" and "should contain 4 elements not 3" in one["errors"]["3"][1], one
    for step, said in (("1", BEFORE_FIRST_CALL), ("3", refusal_said)):
        assert zero["errors"][step][0] == "BarrierError" and said in zero["errors"][step][1], zero
    for outcome in (zero, one):
        assert outcome["buffers_equal_on_every_rank"] and outcome["num_batches_tracked"] == [4, 4], outcome


@pytest.mark.parametrize(
    "replicas, scenario",
    [
        (2, "failed_before_first_call_on_two_groups"),
        ([1, 2], "failed_before_first_call_on_two_groups_in_block"),
        (1, "failed_before_first_call_on_two_groups_in_block"),
    ],
)
def test_a_forward_failing_before_its_first_synchronized_call_tells_every_group_its_layers_use(
    tmp_path, replicas, scenario
):
    # Before, with several groups nothing was told: rank 0 waited at its first call for rank 1's next forward, which
    # waited on the other group (stuck until the group's timeout, or one step apart).
    results = launch(tmp_path, 2, replicas, [4, 4], [scenario])[scenario]
    # (rank 1 alone in its process: its layer refuses the widened input itself)
    refusal_said = "rank(s) 1 raised in this call before exchanging" if replicas == 1 else BEFORE_FIRST_CALL
    check_failed_before_first_call(measures(results[0]), measures(results[1]), refusal_said)


@pytest.mark.parametrize("replicas", [1, 2])
def test_a_forward_failing_after_a_call_that_paired_tells_no_group_even_where_its_layers_use_several(
    tmp_path, replicas
):
    # Telling each group the forward made no call on (as a first version did) waited in vain on the later group,
    # the others waiting on the first one: both ranks stalled until the timeout, then every step failed.
    scenario = "failed_between_calls_on_one_of_two_groups"
    results = launch(tmp_path, 2, replicas, [4, 4], [scenario], timeout=20.0)[scenario]
    zero, one = measures(results[0]), measures(results[1])
    assert sorted(zero["errors"]) == ["1"] and sorted(one["errors"]) == ["1", "2"], (zero, one)
    assert one["errors"]["1"][:2] == ["ValueError", "a bad batch between its layers"], one
    for error in (zero["errors"]["1"], one["errors"]["2"]):
        assert error[0] == "BarrierError" and "called in a different order or number of times" in error[1], error
    assert max(error[2] for outcome in (zero, one) for error in outcome["errors"].values()) < 10, (zero, one)
    assert zero["buffers_equal_on_every_rank"] and one["buffers_equal_on_every_rank"], (zero, one)


@pytest.mark.parametrize("replicas, transport", [([1, 2], "shared_memory"), ([2, 3], "c10d")])
def test_a_forward_with_replicas_failing_before_its_first_synchronized_call_fails_that_step_on_every_rank(
    tmp_path, replicas, transport
):
    # Rank 1 (replicas under DataParallelWithCallback) fails before its first synchronized call: in its code, or a
    # replica refusing the first layer's input. Before, rank 0's first call of that step paired with rank 1's next
    # forward (silently one step apart for good, rank 0's last step waiting for the group's timeout).
    # failed_before_first_call_block_in_replicas: the model's forward in an announcing_failure block of its own, in
    # every replica: told once, by the wrapper (before, by each replica's block too: one step apart after all).
    scenarios = ["failed_before_first_call", "failed_before_first_call_block_in_replicas"]
    if replicas[0] > 1:  # every rank's forward fails alike at the same steps: each tells the others
        scenarios.append("failed_before_first_call_everywhere")
    results = launch(tmp_path, 2, replicas, [4, 4], scenarios, transport=transport)
    check_failed_before_first_call(*(measures(results["failed_before_first_call"][r]) for r in (0, 1)))
    blocks = [measures(results["failed_before_first_call_block_in_replicas"][r]) for r in (0, 1)]
    check_failed_before_first_call(
        *blocks, refusal_said="rank(s) 1 raised in" if replicas[1] == 1 else BEFORE_FIRST_CALL
    )
    if replicas[0] > 1:
        for rank in (0, 1):
            outcome = measures(results["failed_before_first_call_everywhere"][rank])
            assert sorted(outcome["errors"]) == ["1", "3"], outcome
            assert outcome["errors"]["1"][0] == "ValueError", outcome  # its own error, not a BarrierError
            assert outcome["errors"]["3"][0] == "RuntimeError", outcome
            assert outcome["buffers_equal_on_every_rank"] and outcome["num_batches_tracked"] == [4, 4], outcome


def test_a_forward_pre_hook_of_the_wrapper_raising_on_one_rank_fails_that_step_on_every_rank(tmp_path):
    # The wrapper's forward pre-hooks run before its forward: before, a hook raising on rank 1 told nothing, and rank
    # 0's first call of that step paired with rank 1's next forward (silently one step apart for good). Rank 0 runs
    # one replica (under a one-device wrapper), rank 1 two; DataParallelWithCallback and a patched nn.DataParallel.
    scenarios = ["failed_before_first_call_in_pre_hook", "patched_failed_before_first_call_in_pre_hook"]
    results = launch(tmp_path, 2, [1, 2], [4, 4], scenarios)
    for scenario in scenarios:
        zero, one = (measures(results[scenario][rank]) for rank in (0, 1))
        check_failed_before_first_call(zero, one)
        assert "a forward pre-hook of the wrapper" in one["errors"]["1"][1], one


def test_a_module_under_a_one_device_wrapper_failing_before_its_first_synchronized_call_fails_that_step_everywhere(
    tmp_path,
):
    # Each rank runs the module as it is, under DataParallelWithCallback(device_ids=["cpu"]): its code raising before
    # the first layer is told by the wrapper, the first layer's refusal by the layer itself (told once).
    results = launch(tmp_path, 2, 1, [4, 4], ["failed_before_first_call_one_device"])
    zero, one = (measures(results["failed_before_first_call_one_device"][r]) for r in (0, 1))
    check_failed_before_first_call(zero, one, refusal_said="rank(s) 1 raised in this call before exchanging")


@pytest.mark.parametrize("scenario", ["failed_before_first_call_in_block", "ddp_failed_before_first_call_in_block"])
def test_layers_alone_failing_before_their_first_synchronized_call_in_an_announcing_block_fail_that_step_everywhere(
    tmp_path, scenario
):
    # Layers alone in each process (and under DistributedDataParallel), each forward in a
    # syncbn_ext.announcing_failure block: the model's code raising before the first layer is told by the block, the
    # first layer's refusal by the layer itself (told once).
    results = launch(tmp_path, 2, 1, [4, 4], [scenario])[scenario]
    zero, one = measures(results[0]), measures(results[1])
    check_failed_before_first_call(zero, one, refusal_said="rank(s) 1 raised in this call before exchanging")
    if scenario.startswith("ddp"):
        assert zero["grads_equal_on_every_rank"] and one["grads_equal_on_every_rank"], (zero, one)


def test_a_forward_failing_behind_another_threads_forward_of_the_wrapper_is_told(tmp_path):
    # Rank 1's failing forward waited for another thread's (one training forward at a time): it counts calls from
    # then on, so it tells (before, it counted the other forward's calls as its own and told nothing).
    results = launch(tmp_path, 2, 2, [4, 4], ["failed_behind_another_threads_forward"])
    zero, one = (measures(results["failed_behind_another_threads_forward"][r]) for r in (0, 1))
    assert zero["outcomes"]["first"] == "ok" and one["outcomes"]["first"] == "ok", (zero, one)
    assert one["outcomes"]["second"] == "ValueError: a bad batch", one
    assert zero["outcomes"]["second"].startswith("BarrierError") and BEFORE_FIRST_CALL in zero["outcomes"]["second"]
    for outcome in (zero, one):
        assert outcome["outcomes"]["third"] == outcome["outcomes"]["fourth"] == "ok", outcome
        assert outcome["buffers_equal_on_every_rank"] and outcome["num_batches_tracked"] == [3, 3], outcome


def test_a_failed_forward_told_to_ranks_that_never_come_keeps_its_error_with_a_note(tmp_path):
    # Rank 0 never comes: telling it waits the group's timeout (3 s), then rank 1's own error propagates, noted.
    results = launch(tmp_path, 2, 2, [4, 4], ["failed_forward_told_to_nobody"], timeout=3.0)
    outcome = measures(results["failed_forward_told_to_nobody"][1])
    assert outcome["error"] == "a bad batch", outcome
    note = outcome["notes"][-1]  # after the replica's "(raised in replica 0 on device cpu)"
    assert "forward failed before its first synchronized call, and telling the other ranks" in note, outcome
    assert "DistBackendError" in note and "3000" in note, outcome


@pytest.mark.parametrize(
    "replicas, scenario",
    [([1, 2], "ddp_failed_before_first_call"), ([2, 2], "ddp_broadcasting_failed_before_first_call")],
)
def test_under_ddp_a_forward_with_replicas_failing_before_its_first_synchronized_call_fails_that_step_everywhere(
    tmp_path, replicas, scenario
):
    # The same under DistributedDataParallel, with broadcast_buffers=False and with its default True (DDP's
    # broadcast ran on every rank before the failure): DDP's gradients summed over the same steps.
    results = launch(tmp_path, 2, replicas, [4, 4], [scenario])[scenario]
    zero, one = measures(results[0]), measures(results[1])
    check_failed_before_first_call(zero, one)
    assert zero["grads_equal_on_every_rank"] and one["grads_equal_on_every_rank"], (zero, one)
