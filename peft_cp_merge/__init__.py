"""peft-cp-merge: merge LoRA adapters with a joint CP (tensor) decomposition.

Importing the package registers ``combination_type="cp"`` (and the other registered methods) with PEFT's
``add_weighted_adapter``; :func:`unregister` restores PEFT's original method.

The import itself is light (no torch, PEFT or tensorly), so that the command line starts at once: the public names
are loaded on first use (module ``__getattr__``), and the registration patches ``LoraModel`` right away if PEFT is
already imported, otherwise the moment PEFT is first imported (nothing can call ``add_weighted_adapter`` before).
"""

from __future__ import annotations

from ._lazy import lazy_attributes
from ._version import __version__ as __version__
from .errors import (
    MergeInputError,
    PeftCpMergeError,
    UnknownMergeMethodError,
    UnknownMergeOptionError,
    UnsupportedAdapterError,
)
from .integrations import _register_now_or_when_peft_loads, is_registered, register, unregister

__all__ = [
    "MergedAdapter",
    "load_recipe",
    "merge_adapters",
    "add_weighted_adapter_registry",
    "is_registered",
    "register",
    "unregister",
    "LoraFactors",
    "MergeInputError",
    "MergeMethod",
    "PeftCpMergeError",
    "UnknownMergeMethodError",
    "UnknownMergeOptionError",
    "UnsupportedAdapterError",
    "get_merge_method",
    "list_merge_methods",
    "merge_method",
]

# public name -> the submodule that defines it (imported on first access)
_LAZY = {
    "load_recipe": "files.recipe",
    "MergedAdapter": "files.adapter",
    "merge_adapters": "files.merge",
    "LoraFactors": "methods",
    "MergeMethod": "methods",
    "get_merge_method": "methods",
    "list_merge_methods": "methods",
    "merge_method": "methods",
    "add_weighted_adapter_registry": "integrations.peft",
}


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals(), __all__)



_register_now_or_when_peft_loads()
