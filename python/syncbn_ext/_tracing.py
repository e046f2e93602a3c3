"""Whether a tracer is recording the ops running now, out of sight of what the synchronized paths do in C++."""

from __future__ import annotations

import torch

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
