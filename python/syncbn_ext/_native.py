"""The compiled module, loaded once: every module of the package takes ``_C`` from here.

Loading it here (rather than in the package's ``__init__``) lets the inner modules import it without reaching back
up into the package while it is still initializing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._loader import LoadInfo, load

if TYPE_CHECKING:  # type checkers read the compiled module's stub, _C.pyi
    from . import _C

    load_info: LoadInfo
else:
    _C, load_info = load()

__all__ = ["_C", "load_info"]
