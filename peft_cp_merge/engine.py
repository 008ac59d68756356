"""Deprecated: the adapter-file merge lives in :mod:`peft_cp_merge.files` now. Use ``peft_cp_merge.merge_adapters``
(or ``peft_cp_merge.files.merge_adapters``); this module re-exports the documented names for one release."""

import warnings

from .files.adapter import MergedAdapter
from .files.merge import merge_adapters
from .files.sources import resolve_source

__all__ = ["MergedAdapter", "merge_adapters", "resolve_source"]

warnings.warn("peft_cp_merge.engine is deprecated; import merge_adapters and MergedAdapter from peft_cp_merge "
              "(or peft_cp_merge.files).", DeprecationWarning, stacklevel=2)
