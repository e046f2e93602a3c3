"""Each parameter's gradients from the CPU replicas' parallel backward, summed as the backward produces them.

Used by :mod:`syncbn_ext.parallel_backward`: every replica's handle on a parameter hands its gradient over as soon as
it is complete, and the sum is formed in replica order (deterministic), in place where nothing else can see the
tensor written.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterator

import torch

__all__ = ["ParameterSums", "Total"]


class ParameterSums:
    """Every replica's gradient of each parameter, summed as the backward produces them.

    A hook on each replica's handle on a parameter takes its gradient (the captured value becomes a free placeholder)
    and adds it to the parameter's total as soon as replica order allows (deterministic sums): a gradient waits only
    for the lower replicas' gradients of the same parameter, so that few replicas' gradients are alive at once. One
    thread at a time adds to a parameter's total, outside the lock; the others leave their gradients to it.

    Each backward run (:meth:`start`) has an id, which its tasks enter with :meth:`task`: a task of an earlier run,
    left running when its caller gave up on it (a failure, an interrupt), adds nothing to a later run's sums.
    """

    def __init__(self, views: list[list[torch.Tensor]]) -> None:
        self.replicas, self.count = len(views), len(views[0])
        self.lock = threading.Lock()
        self.run: int | None = None  # the run being summed (between start and finish); changed under the lock
        self._thread = threading.local()  # .run: the run of the task on this thread
        self.pending: list[list[torch.Tensor | None]] = []  # arrived, not added yet
        self.arrived: list[list[bool]] = []
        self.added: list[int] = []  # per parameter, how many replicas' gradients are in its total
        self.adding: list[bool] = []  # per parameter, whether a thread is adding to its total
        self.totals: list[Total] = []
        # Per replica and parameter, whether the replica's forward retained its handle's gradient (retain_grad):
        # that handle is then given its gradient, not the placeholder that spares a copy of it.
        self.retained = [[view.retains_grad for view in replica_views] for replica_views in views]
        self.reset()
        for replica, replica_views in enumerate(views):
            for index, view in enumerate(replica_views):
                view.register_hook(self._hook(index, replica))

    def reset(self) -> None:
        self.pending = [[None] * self.replicas for _ in range(self.count)]
        self.arrived = [[False] * self.replicas for _ in range(self.count)]
        self.added = [0] * self.count
        self.adding = [False] * self.count
        self.totals = [Total() for _ in range(self.count)]

    def _next_in_order(self, index: int) -> list[torch.Tensor | None]:
        """Under the lock: the arrived gradients that follow the total's in replica order, taken from pending."""
        taken = []
        while self.added[index] < self.replicas and self.arrived[index][self.added[index]]:
            taken.append(self.pending[index][self.added[index]])
            self.pending[index][self.added[index]] = None
            self.added[index] += 1
        return taken

    def _hook(self, index: int, replica: int) -> Callable[[torch.Tensor | None], torch.Tensor | None]:
        def take(grad: torch.Tensor | None) -> torch.Tensor | None:
            if not self.collecting:
                return None  # the summed gradient on its way to the parameter: leave it
            run = getattr(self._thread, "run", None)
            with self.lock:
                if run != self.run:
                    return None  # not a task of the run being summed (one left behind by an earlier run): nothing
                self.pending[index][replica] = grad
                self.arrived[index][replica] = True
                mine = not self.adding[index]
                self.adding[index] = True
                total = self.totals[index]  # this run's, even should a later run start meanwhile
            while mine:
                with self.lock:
                    if run != self.run:
                        break  # a later run started: its state is not ours to touch
                    grads = self._next_in_order(index)
                    if not grads:
                        self.adding[index] = False
                        break
                total.add_all(grads)
            if grad is None or self.retained[replica][index]:
                return None  # (the gradient unchanged)
            if grad.layout != torch.strided:
                return torch.zeros_like(grad)  # a sparse gradient (nn.Embedding(sparse=True)): an empty one
            return torch.zeros((), dtype=grad.dtype, device=grad.device).expand(grad.shape)

        return take

    @property
    def collecting(self) -> bool:
        """Whether a run is being summed: only the replicas' backward tasks, not autograd's own pass of the sums
        through the views."""
        return self.run is not None

    def start(self, run: int) -> None:
        """Run ``run`` (an id no earlier run had) starts: only its tasks' gradients are summed from now on."""
        with self.lock:
            self.reset()
            self.run = run

    @contextlib.contextmanager
    def task(self, run: int) -> Iterator[None]:
        """Marks the calling thread, while entered, as running a backward task of run ``run``."""
        outer = getattr(self._thread, "run", None)
        self._thread.run = run
        try:
            yield
        finally:
            self._thread.run = outer

    def finish(self, run: int) -> list[torch.Tensor | None]:
        """Run ``run``'s sums, once every backward task ended (a replica that did not use a parameter gave none, and
        the gradients after it wait in pending). A task left running adds nothing afterwards."""
        with self.lock:
            if run != self.run:
                raise RuntimeError(f"syncbn_ext: parallel backward run {run} finished while run {self.run} was summed")
            self.run = None
            totals, pendings = self.totals, self.pending
            self.reset()
        for total, pending in zip(totals, pendings, strict=True):
            total.add_all(pending)
        return [total.value for total in totals]


class Total:
    """A running sum: the first gradient as it is, then additions in place, in replica order.

    The first addition goes into one of the two gradients when nothing else can see it (see :func:`_writable`: a
    fresh gradient autograd handed over and let go, as a convolution's or a matrix product's weight gradient is),
    else into one new tensor: a new tensor per step costs a fresh allocation's page faults, on the backward's critical
    path. ``b.add_(a)`` is ``a + b`` to the bit, so the sums do not depend on which one was written. A gradient
    something else may hold is never written: autograd may pass the same tensor elsewhere too, and a user's function
    may keep the gradient it returned.
    """

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None
        self.owned = False

    def add(self, grad: torch.Tensor | None) -> None:
        """Adds ``grad``, which the caller holds in one variable only (so that :func:`_writable` can tell)."""
        if grad is None:
            return
        # A sparse total takes no dense addend (torch adds sparse to dense only): then the dense one takes the sum,
        # as autograd's accumulation does when one replica's gradient is sparse and another's dense.
        sparse_into_dense = self.value is not None and self.value.is_sparse and not grad.is_sparse
        if self.value is None:
            self.value = grad
        elif self.owned and not sparse_into_dense:
            self.value.add_(grad)
        else:
            if _writable(self.value, grad, "value"):
                self.value.add_(grad)
            elif _writable(grad, self.value, "addend"):
                self.value = grad.add_(self.value)
            else:
                self.value = grad + self.value if sparse_into_dense else self.value + grad
            self.owned = True

    def add_all(self, grads: list[torch.Tensor | None]) -> None:
        """Adds ``grads`` in order, taking each out of the list first (the list then holds none of them), so that
        :func:`_writable` can tell when the total holds the only reference."""
        for position in range(len(grads)):
            grad, grads[position] = grads[position], None
            self.add(grad)


def _dense(tensor: torch.Tensor) -> bool:
    """No two elements share memory (an in-place sum into an expanded tensor would add twice)."""
    if tensor.is_contiguous():
        return True
    return (tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last)) or (
        tensor.dim() == 5 and tensor.is_contiguous(memory_format=torch.channels_last_3d)
    )


def _writable(target: torch.Tensor, other: torch.Tensor, role: str) -> bool:
    """Whether ``target += other`` may write ``target``, held by a :class:`Total` as ``role``: a plain dense tensor
    outside any graph, not a view, and nobody else holding it: no other Python reference, no other C++ reference (a
    view keeps its base), no other tensor on its memory. The counts are compared with those of a fresh tensor held the
    same way (measured once at import), so that they do not depend on the interpreter's version."""
    if not (
        type(target) is torch.Tensor
        and not target.requires_grad  # create_graph: the sum must stay differentiable
        and target.layout == torch.strided
        and not target._is_view()
        and target.shape == other.shape
        and target.device == other.device
        and target.dtype == torch.result_type(target, other)
        and _dense(target)
    ):
        return False
    try:
        storage_uses = torch._C._storage_Use_Count(target.untyped_storage()._cdata)
    except NotImplementedError:  # a tensor without storage: vmap's batched gradients (is_grads_batched=True)
        return False
    counts = (sys.getrefcount(target), target._use_count(), storage_uses)
    if _CALIBRATION is not None:
        _CALIBRATION[role] = counts
        return False
    return counts == _SOLE_OWNER_COUNTS[role]


_CALIBRATION: dict[str, tuple[int, int, int]] | None = {}


def _measure_sole_owner_counts() -> dict[str, tuple[int, int, int]]:
    """The reference counts :func:`_writable` sees for fresh tensors held as a total's value, then as an addend."""
    total = Total()
    total.add(torch.zeros(2))
    addend = torch.zeros(2)
    total.add(addend)  # measures both roles, writes neither
    addend = None
    return dict(_CALIBRATION or {})


_SOLE_OWNER_COUNTS = _measure_sole_owner_counts()
_CALIBRATION = None
