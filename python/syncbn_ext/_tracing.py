"""The dispatch modes around a synchronized forward: whether a tracer is recording the ops running now (out of sight
of what the synchronized paths do in C++), and stepping out of selective activation checkpointing's; functions
torch.compile does not trace (:func:`not_compiled`)."""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.utils.checkpoint
from torch.utils import _python_dispatch

_Function = TypeVar("_Function", bound=Callable[..., Any])


def not_compiled(function: _Function) -> _Function:
    """``torch.compiler.disable(function)`` without importing Dynamo now (over a second at import, which a process
    that never compiles need not pay: ``torch.compiler.disable`` imports it when it decorates).

    Where Dynamo is not loaded, nothing is compiling: the function runs as it is. Otherwise (compiling, or loaded)
    it runs as ``torch.compiler.disable`` makes it run, through torch's own lazy form of it where this torch has one
    (``torch._disable_dynamo``, which imports Dynamo at its first call and which Dynamo skips when it traces)."""
    lazy = getattr(torch, "_disable_dynamo", None)
    if lazy is None:
        return torch.compiler.disable(function)
    disabled = lazy(function)

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        # Compiling: Dynamo reads true here (and never reads sys.modules).
        if torch.compiler.is_compiling() or "torch._dynamo" in sys.modules:
            return disabled(*args, **kwargs)
        return function(*args, **kwargs)

    return call  # type: ignore[return-value]


_RECORDING_MODES = (torch._C._TorchDispatchModeKey.PROXY, torch._C._TorchDispatchModeKey.FAKE)


def being_traced() -> bool:
    """``torch.jit.trace``, ``torch.export``, or a proxy or fake dispatch mode (``make_fx``, AOTAutograd,
    ``FakeTensorMode``): none of them sees the statistics our C++ merges through its barrier, so a graph they
    record would read uninitialized tensors where the merged statistics belong."""
    if torch.jit.is_tracing() or torch.compiler.is_exporting():
        return True
    if torch.compiler.is_compiling():
        return False  # Dynamo: it breaks the graph at our C++ path itself (and cannot trace the mode lookup)
    return any(torch._C._get_dispatch_mode(key) is not None for key in _RECORDING_MODES)


# The modes of torch.utils.checkpoint's selective activation checkpointing (context_fn=
# create_selective_checkpoint_contexts): one caches the block's ops in forward, the other replays them in its
# recomputation. (Private to torch: none where a version lacks them.)
_SELECTIVE_CHECKPOINT_MODES = tuple(
    mode
    for mode in (
        getattr(torch.utils.checkpoint, "_CachingTorchDispatchMode", None),
        getattr(torch.utils.checkpoint, "_CachedTorchDispatchMode", None),
    )
    if mode is not None
)


@contextlib.contextmanager
def outside_selective_checkpointing() -> Iterator[None]:
    """Runs the block without selective activation checkpointing's dispatch modes (other modes stay).

    A synchronized layer's recomputation takes its original call's merged statistics instead of exchanging again,
    so its ops differ from its forward's, which those modes replay op by op (an error naming an op "not found in
    storage"). Out of their sight, the layer is recomputed as under plain checkpointing, which it supports."""
    if not torch._C._len_torch_dispatch_stack():  # the common case, at once
        yield
        return
    stack = _python_dispatch._get_current_dispatch_mode_stack()  # bottom first
    if not _SELECTIVE_CHECKPOINT_MODES or not any(isinstance(m, _SELECTIVE_CHECKPOINT_MODES) for m in stack):
        yield
        return
    popped = [_python_dispatch._pop_mode() for _ in stack]  # top first
    kept = [m for m in reversed(popped) if not isinstance(m, _SELECTIVE_CHECKPOINT_MODES)]
    try:
        for mode in kept:
            _python_dispatch._push_mode(mode)
        yield
    finally:
        for _ in kept:
            _python_dispatch._pop_mode()
        for mode in reversed(popped):
            _python_dispatch._push_mode(mode)
