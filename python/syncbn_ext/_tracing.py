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


def not_compiled(reason: str) -> Callable[[_Function], _Function]:
    """As ``torch.compiler.disable(reason=reason)``, without importing Dynamo now (over a second at import, which a
    process that never compiles need not pay: ``torch.compiler.disable`` imports it where it decorates).

    Where Dynamo is not loaded, nothing compiles: the function runs as it is. Otherwise it runs as
    ``torch.compiler.disable`` makes it run, through torch's own lazy form of it (``torch._disable_dynamo``, which
    imports Dynamo at its first call: a thread still importing it meanwhile is waited for). Dynamo, tracing a
    caller, does not inline the function (``torch.compiler.disable``'s mark and ``reason``: its graph breaks there,
    ``fullgraph=True`` names the function and the reason), and runs its frame as it is (as ``torch._dynamo.skip``
    makes it)."""
    lazy = getattr(torch, "_disable_dynamo", None)

    def decorate(function: _Function) -> _Function:
        if lazy is None:  # a torch without the lazy form
            return torch.compiler.disable(function, reason=reason)
        disabled = lazy(function)

        @functools.wraps(function)
        def call(*args: Any, **kwargs: Any) -> Any:
            if "torch._dynamo" in sys.modules:
                return disabled(*args, **kwargs)
            return function(*args, **kwargs)

        call._torchdynamo_disable = True  # type: ignore[attr-defined]
        call._torchdynamo_disable_msg = reason  # type: ignore[attr-defined]
        _run_frames_as_they_are(call.__code__)
        return call  # type: ignore[return-value]

    return decorate


def _run_frames_as_they_are(code: Any) -> None:
    """Tells Dynamo's frame callback to run ``code``'s frames without compiling them (calls from them are seen as
    any), as ``torch._dynamo.skip`` does, through torch's C module (no Dynamo import). Where this torch lacks the
    means, nothing: Dynamo then compiles the frame, breaking its graph at once, which only costs a compile."""
    eval_frame = getattr(getattr(torch._C, "_dynamo", None), "eval_frame", None)
    try:
        action = eval_frame._FrameAction  # type: ignore[union-attr]
        strategy = eval_frame._FrameExecStrategy(action.SKIP, action.DEFAULT)  # type: ignore[union-attr]
        eval_frame.set_code_exec_strategy(code, strategy)  # type: ignore[union-attr]
    except (AttributeError, TypeError, RuntimeError):
        pass


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
