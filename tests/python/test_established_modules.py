"""Modules written for the established library (their own SyncMaster and replication hook) on our engine.

Memory (the garbage collector must see what a SyncMaster or a context holds), replications of fewer copies
than the last, our layers replicated by another library's wrapper, and the context's own attribute names.
"""

from __future__ import annotations

import gc
import threading
import time
import weakref

import pytest
import torch
from hang_guard import call_with_timeout
from torch import nn

import syncbn_ext
from syncbn_ext import CallbackContext, DataParallelWithCallback, SyncMaster


def _sum_of_messages(intermediates: list[tuple[int, int]]) -> list[tuple[int, int]]:
    total = sum(msg for _, msg in intermediates)
    return [(copy_id, total) for copy_id, _ in intermediates]


class EstablishedStyleCount(nn.Module):
    """Adds the batch size summed over the copies: the established layer's pattern verbatim (master made in
    ``__init__``, its callback a method of the module, no ``reset()`` in the hook)."""

    def __init__(self) -> None:
        super().__init__()
        self._sync_master = SyncMaster(self._data_parallel_master)
        self._is_parallel = False
        self._parallel_id: int | None = None

    def _data_parallel_master(self, intermediates: list[tuple[int, int]]) -> list[tuple[int, int]]:
        return _sum_of_messages(intermediates)

    def __data_parallel_replicate__(self, ctx: CallbackContext, copy_id: int) -> None:
        self._is_parallel = True
        self._parallel_id = copy_id
        if copy_id == 0:
            ctx.sync_master = self._sync_master
        else:
            self._slave_pipe = ctx.sync_master.register_slave(copy_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self._is_parallel and self.training):
            return x + x.shape[0]
        if self._parallel_id == 0:
            return x + self._sync_master.run_master(x.shape[0])
        return x + self._slave_pipe.run_slave(x.shape[0])


def _alive(refs: list[weakref.ref]) -> int:
    gc.collect()
    return sum(ref() is not None for ref in refs)


def test_a_module_owning_a_sync_master_of_one_of_its_methods_is_freed():
    # module -> master -> bound method -> module: a cycle only the garbage collector can free.
    refs = []
    for _ in range(3):
        module = EstablishedStyleCount()
        refs.append(weakref.ref(module))
        del module
    assert _alive(refs) == 0


def test_a_live_master_keeps_its_callback_through_a_collection():
    module = EstablishedStyleCount()
    master = module._sync_master
    assert master.master_callback == module._data_parallel_master
    gc.collect()
    assert master.run_master(5) == 5  # no slaves: the callback with the master's message alone
    assert gc.is_tracked(master)


def test_masters_made_in_copy_zeros_hook_do_not_keep_their_replications_alive():
    refs: list[weakref.ref] = []

    class MasterPerReplication(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("total", torch.zeros(1))

        def _reduce(self, intermediates: list[tuple[int, int]]) -> list[tuple[int, int]]:
            self.total += sum(msg for _, msg in intermediates)
            return _sum_of_messages(intermediates)

        def __data_parallel_replicate__(self, ctx: CallbackContext, copy_id: int) -> None:
            refs.append(weakref.ref(self))
            self.copy_id = copy_id
            if copy_id == 0:
                ctx.sync_master = SyncMaster(self._reduce)  # bound to replica 0: a cycle through the context
            else:
                self.pipe = ctx.sync_master.register_slave(copy_id)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            n = self.master_of(x) if self.copy_id == 0 else self.pipe.run_slave(x.shape[0])
            return x + n

        def master_of(self, x: torch.Tensor) -> int:
            return self._ctx_master.run_master(x.shape[0])

    class KeepsMaster(MasterPerReplication):
        def __data_parallel_replicate__(self, ctx: CallbackContext, copy_id: int) -> None:
            super().__data_parallel_replicate__(ctx, copy_id)
            self._ctx_master = ctx.sync_master

    module = KeepsMaster()
    dp = DataParallelWithCallback(module, device_ids=["cpu"] * 2)
    for _ in range(5):
        out = dp(torch.zeros(4, 1))
        assert torch.equal(out, torch.full((4, 1), 4.0))
    assert module.total.item() == 20  # replica 0's buffer copy, written back after each forward
    assert len(refs) == 10
    assert _alive(refs) == 0


def test_replicas_keeping_their_context_which_keeps_a_replica_are_freed():
    refs: list[weakref.ref] = []

    class KeepsContext(nn.Module):
        def __data_parallel_replicate__(self, ctx: CallbackContext, copy_id: int) -> None:
            refs.append(weakref.ref(self))
            self._ctx = ctx
            if copy_id == 0:
                ctx.master_copy = self  # replica -> context -> replica

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            assert self._ctx.master_copy is not None
            return x

    dp = DataParallelWithCallback(KeepsContext(), device_ids=["cpu"] * 2)
    for _ in range(5):
        dp(torch.zeros(4, 1))
    assert len(refs) == 10
    assert _alive(refs) == 0


def test_a_context_that_holds_itself_is_freed_and_values_of_a_live_one_stay():
    ctx = CallbackContext()
    ctx.me = ctx
    ref = weakref.ref(ctx)
    del ctx
    assert _alive([ref]) == 0

    live = CallbackContext()
    live.value = [1, 2]
    gc.collect()
    assert live.value == [1, 2]


@pytest.mark.parametrize("replicas_before", [3, 2])
def test_a_replication_of_one_copy_after_a_larger_one_runs_without_the_old_copies(monkeypatch, replicas_before):
    # The established hook never calls reset(): a last batch of one sample (one copy) must not wait for the
    # slaves the previous replication registered (it waited the whole timeout, then blamed them).
    monkeypatch.setenv("SYNCBN_TIMEOUT", "60")
    dp = DataParallelWithCallback(EstablishedStyleCount(), device_ids=["cpu"] * replicas_before)
    assert torch.equal(dp(torch.zeros(6, 1)), torch.full((6, 1), 6.0))
    start = time.monotonic()
    out = call_with_timeout(dp, torch.zeros(1, 1), timeout=30)
    assert time.monotonic() - start < 10
    assert torch.equal(out, torch.ones(1, 1))
    # and back to more copies: they register again
    assert torch.equal(dp(torch.zeros(5, 1)), torch.full((5, 1), 5.0))
    assert torch.equal(call_with_timeout(dp, torch.zeros(1, 1), timeout=30), torch.ones(1, 1))


def test_a_master_whose_slaves_are_threads_of_the_modules_own_waits_for_them_inside_a_replica():
    # Only slaves a replication's hooks registered belong to a replication; a replica's master discarded these.
    class Workers(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            master = SyncMaster(_sum_of_messages, timeout=30)
            pipes = [master.register_slave(copy_id) for copy_id in (1, 2, 3)]
            threads = [threading.Thread(target=pipe.run_slave, args=(1,)) for pipe in pipes]
            for thread in threads:
                thread.start()
            total = master.run_master(1)
            for thread in threads:
                thread.join(30)
            return x + total

    dp = DataParallelWithCallback(Workers(), device_ids=["cpu"] * 2)
    assert torch.equal(call_with_timeout(dp, torch.zeros(4, 1), timeout=60), torch.full((4, 1), 4.0))


def test_a_replica_left_behind_finishes_nothing_in_the_next_replication(monkeypatch):
    # Its late return told the group of its closed replication that its copy finished, which reached a SyncMaster the
    # module keeps across replications: the next replication's copy 1, merely late, was reported finished.
    monkeypatch.setenv("SYNCBN_TIMEOUT", "1")

    class Count(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.master = SyncMaster(_sum_of_messages, timeout=30)
            self.step = 0

        def __data_parallel_replicate__(self, ctx: CallbackContext, copy_id: int) -> None:
            self.copy_id = copy_id
            if copy_id == 0:
                self.master.reset()
                ctx.group.add_barrier(self.master)
            else:
                self.pipe = self.master.register_slave(copy_id)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.copy_id == 0:
                return x + self.master.run_master(x.shape[0])
            if self.step == 1:
                time.sleep(1.5)  # late to its pass, within the master's own timeout
            total = self.pipe.run_slave(x.shape[0])
            if self.step == 0:
                time.sleep(2.5)  # slow after its pass: left behind, returns during the next step
            return x + total

    model = Count()
    dp = DataParallelWithCallback(model, device_ids=["cpu"] * 2)
    with pytest.raises(syncbn_ext.BarrierTimeoutError, match=r"replica\(s\) \[1\] did not return"):
        call_with_timeout(dp, torch.zeros(4, 1))
    model.step = 1
    assert torch.equal(call_with_timeout(dp, torch.zeros(4, 1)), torch.full((4, 1), 4.0))
    time.sleep(1.5)  # the thread left behind ends


class ForeignContext:
    """Another library's replication context: a plain object (the established library's CallbackContext)."""


def _run_foreign_replication(module: nn.Module, x: torch.Tensor, copies: int) -> list[torch.Tensor]:
    """Replicates the way the established library's wrapper does: its own contexts, hooks copy by copy, copy 0
    first, each copy on its own thread."""
    replicas = syncbn_ext.replicate_on_cpu(module, copies)
    contexts = [ForeignContext() for _ in replicas[0].modules()]
    for copy_id, replica in enumerate(replicas):
        for ctx, m in zip(contexts, replica.modules(), strict=True):
            if hasattr(m, "__data_parallel_replicate__"):
                m.__data_parallel_replicate__(ctx, copy_id)
    outputs: list[torch.Tensor | None] = [None] * copies
    errors: list[BaseException] = []

    def run(copy_id: int, part: torch.Tensor) -> None:
        try:
            outputs[copy_id] = replicas[copy_id](part)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i, part)) for i, part in enumerate(x.chunk(copies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors, errors
    return outputs  # type: ignore[return-value]


def test_our_layers_replicated_by_another_librarys_wrapper_normalize_over_the_whole_batch(monkeypatch):
    monkeypatch.setenv("SYNCBN_TIMEOUT", "30")
    torch.manual_seed(0)
    layer = syncbn_ext.SynchronizedBatchNorm1d(3).double()
    reference = nn.BatchNorm1d(3).double()
    x = torch.randn(10, 3, dtype=torch.double) * 3 + 1
    outputs = _run_foreign_replication(layer, x, 2)
    torch.testing.assert_close(torch.cat(outputs), reference(x))


def test_under_another_librarys_wrapper_errors_name_the_layer_itself(monkeypatch):
    # Its contexts say nothing of the module's place: errors named every layer "<root>".
    monkeypatch.setenv("SYNCBN_TIMEOUT", "1")
    model = nn.Sequential(nn.Linear(3, 3), syncbn_ext.SynchronizedBatchNorm1d(3))
    replicas = syncbn_ext.replicate_on_cpu(model, 2)
    contexts = [ForeignContext() for _ in replicas[0].modules()]
    for copy_id, replica in enumerate(replicas):
        for ctx, m in zip(contexts, replica.modules(), strict=True):
            if hasattr(m, "__data_parallel_replicate__"):
                m.__data_parallel_replicate__(ctx, copy_id)
    with pytest.raises(syncbn_ext.BarrierTimeoutError) as raised:  # copy 1 never comes
        call_with_timeout(replicas[0], torch.randn(4, 3), timeout=30)
    assert "SynchronizedBatchNorm1d(3) #" in str(raised.value) and "<root>" not in str(raised.value)


def test_a_foreign_context_that_takes_no_attributes_is_a_clear_error():
    layer = syncbn_ext.SynchronizedBatchNorm1d(3)
    replica = syncbn_ext.replicate_on_cpu(layer, 1)[0]
    with pytest.raises(TypeError, match="CallbackContext or an object that takes attributes.*DataParallelWithCallback"):
        replica.__data_parallel_replicate__(object(), 0)


@pytest.mark.parametrize("name", ["group", "position", "module_name", "keys"])
def test_setting_a_name_of_the_context_itself_is_refused_not_shadowed(name):
    ctx = CallbackContext()
    with pytest.raises(AttributeError, match=f"'{name}' belongs to the context itself"):
        setattr(ctx, name, 7)
    assert name not in ctx
