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
from .config import check_lora_config, merged_config
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
        raw = json.loads((path / CONFIG_FILE).read_text())
    except json.JSONDecodeError as e:
        raise MergeInputError(f"{spec!r}: {CONFIG_FILE} is not valid JSON ({e}).") from e
    peft_type = str(raw.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise UnsupportedAdapterError(
            f"Adapter {spec!r} is a {peft_type or 'non-PEFT'} adapter; only LoRA adapters can be merged. "
            "Merge LoRA adapters only."
        )
    config = LoraConfig.from_pretrained(str(path))
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


def _scaling(config: LoraConfig, module: str, rank: int) -> float:
    """``lora_alpha / r`` (``/ sqrt(r)`` with rslora) for ``module``, with ``alpha_pattern`` as PEFT applies it."""
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
    return alpha / (math.sqrt(rank) if config.use_rslora else rank)


def index_modules(sources: Sequence[AdapterSource], handles) -> dict[str, list[_Entry]]:
    """Module name -> the sources' entries for it, from the safetensors headers only (no tensor is read)."""
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
            a_shape = tuple(fh.get_slice(keys["A"]).get_shape())
            b_shape = tuple(fh.get_slice(keys["B"]).get_shape())
            name = module.removeprefix(PREFIX)
            index.setdefault(name, []).append(
                _Entry(s, keys["A"], keys["B"], a_shape, b_shape, _scaling(src.config, name, a_shape[0]))
            )
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

    def _write(self, folder: Path) -> None:
        from safetensors.torch import save_file

        from .card import render_card

        self.config.save_pretrained(str(folder))
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
        base_model: record this base model instead of requiring all sources to name the same one.
        device: where to compute (e.g. ``"cuda"``); default CPU.
        dtype: dtype of the merged factors (default: the sources' dtype). Computation is float32 either way.
        batch_size: at most this many equal-shape modules are read and merged together (memory vs speed).
        token: Hub token for private repos (default: the logged-in token).
        progress: show a tqdm bar over modules.
        **options: the method's options (``cp_init``, ``cp_variant``, ``density``, ...).

    Returns:
        a :class:`MergedAdapter` (``save_pretrained``, ``push_to_hub``).
    """
    from safetensors import safe_open

    start = time.perf_counter()
    m = get_merge_method(method)
    if options.get(m.rank_option) is not None:
        if rank is not None and rank != options[m.rank_option]:
            raise MergeInputError(f"Both rank={rank} and {m.rank_option}={options[m.rank_option]} given; pass one.")
        rank = options.pop(m.rank_option)
    options.pop(m.rank_option, None)
    resolved = m.resolve_options(options)
    if isinstance(sources, (str, Path)) or not sources:
        raise MergeInputError("`sources` must be a non-empty list of adapter folders or Hub ids.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise MergeInputError(f"batch_size must be a positive integer, got {batch_size!r}.")
    weights = [1.0 / len(sources)] * len(sources) if weights is None else check_weights(weights, len(sources))
    out_dtype = _dtype(dtype)
    device = torch.device(device) if device is not None else torch.device("cpu")

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
    default_rank = max(max([c.r, *c.rank_pattern.values()]) for c in configs)

    def open_all(stack: contextlib.ExitStack) -> list:
        return [stack.enter_context(safe_open(str(s.weights_file), framework="pt", device="cpu")) for s in srcs]

    with contextlib.ExitStack() as stack:
        index = index_modules(srcs, open_all(stack))
    for name, entries in index.items():
        _check_shapes(name, entries, srcs)
    default_rank = max(default_rank, *(e.a_shape[0] for es in index.values() for e in es))
    rank = default_rank if rank is None else rank
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise MergeInputError(f"rank must be a positive integer, got {rank!r}; e.g. rank={default_rank}.")

    batches: dict[tuple, list[str]] = {}
    for name, entries in index.items():
        batches.setdefault(_signature(entries), []).append(name)
    tensors: dict[str, torch.Tensor] = {}
    bar = tqdm(total=len(index), desc=f"merge ({method})", unit="module", disable=not progress)
    src_dtype = None
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
                        src_dtype = src_dtype or A.dtype
                        group.append(LoraFactors(A.flatten(1).to(device), B.flatten(1).to(device), e.scaling))
                    groups.append(group)
                    wts.append([weights[e.source] for e in index[name]])
            merged = m.merge_batch(groups, wts, rank=rank, where=chunk, **resolved)
            del groups
            for name, f in zip(chunk, merged):
                f = pad_rank(f, rank)
                e = index[name][0]
                dt = out_dtype or f.A.dtype
                tensors[e.a_key] = f.A.reshape(rank, *e.a_shape[1:]).to("cpu", dt)
                tensors[e.b_key] = f.B.reshape(e.b_shape[0], rank, *e.b_shape[2:]).to("cpu", dt)
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
        "dtype": str(out_dtype or src_dtype).removeprefix("torch."),
    }
    stats = {"seconds": time.perf_counter() - start, "modules": len(index), "created": now(),
             "versions": package_versions()}
    merged = MergedAdapter(tensors, config, recipe, stats)
    stats["bytes"] = merged.nbytes
    logger.info("Merged %d adapters (%d modules) with %s at rank %d in %.2f s (%.1f MB)", len(srcs), len(index),
                method, rank, stats["seconds"], merged.nbytes / 1e6)
    return merged


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).removeprefix("torch.")]
    except KeyError:
        raise MergeInputError(f"dtype={dtype!r} is not supported; use one of {sorted(DTYPES)}.") from None
