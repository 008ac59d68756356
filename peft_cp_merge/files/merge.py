"""Merge PEFT LoRA adapters from folders or Hub repos without loading the base model.

    from peft_cp_merge import merge_adapters

    merged = merge_adapters(["user/math-lora", "./code-lora", "user/adapters/qa@v2"], method="cp", rank=16)
    merged.save_pretrained("merged-lora")          # plain PEFT loads it
    merged.push_to_hub("user/merged-lora")

Sources are read with ``safetensors.safe_open`` one batch of modules at a time (modules with equal shapes are
merged together, ``batch_size`` at most), so peak memory is about one batch of factors, never all adapters. The
merge itself is the registry's method (the same function ``add_weighted_adapter`` calls), so the result equals
the PEFT front end's to float tolerance.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .._io import check_unchanged, now, package_versions
from ..config import check_mergeable, check_option_types, merged_config, numerical_failure
from ..errors import MergeInputError
from ..methods import LoraFactors, check_weights, get_merge_method
from ..methods._linalg import single_threaded
from .adapter import MergedAdapter
from .sources import (
    DTYPES,
    FACTOR_DTYPES,
    batch_key,
    check_shapes,
    common_base_model,
    index_modules,
    open_weights,
    resolve_source,
)

logger = logging.getLogger(__name__)
_BATCH_BYTES = 1 << 30


@single_threaded()  # small per-factor work; the methods thread their large products (_linalg.threaded)
def merge_adapters(
    sources: Sequence[str | Path],
    weights: Sequence[float] | None = None,
    method: str = "cp",
    rank: int | None = None,
    *,
    base_model: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    batch_size: int = 32,
    token: str | bool | None = None,
    progress: bool = True,
    **options: Any,
) -> MergedAdapter:
    """Merge LoRA adapters from local folders or Hub ids into one LoRA adapter, without the base model.

    Args:
        sources: PEFT adapter folders, or Hub ids ``user/repo``, ``user/repo/subfolder``, ``user/repo@revision``
            (downloaded with ``huggingface_hub.snapshot_download``: only the adapter files; the cache and
            ``HF_HUB_OFFLINE`` are honoured). Only ``adapter_model.safetensors`` is read, never a pickle.
        weights: one weight per source, multiplying that adapter's update ``s_t B_t A_t``; default ``1/T`` each.
        method: a registered merge method (``cp``, ``tsv``, ``knots``, ``svd``; see ``list_merge_methods()``).
        rank: rank of the merged adapter (default: the largest source rank). Same as ``cp_rank``/``svd_rank``.
            At most ``max`` over modules of ``min(sum_t r_t, out, in)`` (a merged update cannot have a higher rank,
            the extra components would be all zero): a larger rank is refused before anything is allocated.
        base_model: record this base model instead of requiring all sources to name the same one.
        device: where to compute (e.g. ``"cuda"``); default CPU.
        dtype: dtype of the merged factors (default: the sources' dtype, the widest if they differ). Computation is
            float32 (float64 for float64 sources) either way; a result that overflows ``dtype`` (inf in float16)
            is an error naming ``dtype="float32"``.
        batch_size: at most this many equal-shape modules are read and merged together (memory vs speed).
        token: Hub token for private repos (default: the logged-in token).
        progress: show a tqdm bar over modules.
        **options: the method's options (``cp_init``, ``cp_variant``, ``density``, ...).

    Returns:
        a :class:`MergedAdapter` (``save_pretrained``, ``push_to_hub``).
    """
    start = time.perf_counter()
    if not isinstance(method, str):
        raise MergeInputError(f"method must be a string such as 'cp', got {method!r}.")
    m = get_merge_method(method)
    if options.get(m.rank_option) is not None:
        if rank is not None and rank != options[m.rank_option]:
            raise MergeInputError(f"Both rank={rank} and {m.rank_option}={options[m.rank_option]} given; pass one.")
        rank = options.pop(m.rank_option)
    options.pop(m.rank_option, None)
    check_option_types(m, options)
    resolved = m.resolve_options(options)
    try:
        sources = None if isinstance(sources, (str, Path)) else list(sources)
    except TypeError:
        sources = None
    if not sources:
        raise MergeInputError("`sources` must be a non-empty list of adapter folders or Hub ids.")
    for s in sources:  # before any is resolved or downloaded
        if not isinstance(s, (str, Path)) or not str(s).strip():
            raise MergeInputError(f"Source {s!r} is empty or not a path: give an adapter folder or a Hub id "
                                  "(an empty string would silently mean the current folder).")
    m.resolve_rank(rank, option="rank")  # the type, before any source is resolved
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise MergeInputError(f"batch_size must be a positive integer, got {batch_size!r}.")
    weights = [1.0 / len(sources)] * len(sources) if weights is None else check_weights(weights, len(sources))
    out_dtype = _dtype(dtype)
    device = _device(device)

    srcs = [resolve_source(s, token=token) for s in sources]
    base_model = common_base_model(srcs, base_model, "Merging them is only meaningful for the same base model")
    configs = [s.config for s in srcs]
    check_mergeable(configs, [s.spec for s in srcs])  # before any tensor is read

    identities = {k: v for s in srcs for k, v in s.identity.items()}

    def open_all(stack: contextlib.ExitStack) -> list:
        check_unchanged(identities)  # a file replaced since it was first read is never mixed in
        return [open_weights(s, stack) for s in srcs]

    with contextlib.ExitStack() as stack:
        index = index_modules(srcs, open_all(stack))
    for name, entries in index.items():
        check_shapes(name, entries, srcs)
    # the registry's rank rule over every module, from the headers alone (the configs agree with them, see
    # index_modules): a rank no layer can use is refused before any tensor is read or allocated
    modules = [([e.a_shape[0] for e in es], es[0].b_shape[0], math.prod(es[0].a_shape[1:])) for es in index.values()]
    rank = m.resolve_rank(rank, modules, option="rank")
    # the output dtype defaults to the sources' (the widest, if they differ); factors are read in at least float32
    # (what the registry computes in anyway) and cast to the output dtype once, at the end, where an overflow is
    # caught (_check_finite)
    src_dtype = functools.reduce(torch.promote_types, sorted(
        {DTYPES[FACTOR_DTYPES[d]] for es in index.values() for e in es for d in e.dtypes}, key=str))
    out_dtype = out_dtype or src_dtype
    load_dtype = torch.promote_types(torch.promote_types(src_dtype, out_dtype), torch.float32)

    batches: dict[tuple, list[str]] = {}
    for name, entries in index.items():
        batches.setdefault(batch_key(entries), []).append(name)
    tensors: dict[str, torch.Tensor] = {}
    bar = tqdm(total=len(index), desc=f"merge ({method})", unit="module", disable=not progress)
    for names in batches.values():
        # at most _BATCH_BYTES of factors per batch (held twice: as read and stacked), so 256 adapters' batch of 32
        # modules is not a third of all their bytes; small merges keep batches of batch_size modules
        module_bytes = sum(math.prod(e.a_shape) + math.prod(e.b_shape) for e in index[names[0]]) * load_dtype.itemsize
        step = max(1, min(batch_size, _BATCH_BYTES // max(module_bytes, 1)))
        for i in range(0, len(names), step):
            chunk = names[i: i + step]
            groups, wts = [], []
            # the files are memory-mapped: reopening them per batch unmaps the pages read so far, so resident
            # memory stays at about one batch of factors instead of growing to every adapter's bytes
            with contextlib.ExitStack() as stack:
                handles = open_all(stack)
                for name in chunk:
                    group = []
                    for e in index[name]:
                        A = handles[e.source].get_tensor(e.a_key)
                        B = handles[e.source].get_tensor(e.b_key)
                        group.append(LoraFactors(A.flatten(1).to(device, load_dtype),
                                                 B.flatten(1).to(device, load_dtype), e.scaling))
                    groups.append(group)
                    wts.append([weights[e.source] for e in index[name]])
            check_unchanged(identities)  # after this batch's reads: a file rewritten in place meanwhile
            try:
                merged = m.merge_batch(groups, wts, rank=rank, where=chunk, all_modules=modules, **resolved)
            except torch.linalg.LinAlgError as e:
                raise numerical_failure(chunk, groups, e) from None
            del groups
            for name, f in zip(chunk, merged):
                e = index[name][0]
                tensors[e.a_key] = f.A.reshape(rank, *e.a_shape[1:]).to("cpu", out_dtype)
                tensors[e.b_key] = f.B.reshape(e.b_shape[0], rank, *e.b_shape[2:]).to("cpu", out_dtype)
                _check_finite(name, tensors[e.a_key], tensors[e.b_key], f)
            bar.update(len(chunk))
    bar.close()

    config = merged_config(configs, rank, [s.spec for s in srcs])
    config.base_model_name_or_path = base_model
    config.inference_mode = True
    recipe = {
        "sources": [s.record() for s in srcs],
        "weights": weights,
        "method": method,
        "rank": rank,
        "options": {k: v for k, v in resolved.items()},
        "base_model": base_model,
        "dtype": str(out_dtype).removeprefix("torch."),
    }
    stats = {"seconds": time.perf_counter() - start, "modules": len(index), "created": now(),
             "versions": package_versions()}
    merged = MergedAdapter(tensors, config, recipe, stats, source_paths=[s.path for s in srcs])
    stats["bytes"] = merged.nbytes
    logger.info("Merged %d adapters (%d modules) with %s at rank %d in %.2f s (%.1f MB)", len(srcs), len(index),
                method, rank, stats["seconds"], merged.nbytes / 1e6)
    return merged


def _check_finite(name: str, A: torch.Tensor, B: torch.Tensor, computed: LoraFactors) -> None:
    """The merged factors, in their output dtype, hold no inf/NaN (e.g. a float16 overflow)."""
    if bool(torch.isfinite(A).all()) and bool(torch.isfinite(B).all()):
        return
    if bool(torch.isfinite(computed.A).all()) and bool(torch.isfinite(computed.B).all()):
        wider = "float32" if A.dtype in (torch.float16, torch.bfloat16) else "float64"
        raise MergeInputError(
            f"The merged factors of module {name!r} overflow {str(A.dtype).removeprefix('torch.')} (values up to "
            f"{max(float(computed.A.abs().max()), float(computed.B.abs().max())):.3g} become inf). Pass "
            f"--dtype {wider} (dtype='{wider}'), or smaller weights."
        )
    raise MergeInputError(
        f"The merge of module {name!r} produced non-finite values (NaN/inf): the factors are too large for the "
        "computation. Rescale the adapters or pass smaller weights; --dtype float32 does not help here."
    )


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise MergeInputError(f"dtype={dtype!r} is not supported; use one of {sorted(DTYPES)}.")


def _device(device: str | torch.device | None) -> torch.device:
    """``device`` as a ``torch.device`` that exists here (checked with an empty tensor, so nothing is computed on a
    device that is missing)."""
    if device is None:
        return torch.device("cpu")
    if not isinstance(device, (str, torch.device)):
        raise MergeInputError(f"device must be a string such as 'cpu' or 'cuda', got {device!r}.")
    try:
        dev = torch.device(device)
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError, ValueError) as e:
        raise MergeInputError(f"device={str(device)!r} is not usable here ({' '.join(str(e).split())[:200]}); "
                              "use 'cpu', or 'cuda' on a machine with a CUDA GPU.") from None
    return dev
