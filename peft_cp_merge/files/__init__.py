"""Merging straight from adapter files or Hub repos, without the base model (front end 2).

``sources`` resolves folders and Hub ids and indexes their modules from the safetensors headers; ``merge`` runs the
registry's method over them (:func:`merge_adapters`); ``adapter`` holds the result (:class:`MergedAdapter`, its
model card); ``recipe`` is the one typed schema of a merge recipe (YAML file or the recipe block of a card).
Importing this package is light: the names below load their module (torch, PEFT) on first use.
"""

from __future__ import annotations

from .._lazy import lazy_attributes

__all__ = ["AdapterSource", "MergedAdapter", "Recipe", "load_recipe", "merge_adapters", "resolve_source"]

_LAZY = {
    "AdapterSource": "sources",
    "resolve_source": "sources",
    "MergedAdapter": "adapter",
    "merge_adapters": "merge",
    "Recipe": "recipe",
    "load_recipe": "recipe",
}

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals(), __all__)
