"""Synchronization across processes: which ``torch.distributed`` group a synchronized layer merges across.

The merge itself is C++ (``cpp/src/cross_process.cpp``, on the c10d process group torch hands our module): each
process first merges its own replicas' statistics, then its master replica exchanges them with the group's other
ranks (gloo on CPU, NCCL on GPUs), and the merge nodes sum the gradient of the statistics across the group in
backward (one all-gather per synchronized call each way).
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

__all__ = ["resolve_group"]


def resolve_group(group: Any, default_to_world: bool) -> Any:
    """The process group a layer merges across, or ``None`` for this process only.

    ``group`` when given (``None`` on a rank that is not a member of it); else the default group when
    ``default_to_world`` and ``torch.distributed`` is initialized. A group of one rank is ``None``.
    """
    if not dist.is_available():
        return None
    if group is None:
        if not default_to_world or not dist.is_initialized():
            return None
        group = dist.group.WORLD
    if group is dist.GroupMember.NON_GROUP_MEMBER:
        return None
    return group if group.size() > 1 else None
