"""Training forwards of one module (or of modules sharing a module with buffers) from several threads, one after
another: each replicates the buffers the previous one wrote back (see :func:`training_forward_lock`)."""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from typing import Any

from torch import nn

__all__ = ["TrainingForwardLocks", "training_forward_lock"]


_training_forward_locks: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_training_forward_locks_guard = threading.Lock()


def _forget_training_forward_locks_after_fork() -> None:
    # A forked child has only the thread that forked: a lock another thread held at the fork (a training forward
    # running there) would never be released in the child.
    global _training_forward_locks, _training_forward_locks_guard
    _training_forward_locks = weakref.WeakKeyDictionary()
    _training_forward_locks_guard = threading.Lock()


os.register_at_fork(after_in_child=_forget_training_forward_locks_after_fork)


class TrainingForwardLocks:
    """The locks of a module and of every module of its tree that holds buffers, taken in one global order (so
    that forwards of overlapping trees cannot deadlock) and released together. Reentrant, as each lock is."""

    def __init__(self, locks: list[threading.RLock]) -> None:
        self._locks = locks

    def acquire(self, blocking: bool = True) -> bool:
        """Takes every lock (waits for them unless ``blocking`` is false); False if one was held elsewhere. An
        exception while waiting (Ctrl-C) releases those already taken."""
        with contextlib.ExitStack() as taken:  # releases them on False or an exception
            for lock in self._locks:
                if not lock.acquire(blocking):
                    return False
                taken.callback(lock.release)
            taken.pop_all()
        return True

    def release(self) -> None:
        # ExitStack releases each one (last taken first), even should an exception (Ctrl-C) arrive in between.
        with contextlib.ExitStack() as taken:
            for lock in self._locks:
                taken.callback(lock.release)

    def __enter__(self) -> TrainingForwardLocks:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def training_forward_lock(module: nn.Module) -> contextlib.AbstractContextManager[Any]:
    """What a replicated forward of ``module`` holds from its replication to its write-back.

    Replica 0 updates copies of the module's buffers, copied back at the forward's end: two training forwards at
    once from two threads would each write back its own update over the other's (a running mean missing a
    batch, ``num_batches_tracked`` counting half of them). So training forwards of one module run one after
    another, as if called in turn, and so do those of two modules whose trees share a module holding buffers
    (a wrapper of a model and one of its block, two models sharing a layer): each module with buffers has its
    lock, and a forward holds those of its tree. A forward in eval mode (no module of the tree training: no
    running statistics to update) holds nothing and runs alongside any other. Reentrant: a forward that calls the
    same wrapper again from its own thread goes on. (A forward that calls, from its own thread, a wrapper of another
    model sharing modules with its own takes the locks it lacks after those it holds, out of the global order: two
    threads doing so crosswise could wait for each other.)
    """
    modules = list(module.modules())
    if not any(m.training for m in modules):
        return contextlib.nullcontext()
    holders = [module, *(m for m in modules if m is not module and any(b is not None for b in m._buffers.values()))]
    with _training_forward_locks_guard:
        locks = {}
        for holder in holders:
            lock = _training_forward_locks.get(holder)
            if lock is None:
                lock = _training_forward_locks[holder] = threading.RLock()
            locks[id(lock)] = lock
    return TrainingForwardLocks([locks[key] for key in sorted(locks)])
