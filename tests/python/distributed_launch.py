"""Launching ranks on localhost for the tests across processes: each runs distributed_worker.py's scenarios and
prints one JSON line per scenario; every launch is bounded in time and leaves no process behind."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
from collections import defaultdict
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import child_processes
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
WORKER = HERE / "distributed_worker.py"
LAUNCH_TIMEOUT = 240  # seconds, for a whole launch
TOLERANCE = 1e-12
STACKS = signal.SIGUSR1  # on which a worker prints its threads' stacks (distributed_worker.py)


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
            child_processes.Child(
                [*command, "--replicas", str(per_rank[rank])], env=dict(env, RANK=str(rank)), stack_dump_signal=STACKS
            )
            for rank in range(world)
        ]
        return collect(children)
    command += ["--world", str(world), "--store", str(tmp_path / "store")]
    children = [
        child_processes.Child(
            [*command, "--rank", str(rank), "--replicas", str(per_rank[rank])], env=env, stack_dump_signal=STACKS
        )
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def initialized_alone(tmp_path: Path, timeout: timedelta | None = None) -> Iterator[None]:
    """torch.distributed initialized in this process, a world of one over gloo (groups are used only while it is);
    destroyed at the end unless the block destroyed it."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1, timeout=timeout)
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
