"""Synchronization across processes: ranks on localhost (gloo), each with 1 or 2 CPU replicas, against one
nn.BatchNorm model on the global batch (float64). Every launch is bounded in time and leaves no process behind."""

from __future__ import annotations

import json
import os
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


def launch(tmp_path, world, replicas, sizes, scenarios, timeout=30.0):
    """``world`` ranks over a FileStore, each running ``scenarios``."""
    store = tmp_path / "store"
    command = [sys.executable, str(WORKER), "--world", str(world), "--store", str(store), "--replicas", str(replicas)]
    command += ["--sizes", *map(str, sizes), "--timeout", str(timeout), "--scenarios", *scenarios]
    return collect([child_processes.Child([*command, "--rank", str(rank)]) for rank in range(world)])


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
    "world, replicas, sizes",
    [
        (2, 1, [3, 5]),
        (2, 2, [4, 5]),
        (3, 1, [3, 5, 0]),  # uneven slices, an empty rank
        (3, 2, [2, 6, 0]),
    ],
)
def test_every_rank_matches_one_batchnorm_on_the_global_batch(tmp_path, world, replicas, sizes):
    scenarios = ["parity", "ddp", "eval", "channels"] + (["subgroup"] if world == 3 else [])
    results = launch(tmp_path, world, replicas, sizes, scenarios)
    for rank in range(world):
        for case, result in measures(results["parity"][rank]).items():  # both layers, momentum 0.1 and None
            assert_parity(result, steps=3), case
        assert measures(results["eval"][rank])["output"] < TOLERANCE
        channels = measures(results["channels"][rank])  # widths 3, 5, 3, 3; the middle two skipped at step 2
        assert_parity(channels, steps=5, tracked=[5, 4, 4, 5])
        assert channels["allgathers_per_step"] == 2 * 4  # one forward, one backward, per synchronized call
        if sizes[rank] > 0:  # DistributedDataParallel needs a batch on every rank
            assert_parity(measures(results["ddp"][rank]), steps=2)
    if world == 3:  # a subgroup of ranks 0 and 1: rank 2 normalizes alone
        for rank in range(world):
            assert_parity(measures(results["subgroup"][rank]), steps=2)


@pytest.mark.parametrize("replicas", [1, 2])
def test_ranks_at_different_layers_get_an_error_naming_every_ranks_layer(tmp_path, replicas):
    # mismatch: each rank at another layer of the same width. mismatch_widths (on the same group, after it): the
    # layers' widths differ too, after steps in which every rank learned them: every rank's exchange still has the
    # same size whatever its layer's width, so it is the error too, not a broken gloo exchange.
    results = launch(tmp_path, 2, replicas, [4, 4], ["mismatch", "mismatch_widths"])
    for rank in (0, 1):
        record = results["mismatch"][rank]
        assert record.get("error") == "BarrierError", record
        message = record["message"]
        # Its own layer by name (under the wrapper, with the layer's path in the replica), every rank's by id.
        assert f"rank {rank} is at " in message and "SyncBatchNorm(3)" in message
        assert "rank 0: synchronized call 1 on this group" in message
        assert "rank 1: synchronized call 1 on this group" in message
        assert "every rank must call the synchronized layers the same number of times" in message

        record = results["mismatch_widths"][rank]
        assert record.get("error") == "BarrierError", record
        # Calls 2-5: two agreeing steps of two layers; call 6: rank 0 at a (3 channels), rank 1 at b (5).
        assert "rank 0: synchronized call 6 on this group, layer #" in record["message"], record
        assert "(3 channels), rank 1: synchronized call 6" in record["message"], record
        assert "(5 channels);" in record["message"], record


def test_a_rank_that_never_comes_is_caught_by_the_groups_timeout_naming_our_layer(tmp_path):
    results = launch(tmp_path, 3, 1, [2, 2, 2], ["absent"], timeout=3.0)
    for rank in (0, 2):  # rank 1 is stuck (it leaves when the others gave up)
        record = results["absent"][rank]
        assert record.get("error") == "DistBackendError", record
        assert "in synchronized BatchNorm SyncBatchNorm(3)" in record["message"]
        assert "across the process group" in record["message"]


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
    layer = syncbn_ext.SyncBatchNorm(3)
    assert layer.sync_group() is None
    reference = torch.nn.BatchNorm1d(3)
    x = torch.randn(6, 3)
    torch.testing.assert_close(layer(x), reference(x))
    torch.testing.assert_close(layer.running_var, reference.running_var)
    # Our in-process layers ignore torch.distributed unless given a group.
    assert syncbn_ext.SynchronizedBatchNorm1d(3).sync_group() is None
