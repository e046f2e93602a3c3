"""Synchronization across processes: which ``torch.distributed`` group a synchronized layer merges across.

The merge itself is C++ (``cpp/src/cross_process.cpp``, on the c10d process group torch hands our module): each
process first merges its own replicas' statistics, then its master replica exchanges them with the group's other
ranks (gloo on CPU, NCCL on GPUs), and the merge nodes sum the gradient of the statistics across the group in
backward (one all-gather per synchronized call each way). Ranks that share a host exchange CPU rows through shared
memory instead of the group's backend (set up through the group at its first synchronized call;
``SYNCBN_SHARED_MEMORY=0`` turns it off): see :func:`cross_process_transport`.

The layers exchange on a communicator of their own (:func:`exchange_group`), never on the user's gloo group itself:
other users of that group (DistributedDataParallel's gradient all-reduces) issue their collectives in their own
order, which differs between ranks that run their backward differently (autograd's serial backward on one rank,
the replicas' parallel backward on another), so collectives sharing one communicator would pair up wrongly.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["cross_process_transport", "exchange_group", "made_exchange_group", "resolve_group"]


def resolve_group(group: Any, default_to_world: bool, argument: str = "process_group") -> Any:
    """The process group a layer merges across, or ``None`` for this process only.

    ``group`` when given (``None`` on a rank that is not a member of it); else the default group when
    ``default_to_world``. A group of one rank is ``None``; so is every group once ``torch.distributed`` is not
    initialized (never, or after ``destroy_process_group()``: as torch's ``nn.SyncBatchNorm``, the layers then
    normalize alone, not on the communicator they still hold). ``argument``: the group's name in errors.
    """
    if not dist.is_available() or not dist.is_initialized():
        return None
    if group is None:
        if not default_to_world:
            return None
        group = dist.group.WORLD
    # torch's marker of a rank outside a group (new_group's return there): compared by value, as torch does, since
    # an unpickled one (torch.save, a spawned process) is another object; only to a value of its type (an array
    # of ranks compared to it would be an array).
    if not isinstance(group, dist.ProcessGroup):
        outside = dist.GroupMember.NON_GROUP_MEMBER
        if type(group) is type(outside) and group == outside:
            return None
        raise TypeError(
            f"{argument} must be a torch.distributed ProcessGroup (e.g. dist.new_group(ranks)) or None, got "
            f"{group!r} of type {type(group).__name__}"
        )
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

    resolved = resolve_group(group, default_to_world=True, argument="cross_process_transport: group")
    if resolved is None:
        return "none"
    # Where the layers exchange for it: its own group once made (see exchange_group; CPU tensors), else the group
    # itself (other groups, and tensors on devices the group does not serve with gloo: NCCL's).
    own = _own_groups.get(resolved)
    if isinstance(own, dist.ProcessGroup):
        transport = _C.cross_process_transport(own)
        if transport != "not yet":
            return transport
    return _C.cross_process_transport(resolved)


# ---- the layers' own communicator --------------------------------------------------------------------------------

_NOT_YET = object()


class _FailedSetUp:
    """A group whose own communicator could not be set up: its rendezvous keys are spent, so it is not tried again."""

    def __init__(self, message: str) -> None:
        self.message = message


class _SetUpState:
    """A group's set-up: its lock (a set-up waits for the group's other ranks, up to its timeout, so it holds its
    group's lock only: two groups first used from two threads, in other orders on other ranks, go on), and whether
    one was attempted (one interrupted before it recorded its outcome has spent the group's keys all the same)."""

    __slots__ = ("attempted", "lock")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.attempted = False


# user group -> the layers' own group over its ranks, or _FailedSetUp. Weak keys: the user's group is freed as before
# (destroy_process_group ends gloo's threads), and its own group with it.
_own_groups: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_set_up_states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # user group -> _SetUpState
_gloo_device_types: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # user group -> frozenset
_ranks_named: weakref.WeakSet = weakref.WeakSet()  # groups whose global ranks the C++ exchanges know (if any)
# user group -> (its gloo backend, its own group's): the own group's timeout follows the user's, which torch's
# _set_pg_timeout changes (e.g. raised after a first step), as torch's own collectives on the group do.
_timeout_followers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# user group -> why this rank's exchanges on it fail from now on (a forward interrupted before its first call there).
_out_of_step: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_own_groups_lock = threading.Lock()  # guards the dictionaries' writes, never held while waiting


def out_of_step(group: Any) -> bool:
    """Whether this rank's exchanges on ``group`` fail from now on (:func:`mark_out_of_step`)."""
    return group in _out_of_step


def mark_out_of_step(group: Any, reason: str) -> None:
    """Every later exchange of this rank on ``group`` (a :func:`resolve_group` result) fails at once, saying
    ``reason``: the other ranks wait at a call this rank's next one would pair with, one step apart."""
    with _own_groups_lock:
        _out_of_step.setdefault(group, reason)


def exchange_group(group: Any, label: str = "", device: torch.device | None = None) -> Any:
    """The group a synchronized layer's collectives on ``device`` (default CPU) go through for ``group`` (a
    :func:`resolve_group` result).

    For a group made by ``torch.distributed`` (``init_process_group``, ``new_group``, ...) that serves ``device``'s
    type with gloo (CPU tensors of a ``"gloo"`` or ``"cpu:gloo"`` group, or of one made with no backend named): a
    gloo group of its own over the same ranks, with the same timeout, made once per process at the first
    synchronized call on ``group`` with such a device (collectively: every member rank reaches it at the same call,
    per the collective-order rule), on a prefix of ``group``'s store (a connection of its own), outside torch's
    registry of groups (whose names would shift on the member ranks only). Its collectives then cannot pair with
    those of other users of ``group`` (DistributedDataParallel's all-reduces), which ranks issue in different orders
    when they run their backward differently. Other devices (NCCL's), other groups (groups torch does not know) and
    ``None``: unchanged. ``label``: the calling layer, named in the ``DistBackendError`` of a set-up that failed (a
    rank that never came: the group's timeout).
    """
    if group is None:
        return None
    out_of_step = _out_of_step.get(group)
    if out_of_step is not None:
        raise dist.DistBackendError(
            f"{out_of_step}: the ranks are out of step; start the processes again\nin synchronized BatchNorm "
            f"{label} (rank {group.rank()} of {group.size()} of its process group)"
        )
    if ("cpu" if device is None else device.type) not in _gloo_devices(group):
        if group not in _ranks_named:
            _name_global_ranks(group, group)
        return group
    own = _own_groups.get(group, _NOT_YET)
    if own is _NOT_YET:
        own = _set_up(group, label)
    if isinstance(own, _FailedSetUp):
        raise dist.DistBackendError(
            f"the layers' communicator over this group could not be set up ({own.message}); every exchange on the "
            f"group fails from then on: start the processes again\n{_where(group, label)}"
        )
    followed = _timeout_followers.get(group)
    if followed is not None:
        users, ours = followed
        timeout = users.options._timeout
        if timeout != ours.options._timeout:
            ours._set_default_timeout(timeout)
    return own


def made_exchange_group(group: Any, device: torch.device) -> Any:
    """:func:`exchange_group` for ``group`` (a :func:`resolve_group` result) on ``device`` where it is made (or needs
    none), without setting it up; ``None`` where it is not made yet (at the group's first synchronized call)."""
    if device.type not in _gloo_devices(group):
        return group
    own = _own_groups.get(group)
    return own if isinstance(own, dist.ProcessGroup) else None


def _gloo_devices(group: Any) -> frozenset[str]:
    """The device types ``group`` serves with gloo (whatever name it was made with), if torch made it; else none."""
    devices = _gloo_device_types.get(group)
    if devices is None:
        from torch.distributed import distributed_c10d as c10d

        found = []
        if c10d._world.pg_map.get(group) is not None:
            for device in c10d.BackendConfig(dist.Backend.GLOO).get_device_backend_map():
                try:
                    backend = group._get_backend(torch.device(device))
                except RuntimeError:  # no backend for that device type
                    continue
                # TORCH_DISTRIBUTED_DEBUG=DETAIL wraps each backend in a _ProcessGroupWrapper
                if isinstance(getattr(backend, "wrapped_pg", backend), dist.ProcessGroupGloo):
                    found.append(device)
        devices = frozenset(found)
        with _own_groups_lock:
            _gloo_device_types[group] = devices
    return devices


def _a_gloo_device(group: Any) -> torch.device:
    """A device ``group`` serves with gloo: its gloo backend (one for all of them) holds the group's timeout."""
    return torch.device(next(iter(_gloo_devices(group))))


def _set_up(group: Any, label: str) -> Any:
    """``group``'s entry in ``_own_groups``, made by the first caller (the replica threads of a process may arrive
    together)."""
    with _own_groups_lock:
        state = _set_up_states.get(group)
        if state is None:
            state = _set_up_states[group] = _SetUpState()
    with state.lock:
        own = _own_groups.get(group, _NOT_YET)
        if own is not _NOT_YET:
            return own
        if state.attempted:  # interrupted before it recorded its outcome (an exception raised in its handler)
            own = _FailedSetUp("an earlier set-up on this process was interrupted")
        else:
            state.attempted = True  # first: a Ctrl-C may arrive at any Python line from here on
            try:
                own = _new_own_group(group)
            except BaseException as error:  # a timeout, Ctrl-C: its keys in the store are spent
                with _own_groups_lock:
                    _own_groups[group] = _FailedSetUp(f"{type(error).__name__}: {error}")
                if not isinstance(error, Exception):
                    raise
                raise dist.DistBackendError(f"{error}\n{_where(group, label)}") from error
        followed = None
        if not isinstance(own, _FailedSetUp):
            _name_global_ranks(own, group)
            device = _a_gloo_device(group)
            followed = (group._get_backend(device), own._get_backend(device))
        with _own_groups_lock:
            if followed is not None:
                _timeout_followers[group] = followed
            _own_groups[group] = own
        return own


def _global_ranks(group: Any) -> list[int] | None:
    """``group``'s ranks in the default group, in its own rank order, where they differ from its own numbers (a
    subgroup's); else (or for a group torch.distributed does not know) ``None``."""
    try:
        ranks = dist.get_process_group_ranks(group)
    except (RuntimeError, ValueError, KeyError):
        return None
    return None if ranks == list(range(len(ranks))) else ranks


def _name_global_ranks(exchanging: Any, group: Any) -> None:
    """Tells the C++ exchanges on ``exchanging`` (``group`` or its own communicator) ``group``'s global ranks, which
    their errors add to the group's own rank numbers."""
    from ._native import _C

    ranks = _global_ranks(group)
    if ranks is not None:
        _C.set_global_ranks(exchanging, ranks)
    with _own_groups_lock:
        _ranks_named.add(group)


def _where(group: Any, label: str) -> str:
    """As the C++ exchanges' errors name the layer and the group."""
    try:
        backend = dist.get_backend(group)
    except ValueError:  # a group destroyed since (no longer in torch's registry)
        backend = f"{group.name()}, destroyed"
    ranks = _global_ranks(group)
    if ranks is not None:
        listed = ", ".join(map(str, ranks[:16])) + (", ..." if len(ranks) > 16 else "")
        backend += (
            f"; the group's ranks 0..{len(ranks) - 1} are global ranks {listed} (this process: global rank "
            f"{ranks[group.rank()]})"
        )
    return (
        f"in synchronized BatchNorm {label}, setting up its communicator across the process group (rank "
        f"{group.rank()} of {group.size()}, {backend}): every rank of the group sets it up at its first "
        "synchronized call on the group, and waits for the others up to the group's timeout, through the group's "
        "store (where the process serving it, global rank 0's under tcp:// or env://, has exited, it fails too)"
    )


def _new_own_group(group: Any) -> Any:
    """A gloo group over ``group``'s ranks, made as torch's ``_new_process_group_helper`` makes one, serving the
    device types ``group`` serves with gloo (CPU; CUDA too for a pure gloo group, not for ``"cpu:gloo,cuda:nccl"``).
    Holds ``group``'s store, not ``group``."""
    from torch.distributed import distributed_c10d as c10d

    _, group_store = c10d._world.pg_map[group]
    gloo_devices = _gloo_devices(group)
    timeout = group._get_backend(_a_gloo_device(group)).options._timeout
    name = f"syncbn_ext/{group.group_name}"
    try:
        # A connection of its own: a set-up waiting in store.wait on a shared TCPStore client holds that client, so
        # another group's set-up from another thread could not set its keys.
        group_store = group_store.clone()
    except (RuntimeError, NotImplementedError):  # a store that cannot be cloned (a Python one): shared
        pass
    store = dist.PrefixStore(f"{name}/", group_store)
    rank, size = group.rank(), group.size()
    own = dist.ProcessGroup(store, rank, size)
    own._set_default_backend(dist.ProcessGroup.BackendType.GLOO)
    backend = dist.ProcessGroupGloo(dist.PrefixStore("cpu/", store), rank, size, timeout=timeout)
    backend._set_sequence_number_for_group()
    # As torch does for a gloo group: the one backend for every device the group serves with gloo.
    for device in sorted(gloo_devices):
        own._register_backend(torch.device(device), dist.ProcessGroup.BackendType.GLOO, backend)
    own._set_group_name(name)
    own._set_group_desc(name)
    return own
