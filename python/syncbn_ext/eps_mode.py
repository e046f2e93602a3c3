"""How ``eps`` enters the normalization of the synchronized layers: ``nn.BatchNorm``'s or the established library's."""

from __future__ import annotations

from typing import Literal

__all__ = ["get_sbn_eps_mode", "set_sbn_eps_mode"]

_EPS_MODES = ("plus", "clamp")
_eps_mode = "plus"


def set_sbn_eps_mode(mode: Literal["plus", "clamp"]) -> None:
    """Chooses how ``eps`` enters the normalization of batch statistics, for every synchronized layer.

    * ``"plus"`` (default): ``(x - mean) / sqrt(var + eps)``, as ``nn.BatchNorm``.
    * ``"clamp"``: ``(x - mean) / sqrt(max(var, eps))``, as the established Synchronized-BatchNorm-PyTorch
      library: for a channel whose batch variance is well above ``eps`` the output is that of an
      un-regularized normalization.

    The mode applies to every forward that normalizes with *batch* statistics (training mode, or eval mode
    without running statistics), replicated or not, so a model behaves the same with one device and with
    many. Normalization with the *running* statistics (eval mode with tracked statistics) is always
    ``nn.BatchNorm``'s own, ``sqrt(running_var + eps)``, in both modes (as in the established library). The
    running statistics are updated the same way in both modes. The mode is read at each forward; change it
    between forwards, not while one is running.

    Args:
        mode: ``"plus"`` or ``"clamp"``.

    Raises:
        TypeError: ``mode`` is not a string.
        ValueError: ``mode`` is another string.
    """
    global _eps_mode
    if not isinstance(mode, str):
        raise TypeError(f"set_sbn_eps_mode: mode must be 'plus' or 'clamp', got {mode!r} of type {type(mode).__name__}")
    if mode not in _EPS_MODES:
        raise ValueError(f"set_sbn_eps_mode: mode must be 'plus' or 'clamp', got {mode!r}")
    _eps_mode = mode


def get_sbn_eps_mode() -> Literal["plus", "clamp"]:
    """The current eps mode of the synchronized layers, ``"plus"`` or ``"clamp"`` (see :func:`set_sbn_eps_mode`)."""
    return _eps_mode
