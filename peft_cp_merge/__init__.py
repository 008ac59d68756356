"""peft-cp-merge: merge LoRA adapters with a joint CP (tensor) decomposition.

Importing the package registers ``combination_type="cp"`` (and the other registered methods) with PEFT's
``add_weighted_adapter``; :func:`unregister` restores PEFT's original method.
"""

from .card import load_recipe
from .engine import MergedAdapter, merge_adapters
from .errors import (
    MergeInputError,
    PeftCpMergeError,
    UnknownMergeMethodError,
    UnknownMergeOptionError,
    UnsupportedAdapterError,
)
from .methods import LoraFactors, MergeMethod, get_merge_method, list_merge_methods, merge_method
from .peft_glue import add_weighted_adapter_registry, is_registered, register, unregister

__version__ = "0.1.0"

register()

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
