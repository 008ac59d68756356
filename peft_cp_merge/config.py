"""Config checks and the merged adapter's config, shared by the PEFT glue and the adapter-file engine."""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Sequence

from peft import LoraConfig

from .errors import MergeInputError, UnsupportedAdapterError


def check_lora_config(config, name: str) -> None:
    """Raise :class:`UnsupportedAdapterError` for adapters these merge methods cannot represent."""
    if not isinstance(config, LoraConfig):
        kind = getattr(config, "peft_type", type(config).__name__)
        raise UnsupportedAdapterError(
            f"Adapter {name!r} is a {kind} adapter; only LoRA adapters can be merged. Merge LoRA adapters only."
        )
    if config.use_dora:
        raise UnsupportedAdapterError(
            f"Adapter {name!r} uses DoRA (use_dora=True); its magnitude vector has no low-rank form to merge. "
            "Merge plain LoRA adapters, or merge DoRA adapters into the base weights with merge_and_unload() first."
        )
    if getattr(config, "lora_bias", False):
        raise UnsupportedAdapterError(
            f"Adapter {name!r} trains a LoRA bias (lora_bias=True), which these merge methods cannot combine. "
            "Use adapters trained with lora_bias=False."
        )
    if getattr(config, "target_parameters", None):
        raise UnsupportedAdapterError(
            f"Adapter {name!r} targets nn.Parameters (target_parameters={config.target_parameters!r}), which "
            "add_weighted_adapter does not support. Use adapters that target modules."
        )


def merged_target_modules(configs: Sequence[LoraConfig]):
    """Union of the adapters' ``target_modules``: a set union, or a regex alternation when they are strings."""
    targets = [c.target_modules for c in configs]
    if all(isinstance(t, str) for t in targets):
        return "|".join(f"({t})" for t in targets)
    if any(isinstance(t, str) for t in targets):
        raise MergeInputError(
            "The adapters mix a regex `target_modules` string with a list of module names; PEFT cannot express "
            "their union. Merge adapters whose target_modules are all lists, or all regex strings."
        )
    return functools.reduce(operator.or_, (set(t) for t in targets))


def merged_config(configs: Sequence[LoraConfig], rank: int) -> LoraConfig:
    """The merged adapter's config: the first one's, with ``r = lora_alpha = rank`` (scaling exactly 1),
    ``use_rslora=False``, ``rank_pattern``/``alpha_pattern`` cleared and the union of target modules.

    ``use_rslora`` is reset because with it the inherited scaling would be ``rank / sqrt(rank)`` (peft #3449).
    """
    return dataclasses.replace(
        configs[0],
        r=rank,
        lora_alpha=rank,
        use_rslora=False,
        rank_pattern={},
        alpha_pattern={},
        target_modules=merged_target_modules(configs),
    )
