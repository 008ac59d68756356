"""PEFT front end: ``LoraModel.add_weighted_adapter(combination_type=<ours>)`` through the method registry.

PEFT has no registry of combination types, so :func:`peft_cp_merge.register` (defined, light, in
:mod:`peft_cp_merge.integrations`) wraps ``LoraModel.add_weighted_adapter`` once (idempotently). PEFT's own types go to
the original method untouched; ours come to :func:`add_weighted_adapter_registry`: validated here, merged layer by
layer through the registry, and only then injected, so a failure leaves the model exactly as it was.
``PeftModel.add_weighted_adapter`` forwards to ``LoraModel`` and so works too.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from peft.tuners.lora import LoraLayer, LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import _freeze_adapter

from ..config import check_lora_config, check_mergeable, check_option_types, merged_config, numerical_failure
from ..errors import MergeInputError, UnknownMergeOptionError
from ..methods import LoraFactors, check_weights, get_merge_method

logger = logging.getLogger(__name__)


def get_lora_factors(layer: LoraLayer, adapter: str) -> LoraFactors | None:
    """``(A, B, scaling)`` of ``adapter`` in ``layer`` as 2-D matrices (update ``scaling * B @ A``), or ``None``.

    Linear (and ``Conv1D`` with ``fan_in_fan_out``: the factors are stored unflipped, only the delta is transposed),
    Embedding (``lora_embedding_A`` (r, num_embeddings), ``lora_embedding_B`` (dim, r)) and ConvNd (A flattened to
    (r, in * prod(kernel)), B to (out, r)).
    """
    if adapter in layer.lora_A:
        A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    elif adapter in getattr(layer, "lora_embedding_A", {}):
        A, B = layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]
    else:
        return None
    return LoraFactors(A.detach().flatten(1), B.detach().flatten(1), float(layer.scaling[adapter]))


def _target_params(layer: LoraLayer, adapter: str) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
    if adapter in layer.lora_A:
        return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    return layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]


def _collect_layers(model: LoraModel, adapters, weights) -> tuple[list[str], list[list[LoraFactors]], list[list]]:
    """``(keys, groups, weights)`` of every LoRA layer holding at least one of ``adapters`` (views, no copies)."""
    keys, groups, group_weights = [], [], []
    for key, module in model.model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        present = [(get_lora_factors(module, a), w) for a, w in zip(adapters, weights)]
        present = [(f, w) for f, w in present if f is not None]
        if present:
            keys.append(key)
            groups.append([f for f, _ in present])
            group_weights.append([w for _, w in present])
    return keys, groups, group_weights


def _merge_layers(model: LoraModel, adapters, weights, method, rank, options) -> dict[str, LoraFactors]:
    """Merged factors (exactly the merge's rank each) for every LoRA layer holding at least one of ``adapters``;
    nothing is modified. ``rank`` follows the registry's rule (:meth:`MergeMethod.resolve_rank`).

    All layers go through one :meth:`MergeMethod.merge_batch` call, so batched methods (``cp``) merge the
    equal-shape layers of a model (all ``q_proj``, all ``k_proj``, ...) together, as the file engine does.
    """
    keys, groups, group_weights = _collect_layers(model, adapters, weights)
    if not keys:
        raise MergeInputError(f"None of the adapters {adapters} has LoRA layers in this model; nothing to merge.")
    try:
        merged = method.merge_batch(groups, group_weights, rank=rank, where=keys, **options)
    except torch.linalg.LinAlgError as e:
        raise numerical_failure(keys, groups, e) from None
    return dict(zip(keys, merged))


def add_weighted_adapter_registry(
    model: LoraModel,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str,
    **kwargs: Any,
) -> None:
    """``add_weighted_adapter`` for the registry's combination types (``cp``, ``tsv``, ``knots``, ...).

    Args:
        model: the ``LoraModel`` (``PeftModel.add_weighted_adapter`` forwards here).
        adapters: names of the adapters to merge.
        weights: one weight per adapter; ``w_t`` multiplies the adapter's full update ``s_t B_t A_t`` once.
        adapter_name: name of the new adapter; must not exist yet.
        combination_type: a registered method name (see ``peft_cp_merge.list_merge_methods(peft_only=True)``).
        **kwargs: the method's rank keyword (``cp_rank`` for ``cp``, ``svd_rank`` for the SVD family; default:
            the largest adapter rank; at most ``max`` over layers of ``min(sum_t r_t, out, in)``, as a merged
            update has no higher rank: a larger one is refused before anything is allocated) and its options
            (``cp_init``, ``cp_variant``, ``density``, ...), type-checked up front.

    The new adapter has ``r = lora_alpha = rank`` (scaling exactly 1), ``use_rslora=False``, no rank/alpha
    patterns, and targets the union of the adapters' target modules. It is not activated (as in PEFT).
    """
    method = get_merge_method(combination_type)
    rank = kwargs.pop(method.rank_option, None)
    for peft_only in ("svd_clamp", "svd_full_matrices", "svd_driver"):
        if peft_only in kwargs and peft_only not in method.options:
            raise UnknownMergeOptionError(
                f"`{peft_only}` belongs to PEFT's own SVD types and is not used by combination_type="
                f"{combination_type!r}. Remove it. Valid options: {', '.join(sorted(method.options)) or '(none)'}."
            )
    check_option_types(method, kwargs)
    options = method.resolve_options(kwargs)
    if isinstance(adapters, str) or not adapters:
        raise MergeInputError("`adapters` must be a non-empty list of adapter names, e.g. ['math', 'code'].")
    adapters = list(adapters)
    for name in adapters:
        if name not in model.peft_config:
            raise MergeInputError(
                f"Adapter {name!r} does not exist. Loaded adapters: {sorted(model.peft_config)}. "
                "Load it first with `model.load_adapter(path, adapter_name=...)`."
            )
    if len(set(adapters)) != len(adapters):
        logger.info("Merging an adapter list with repeats: %s", adapters)
    if adapter_name in model.peft_config:
        raise MergeInputError(
            f"An adapter named {adapter_name!r} already exists. Choose a new `adapter_name`, or remove the old one "
            f"with `model.delete_adapter({adapter_name!r})`."
        )
    weights = check_weights(weights, len(adapters), name="`weights`")
    configs = [model.peft_config[name] for name in adapters]
    for name, config in zip(adapters, configs):
        check_lora_config(config, name)
    check_mergeable(configs, adapters)  # the fields they must agree on, and one layer selection for all
    method.resolve_rank(rank)  # the type, before any work

    # Compute everything before touching the model: an error above or here leaves it unchanged.
    merged = _merge_layers(model, adapters, weights, method, rank, options)
    rank = next(iter(merged.values())).rank  # the registry's default or the checked rank (results are padded to it)
    for key, f in merged.items():  # the registry computes in float32 and casts back to the adapters' dtype
        _check_finite(key, f.A, f.B)

    model.peft_config[adapter_name] = merged_config(configs, rank, adapters)
    try:
        model.inject_adapter(model.model, adapter_name)
        _freeze_adapter(model.model, adapter_name)
        for key, module in model.model.named_modules():
            if not isinstance(module, LoraLayer) or (
                adapter_name not in module.lora_A and adapter_name not in getattr(module, "lora_embedding_A", {})
            ):
                continue
            A_param, B_param = _target_params(module, adapter_name)
            f = merged.get(key)
            with torch.no_grad():
                if f is None:  # targeted by the union but holding none of the adapters: no update there
                    A_param.zero_()
                    B_param.zero_()
                    continue
                if not math.isclose(float(module.scaling[adapter_name]), 1.0):
                    raise RuntimeError(f"merged adapter scaling is {module.scaling[adapter_name]} in {key}, not 1")
                A_param.copy_(f.A.reshape(A_param.shape).to(A_param.dtype))
                B_param.copy_(f.B.reshape(B_param.shape).to(B_param.dtype))
            _check_finite(key, A_param, B_param)
    except BaseException:
        _remove_adapter(model, adapter_name)
        raise


def _check_finite(key: str, A: torch.Tensor, B: torch.Tensor) -> None:
    if not (bool(torch.isfinite(A).all()) and bool(torch.isfinite(B).all())):
        dtype = str(A.dtype).removeprefix("torch.")
        raise MergeInputError(
            f"The merged factors of layer {key!r} overflow {dtype} (inf/NaN after the cast to the adapters' dtype); "
            "the model is unchanged. Merge float32 adapters (e.g. after model.float()) or pass smaller weights."
        )


def _remove_adapter(model: LoraModel, adapter_name: str) -> None:
    """Undo a partial injection: delete ``adapter_name`` from every layer and from ``peft_config``."""
    for module in model.model.modules():
        if isinstance(module, BaseTunerLayer):
            module.delete_adapter(adapter_name)
    model.peft_config.pop(adapter_name, None)
