"""CPU replicas' share of the intra-op threads is set for their worker threads alone.

torch.set_num_threads sets the calling thread's count and also the process-wide default that every thread started
later takes: a worker setting its share that way gave the share to the threads started meanwhile, and the caller
putting "its own" count back made that count the default for good when the caller's differed from it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import pytest
import torch
from hang_guard import call_with_timeout
from torch import nn

import syncbn_ext.replica_workers as replica_workers
from syncbn_ext import DataParallelWithCallback, SynchronizedBatchNorm1d
from syncbn_ext._native import _C

DEFAULT = 4  # the process default in these tests
REPLICAS = 2
SHARE = DEFAULT // REPLICAS  # each replica's, called from a thread with the default

pytestmark = pytest.mark.skipif(
    not _C.set_thread_intra_op_threads(torch.get_num_threads()),  # sets this thread's own count: unchanged
    reason="torch without OpenMP: one process-wide intra-op count",
)


def count_in_new_thread() -> int:
    seen: list[int] = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return seen[0]


@pytest.fixture
def process_default() -> Iterator[None]:
    saved = torch.get_num_threads()
    torch.set_num_threads(DEFAULT)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@contextlib.contextmanager
def no_idle_workers(intra_op_threads: int) -> Iterator[None]:
    """Holds the pool's idle workers of that count (left by other tests), so that the next forward creates its own."""
    pool = replica_workers._POOL
    held: list[replica_workers._Worker] = []
    pool.acquire(len(pool._idle.get(intra_op_threads, [])), intra_op_threads, held)
    try:
        yield
    finally:
        pool.release(held)


def wrapper() -> DataParallelWithCallback:
    model = nn.Sequential(nn.Linear(3, 3), SynchronizedBatchNorm1d(3))
    return DataParallelWithCallback(model, device_ids=["cpu"] * REPLICAS)


def test_threads_started_while_workers_are_created_get_the_process_default(process_default, monkeypatch):
    started_meanwhile: list[int] = []
    create = replica_workers._Worker.__init__

    def create_then_start_a_thread(self, intra_op_threads, started=None):
        create(self, intra_op_threads, started)
        started_meanwhile.append(count_in_new_thread())  # as another thread of the program would, at that moment

    monkeypatch.setattr(replica_workers._Worker, "__init__", create_then_start_a_thread)
    with no_idle_workers(SHARE):
        call_with_timeout(wrapper(), torch.randn(4, 3))  # from a new thread: with the default count
    assert started_meanwhile == [DEFAULT] * REPLICAS  # was the share
    assert count_in_new_thread() == DEFAULT


def test_a_caller_with_its_own_count_leaves_the_process_default_alone(process_default):
    own_count_set, default_back, done = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, int] = {}

    def caller() -> None:
        torch.get_num_threads()  # torch's lazy per-thread initialization first: it would undo the count set next
        torch.set_num_threads(1)  # this thread's count, and the process default for now...
        own_count_set.set()
        default_back.wait()  # ...put back by the main thread: this thread keeps 1, the default is DEFAULT again
        with no_idle_workers(1):  # 1 // REPLICAS, at least 1
            wrapper()(torch.randn(4, 3))
        seen["caller"] = torch.get_num_threads()
        done.set()

    thread = threading.Thread(target=caller, daemon=True)
    thread.start()
    assert own_count_set.wait(30)
    torch.set_num_threads(DEFAULT)
    default_back.set()
    assert done.wait(60)
    thread.join()
    assert seen["caller"] == 1
    assert count_in_new_thread() == DEFAULT  # was 1 for good: the caller "restored" its count as the default
    assert torch.get_num_threads() == DEFAULT


def test_the_workers_compute_with_their_share(process_default):
    worker = replica_workers._Worker(1)
    try:
        seen: list[int] = []
        ran = threading.Event()

        def task() -> None:
            torch.randn(64, 64) @ torch.randn(64, 64)  # a parallel op: the count stays the worker's own
            seen.append(torch.get_num_threads())
            ran.set()

        worker.tasks.put(task)
        assert ran.wait(30)
        assert seen == [1]
        assert count_in_new_thread() == DEFAULT
    finally:
        worker.tasks.put(None)
        worker.thread.join(30)
