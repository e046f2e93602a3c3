"""Notes on exceptions, Python 3.10 included (``BaseException.add_note`` is 3.11's)."""

from __future__ import annotations

import contextlib

__all__ = ["add_note"]


def add_note(error: BaseException, note: str) -> None:
    """``error.add_note(note)``; before Python 3.11, which has no ``add_note``, appended to ``__notes__`` as the
    ``exceptiongroup`` backport does (its traceback display shows them)."""
    if hasattr(error, "add_note"):
        error.add_note(note)
        return
    with contextlib.suppress(AttributeError, TypeError):  # an exception class without a __dict__ keeps no note
        error.__notes__ = [*getattr(error, "__notes__", ()), note]
