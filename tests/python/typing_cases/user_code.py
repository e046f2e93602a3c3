"""Correct code using the public API as README shows it: ``mypy --strict`` must find nothing (test_typing.py)."""

from __future__ import annotations

import torch
from torch import nn

import syncbn_ext


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


def wrapped() -> Net:
    dp = syncbn_ext.DataParallelWithCallback(syncbn_ext.convert_model(Net()), device_ids=["cpu"] * 2)
    patched = syncbn_ext.patch(nn.DataParallel(Net()))
    assert isinstance(patched, nn.DataParallel)
    net: Net = syncbn_ext.DataParallelWithCallback(Net(), ["cpu", torch.device("cpu")]).module  # the wrapped type
    return dp.module if isinstance(dp.module, Net) else net


def layers() -> list[nn.Module]:
    return [
        syncbn_ext.SynchronizedBatchNorm1d(4, eps=1e-3, momentum=None, affine=False, track_running_stats=True),
        syncbn_ext.SynchronizedBatchNorm2d(num_features=4, device="cpu", dtype=torch.float64),
        syncbn_ext.SynchronizedBatchNorm3d(4),
        syncbn_ext.SyncBatchNorm(4, process_group=None),
        syncbn_ext.SyncBatchNorm.convert_sync_batchnorm(Net()),
        syncbn_ext.revert_model(Net()),
    ]


class MyBarrierError(syncbn_ext.BarrierError):
    """Subclassing the compiled module's exceptions."""


def sum_of_copies(items: list[tuple[int, object]]) -> list[tuple[int, object]]:
    total = sum(int(str(message)) for _, message in items)
    return [(copy_id, total) for copy_id, _ in items]


def barrier(timeout: float) -> float:
    master = syncbn_ext.SyncMaster(sum_of_copies, timeout=timeout)
    master.label = "bn"
    master.timeout = 2 * timeout
    pipe: syncbn_ext.SlavePipe = master.register_slave(1)
    ids: list[int] = master.slave_ids
    assert pipe.identifier == 1 and ids == [1] and not master.closed
    future = syncbn_ext.FutureResult()
    future.put(3)
    assert future.ready() and future.get(timeout=1.0) == 3
    try:
        master.abort("stopped")
    except syncbn_ext.BarrierTimeoutError as error:
        raise MyBarrierError(str(error)) from error
    contexts = syncbn_ext.execute_replication_callbacks([nn.Linear(2, 2), nn.Linear(2, 2)])
    names: list[str] = contexts[0].keys()
    assert not names
    return syncbn_ext.default_timeout_seconds() / 2


def information() -> str:
    syncbn_ext.set_sbn_eps_mode("clamp")
    info: syncbn_ext.LoadInfo = syncbn_ext.load_info
    return f"{info.how} {syncbn_ext.get_sbn_eps_mode()} {syncbn_ext.cross_process_transport()}"
