"""The replicas' worker threads: persistent daemon threads shared by every wrapper of the process.

A thread started per replica per forward costs time and, on CPU, a new OpenMP team each time, so workers are kept
between forwards, idle in a pool by intra-op thread count, and end after :data:`IDLE_WORKER_SECONDS` unused. A CPU
replica runs with ``torch.get_num_threads() // n`` intra-op threads (at least one), so that ``n`` replicas running at
once use the caller's threads, not ``n`` times as many: set for the worker's thread alone (OpenMP's per-thread
count), so threads started meanwhile and later still get torch's default.

A worker whose task outlives its forward (a stuck or interrupted replica) is abandoned: it finishes alone and exits.
The interpreter's exit waits for such threads, at most :data:`EXIT_WAIT_SECONDS` (one returning from a torch op
during the exit would abort the process).
"""

from __future__ import annotations

import atexit
import itertools
import os
import queue
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch

from ._native import _C

__all__ = [
    "EXIT_WAIT_SECONDS",
    "IDLE_WORKER_SECONDS",
    "cpu_intra_op_threads",
    "replica_threads_running",
]

#: How long the interpreter's exit waits for replicas still running (left behind by a failed forward or backward).
EXIT_WAIT_SECONDS = 10.0
#: Idle workers unused for longer than this end (those of a replica count or intra-op thread count no longer used).
IDLE_WORKER_SECONDS = 60.0


# The OS thread ids of the workers started (those still running, at the last start), for the exit to wait for
# their OS threads' end too (see _wait_for_os_thread_end). Workers start from several threads at once (wrappers
# used from several threads): read and written under the lock.
_started_thread_ids: set[int] = set()
_started_thread_ids_lock = threading.Lock()
_worker_numbers = itertools.count(1)


def _note_started_thread(thread_id: int) -> None:
    with _started_thread_ids_lock:
        ended = [i for i in _started_thread_ids if not _os_thread_exists(i)]
        _started_thread_ids.difference_update(ended)
        _started_thread_ids.add(thread_id)


def _started_threads() -> set[int]:
    with _started_thread_ids_lock:
        return set(_started_thread_ids)


def _forget_started_threads_after_fork() -> None:
    global _started_thread_ids_lock
    _started_thread_ids_lock = threading.Lock()  # another thread may have held it at the fork
    _started_thread_ids.clear()  # the child has none of those threads


os.register_at_fork(after_in_child=_forget_started_threads_after_fork)


class _Worker:
    """A daemon thread that runs tasks from its queue; with a CPU intra-op thread count of its own."""

    def __init__(self, intra_op_threads: int | None, started: list[_Worker] | None = None) -> None:
        """Starts the thread and appends the worker to ``started`` (from then on the caller ends it on failure);
        returns once the thread is ready. On an exception meanwhile (KeyboardInterrupt) the thread is told to end."""
        started = [] if started is None else started
        self.intra_op_threads = intra_op_threads
        # False with a torch without OpenMP: the thread's count was set process-wide, and acquire() puts it back.
        self.own_intra_op_threads = True
        self.tasks: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.abandoned = False
        self.retiring = False
        self.idle_since = 0.0
        self._ready = threading.Event()
        name = f"syncbn-worker-{next(_worker_numbers)}"
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        try:
            self.thread.start()
            started.append(self)
        except BaseException:
            if self not in started:
                self.retire()  # an interrupt during start(): a thread that started must not wait for ever
            raise
        if self.thread.native_id is not None:
            _note_started_thread(self.thread.native_id)
        self._ready.wait()

    def _loop(self) -> None:
        # This thread's own count (not torch.set_num_threads: that also sets the count every thread started later
        # takes); without OpenMP, torch's process-wide one.
        if self.intra_op_threads is not None and not _C.set_thread_intra_op_threads(self.intra_op_threads):
            self.own_intra_op_threads = False
            torch.get_num_threads()  # torch's lazy per-thread initialization first, as before a count of its own
            torch.set_num_threads(self.intra_op_threads)
        self.sequence_number = _C.peek_sequence_number()
        self._ready.set()
        while True:
            task = self.tasks.get()
            if task is None:
                return
            task()
            task = None  # drop the replica, its inputs and outputs before waiting again
            self.sequence_number = _C.peek_sequence_number()
            if self.abandoned:
                return

    def retire(self) -> None:
        """Tells the thread to end once back at its queue (an idle worker, or one done with its task)."""
        self.retiring = True  # never handed a task again (the pool drops it, should it be there)
        # Renamed first: ending, it runs no replica (replica_threads_running must not count it).
        self.thread.name = self.thread.name.replace("syncbn-worker-", "syncbn-retiring-", 1)
        self.tasks.put(None)

    def abandon(self, name: str) -> None:
        """Leaves the thread to finish its task alone; it exits afterwards instead of taking another."""
        self.abandoned = True
        self.thread.name = name
        self.tasks.put(None)


class _WorkerPool:
    """Idle workers by intra-op thread count, shared by every wrapper of the process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: dict[int | None, list[_Worker]] = {}
        # Set once the interpreter exits: workers done with their task then end instead of waiting for another
        # (a daemon thread's forward that ends during the exit's wait must not leave them for the shutdown).
        self._exiting = False
        # A forked child has only the thread that forked: the workers' threads are not there, and a task given to
        # one would never run (a forward of the parent's wrapper in the child would wait for ever).
        os.register_at_fork(after_in_child=self._forget_after_fork)

    def _forget_after_fork(self) -> None:
        self._lock = threading.Lock()  # another thread may have held it at the fork
        self._idle = {}
        self._exiting = False

    def acquire(self, count: int, intra_op_threads: int | None, workers: list[_Worker]) -> None:
        """Puts ``count`` workers of that intra-op thread count into ``workers`` (an empty list of the caller's),
        idle ones first, as it takes or starts each: an exception meanwhile (KeyboardInterrupt, a thread that cannot
        start) gives back those taken, ends those started and leaves ``workers`` empty, and one after this returns
        finds every worker in the caller's list."""
        caller_threads = torch.get_num_threads()
        taken = 0
        started: list[_Worker] = []
        try:
            with self._lock:
                idle = self._idle.setdefault(intra_op_threads, [])
                idle[:] = [worker for worker in idle if not worker.retiring]  # one interrupted while released
                start = max(0, len(idle) - count)
                taken = len(idle) - start
                # Moved without a call in between, where an interrupt could leave a worker in neither list.
                workers += idle[start:]
                del idle[start:]
            while len(workers) < count:
                _Worker(intra_op_threads, started=workers)
        except BaseException:
            # No worker may be left waiting for a task for ever: those taken go back, those started end.
            started = workers[taken:]
            for worker in started:
                worker.retire()
            with self._lock:
                still_idle = {id(worker) for worker in self._idle.get(intra_op_threads, [])}
            self.release([worker for worker in workers[:taken] if id(worker) not in still_idle])
            workers.clear()
            raise
        finally:
            if not all(worker.own_intra_op_threads for worker in started or workers[taken:]):
                # torch without OpenMP: the new workers' torch.set_num_threads set the process-wide count.
                torch.set_num_threads(caller_threads)

    def release(self, workers: Sequence[_Worker]) -> None:
        now = time.monotonic()
        with self._lock:
            for worker in workers:
                if worker.abandoned or worker.retiring:
                    continue
                if self._exiting:
                    worker.retire()
                else:
                    worker.idle_since = now
                    self._idle.setdefault(worker.intra_op_threads, []).append(worker)
            # Workers kept for a replica count or thread count no longer used (a last batch smaller than the
            # replicas, a wrapper no longer called, torch.set_num_threads changed) end, with their OpenMP teams.
            for key, idle in list(self._idle.items()):
                unused = [worker for worker in idle if now - worker.idle_since > IDLE_WORKER_SECONDS]
                for worker in unused:
                    worker.retire()
                self._idle[key] = [worker for worker in idle if worker not in unused]
                if not self._idle[key]:
                    del self._idle[key]

    def retire_unless_idle(self, workers: Sequence[_Worker]) -> None:
        """Tells those of ``workers`` not idle in the pool, nor abandoned, to end once their task is done (after an
        interrupt, which left them neither given back nor told to end)."""
        with self._lock:
            idle = {id(worker) for workers in self._idle.values() for worker in workers}
        for worker in workers:
            if id(worker) not in idle and not worker.abandoned and not worker.retiring:
                worker.retire()

    def end_idle_workers(self) -> list[threading.Thread]:
        """Tells every idle worker to end (at the interpreter's exit), and every busy one to end once done, instead of
        waiting for another task; returns the idle ones' threads. A worker just released may still be dropping its
        task's tensors: it takes the end once back at its queue."""
        with self._lock:
            idle = [worker for workers in self._idle.values() for worker in workers]
            self._idle = {}
            self._exiting = True
        for worker in idle:
            worker.retire()
        return [worker.thread for worker in idle]

    def busy_or_abandoned_threads(self) -> list[threading.Thread]:
        """The workers' threads that are not idle in the pool (for tests and diagnostics)."""
        with self._lock:
            idle = {id(w.thread) for workers in self._idle.values() for w in workers}
        return [
            t
            for t in threading.enumerate()
            if t.name.startswith(("syncbn-worker-", "syncbn-abandoned-")) and id(t) not in idle and t.is_alive()
        ]


_POOL = _WorkerPool()


def replica_threads_running() -> list[threading.Thread]:
    """The threads still running a replica: busy workers, and replicas left behind by a forward that gave up."""
    return _POOL.busy_or_abandoned_threads()


def _wait_for_replica_threads_at_exit() -> None:
    """Gives replicas still running at the interpreter's exit time to end, at most :data:`EXIT_WAIT_SECONDS`.

    A daemon thread that returns from a torch op while the interpreter shuts down is ended by CPython in a way C++
    cannot unwind: the process aborts ("terminate called without an active exception", or a fatal Python error)
    instead of exiting with its status. A replica left behind (Ctrl-C during a forward, a replica past the timeout)
    usually ends soon: its replication is closed, so its next synchronized layer raises.
    """

    def join_all(threads: list[threading.Thread], until: float) -> list[threading.Thread]:
        for thread in threads:
            thread.join(max(0.0, until - time.monotonic()))
        return [thread for thread in threads if thread.is_alive()]

    start = time.monotonic()
    # Idle workers end too, so that no daemon thread of ours is left for the interpreter's shutdown to stop: one
    # released to the pool is still running C++ for a moment (its task's tensors freed), and the shutdown stopping
    # it there aborted the process (seen under load, at the end of a multi-process test).
    retiring = [t for t in threading.enumerate() if t.name.startswith("syncbn-retiring-") and t.is_alive()]
    join_all([*_POOL.end_idle_workers(), *retiring], until=start + min(1.0, EXIT_WAIT_SECONDS))
    still_running = join_all(replica_threads_running(), until=start + min(1.0, EXIT_WAIT_SECONDS))
    if still_running:
        print(
            f"syncbn_ext: waiting up to {EXIT_WAIT_SECONDS:g} s for {len(still_running)} replica thread(s) still "
            "running (left behind by a failed or interrupted forward or backward, or a daemon thread's forward), "
            "before the interpreter exits (one ending during the exit would crash it); Ctrl-C to exit at once",
            file=sys.stderr,
            flush=True,
        )
        join_all(still_running, until=start + EXIT_WAIT_SECONDS)
    running = {t.native_id for t in threading.enumerate()}
    until = time.monotonic() + 1.0
    for thread_id in _started_threads() - running:  # their Python part ended
        _wait_for_os_thread_end(thread_id, until)


def _os_thread_exists(thread_id: int) -> bool:
    return os.path.exists(f"/proc/self/task/{thread_id}")


def _wait_for_os_thread_end(thread_id: int, until: float) -> None:
    """Waits, at most until ``until``, for a worker's OS thread to end after its Python part did. ``Thread.join``
    returns once the thread's Python state is gone, before its C++ thread-local destructors run: a worker whose
    parallel backward failed frees the autograd nodes still queued in its thread there, taking the GIL, and the
    interpreter's shutdown meeting it aborted the process. Linux (``/proc/self/task``); elsewhere it returns."""
    while _os_thread_exists(thread_id) and time.monotonic() < until:
        time.sleep(0.001)  # without the GIL, which those destructors take


atexit.register(_wait_for_replica_threads_at_exit)


def cpu_intra_op_threads(replicas: int) -> int:
    """The intra-op threads of each of ``replicas`` CPU replicas running at once: their share of the caller's."""
    return max(1, torch.get_num_threads() // replicas)
