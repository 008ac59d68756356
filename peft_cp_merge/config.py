"""Config checks and the merged adapter's config, shared by the PEFT glue and the adapter-file engine."""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from numbers import Real
from typing import Any, Literal

from peft import LoraConfig

from .errors import MergeInputError, UnsupportedAdapterError

# --- every LoraConfig field, and what a merge does with it ----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FieldRule:
    """What a merge does with one ``LoraConfig`` field.

    ``kind``: ``merged`` (:func:`merged_config` computes the merged adapter's value, as ``how`` says), ``equal``
    (the adapters must agree, the merge keeps the value; with ``unset_ok``, adapters that leave it ``None`` agree
    with any), ``refused`` (an adapter with a value ``allowed`` rejects, by default anything but the field's
    default, is refused by :func:`check_lora_config`) or ``first`` (the first adapter's value is kept: it does not
    change the merged update, as ``how`` says).
    """

    kind: Literal["merged", "equal", "refused", "first"]
    how: str
    allowed: Callable[[Any], bool] | None = None
    unset_ok: bool = False
    fix: str = "Merge adapters without it."


def _off(value: Any) -> bool:
    return not value  # None, False, [] or {}: the feature is not used


def _unset(value: Any) -> bool:
    return value is None  # a variant's config: any value, {} included, enables the variant


# init_lora_weights values whose initialisation changes the base weights (the trained factors then update that
# changed base, not the model the other adapters update)
_BASE_CHANGING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")
_LAYER_SELECTION = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern")

LORA_CONFIG_FIELDS: dict[str, FieldRule] = {
    # PeftConfig
    "task_type": FieldRule("equal", "the PeftModel class that loads the adapter", unset_ok=True),
    "peft_type": FieldRule("refused", "only LoRA adapters are merged", allowed=lambda v: v == "LORA",
                           fix="Merge LoRA adapters only."),
    "auto_mapping": FieldRule("equal", "the base model class AutoPeftModel loads", unset_ok=True),
    "peft_version": FieldRule("merged", "the installed PEFT's version (the merged config is written by it)"),
    "base_model_name_or_path": FieldRule(
        "merged", "merge_adapters: the sources' common base model (different ones refused unless base_model= is "
                  "given); add_weighted_adapter: the model's (the first adapter's), all adapters sitting on it"),
    "revision": FieldRule("equal", "the base model's revision", unset_ok=True),
    "inference_mode": FieldRule("merged", "merge_adapters: True (written for inference); add_weighted_adapter: the "
                                          "first adapter's, as PEFT's own combinations do"),
    # LoraConfig
    "r": FieldRule("merged", "the merge's rank"),
    "lora_alpha": FieldRule("merged", "the merge's rank, so the scaling is exactly 1 (each adapter's scaling is "
                                      "folded into the merged factors)"),
    "use_rslora": FieldRule("merged", "False: with it the scaling would be rank / sqrt(rank), not 1 (peft #3449)"),
    "rank_pattern": FieldRule("merged", "cleared: every merged module has the merge's rank"),
    "alpha_pattern": FieldRule("merged", "cleared: every merged module has scaling 1"),
    "target_modules": FieldRule("merged", "the union of the adapters' target modules (a set union, or a regex "
                                          "alternation); see merged_layer_selection"),
    "exclude_modules": FieldRule("merged", "kept when all adapters agree (with their exclude_modules, "
                                           "layers_to_transform and layers_pattern), else refused"),
    "layers_to_transform": FieldRule("merged", "kept when all adapters agree; the union of the layers when they "
                                               "target the same modules (None, all layers, wins); else refused"),
    "layers_pattern": FieldRule("merged", "kept when all adapters that restrict layers agree on it, else refused"),
    "lora_dropout": FieldRule("first", "dropout is used in training only"),
    "fan_in_fan_out": FieldRule("first", "PEFT sets it from each layer's type when it injects an adapter (True for "
                                         "GPT-2 Conv1D, False for Linear), and the factors are stored alike"),
    "bias": FieldRule("refused", "trained biases are saved outside the LoRA factors and cannot be merged",
                      allowed=lambda v: v == "none", fix="Merge adapters trained with bias='none'."),
    "modules_to_save": FieldRule("refused", "full trained copies of modules have no low-rank form to merge",
                                 allowed=_off),
    "init_lora_weights": FieldRule(
        "merged", "True: the merged factors are the whole adapter; an adapter whose initialisation changed the base "
                  f"weights ({', '.join(_BASE_CHANGING_INITS)}) is refused",
        allowed=lambda v: not (isinstance(v, str) and v.lower().startswith(_BASE_CHANGING_INITS)),
        fix="Save it as a plain LoRA first (PEFT's save_pretrained(..., path_initial_model_for_weight_conversion=...)"
            " converts PiSSA/OLoRA/CorDA adapters), or merge it into its base with merge_and_unload()."),
    "megatron_config": FieldRule("refused", "Megatron's tensor-parallel LoRA layers shard the factors",
                                 allowed=_off),
    "megatron_core": FieldRule("first", "only read together with megatron_config (refused)"),
    "trainable_token_indices": FieldRule("refused", "trained token embeddings have no low-rank form to merge",
                                         allowed=_off),
    "loftq_config": FieldRule("merged", "cleared: only read by init_lora_weights='loftq' (refused)"),
    "eva_config": FieldRule("merged", "cleared: only read when initialising (init_lora_weights is True)"),
    "corda_config": FieldRule("merged", "cleared: only read by init_lora_weights='corda' (refused)"),
    "lora_ga_config": FieldRule("merged", "cleared: only read by init_lora_weights='lora_ga' (refused)"),
    "use_dora": FieldRule("refused", "DoRA's magnitude vector has no low-rank form to merge", allowed=_off,
                          fix="Merge plain LoRA adapters, or merge DoRA adapters into the base weights with "
                              "merge_and_unload() first."),
    "velora_config": FieldRule("refused", "VeLoRA keeps extra buffers beside the factors", allowed=_unset),
    "alora_invocation_tokens": FieldRule("refused", "Activated LoRA applies the update only after its invocation "
                                                    "tokens", allowed=_off),
    "use_qalora": FieldRule("refused", "QALoRA's A factor acts on pooled inputs", allowed=_off),
    "qalora_group_size": FieldRule("first", "only read together with use_qalora (refused)"),
    "monteclora_config": FieldRule("refused", "MonteCLoRA samples its update", allowed=_unset),
    "layer_replication": FieldRule("equal", "the layer stack the adapter's module names refer to"),
    "runtime_config": FieldRule("first", "runtime options, never saved"),
    "lora_bias": FieldRule("refused", "the LoRA bias cannot be combined", allowed=_off,
                           fix="Use adapters trained with lora_bias=False."),
    "target_parameters": FieldRule("refused", "add_weighted_adapter does not support LoRA on nn.Parameters",
                                   allowed=_off, fix="Use adapters that target modules."),
    "use_bdlora": FieldRule("refused", "BD-LoRA's factors are block-diagonal", allowed=_unset),
    "arrow_config": FieldRule("refused", "Arrow routes between adapters per token; merge the library's adapters "
                                         "instead", allowed=_unset),
    "kasa_config": FieldRule("refused", "KaSA changes the base weights and adds a diagonal between the factors",
                             allowed=_unset),
    "ensure_weight_tying": FieldRule("equal", "whether adapters on tied weights are tied"),
}


def _field_defaults() -> dict[str, Any]:
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(LoraConfig)
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}


def _fields_present() -> list[str]:
    return [f.name for f in dataclasses.fields(LoraConfig)]


def _show(value: Any) -> str:
    return f"{value!r:.120}"


def check_lora_config(config, name: str) -> None:
    """Raise :class:`UnsupportedAdapterError` for adapters these merge methods cannot represent: a field of
    :data:`LORA_CONFIG_FIELDS` of kind ``refused`` holds a value that rule does not allow (DoRA, lora_bias, ...)."""
    if not isinstance(config, LoraConfig):
        kind = getattr(config, "peft_type", type(config).__name__)
        raise UnsupportedAdapterError(
            f"Adapter {name!r} is a {kind} adapter; only LoRA adapters can be merged. Merge LoRA adapters only."
        )
    defaults = _field_defaults()
    for field_name in _fields_present():
        rule = LORA_CONFIG_FIELDS.get(field_name)
        value = getattr(config, field_name)
        if rule is None:  # a field of a newer PEFT: merge only adapters that leave it at its default
            if field_name in defaults and _norm(value) != _norm(defaults[field_name]):
                raise UnsupportedAdapterError(
                    f"Adapter {name!r} has {field_name}={_show(value)}, a LoraConfig field this version of "
                    "peft-cp-merge does not know how to merge. Upgrade peft-cp-merge, or merge adapters that leave "
                    f"{field_name} at its default ({defaults[field_name]!r})."
                )
            continue
        if rule.allowed is None and rule.kind != "refused":
            continue
        ok = rule.allowed(value) if rule.allowed is not None else value == defaults.get(field_name)
        if not ok:
            label = "uses DoRA (use_dora=True)" if field_name == "use_dora" else f"has {field_name}={_show(value)}"
            raise UnsupportedAdapterError(f"Adapter {name!r} {label}, which cannot be merged: {rule.how}. {rule.fix}")


def _norm(value: Any) -> Any:
    """A field's value in a comparable form (tuples and lists alike, sets sorted, enums as their value)."""
    if isinstance(value, (list, tuple)):
        return [_norm(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(_norm(v) for v in value)
    if isinstance(value, dict):
        return {k: _norm(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _norm(dataclasses.asdict(value))
    return getattr(value, "value", value)


def _names(configs: Sequence, names: Sequence[str] | None) -> list[str]:
    return list(names) if names is not None else [f"adapter {i}" for i in range(len(configs))]


def check_mergeable(configs: Sequence[LoraConfig], names: Sequence[str] | None = None) -> None:
    """Raise :class:`MergeInputError` when the adapters differ in a field they must agree on (kind ``equal`` of
    :data:`LORA_CONFIG_FIELDS`) or select their modules in ways one config cannot express
    (:func:`merged_layer_selection`). Cheap: the front ends call it before any tensor is read."""
    names = _names(configs, names)
    for field_name in _fields_present():
        rule = LORA_CONFIG_FIELDS.get(field_name)
        if rule is None or rule.kind != "equal":
            continue
        values = [(n, getattr(c, field_name)) for n, c in zip(names, configs)]
        if rule.unset_ok:
            values = [(n, v) for n, v in values if v is not None]
        if len({repr(_norm(v)) for _, v in values}) > 1:
            shown = ", ".join(f"{n!r}: {_show(v)}" for n, v in values[:4])
            raise MergeInputError(
                f"The adapters differ in {field_name} ({shown}), which must be the same for all ({rule.how}). "
                "Merge adapters that agree on it."
            )
    merged_layer_selection(configs, names)


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


def merged_layer_selection(configs: Sequence[LoraConfig], names: Sequence[str] | None = None) -> dict[str, Any]:
    """``target_modules``, ``exclude_modules``, ``layers_to_transform`` and ``layers_pattern`` of the merged
    adapter, chosen so that PEFT applies it to exactly the union of the modules the adapters update.

    PEFT targets a module when it matches ``target_modules`` (exactly, by suffix, or the regex), is not matched by
    ``exclude_modules``, and, for a suffix match, sits in a layer of ``layers_to_transform`` (found with
    ``layers_pattern``). So: when the adapters agree on the last three, the union of ``target_modules`` is exact;
    when they agree on ``target_modules`` and ``exclude_modules`` (and on ``layers_pattern`` among those that
    restrict layers), the union of their layers is exact (``None``, all layers, wins). Any other difference has no
    exact single config and is refused, naming the field.
    """
    names = _names(configs, names)

    def layers(c):
        value = c.layers_to_transform
        if value is None or value == []:
            return None
        return tuple(sorted({value} if isinstance(value, int) else set(value)))

    def pattern(c):
        p = getattr(c, "layers_pattern", None)
        if layers(c) is None or not p:
            return None
        return (p,) if isinstance(p, str) else tuple(p)

    def targets(value):
        return value if isinstance(value, str) or value is None else tuple(sorted(set(value)))

    def exclude(c):
        value = getattr(c, "exclude_modules", None)
        return targets(value) if value else None

    first = configs[0]
    sel = {"exclude_modules": getattr(first, "exclude_modules", None), "layers_to_transform":
           first.layers_to_transform, "layers_pattern": getattr(first, "layers_pattern", None)}
    if len({(exclude(c), layers(c), pattern(c)) for c in configs}) == 1:
        return {"target_modules": merged_target_modules(configs), **sel}
    differing = [f for f, key in (("exclude_modules", exclude), ("target_modules", lambda c: targets(
        c.target_modules))) if len({key(c) for c in configs}) > 1]
    patterns = {pattern(c) for c in configs if layers(c) is not None}
    if len(patterns) > 1:
        differing.append("layers_pattern")
    if differing:
        pairs = list(zip(names, configs))[:4]
        shown = "; ".join(f"{f}: " + ", ".join(f"{n!r}: {_show(getattr(c, f, None))}" for n, c in pairs)
                          for f in differing + ["layers_to_transform"])
        raise MergeInputError(
            f"The adapters select their modules differently ({shown}): no single LoRA config applies the merge to "
            "exactly the modules they update, so PEFT would silently drop part of it. Merge adapters that agree on "
            "exclude_modules, layers_to_transform and layers_pattern, or that target the same modules (their "
            "layers are then united)."
        )
    union = None if any(layers(c) is None for c in configs) else sorted({i for c in configs for i in layers(c)})
    return {"target_modules": first.target_modules, "exclude_modules": getattr(first, "exclude_modules", None),
            "layers_to_transform": union,
            "layers_pattern": next(iter(patterns)) if union is not None and patterns else None}


def merged_config(configs: Sequence[LoraConfig], rank: int, names: Sequence[str] | None = None) -> LoraConfig:
    """The merged adapter's config, field by field as :data:`LORA_CONFIG_FIELDS` says: ``r = lora_alpha = rank``
    (scaling exactly 1), ``use_rslora=False``, ``rank_pattern``/``alpha_pattern`` cleared, the layer selection of
    :func:`merged_layer_selection`, ``init_lora_weights=True`` with the initialisation configs cleared, the
    installed PEFT's version; every other field the first adapter's (after :func:`check_mergeable`).

    ``use_rslora`` is reset because with it the inherited scaling would be ``rank / sqrt(rank)`` (peft #3449).
    """
    check_mergeable(configs, names)
    present = set(_fields_present())
    defaults = _field_defaults()
    changes = dict(r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={},
                   init_lora_weights=True, **merged_layer_selection(configs, names))
    for cleared in ("loftq_config", "eva_config", "corda_config", "lora_ga_config"):
        if cleared in present:
            changes[cleared] = defaults[cleared]
    if "peft_version" in present:
        changes["peft_version"] = None  # PeftConfig fills in the installed version
    for field_name in _fields_present():
        rule = LORA_CONFIG_FIELDS.get(field_name)
        if rule is not None and rule.kind == "equal" and rule.unset_ok and getattr(configs[0], field_name) is None:
            changes[field_name] = next((getattr(c, field_name) for c in configs
                                        if getattr(c, field_name) is not None), None)
    return dataclasses.replace(configs[0], **{k: v for k, v in changes.items() if k in present})


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
