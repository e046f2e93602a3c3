"""The replica workers' pool (syncbn_ext.replica_workers): workers shared by every wrapper, kept per intra-op thread
count, started from several threads at once, and never left waiting for a task that will not come (an interrupt
while they start or while a forward hands out its tasks)."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from batchnorm_cases import cpu_dp
from hang_guard import HANG_TIMEOUT, call_with_timeout
from torch import nn

import syncbn_ext
from syncbn_ext import parallel_apply, replica_workers
from syncbn_ext.replica_workers import replica_threads_running


def worker_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("syncbn-")}


def replica_threads_left() -> list[threading.Thread]:
    """The threads still running a replica once they had HANG_TIMEOUT to end."""
    until = time.monotonic() + HANG_TIMEOUT
    while replica_threads_running() and time.monotonic() < until:
        time.sleep(0.01)
    return replica_threads_running()


def wait_until_ended(threads: set[threading.Thread]) -> list[str]:
    """Joins the threads (at most HANG_TIMEOUT in all); returns the names of those still alive."""
    until = time.monotonic() + HANG_TIMEOUT
    for thread in threads:
        thread.join(max(0.0, until - time.monotonic()))
    return [t.name for t in threads if t.is_alive()]


def test_idle_workers_of_replica_counts_no_longer_used_end(monkeypatch):
    # Workers are kept per intra-op thread count (the caller's count // replicas): those of a count no longer used
    # (a last batch smaller than the replicas, another wrapper) end once unused for IDLE_WORKER_SECONDS.
    pool = syncbn_ext.replica_workers._POOL
    monkeypatch.setattr(syncbn_ext.replica_workers, "IDLE_WORKER_SECONDS", 0.0)
    model = nn.Sequential(nn.Linear(3, 3), syncbn_ext.SynchronizedBatchNorm1d(3))
    threads_before = torch.get_num_threads()
    torch.set_num_threads(12)  # shares of 6, 4 and 3 threads: a key each
    try:
        for replicas in (2, 3, 4):
            call_with_timeout(cpu_dp(model, replicas), torch.randn(12, 3))
            idle = {key: len(workers) for key, workers in pool._idle.items()}
            assert idle == {12 // replicas: replicas}, idle  # the previous count's workers were told to end
    finally:
        torch.set_num_threads(threads_before)
    kept = {worker.thread for workers in pool._idle.values() for worker in workers}
    ending = [t for t in threading.enumerate() if t.name.startswith("syncbn-retiring-") and t not in kept]
    for thread in ending:
        thread.join(10)
    assert not [t for t in ending if t.is_alive()]


def test_workers_told_to_end_are_not_counted_as_running_a_replica(monkeypatch):
    # A forward's end tells the workers idle for too long to end: until their threads were gone, they counted as
    # threads still running a replica (checks of "no replica left running" right after a forward saw them).
    monkeypatch.setattr(syncbn_ext.replica_workers, "IDLE_WORKER_SECONDS", 0.0)
    model = nn.Sequential(nn.Linear(3, 3), syncbn_ext.SynchronizedBatchNorm1d(3))
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)  # one intra-op thread per replica whatever their number: the same idle workers
    try:
        seen = []
        for _ in range(50):
            cpu_dp(model, 4)(torch.randn(8, 3))
            cpu_dp(model, 2)(torch.randn(8, 3))  # its end tells the 2 workers it did not use to end
            seen += [t.name for t in replica_threads_running()]
    finally:
        torch.set_num_threads(threads_before)
    assert seen == []


def test_workers_start_from_several_threads_at_once(monkeypatch):
    # Each start forgets the OS threads of workers that ended, looking in /proc (other threads run meanwhile):
    # starts from several threads at once (models trained from two threads) changed that record while another
    # start iterated it, "RuntimeError: Set changed size during iteration" failing a healthy forward.
    exists = replica_workers._os_thread_exists

    def slow_exists(thread_id: int) -> bool:
        time.sleep(0.001)  # widens the window another thread's start had
        return exists(thread_id)

    monkeypatch.setattr(replica_workers, "_os_thread_exists", slow_exists)
    pool = replica_workers._POOL
    errors: list[BaseException] = []
    started: set[threading.Thread] = set()

    def start_workers() -> None:
        try:
            for _ in range(5):
                workers: list[replica_workers._Worker] = []
                pool.acquire(3, None, workers)  # a key no CPU forward uses: none idle, each one new
                started.update(worker.thread for worker in workers)
                for worker in workers:
                    worker.retire()
        except BaseException as error:  # handed to the test's thread
            errors.append(error)

    threads = [threading.Thread(target=start_workers) for _ in range(4)]
    for thread in threads:
        thread.start()
    assert wait_until_ended(set(threads)) == []
    assert errors == []
    assert len(started) == 4 * 5 * 3
    assert wait_until_ended(started) == []


def test_an_interrupt_while_workers_start_leaves_none_waiting_for_a_task(monkeypatch):
    # Ctrl-C while a forward started its workers: those started so far, and the idle ones it had taken from the
    # pool, were dropped, waiting for a task for ever (counted as replicas still running; the exit waited for them).
    pool = replica_workers._POOL
    idle: list[replica_workers._Worker] = []
    pool.acquire(2, None, idle)
    pool.release(idle)  # two idle workers, which the next acquire takes before starting more
    idle_before = list(pool._idle[None])
    caller = threading.get_ident()
    exists = replica_workers._os_thread_exists
    checks = 0

    def interrupted_on_the_third_check(thread_id: int) -> bool:
        nonlocal checks
        if threading.get_ident() == caller:
            checks += 1
            if checks == 3:
                raise KeyboardInterrupt
        return exists(thread_id)

    before = worker_threads()
    monkeypatch.setattr(replica_workers, "_os_thread_exists", interrupted_on_the_third_check)
    taken: list[replica_workers._Worker] = []
    with pytest.raises(KeyboardInterrupt):
        pool.acquire(6, None, taken)
    assert taken == []
    monkeypatch.undo()
    started = worker_threads() - before
    assert started  # the interrupt came while workers started
    assert wait_until_ended(started) == []
    assert sorted(map(id, pool._idle[None])) == sorted(map(id, idle_before))  # given back, still usable
    pool.acquire(2, None, idle := [])
    for worker in idle:
        worker.retire()


def test_an_interrupt_while_a_forward_hands_out_its_tasks_closes_it_and_leaves_no_worker(monkeypatch):
    # Ctrl-C after replica 0's task was handed to its worker, before replica 1's: the forward's failure handling
    # had not started, so nothing closed the replication (replica 0 waited in its barrier until the timeout) and
    # replica 0's worker never went back to the pool.
    reporting = parallel_apply._Reporting

    def interrupted_at_replica_1(index, task, report):
        if index == 1:
            raise KeyboardInterrupt
        return reporting(index, task, report)

    monkeypatch.setattr(parallel_apply, "_Reporting", interrupted_at_replica_1)
    closed: list[str] = []
    ran: list[int] = []
    tasks = [lambda i=i: ran.append(i) for i in range(3)]
    with pytest.raises(KeyboardInterrupt):
        parallel_apply.run_on_workers(tasks, ["a", "b", "c"], None, closed.append, lambda error: False)
    assert closed and "interrupted (KeyboardInterrupt)" in closed[0]
    assert ran == [0]
    assert replica_threads_left() == []


def test_a_second_interrupt_while_the_first_is_handled_leaves_no_worker(monkeypatch):
    # Ctrl-C twice: the second arrived while the forward handled the first (closing the replication, waiting a
    # moment for the replicas), and the workers were neither abandoned nor given back: waiting for ever.
    reporting = parallel_apply._Reporting

    def interrupted_at_replica_1(index, task, report):
        if index == 1:
            raise KeyboardInterrupt("first")
        return reporting(index, task, report)

    monkeypatch.setattr(parallel_apply, "_Reporting", interrupted_at_replica_1)
    closed: list[str] = []

    def close_interrupted_again(reason: str) -> None:
        closed.append(reason)
        if len(closed) == 1:
            raise KeyboardInterrupt("second")

    tasks = [lambda: time.sleep(0.3), lambda: None, lambda: None]
    with pytest.raises(KeyboardInterrupt, match="second"):
        parallel_apply.run_on_workers(tasks, ["a", "b", "c"], None, close_interrupted_again, lambda error: False)
    assert len(closed) == 2 and "gave up on replica(s) [0]" in closed[1]
    assert replica_threads_left() == []


def test_an_interrupt_while_a_forward_takes_its_workers_leaves_none_taken(monkeypatch):
    # Between taking the workers and handing them their tasks, the forward's failure handling had not started.
    pool = replica_workers._POOL
    acquire = pool.acquire

    def taken_then_interrupted(count, intra_op_threads, workers):
        acquire(count, intra_op_threads, workers)
        raise KeyboardInterrupt

    monkeypatch.setattr(pool, "acquire", taken_then_interrupted)
    closed: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        parallel_apply.run_on_workers([lambda: None] * 2, ["a", "b"], None, closed.append, lambda error: False)
    monkeypatch.undo()
    assert replica_threads_running() == []
    assert closed


def test_an_interrupt_while_a_forward_gives_its_workers_back_leaves_none_waiting(monkeypatch):
    # After the last replica returned, while the workers went back to the pool: outside the failure handling.
    pool = replica_workers._POOL
    release = pool.release
    calls = 0

    def interrupted_once(workers):
        nonlocal calls
        calls += 1
        if calls == 1:
            raise KeyboardInterrupt
        release(workers)

    monkeypatch.setattr(pool, "release", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        parallel_apply.run_on_workers([lambda: None] * 2, ["a", "b"], None, lambda reason: None, lambda e: False)
    monkeypatch.undo()
    assert replica_threads_left() == []
    assert parallel_apply.run_on_workers([lambda: 7] * 2, ["a", "b"], None, print, lambda e: False) == [7, 7]


def test_models_trained_from_two_threads_match_the_whole_batch():
    # Two wrappers trained at once from two threads, each starting workers as the thread counts change.
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(3, 4), syncbn_ext.SynchronizedBatchNorm1d(4)) for _ in range(2)]
    references = [nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)) for _ in range(2)]
    for model, reference in zip(models, references, strict=True):
        reference.load_state_dict(model.state_dict())
    inputs = [torch.randn(8, 3) for _ in range(2)]
    weights = torch.randn(8, 4)  # the loss: the output weighted, whose gradient the statistics shape
    threads_before = torch.get_num_threads()

    def train(k: int) -> None:
        for step in range(6):
            torch.set_num_threads(4 * (step % 3 + 1))  # new shares: new workers
            cpu_dp(models[k], 4)(inputs[k]).mul(weights).sum().backward()

    try:
        threads = [threading.Thread(target=call_with_timeout, args=(train, k)) for k in range(2)]
        for thread in threads:
            thread.start()
        assert wait_until_ended(set(threads)) == []
    finally:
        torch.set_num_threads(threads_before)
    for model, reference, x in zip(models, references, inputs, strict=True):
        for _ in range(6):
            reference(x).mul(weights).sum().backward()
        for (name, tensor), expected in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
            torch.testing.assert_close(tensor, expected, msg=name)
        for (name, param), expected in zip(model.named_parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(param.grad, expected.grad, msg=name)
