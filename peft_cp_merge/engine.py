"""Adapter-file engine: merge PEFT LoRA adapters from folders or Hub repos without loading the base model.

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
import json
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from peft.utils.other import get_pattern_key
from tqdm.auto import tqdm

from ._io import atomic_folder, now, package_versions
from .config import (
    check_lora_config,
    check_merge_rank,
    check_option_types,
    check_raw_lora_config,
    merged_config,
    numerical_failure,
    rank_limit,
)
from .errors import MergeInputError, UnsupportedAdapterError
from .methods import LoraFactors, check_weights, get_merge_method
from .methods._linalg import pad_rank

logger = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
PREFIX = "base_model.model."
_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.weight$|^(?P<emodule>.+)\.(?P<ekind>lora_embedding_[AB])$"
)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
# safetensors dtypes accepted as LoRA factors (integer, boolean, complex and float8 factors are refused)
FACTOR_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


# --- sources --------------------------------------------------------------------------------------------------------

@dataclass
class AdapterSource:
    """One resolved source: a local folder holding ``adapter_config.json`` and ``adapter_model.safetensors``.

    ``spec`` is what the user gave; ``repo_id``/``subfolder``/``revision`` are set for Hub sources, ``revision``
    then being the commit hash that was downloaded (so a recipe can pin it).
    """

    spec: str
    path: Path
    config: LoraConfig
    repo_id: str | None = None
    subfolder: str | None = None
    revision: str | None = None

    @property
    def weights_file(self) -> Path:
        return self.path / WEIGHTS_FILE

    def record(self) -> dict[str, Any]:
        """How the recipe names this source (Hub sources pinned to the downloaded commit)."""
        if self.repo_id is None:
            return {"source": self.spec}
        repo = self.repo_id + (f"/{self.subfolder}" if self.subfolder else "")
        return {"source": repo, "revision": self.revision}


def parse_hub_spec(spec: str) -> tuple[str, str | None, str | None]:
    """``user/repo[/sub/folder][@revision]`` -> ``(repo_id, subfolder, revision)``."""
    rest, _, revision = spec.partition("@")
    parts = rest.strip("/").split("/")
    if len(parts) < 2 or not all(re.fullmatch(r"[A-Za-z0-9][\w.\-]*", p) for p in parts):
        raise MergeInputError(
            f"Adapter source {spec!r} is neither an existing local folder nor a Hub id. Give the path of a PEFT "
            "adapter folder (with adapter_config.json), or a Hub id 'user/repo', 'user/repo/subfolder' or "
            "'user/repo@revision'."
        )
    return "/".join(parts[:2]), "/".join(parts[2:]) or None, revision or None


def _download(repo_id: str, subfolder: str | None, revision: str | None, token: str | bool | None) -> Path:
    """``snapshot_download`` of just the adapter files (returns the snapshot root); huggingface_hub's errors
    re-raised with the fix."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    prefix = f"{subfolder}/" if subfolder else ""
    where = f"{repo_id}{'/' + subfolder if subfolder else ''}{'@' + revision if revision else ''}"
    try:
        root = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=[prefix + CONFIG_FILE, prefix + WEIGHTS_FILE, prefix + PICKLE_FILE],
            token=token,
        )
    except GatedRepoError as e:
        raise MergeInputError(f"Hub repo {where!r} is gated: accept its terms on the Hub and log in "
                              f"(`hf auth login` or HF_TOKEN). ({e})") from e
    except RepositoryNotFoundError as e:
        raise MergeInputError(f"Hub repo {repo_id!r} was not found (or is private): check the id, or log in with "
                              f"`hf auth login` / HF_TOKEN for a private repo. ({type(e).__name__})") from e
    except RevisionNotFoundError as e:
        raise MergeInputError(f"Revision {revision!r} does not exist in Hub repo {repo_id!r}: give an existing "
                              "branch, tag or commit after '@'.") from e
    except LocalEntryNotFoundError as e:
        raise MergeInputError(
            f"Cannot get {where!r}: the Hub is unreachable (or HF_HUB_OFFLINE=1) and it is not in the local cache "
            f"({type(e).__name__}). Download it once while online (`hf download {repo_id}`), or pass a local "
            "folder."
        ) from e
    return Path(root)


def resolve_source(spec: str | Path, *, token: str | bool | None = None) -> AdapterSource:
    """A local adapter folder, or a Hub id downloaded (only the adapter files) into the Hugging Face cache."""
    spec = str(spec)
    local = Path(spec).expanduser()
    repo_id = subfolder = revision = None
    if local.exists():
        path = local
    elif spec.startswith((".", "/", "~")) or Path(spec).suffix in (".json", ".safetensors", ".bin"):
        raise MergeInputError(f"Adapter source {spec!r} does not exist. Check the path.")
    else:
        repo_id, subfolder, revision = parse_hub_spec(spec)
        root = _download(repo_id, subfolder, revision, token)
        path, revision = root / (subfolder or ""), root.name  # snapshots/<commit hash>
    if not path.is_dir():
        raise MergeInputError(f"Adapter source {spec!r} is a file; give the adapter folder that contains it.")
    if not (path / CONFIG_FILE).is_file():
        raise MergeInputError(
            f"{spec!r} has no {CONFIG_FILE}: it is not a PEFT adapter folder. Point to the folder written by "
            "`model.save_pretrained(...)` of a PeftModel."
        )
    if not (path / WEIGHTS_FILE).is_file():
        if (path / PICKLE_FILE).is_file():
            raise MergeInputError(
                f"{spec!r} holds only {PICKLE_FILE}, a pickle, which is never loaded here (it can run code). "
                "Convert it once in an environment you trust: load it with `PeftModel.from_pretrained(base, "
                "path)` and re-save with `model.save_pretrained(out, safe_serialization=True)`."
            )
        raise MergeInputError(f"{spec!r} has {CONFIG_FILE} but no {WEIGHTS_FILE}; the adapter is incomplete.")
    return AdapterSource(spec, path, _read_config(path, spec), repo_id, subfolder, revision)


def _read_config(path: Path, spec: str) -> LoraConfig:
    try:
        raw = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MergeInputError(f"{spec!r}: {CONFIG_FILE} is not valid JSON ({e}).") from None
    if not isinstance(raw, dict):
        check_raw_lora_config(raw, spec)
    peft_type = str(raw.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise UnsupportedAdapterError(
            f"Adapter {spec!r} is a {peft_type or 'non-PEFT'} adapter; only LoRA adapters can be merged. "
            "Merge LoRA adapters only."
        )
    check_raw_lora_config(raw, spec)
    try:
        config = LoraConfig.from_pretrained(str(path))
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise MergeInputError(f"Adapter {spec!r}: PEFT cannot read its {CONFIG_FILE} ({type(e).__name__}: {e}). "
                              "Re-save the adapter with PEFT's save_pretrained.") from None
    check_lora_config(config, spec)
    for attr in ("modules_to_save", "trainable_token_indices"):
        if getattr(config, attr, None):
            raise UnsupportedAdapterError(
                f"Adapter {spec!r} also trains full modules ({attr}={getattr(config, attr)!r}), which have no "
                "low-rank form to merge. Merge adapters without them."
            )
    return config


# --- module index ---------------------------------------------------------------------------------------------------

@dataclass
class _Entry:
    """Where one source keeps one module's factors."""

    source: int
    a_key: str
    b_key: str
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    scaling: float
    dtypes: tuple[str, ...] = ("F32",)  # safetensors dtypes of A and B


def _scaling(config: LoraConfig, module: str, rank: int) -> float:
    """``lora_alpha / r`` (``/ sqrt(r)`` with rslora) for ``module``, with ``alpha_pattern`` as PEFT applies it."""
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
    return alpha / (math.sqrt(rank) if config.use_rslora else rank)


def _config_rank(config: LoraConfig, module: str) -> int:
    """The rank ``adapter_config.json`` gives ``module`` (``rank_pattern`` as PEFT applies it, else ``r``)."""
    return config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)


def open_weights(src: AdapterSource, stack: contextlib.ExitStack):
    """``safe_open`` of a source's weights; a truncated or garbage file is a :class:`MergeInputError`."""
    from safetensors import SafetensorError, safe_open

    try:
        return stack.enter_context(safe_open(str(src.weights_file), framework="pt", device="cpu"))
    except (SafetensorError, OSError, ValueError) as e:
        raise MergeInputError(
            f"Adapter {src.spec!r}: {WEIGHTS_FILE} is not a readable safetensors file ({' '.join(str(e).split())}); "
            "it is truncated or corrupt. Download or save the adapter again."
        ) from None


def index_modules(sources: Sequence[AdapterSource], handles) -> dict[str, list[_Entry]]:
    """Module name -> the sources' entries for it, from the safetensors headers only (no tensor is read).

    Checked here, before anything is allocated: every tensor is a LoRA factor of a floating-point dtype, A and B
    agree on a rank of at least 1, which is the rank ``adapter_config.json`` gives the module, and each source holds
    at least one module.
    """
    from safetensors import SafetensorError

    index: dict[str, list[_Entry]] = {}
    for s, (src, fh) in enumerate(zip(sources, handles)):
        found: dict[str, dict[str, str]] = {}
        for key in fh.keys():
            m = _KEY.match(key)
            if m is None:
                raise UnsupportedAdapterError(
                    f"Adapter {src.spec!r} holds tensor {key!r}, which is not a LoRA A/B factor (e.g. DoRA "
                    "magnitudes, biases or full modules). Only plain LoRA adapters can be merged."
                )
            module = m["module"] or m["emodule"]
            kind = (m["kind"] or m["ekind"])[-1]
            found.setdefault(module, {})[kind] = key
        for module, keys in found.items():
            if set(keys) != {"A", "B"}:
                raise MergeInputError(f"Adapter {src.spec!r} has only lora_{''.join(keys)} for module {module!r}; "
                                      "the adapter file is incomplete or corrupt.")
            try:
                a_slice, b_slice = fh.get_slice(keys["A"]), fh.get_slice(keys["B"])
                a_shape, b_shape = tuple(a_slice.get_shape()), tuple(b_slice.get_shape())
                dtypes = (a_slice.get_dtype(), b_slice.get_dtype())
            except SafetensorError as e:
                raise MergeInputError(f"Adapter {src.spec!r}: cannot read tensor headers of {WEIGHTS_FILE} "
                                      f"({e}); the file is corrupt.") from None
            bad = sorted(set(dtypes) - set(FACTOR_DTYPES))
            if bad:
                raise MergeInputError(
                    f"Adapter {src.spec!r} stores the LoRA factors of module {module!r} as {bad[0]}; only "
                    f"floating-point factors ({', '.join(FACTOR_DTYPES.values())}) can be merged. Save the adapter "
                    "with floating-point weights (a quantized adapter must be dequantized first)."
                )
            name = module.removeprefix(PREFIX)
            if len(a_shape) < 2 or len(b_shape) < 2 or a_shape[0] != b_shape[1] or a_shape[0] < 1:
                raise MergeInputError(
                    f"Adapter {src.spec!r} has LoRA factors A {a_shape} and B {b_shape} for module {name!r}: "
                    "expected A (r, in, ...) and B (out, r, ...) with the same rank r >= 1. The adapter is corrupt."
                )
            declared = _config_rank(src.config, name)
            if declared != a_shape[0]:
                raise MergeInputError(
                    f"Adapter {src.spec!r}: {CONFIG_FILE} gives module {name!r} rank {declared}, but its factors "
                    f"have rank {a_shape[0]} (A {a_shape}). The config does not belong to these weights (PEFT could "
                    "not load it either); save the adapter again."
                )
            index.setdefault(name, []).append(
                _Entry(s, keys["A"], keys["B"], a_shape, b_shape, _scaling(src.config, name, a_shape[0]), dtypes)
            )
        if not found:
            raise MergeInputError(f"Adapter {src.spec!r}: {WEIGHTS_FILE} holds no LoRA tensors, so it would "
                                  "contribute nothing. Check that it is the right (complete) adapter.")
    if not index:
        raise MergeInputError("The adapters hold no LoRA factors; nothing to merge.")
    return index


def _signature(entries: list[_Entry]) -> tuple:
    return tuple((e.source, e.a_shape, e.b_shape) for e in entries)


def _check_shapes(name: str, entries: list[_Entry], sources: Sequence[AdapterSource]) -> None:
    first = entries[0]
    out_in = (first.b_shape[0], math.prod(first.a_shape[1:]))
    for e in entries[1:]:
        if (e.b_shape[0], math.prod(e.a_shape[1:])) != out_in or e.a_shape[1:] != first.a_shape[1:]:
            raise MergeInputError(
                f"Module {name!r} has incompatible shapes: {sources[first.source].spec!r} updates a weight of "
                f"shape {out_in} (A {first.a_shape}), {sources[e.source].spec!r} A {e.a_shape} / B {e.b_shape}. "
                "Only adapters for the same base model architecture can be merged."
            )


# --- the merged adapter ---------------------------------------------------------------------------------------------

@dataclass
class MergedAdapter:
    """A merged LoRA adapter in memory: PEFT-format tensors, its ``LoraConfig`` and the recipe that made it."""

    tensors: dict[str, torch.Tensor]
    config: LoraConfig
    recipe: dict[str, Any]
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def config_json(self) -> str:
        """``adapter_config.json`` as PEFT writes it (sorted keys), with set-valued fields (``target_modules``)
        written as sorted lists, so the same merge always gives the same bytes."""
        d = self.config.to_dict()
        for k, v in d.items():
            if isinstance(v, (set, frozenset)):
                d[k] = sorted(v)
        return json.dumps(d, indent=2, sort_keys=True)

    def _write(self, folder: Path) -> None:
        from safetensors.torch import save_file

        from .card import render_card

        (folder / CONFIG_FILE).write_text(self.config_json())
        save_file({k: v.contiguous().cpu() for k, v in self.tensors.items()}, str(folder / WEIGHTS_FILE),
                  metadata={"format": "pt"})
        (folder / "README.md").write_text(render_card(self))

    def save_pretrained(self, save_directory: str | Path, *, overwrite: bool = False) -> Path:
        """Write ``adapter_config.json``, ``adapter_model.safetensors`` and ``README.md`` (the model card with
        the recipe) into a new folder, atomically; an existing folder is refused unless ``overwrite``."""
        try:
            return atomic_folder(save_directory, self._write, overwrite=overwrite)
        except FileExistsError as e:
            raise MergeInputError(str(e)) from None

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, revision: str | None = None,
                    commit_message: str | None = None, token: str | bool | None = None) -> str:
        """Upload the adapter folder to ``repo_id`` (created if missing) in one commit; returns the commit URL."""
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "adapter"
            folder.mkdir()
            self._write(folder)
            info = api.upload_folder(
                repo_id=repo_id, folder_path=str(folder), revision=revision,
                commit_message=commit_message or f"Merge {len(self.recipe['sources'])} LoRA adapters with "
                                                 f"{self.recipe['method']} (peft-cp-merge)",
            )
        return str(getattr(info, "commit_url", info))


# --- merge ----------------------------------------------------------------------------------------------------------

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
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise MergeInputError(f"rank must be a positive integer, got {rank!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise MergeInputError(f"batch_size must be a positive integer, got {batch_size!r}.")
    weights = [1.0 / len(sources)] * len(sources) if weights is None else _weights(weights, len(sources))
    out_dtype = _dtype(dtype)
    device = _device(device)

    srcs = [resolve_source(s, token=token) for s in sources]
    bases = {s.spec: s.config.base_model_name_or_path for s in srcs}
    if base_model is None:
        if len(set(bases.values())) > 1:
            raise MergeInputError(
                f"The adapters were trained on different base models: {bases}. Merging them is only meaningful "
                "for the same base model; if these are the same weights under different names, pass "
                "base_model='<id>' (--base-model) to merge anyway."
            )
        base_model = next(iter(bases.values()))
    configs = [s.config for s in srcs]

    def open_all(stack: contextlib.ExitStack) -> list:
        return [open_weights(s, stack) for s in srcs]

    with contextlib.ExitStack() as stack:
        index = index_modules(srcs, open_all(stack))
    for name, entries in index.items():
        _check_shapes(name, entries, srcs)
    # the default is the largest rank the sources actually hold (the configs agree, see index_modules); a larger
    # rank is refused here, from the headers alone, before any tensor is read or allocated
    default_rank = max(e.a_shape[0] for es in index.values() for e in es)
    limit = rank_limit((sum(e.a_shape[0] for e in es), es[0].b_shape[0], math.prod(es[0].a_shape[1:]))
                       for es in index.values())
    rank = check_merge_rank(rank, "rank", default=default_rank, limit=limit)
    # the output dtype defaults to the sources' (the widest, if they differ); factors are read in at least float32
    # (what the registry computes in anyway) and cast to the output dtype once, at the end, where an overflow is
    # caught (_check_finite)
    src_dtype = functools.reduce(torch.promote_types, sorted(
        {DTYPES[FACTOR_DTYPES[d]] for es in index.values() for e in es for d in e.dtypes}, key=str))
    out_dtype = out_dtype or src_dtype
    load_dtype = torch.promote_types(torch.promote_types(src_dtype, out_dtype), torch.float32)

    batches: dict[tuple, list[str]] = {}
    for name, entries in index.items():
        batches.setdefault(_signature(entries), []).append(name)
    tensors: dict[str, torch.Tensor] = {}
    bar = tqdm(total=len(index), desc=f"merge ({method})", unit="module", disable=not progress)
    for names in batches.values():
        for i in range(0, len(names), batch_size):
            chunk = names[i: i + batch_size]
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
            try:
                merged = m.merge_batch(groups, wts, rank=rank, where=chunk, **resolved)
            except torch.linalg.LinAlgError as e:
                raise numerical_failure(chunk, groups, e) from None
            del groups
            for name, f in zip(chunk, merged):
                f = pad_rank(f, rank)
                e = index[name][0]
                tensors[e.a_key] = f.A.reshape(rank, *e.a_shape[1:]).to("cpu", out_dtype)
                tensors[e.b_key] = f.B.reshape(e.b_shape[0], rank, *e.b_shape[2:]).to("cpu", out_dtype)
                _check_finite(name, tensors[e.a_key], tensors[e.b_key], f)
            bar.update(len(chunk))
    bar.close()

    config = merged_config(configs, rank)
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
    merged = MergedAdapter(tensors, config, recipe, stats)
    stats["bytes"] = merged.nbytes
    logger.info("Merged %d adapters (%d modules) with %s at rank %d in %.2f s (%.1f MB)", len(srcs), len(index),
                method, rank, stats["seconds"], merged.nbytes / 1e6)
    return merged


def _weights(weights: Any, n: int) -> list[float]:
    """:func:`check_weights`, with non-numbers (``["a"]``, ``{...}``) a :class:`MergeInputError` too."""
    try:
        return check_weights(weights, n)
    except MergeInputError:
        raise
    except (TypeError, ValueError, RuntimeError):
        raise MergeInputError(f"weights must be a list of {n} numbers, one per adapter, got {weights!r}.") from None


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
