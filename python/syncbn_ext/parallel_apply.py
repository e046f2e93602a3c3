"""Running the replicas: every replica at once, each on a persistent worker thread, and never waiting for ever.

:func:`parallel_apply` is ``torch.nn.parallel.parallel_apply`` for CPU and accelerator replicas, with the failure
handling synchronized layers need:

* A replica that raises closes its replication (``ReplicationGroup.close``): the other copies waiting for it in a
  barrier wake at once, and none of them writes anything afterwards. A replica whose forward returns tells the
  replication's barriers that it sends no more (``copy_finished``), so a copy that made more synchronized calls fails
  at once with an error naming both.
* The caller waits for the replicas, but never for ever: once a replica failed, at most
  :data:`FAILURE_GRACE_SECONDS` more; once one returned, at most ``$SYNCBN_TIMEOUT`` more (counted from the end of a
  later wait for other ranks, which the process group's timeout bounds). A replica still running then (stuck where
  nothing can wake it) is left behind on its thread, its replication closed so it can write nothing; it ends when
  it returns. An exception in the calling thread (Ctrl-C) closes the replication, waits the grace period at most,
  and propagates. The interpreter's exit waits for replicas left behind, at most
  :data:`~syncbn_ext.replica_workers.EXIT_WAIT_SECONDS` (one returning from a torch op during the exit would abort
  the process).
* The exception raised is the replica's own object (type, arguments and attributes intact), with a note naming the
  replica; errors the closing itself caused in the other copies are not reported over the original one.

The replicas run on the persistent worker threads of :mod:`syncbn_ext.replica_workers`, each CPU replica with its
share of the caller's intra-op threads.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch

from ._exception_notes import add_note
from ._native import _C
from .replica_workers import _POOL, _Worker, cpu_intra_op_threads, replica_threads_running
from .replication import Replication
from .scatter_gather import _tensors

__all__ = [
    "FAILURE_GRACE_SECONDS",
    "INTERRUPT_GRACE_SECONDS",
    "cpu_intra_op_threads",
    "parallel_apply",
    "replica_threads_running",
    "run_on_workers",
    "running_a_replica",
]

#: How long the caller still waits for the other replicas once one failed (the C++ wrapper's too: the wait policy,
#: ``_C.ReplicaWaitPolicy``, is the same one).
FAILURE_GRACE_SECONDS: float = _C.FAILURE_GRACE_SECONDS
# How long the calling thread waits for a replica's report at a time (see run_on_workers's collect).
_REPORT_POLL_SECONDS = 0.1
#: How long an interrupted caller (Ctrl-C) waits for the replicas, which it woke, before it propagates.
INTERRUPT_GRACE_SECONDS = 0.5

#: Tag of the reasons this module closes replications with: the errors it causes in other copies carry it.
ABORT_TAG = "DataParallelWithCallback"


# ------------------------------------------------------------------------------------------------------------------
# One replica's task
# ------------------------------------------------------------------------------------------------------------------


class _CallerState:
    """The calling thread's state, applied in each replica's thread: ATen's thread-local state, as torch carries it
    to its own autograd threads (grad and inference mode, autocast, the profiler, saved-tensor hooks, dispatch and
    torch-function modes...), inside an ``autocast`` block of the caller's settings: the thread-local state does not
    carry autocast's cache flag, and leaving the block empties the worker's cache of cast weights, as it does the
    caller's."""

    def __init__(self, device_type: str) -> None:
        self.thread_state = _C.ThreadLocalState()
        self.device_type = device_type
        self.autocast_enabled = torch.is_autocast_enabled(device_type)
        self.autocast_dtype = torch.get_autocast_dtype(device_type)
        self.autocast_cache = torch.is_autocast_cache_enabled()

    def applied(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        stack.enter_context(self.thread_state.applied())
        stack.enter_context(
            torch.autocast(
                self.device_type,
                dtype=self.autocast_dtype,
                enabled=self.autocast_enabled,
                cache_enabled=self.autocast_cache,
            )
        )
        return stack


@contextlib.contextmanager
def reporting_outcome(group: Any, copy_id: int, tag: str = "") -> Any:
    """Tells ``group`` how copy ``copy_id``'s forward inside the block ended.

    Raising closes the replication (``tag`` prefixes the reason): the others may be waiting for this copy in a
    barrier; they wake, and none writes anything. Returning finishes the copy: nobody waits for it any more.
    """
    try:
        yield
    except BaseException as error:
        group.close(f"{tag}replica {copy_id} raised {described(error)}")
        raise
    group.copy_finished(copy_id)


def described(error: BaseException) -> str:
    """``"Type: message"`` of a replica's exception, for the others' errors: never raises, so that a user's exception
    whose ``__str__`` fails still closes the replication and reaches the caller as itself."""
    try:
        message = str(error)
    except BaseException as failed:  # noqa: BLE001  (whatever its __str__ raises)
        message = f"<its str() raised {type(failed).__name__}>"
    return f"{type(error).__name__}: {message}"


class _ReplicaTask:
    """Runs replica ``index`` on a worker and reports ``(index, ok, output or exception)``."""

    def __init__(
        self,
        index: int,
        module: Any,
        args: Any,
        kwargs: dict[str, Any],
        device: int | None,
        streams: dict[int, Any],
        state: _CallerState,
    ) -> None:
        self.index, self.module, self.args, self.kwargs = index, module, args, kwargs
        # The caller's current stream of every device the replicas use: current streams are per thread, and a
        # replica copying the master's merged statistics from device 0 must do it on the stream they were computed on.
        self.device, self.streams, self.state = device, streams, state
        self.sequence_number = 0  # set by the runner: where every replica starts numbering its autograd nodes

    def __call__(self) -> Any:
        # Replicas that build the same graph then number its nodes alike, so that autograd orders their
        # backward alike when each runs on its own thread (see syncbn_ext.parallel_backward).
        _C.align_sequence_number(self.sequence_number)
        tag = Replication.of(self.module)
        replication, copy_id = tag if tag is not None else (None, self.index)
        group = replication.group if replication is not None else None
        with reporting_outcome(group, copy_id, f"{ABORT_TAG}: ") if group is not None else contextlib.nullcontext():
            try:
                with contextlib.ExitStack() as stack:
                    if group is not None:
                        stack.enter_context(group.replica(copy_id))
                    if self.device is not None:
                        for index, stream in self.streams.items():
                            if index != self.device:
                                stack.enter_context(stream)  # (it makes its device current: set below)
                        stack.enter_context(torch.accelerator.device_index(self.device))
                        stack.enter_context(self.streams[self.device])
                    stack.enter_context(self.state.applied())
                    stack.enter_context(_running_a_replica())
                    args = self.args if isinstance(self.args, (list, tuple)) else (self.args,)
                    return self.module(*args, **self.kwargs)
            finally:
                self.module = self.args = self.kwargs = None


_replica_thread = threading.local()  # depth: how many replicas' forwards this thread is running (nested: more)


@contextlib.contextmanager
def _running_a_replica() -> Any:
    _replica_thread.depth = getattr(_replica_thread, "depth", 0) + 1
    try:
        yield
    finally:
        _replica_thread.depth -= 1


def running_a_replica() -> bool:
    """Whether the calling thread is running a replica's forward (of :func:`parallel_apply`)."""
    return getattr(_replica_thread, "depth", 0) > 0


class _Reporting:
    """Runs a task on a worker, and reports ``(index, ok, result or exception)`` to the caller."""

    def __init__(self, index: int, task: Any, report: queue.SimpleQueue[tuple[int, bool, Any]]) -> None:
        self.index, self.task, self.report = index, task, report

    def __call__(self) -> None:
        # Neither this frame nor self may keep the queue once the outcome is in it: the error's traceback holds
        # this frame, and a queue no caller reads any more (a replica given up on) would close a cycle the garbage
        # collector alone frees, keeping the replica's frames, inputs and parameters until then.
        report, self.report = self.report, None
        try:
            result = self.task()
        except BaseException as error:
            report.put((self.index, False, error))
        else:
            report.put((self.index, True, result))
        finally:
            self.task = None
            del report


def run_on_workers(
    tasks: Sequence[Any],
    wheres: Sequence[str],
    intra_op_threads: int | None,
    close: Any,
    caused_by_closing: Any,
) -> list[Any]:
    """Runs ``tasks[i]()`` for every ``i`` at once, each on a worker thread; returns their results in order.

    ``close(reason)`` wakes and kills what the tasks may wait on (called once a task failed, on an interrupt, and
    before leaving tasks behind); ``caused_by_closing(error)`` tells the errors it caused. Waits at most
    :data:`FAILURE_GRACE_SECONDS` after a failure, ``$SYNCBN_TIMEOUT`` after a task returned (or after a later wait
    for other ranks ended), and :data:`INTERRUPT_GRACE_SECONDS` after an interrupt; tasks still running then are left
    behind. Raises the lowest index's own exception (with a note ``(raised <wheres[i]>)``), else a
    ``BarrierTimeoutError``.
    """
    n = len(tasks)
    if n == 0:
        return []
    timeout = _C.default_timeout_seconds()
    # How long to wait (the C++ wrapper's policy): a grace period after a failure, the timeout after a return.
    wait = _C.ReplicaWaitPolicy(timeout)
    report: queue.SimpleQueue[tuple[int, bool, Any]] = queue.SimpleQueue()
    workers: list[_Worker] = []  # filled by _POOL.acquire, inside the try below
    handed = 0  # tasks given to their workers (counted just before the put: an interrupt between leaves none unseen)
    results: dict[int, Any] = {}
    errors: dict[int, BaseException] = {}

    def collect(block_until: float | None) -> bool:
        """Takes one report, waiting until ``block_until`` (monotonic; None: for ever); False on timeout."""
        while True:
            # In short waits: an exception set for this thread without a signal (_thread.interrupt_main(), a
            # signal raised from another thread, an asynchronous exception) is raised only between bytecodes.
            left = None if block_until is None else max(0.0, block_until - time.monotonic())
            try:
                index, ok, value = report.get(
                    timeout=_REPORT_POLL_SECONDS if left is None else min(left, _REPORT_POLL_SECONDS)
                )
                break
            except queue.Empty:
                if left is not None and left <= _REPORT_POLL_SECONDS:
                    return False
        if ok:
            results[index] = value
            wait.returned()
        else:
            errors[index] = value
            if not wait.any_failed:
                wait.failed()
                if len(errors) + len(results) < n:
                    close(f"{ABORT_TAG}: replica {index} raised {type(value).__name__}")
        return True

    def pending() -> list[int]:
        return [i for i in range(handed) if i not in results and i not in errors]

    handed_back = False  # every worker released, retired or abandoned

    def hand_back(returned: Sequence[int]) -> None:
        nonlocal handed_back
        # A worker whose task raised ends: a backward that failed leaves the nodes it had queued in its thread's
        # autograd state (the graph, and the process groups its nodes hold) until that thread's next backward.
        _POOL.release([workers[i] for i in returned if i not in errors])
        for i in returned:
            if i in errors:
                workers[i].retire()
        handed_back = True

    def give_up(missing: Sequence[int], why: str) -> None:
        try:
            close(f"{ABORT_TAG}: gave up on replica(s) {list(missing)}: {why}")
        finally:  # a Ctrl-C while it closes: the workers are disposed of all the same
            for i in missing:
                workers[i].abandon(f"syncbn-abandoned-replica-{i}")
            hand_back([i for i in range(len(workers)) if i not in missing])  # those never handed a task too

    try:
        try:
            _POOL.acquire(n, intra_op_threads, workers)
            sequence_number = max(worker.sequence_number for worker in workers)
            for i, (worker, task) in enumerate(zip(workers, tasks, strict=True)):
                if isinstance(task, _ReplicaTask):
                    task.sequence_number = sequence_number
                reporting = _Reporting(i, task, report)
                handed = i + 1
                worker.tasks.put(reporting)
            while pending():
                left = wait.seconds_left()
                # At the bound, a replica left waiting for other ranks (bounded by the group's timeout, not ours)
                # renews it: a copy of a parallel backward may return while another runs a merge across processes.
                if not collect(None if left is None else time.monotonic() + left) and not wait.renew():
                    break
        except BaseException as interrupt:  # KeyboardInterrupt (or any exception) in the calling thread
            try:
                close(f"{ABORT_TAG}: the calling thread was interrupted ({type(interrupt).__name__})")
                deadline = time.monotonic() + INTERRUPT_GRACE_SECONDS
                while pending() and collect(deadline):
                    pass
            finally:  # also after a second Ctrl-C during that grace period: no worker left waiting for ever
                give_up(pending(), "the calling thread was interrupted")
            raise
        missing = pending()
        if missing:
            give_up(missing, "it did not return in time")
        else:
            hand_back(range(n))
    finally:
        if not handed_back:  # an interrupt there (a second Ctrl-C): none may wait for a task for ever
            _POOL.retire_unless_idle(workers)

    failures = sorted(errors)
    if failures:
        primary = [i for i in failures if not caused_by_closing(errors[i])]
        index = min(primary or failures)
        error = errors[index]
        add_note(error, f"(raised {wheres[index]})")
        # Raised from a local, the error's traceback would hold this frame and the frame the error: a cycle that
        # only the garbage collector frees, keeping the replicas' frames (their process groups among them) alive
        # until then, past the user's destroy_process_group().
        errors.clear()
        try:
            raise error
        finally:
            del error
    if missing:
        returned = min(results)
        raise _C.BarrierTimeoutError(
            f"{ABORT_TAG}: replica(s) {missing} did not return within {timeout:g} s of replica {returned}'s "
            "return (or of a later wait for other ranks); they were left running on their threads, and their "
            "replication was closed so that they can write nothing (raise SYNCBN_TIMEOUT, in seconds, to wait longer)"
        )
    return [results[i] for i in range(n)]


# ------------------------------------------------------------------------------------------------------------------
# parallel_apply
# ------------------------------------------------------------------------------------------------------------------


def _device_index(device: Any) -> int | None:
    """None for the CPU (or no device given), else the accelerator index."""
    if device is None:
        return None
    if isinstance(device, int):
        return device
    device = torch.device(device)
    if device.type == "cpu":
        return None
    return device.index if device.index is not None else torch.accelerator.current_device_index()


def _input_device_index(args: Any, kwargs: Any) -> int | None:
    """The accelerator index of the first tensor in a replica's arguments (None: on the CPU, or no tensor)."""
    tensors = _tensors((args, kwargs))
    if not tensors:
        return None
    accelerator = torch.accelerator.current_accelerator()
    device = tensors[0].device
    return _device_index(device) if accelerator and device.type == accelerator.type else None


def close_replications(replicas: Sequence[Any], reason: str) -> None:
    """Closes the replications of ``replicas``, and aborts the barriers modules hold outside any replication."""
    groups = {}
    for replica in replicas:
        tag = Replication.of(replica)
        if tag is not None and tag[0].group is not None:
            groups[id(tag[0].group)] = tag[0].group
    for group in groups.values():
        group.close(reason)
    # Barriers of modules written against the established library's API (a SyncMaster held as an attribute,
    # reset at each replication), which the group does not know.
    seen: set[int] = set()
    for replica in replicas:
        if not isinstance(replica, torch.nn.Module):
            continue
        for m in replica.modules():
            # A copy of the values, taken at once (under the GIL): replicas still running may set attributes.
            for value in list(vars(m).values()):
                if isinstance(value, _C.SyncMaster) and id(value) not in seen:
                    seen.add(id(value))
                    value.abort(reason)


def caused_by_closing(error: BaseException) -> bool:
    return isinstance(error, _C.BarrierAbortedError) and ABORT_TAG in str(error)


_CHECKPOINT_AROUND_MESSAGE = (
    "DataParallelWithCallback: torch.utils.checkpoint(..., use_reentrant=False) around the replicas (around the "
    "wrapper, or a module that calls it) is not supported: its saved-tensor hooks, which the replicas' threads "
    "inherit, would pair one replica's recomputed tensors with another's (wrong gradients). Checkpoint inside the "
    "wrapped module instead (torch.utils.checkpoint(block, x, use_reentrant=False) in its forward): synchronized "
    "layers recompute such blocks with the whole batch's statistics"
)


def _under_checkpoint() -> bool:
    """Whether the innermost saved-tensor hooks of the calling thread are torch.utils.checkpoint's (non-reentrant):
    they match recomputed tensors to saved ones by the order they were packed, which replicas packing at once from
    several threads do not keep."""
    if not torch.is_grad_enabled():
        return False
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return hooks is not None and getattr(hooks[0], "__module__", None) == "torch.utils.checkpoint"


def parallel_apply(
    modules: Sequence[Any],
    inputs: Sequence[Any],
    kwargs_tup: Sequence[dict[str, Any]] | None = None,
    devices: Sequence[Any] | None = None,
) -> list[Any]:
    """Runs ``modules[i](*inputs[i], **kwargs_tup[i])`` for every ``i`` at once, one worker thread each.

    ``devices[i]`` is replica ``i``'s accelerator (an index or device; it is made current, with the caller's
    current stream of every device used, in the replica's thread), or the CPU / ``None``; without ``devices``,
    each replica's is its first input tensor's (as ``torch.nn.parallel.parallel_apply`` takes it). The caller's
    grad mode, inference mode and autocast state apply in every replica. See the module's documentation for
    failures, interrupts and timeouts.

    Returns:
        The outputs, in replica order.

    Raises:
        The lowest copy id's exception (not counting errors the closing of the replication caused), the very
        object the replica raised, with a note naming the replica; ``BarrierTimeoutError`` when replicas never
        returned although one did.
    """
    n = len(modules)
    if n != len(inputs):
        raise ValueError(f"parallel apply: {n} replicas but {len(inputs)} inputs")
    if kwargs_tup is None:
        kwargs_tup = [{} for _ in modules]
    elif len(kwargs_tup) != n:
        raise ValueError(f"parallel apply: {n} replicas but {len(kwargs_tup)} kwargs")
    if devices is None:  # as torch's: each replica's device is its input's
        indices = [_input_device_index(inputs[i], kwargs_tup[i]) for i in range(n)]
    else:
        indices = [_device_index(d) for d in devices]
    if len(indices) != n:
        raise ValueError(f"parallel apply: {n} replicas but {len(indices)} devices")
    if n == 0:
        return []
    if _under_checkpoint():
        close_replications(modules, f"{ABORT_TAG}: {_CHECKPOINT_AROUND_MESSAGE}")
        raise RuntimeError(_CHECKPOINT_AROUND_MESSAGE)
    on_cpu = all(index is None for index in indices)
    device_type = "cpu" if on_cpu else torch.accelerator.current_accelerator().type  # type: ignore[union-attr]
    used = sorted({index for index in indices if index is not None})
    state = _CallerState(device_type)

    def caller_streams() -> dict[int, Any]:
        # Objects of each task's own: a Stream object keeps the state its context restores, one entry at a time.
        return {index: torch.accelerator.current_stream(index) for index in used}

    tasks = [
        _ReplicaTask(i, modules[i], inputs[i], kwargs_tup[i], indices[i], caller_streams(), state) for i in range(n)
    ]
    wheres = [
        f"in replica {i} on device {'cpu' if index is None else f'{device_type}:{index}'}"
        for i, index in enumerate(indices)
    ]
    return run_on_workers(
        tasks,
        wheres,
        cpu_intra_op_threads(n) if on_cpu else None,
        lambda reason: close_replications(modules, reason),
        caused_by_closing,
    )
