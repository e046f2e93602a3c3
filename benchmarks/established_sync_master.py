"""A plain-Python SyncMaster in the style of the established library, for comparison only.

This is a re-implementation, written for benchmarking, of the master/slave barrier of
vacancy/Synchronized-BatchNorm-PyTorch (MIT licence), ``sync_batchnorm/comm.py``. It keeps
that design's behaviour and its cost per pass:

* :class:`FutureResult` is a one-slot hand-off built on a ``threading.Lock`` and a
  ``threading.Condition``;
* every slave shares ONE ``queue.Queue`` with the master, used both for the slaves'
  messages and for their acknowledgements;
* :meth:`SlavePipe.run_slave` puts ``(identifier, msg)`` on the queue, waits for its
  result, then puts ``True`` on the queue as its acknowledgement;
* :meth:`SyncMaster.run_master` takes ``nr_slaves`` messages from the queue (in arrival
  order, after the master's own ``(0, msg)``), calls the callback, hands out the results
  and then drains the ``nr_slaves`` acknowledgements, asserting each one is ``True``.

No timeouts, no error propagation: like the original, a slave that never arrives leaves
the master waiting forever, and a callback that raises leaves the slaves waiting forever.
The shared queue also carries the original's race (design note 13): when one barrier is
used twice in a pass, a fast slave's next message can overtake another's acknowledgement.
The benchmark never does that. Not part of the package; do not import it from library code.
"""

from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["FutureResult", "SlavePipe", "SyncMaster"]


class FutureResult:
    """A one-slot result that one thread puts and another waits for."""

    def __init__(self) -> None:
        self._result: Any = None
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)

    def put(self, result: Any) -> None:
        with self._lock:
            assert self._result is None, "the previous result has not been fetched"
            self._result = result
            self._cond.notify()

    def get(self) -> Any:
        with self._lock:
            if self._result is None:
                self._cond.wait()
            result = self._result
            self._result = None
            return result


_MasterRegistry = collections.namedtuple("_MasterRegistry", ["result"])
_SlavePipeBase = collections.namedtuple("_SlavePipeBase", ["identifier", "queue", "result"])


class SlavePipe(_SlavePipeBase):
    """A slave's end of a :class:`SyncMaster`: its id, the shared queue and its own result slot."""

    def run_slave(self, msg: Any) -> Any:
        self.queue.put((self.identifier, msg))
        ret = self.result.get()
        self.queue.put(True)  # the acknowledgement, on the same queue as the messages
        return ret


class SyncMaster:
    """The master's end: collects every slave's message, runs the callback, hands out results."""

    def __init__(self, master_callback: Callable[[list], list]) -> None:
        self._master_callback = master_callback
        self._queue: queue.Queue = queue.Queue()
        self._registry: collections.OrderedDict = collections.OrderedDict()
        self._activated = False

    def __getstate__(self) -> dict:
        return {"master_callback": self._master_callback}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["master_callback"])

    def register_slave(self, identifier: int) -> SlavePipe:
        if self._activated:
            # A pass has run since the last registration: this is a new replication.
            assert self._queue.empty(), "the queue is not clean before the next initialization"
            self._activated = False
            self._registry.clear()
        future = FutureResult()
        self._registry[identifier] = _MasterRegistry(future)
        return SlavePipe(identifier, self._queue, future)

    def run_master(self, master_msg: Any) -> Any:
        self._activated = True
        intermediates = [(0, master_msg)]
        for _ in range(self.nr_slaves):
            intermediates.append(self._queue.get())

        results = self._master_callback(intermediates)
        assert results[0][0] == 0, "the first result should belong to the master"

        for copy_id, result in results:
            if copy_id == 0:
                continue
            self._registry[copy_id].result.put(result)

        for _ in range(self.nr_slaves):
            assert self._queue.get() is True

        return results[0][1]

    @property
    def nr_slaves(self) -> int:
        return len(self._registry)
