"""Deprecated: the ``add_weighted_adapter`` front end lives in :mod:`peft_cp_merge.integrations.peft` now. Use
``peft_cp_merge.register`` / ``unregister`` / ``add_weighted_adapter_registry``; this module re-exports them for one
release."""

import warnings

from .integrations import is_registered, register, unregister
from .integrations.peft import add_weighted_adapter_registry, get_lora_factors

__all__ = ["add_weighted_adapter_registry", "get_lora_factors", "is_registered", "register", "unregister"]

warnings.warn("peft_cp_merge.peft_glue is deprecated; import register, unregister and add_weighted_adapter_registry "
              "from peft_cp_merge (or peft_cp_merge.integrations).", DeprecationWarning, stacklevel=2)
