"""The math core: merge methods as pure functions over one module's LoRA factors, registered by name.

Adding a method is one new file here with a function decorated by :func:`merge_method`, imported below.
"""

from . import anchors, core, cp, iso, knots, svd, tsv, tucker  # noqa: F401  (registers the methods)
from .registry import (
    LoraFactors,
    MergeMethod,
    check_factors,
    check_weights,
    get_merge_method,
    list_merge_methods,
    merge_method,
)

__all__ = [
    "LoraFactors",
    "MergeMethod",
    "check_factors",
    "check_weights",
    "get_merge_method",
    "list_merge_methods",
    "merge_method",
]
