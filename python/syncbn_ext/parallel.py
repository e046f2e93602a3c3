"""Placeholder: replaced by the DataParallelWithCallback implementation."""
from __future__ import annotations

DataParallelWithCallback = None
patch = None
patch_replication_callback = None
