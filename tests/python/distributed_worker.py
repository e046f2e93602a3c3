"""One rank of a multi-process test (launched through distributed_launch.py, or by torchrun): runs scenarios, prints
JSON lines.

The scenarios: ``distributed_parity.py`` (every rank matches one nn.BatchNorm model on the global batch),
``distributed_wrappers.py`` (the same under DistributedDataParallel, torch.compile and FSDP),
``distributed_faults.py`` (ranks that disagree, stall or exit), ``distributed_interrupts.py`` (ranks interrupted or
failing to set up), ``distributed_failed_forwards.py`` (a rank's forward fails), ``distributed_checkpoints.py``
(torch.utils.checkpoint) and ``distributed_restricted_backward.py`` (gradients of some tensors only).
Each scenario prints one line ``{"scenario": ..., "rank": ..., <measures>}`` or, when it raised,
``{"scenario": ..., "rank": ..., "error": type, "message": ...}``.

    python distributed_worker.py --rank R --world W --store FILE --replicas N --scenarios parity ddp ...
    torchrun ... distributed_worker.py --replicas N --scenarios parity   # rank and world from the environment
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import json
import os
import signal
import sys
import traceback

import distributed_checkpoints as checkpoints
import distributed_failed_forwards as failed
import distributed_faults as faults
import distributed_interrupts as interrupts
import distributed_parity as parity
import distributed_restricted_backward as restricted
import distributed_wrappers as wrappers
import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  before init_process_group, so that it does not hold the default group

SCENARIOS = {
    "parity": parity.scenario_parity,
    "ddp": wrappers.scenario_ddp,
    "ddp_accumulate": wrappers.scenario_ddp_accumulate,
    "ddp_mixed_backward": wrappers.scenario_ddp_mixed_backward,
    "subgroup": parity.scenario_subgroup,
    "released": parity.scenario_released,
    "eval": parity.scenario_eval,
    "large_mean": parity.scenario_large_mean,
    "ddp_compiled": wrappers.scenario_ddp_compiled,
    "fsdp": wrappers.scenario_fsdp,
    "mismatch": faults.scenario_mismatch,
    "mismatch_widths": faults.scenario_mismatch_widths,
    "copied_on_one_rank": faults.scenario_copied_on_one_rank,
    "channels": parity.scenario_channels,
    "absent": faults.scenario_absent,
    "absent_later": faults.scenario_absent_later,
    "exited": faults.scenario_exited,
    "late_past_the_timeout": faults.scenario_late_past_the_timeout,
    "steps": faults.scenario_steps,
    "unused_output": faults.scenario_unused_output,
    "skipped_step": faults.scenario_skipped_step,
    "ddp_failed_forward": failed.scenario_ddp_failed_forward,
    "failed_before_first_call": failed.scenario_failed_before_first_call,
    "failed_before_first_call_everywhere": failed.scenario_failed_before_first_call_everywhere,
    "failed_before_first_call_one_device": failed.scenario_failed_before_first_call_one_device,
    "failed_before_first_call_in_pre_hook": failed.scenario_failed_before_first_call_in_pre_hook,
    "patched_failed_before_first_call_in_pre_hook": failed.scenario_patched_failed_before_first_call_in_pre_hook,
    "ddp_failed_before_first_call": failed.scenario_ddp_failed_before_first_call,
    "failed_forward_told_to_nobody": failed.scenario_failed_forward_told_to_nobody,
    "failed_before_first_call_block_in_replicas": failed.scenario_failed_before_first_call_block_in_replicas,
    "failed_behind_another_threads_forward": failed.scenario_failed_behind_another_threads_forward,
    "failed_before_first_call_in_block": failed.scenario_failed_before_first_call_in_block,
    "ddp_failed_before_first_call_in_block": failed.scenario_ddp_failed_before_first_call_in_block,
    "ddp_broadcasting_failed_before_first_call": failed.scenario_ddp_broadcasting_failed_before_first_call,
    "refused_input": faults.scenario_refused_input,
    "checkpoint": checkpoints.scenario_checkpoint,
    "checkpoint_selective": checkpoints.scenario_checkpoint_selective,
    "checkpoint_after_failed_backward": checkpoints.scenario_checkpoint_after_failed_backward,
    "checkpoint_two_alike_calls_in_one_block": checkpoints.scenario_checkpoint_two_alike_calls_in_one_block,
    "checkpoint_forgotten": checkpoints.scenario_checkpoint_forgotten,
    "checkpoint_forgotten_among_alike": checkpoints.scenario_checkpoint_forgotten_among_alike,
    "checkpoint_stop_gradient_view": checkpoints.scenario_checkpoint_stop_gradient_view,
    "some_parameters_grads": restricted.scenario_some_parameters_grads,
    "some_parameters_below_a_skipped_layer": restricted.scenario_some_parameters_below_a_skipped_layer,
    "input_grad_only": restricted.scenario_input_grad_only,
    "input_grad_on_one_rank": faults.scenario_input_grad_on_one_rank,
    "channels_differ": faults.scenario_channels_differ,
    "channels_differ_in_subgroup": faults.scenario_channels_differ_in_subgroup,
    "failed_between_calls_on_one_of_two_groups": failed.scenario_failed_between_calls_on_one_of_two_groups,
    "failed_before_first_call_on_two_groups": failed.scenario_failed_before_first_call_on_two_groups,
    "failed_before_first_call_on_two_groups_in_block": failed.scenario_failed_before_first_call_on_two_groups_in_block,
    "slow_rank": faults.scenario_slow_rank,
    "slow_rank_in_backward": faults.scenario_slow_rank_in_backward,
    "interrupted": interrupts.scenario_interrupted,
    "interrupted_set_up": interrupts.scenario_interrupted_set_up,
    "interrupted_before_first_call": interrupts.scenario_interrupted_before_first_call,
    "killed_in_set_up": interrupts.scenario_killed_in_set_up,
    "shared_memory_unavailable": interrupts.scenario_shared_memory_unavailable,
    "join_throw": faults.scenario_join_throw,
    "join_shadowing": faults.scenario_join_shadowing,
    "wide": parity.scenario_wide,
    "double_backward": parity.scenario_double_backward,
    "two_groups_in_threads": parity.scenario_two_groups_in_threads,
    "own_communicator": parity.scenario_own_communicator,
}
WITH_TIMEOUT = {
    "absent",
    "absent_later",
    "interrupted_set_up",
    "two_groups_in_threads",
    "failed_forward_told_to_nobody",
}
# A failed group cannot be torn down collectively.
LEAVE_THE_GROUP_AS_IS = {
    "absent",
    "absent_later",
    "exited",
    "late_past_the_timeout",
    "failed_forward_told_to_nobody",
    "interrupted",
    "interrupted_before_first_call",
    "interrupted_set_up",
    "join_shadowing",
    "killed_in_set_up",
}
# torch's FSDP2 keeps the default group alive past destroy_process_group (with plain nn.BatchNorm and without this
# package too), so gloo's threads live into the interpreter's shutdown, where torch 2.13 may abort the process
# (README, "Ending the script"): these end with os._exit once their results are out.
END_WITH_OS_EXIT = {"fsdp"}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--world", type=int, default=None)
    parser.add_argument("--store", default=None, help="a FileStore path (else torchrun's environment)")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--sizes", type=int, nargs="+", required=True, help="batch slice of every rank")
    parser.add_argument("--timeout", type=float, default=30.0, help="the process group's timeout, seconds")
    parser.add_argument("--scenarios", nargs="+", choices=sorted(SCENARIOS), required=True)
    parser.add_argument("--backend", default="gloo", help="init_process_group's backend; 'none': none named")
    args = parser.parse_args()
    # Every thread's stack on SIGUSR1: the launcher asks for them before stopping a rank that overran.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    timeout = datetime.timedelta(seconds=args.timeout)
    backend = None if args.backend == "none" else args.backend
    if args.store is not None:
        store = dist.FileStore(args.store, args.world)
        dist.init_process_group(backend, store=store, rank=args.rank, world_size=args.world, timeout=timeout)
    else:
        dist.init_process_group(backend, init_method="env://", timeout=timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)  # several ranks share the cores of one machine
    for name in args.scenarios:
        extra = {"timeout": args.timeout} if name in WITH_TIMEOUT else {}
        try:
            measures = SCENARIOS[name](rank, world, args.replicas, args.sizes, **extra)
            result = {"scenario": name, "rank": rank, "result": measures}
        except Exception as error:
            result = {"scenario": name, "rank": rank, "error": type(error).__name__, "message": str(error)}
            if os.environ.get("SYNCBN_TEST_TRACEBACK"):
                traceback.print_exc()
        print(json.dumps(result), flush=True)
    if not LEAVE_THE_GROUP_AS_IS.intersection(args.scenarios):
        dist.destroy_process_group()
    if END_WITH_OS_EXIT.intersection(args.scenarios):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
