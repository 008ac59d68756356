"""Config checks and the merged adapter's config, shared by the PEFT glue and the adapter-file engine."""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from collections.abc import Mapping, Sequence
from numbers import Real
from typing import Any

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


# --- up-front checks: raw adapter_config.json values, option types, rank limits --------------------------------------

def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(float(x))


def check_raw_lora_config(raw: Any, name: str) -> None:
    """Type-check the fields of an ``adapter_config.json`` this package relies on, before ``LoraConfig`` sees them.

    ``r`` (and ``rank_pattern`` values) must be positive integers, ``lora_alpha`` (and ``alpha_pattern`` values)
    finite numbers, the flags real booleans, ``target_modules`` a string or a list of strings. The ranks are
    further checked against the tensors' shapes by the engine, so ``r: 1000000000`` never sizes an allocation.
    """
    where = f"Adapter {name!r}: adapter_config.json"
    if not isinstance(raw, dict):
        raise MergeInputError(f"{where} must hold a JSON object (the config PEFT's save_pretrained writes), "
                              f"got a {type(raw).__name__}.")
    if "r" in raw and not (_is_int(raw["r"]) and raw["r"] >= 1):
        raise MergeInputError(f"{where} has r={raw['r']!r}; the LoRA rank must be a positive integer.")
    if "lora_alpha" in raw and not _is_number(raw["lora_alpha"]):
        raise MergeInputError(f"{where} has lora_alpha={raw['lora_alpha']!r}; it must be a finite number.")
    for key, ok, what in (("rank_pattern", lambda v: _is_int(v) and v >= 1, "positive integers"),
                          ("alpha_pattern", _is_number, "finite numbers")):
        pattern = raw.get(key)
        if pattern is None:
            continue
        if not isinstance(pattern, dict) or not all(isinstance(k, str) and ok(v) for k, v in pattern.items()):
            raise MergeInputError(f"{where} has {key}={pattern!r}; it must map module names to {what}.")
    for key in ("use_rslora", "use_dora", "fan_in_fan_out", "lora_bias", "inference_mode"):
        if key in raw and not isinstance(raw[key], bool):
            raise MergeInputError(f"{where} has {key}={raw[key]!r}; it must be true or false.")
    targets = raw.get("target_modules")
    if targets is not None and not isinstance(targets, str) and not (
        isinstance(targets, list) and all(isinstance(t, str) for t in targets)
    ):
        raise MergeInputError(f"{where} has target_modules={targets!r}; it must be a string or a list of strings.")
    base = raw.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise MergeInputError(f"{where} has base_model_name_or_path={base!r}; it must be a string.")


def check_option_types(method, options: Mapping[str, Any]) -> None:
    """Type-check ``options`` against the types of ``method``'s defaults, before the method's own ``validate``.

    A string default takes a string, a float default a finite number, an integer default an integer (``None``
    allowed where the default is a seed, ``*random_state``, meaning "random"), a boolean default a boolean.
    Unknown names are left to :meth:`MergeMethod.resolve_options`, which lists the valid ones.
    """
    for key, value in options.items():
        if key not in method.options:
            continue
        default = method.options[key]
        if key.endswith("random_state"):
            if value is not None and not (_is_int(value) and 0 <= value < 2**32):
                raise MergeInputError(f"{key} must be an integer seed in [0, 2**32) (or None for a random start), "
                                      f"got {value!r}; e.g. {key}={default!r}.")
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise MergeInputError(f"{key} must be true or false, got {value!r}.")
        elif _is_int(default):
            if not _is_int(value):
                raise MergeInputError(f"{key} must be an integer, got {value!r}; e.g. {key}={default!r}.")
        elif isinstance(default, float):
            if not _is_number(value):
                raise MergeInputError(f"{key} must be a finite number, got {value!r}; e.g. {key}={default!r}.")
        elif isinstance(default, str) and not isinstance(value, str):
            raise MergeInputError(f"{key} must be a string, got {value!r}; e.g. {key}={default!r}.")


def numerical_failure(where: Sequence[str], groups, error: Exception) -> MergeInputError:
    """The error for a merge whose linear algebra failed (``torch.linalg.LinAlgError``): factors far outside a
    trained adapter's range (e.g. entries ~1e30, whose squares overflow float32) or degenerate."""
    largest = max((float(t.detach().abs().max()) for g in groups for f in g for t in (f.A, f.B) if t.numel()),
                  default=0.0)
    first = ", ".join(repr(w) for w in list(where)[:3]) + (", ..." if len(where) > 3 else "")
    return MergeInputError(
        f"The merge failed numerically in module(s) {first} ({' '.join(str(error).split())[:160]}). The largest "
        f"factor entry is {largest:.3g}: LoRA factors of a trained adapter are of order 1, and entries beyond ~1e15 "
        "overflow float32 in the merge's products. Rescale or repair the adapter (or pass float64 factors)."
    )
