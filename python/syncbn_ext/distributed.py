"""Synchronization across processes: which ``torch.distributed`` group a synchronized layer merges across.

The merge itself is C++ (``cpp/src/cross_process.cpp``, on the c10d process group torch hands our module): each
process first merges its own replicas' statistics, then its master replica exchanges them with the group's other
ranks (gloo on CPU, NCCL on GPUs), and the merge nodes sum the gradient of the statistics across the group in
backward (one all-gather per synchronized call each way). Ranks that share a host exchange CPU rows through shared
memory instead of the group's backend (set up through the group at its first synchronized call;
``SYNCBN_SHARED_MEMORY=0`` turns it off): see :func:`cross_process_transport`.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

__all__ = ["cross_process_transport", "resolve_group"]


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
    # torch's marker of a rank outside a group (new_group's return there): compared by value, as torch does, since
    # an unpickled one (torch.save, a spawned process) is another object.
    if not isinstance(group, dist.ProcessGroup) and group == dist.GroupMember.NON_GROUP_MEMBER:
        return None
    return group if group.size() > 1 else None


def cross_process_transport(group: Any = None) -> str:
    """How this process's synchronized layers exchange with the other ranks of ``group`` (default: the default group).

    ``"shared memory"``: every rank of the group is on this host (CPU tensors; the default there);
    ``"process group"``: through the group's own backend (ranks on several hosts, ``SYNCBN_SHARED_MEMORY=0`` on some
    rank, GPU tensors); ``"not yet"``: no synchronized call on the group so far (it is decided at the first, alike on
    every rank); ``"none"``: no other rank to exchange with (``torch.distributed`` not initialized, a group of one,
    or this rank not a member).
    """
    from ._native import _C

    resolved = resolve_group(group, default_to_world=True)
    return "none" if resolved is None else _C.cross_process_transport(resolved)
