"""Wrong calls that fail at run time: ``mypy --strict`` must flag each line marked ``# error: <code>``, and only
those (test_typing.py). Never run."""

from __future__ import annotations

from torch import nn

import syncbn_ext


def misuse() -> None:
    master = syncbn_ext.SyncMaster()  # error: call-arg
    master = syncbn_ext.SyncMaster(lambda items: items, timeout="10")  # error: arg-type
    master.register_slave("1")  # error: arg-type
    master.regster_slave(1)  # error: attr-defined
    master.slave_ids = [1]  # error: misc
    syncbn_ext.FutureResult(5)  # error: call-arg
    syncbn_ext.FutureResult().get(timeout="x")  # error: arg-type
    syncbn_ext.default_timeout_seconds(5)  # error: call-arg
    syncbn_ext.execute_replication_callbacks(nn.Linear(2, 2))  # error: arg-type
    print(syncbn_ext.BarrierTimeoutError("x").no_such_attr)  # error: attr-defined
    syncbn_ext.SyncBatchNorm.convert_sync_batchnorm("resnet")  # error: arg-type
    syncbn_ext.set_sbn_eps_mode("clip")  # error: arg-type
    conv: nn.Conv2d = syncbn_ext.DataParallelWithCallback(nn.Linear(2, 2), ["cpu"] * 2).module  # error: assignment
    print(conv)
