"""Adapter sources: a local PEFT adapter folder or a Hub id (``user/repo[/subfolder][@revision]``), resolved to a
folder with a checked ``adapter_config.json``, and the index of its LoRA modules read from the safetensors headers
alone (no tensor is read until the merge asks for it)."""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from peft.utils.other import get_pattern_key

from .._io import file_identities
from ..config import check_lora_config, check_raw_lora_config
from ..errors import MergeInputError, UnsupportedAdapterError

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
    identity: dict[str, tuple[int, int, int, int]] = field(default_factory=dict, repr=False)
    """(size, mtime_ns, inode, device) of the config and weights files, taken before they were first read."""

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
    if not isinstance(spec, (str, Path)) or not str(spec).strip():
        raise MergeInputError(f"Adapter source {spec!r} is empty: give the path of an adapter folder or a Hub id "
                              "(an empty string would silently mean the current folder).")
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
        # snapshots/<commit hash>: the immutable snapshot the id resolved to (its files link to content blobs)
        path, revision = root / (subfolder or ""), root.name
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
    identity = file_identities([path / CONFIG_FILE, path / WEIGHTS_FILE])  # before the first read
    return AdapterSource(spec, path, _read_config(path, spec), repo_id, subfolder, revision, identity)


def _read_config(path: Path, spec: str) -> LoraConfig:
    try:
        raw = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MergeInputError(f"{spec!r}: {CONFIG_FILE} is not valid JSON ({e}).") from None
    except RecursionError:
        raise MergeInputError(f"{spec!r}: {CONFIG_FILE} is nested too deeply to be an adapter config.") from None
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


def open_weights(src: AdapterSource, stack: contextlib.ExitStack) -> Any:
    """``safe_open`` of a source's weights; a truncated or garbage file is a :class:`MergeInputError`."""
    from safetensors import SafetensorError, safe_open

    try:
        return stack.enter_context(safe_open(str(src.weights_file), framework="pt", device="cpu"))
    except (SafetensorError, OSError, ValueError) as e:
        raise MergeInputError(
            f"Adapter {src.spec!r}: {WEIGHTS_FILE} is not a readable safetensors file ({' '.join(str(e).split())}); "
            "it is truncated or corrupt. Download or save the adapter again."
        ) from None


def index_modules(sources: Sequence[AdapterSource], handles: Sequence[Any]) -> dict[str, list[_Entry]]:
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


def batch_key(entries: list[_Entry]) -> tuple:
    """Modules with the same key (sources and shapes) are merged in one batch."""
    return tuple((e.source, e.a_shape, e.b_shape) for e in entries)


def check_shapes(name: str, entries: list[_Entry], sources: Sequence[AdapterSource]) -> None:
    """Every source's update of module ``name`` has the same (out, in); raise naming the adapters otherwise."""
    first = entries[0]
    out_in = (first.b_shape[0], math.prod(first.a_shape[1:]))
    for e in entries[1:]:
        if (e.b_shape[0], math.prod(e.a_shape[1:])) != out_in or e.a_shape[1:] != first.a_shape[1:]:
            raise MergeInputError(
                f"Module {name!r} has incompatible shapes: {sources[first.source].spec!r} updates a weight of "
                f"shape {out_in} (A {first.a_shape}), {sources[e.source].spec!r} A {e.a_shape} / B {e.b_shape}. "
                "Only adapters for the same base model architecture can be merged."
            )


def common_base_model(srcs: Sequence[AdapterSource], base_model: str | None, advice: str) -> str | None:
    """The one base model of ``srcs`` (``base_model`` when the user gave it); sources of different base models are
    refused, with ``advice`` saying what to do instead."""
    if base_model is not None:
        return base_model
    bases = {s.spec: s.config.base_model_name_or_path for s in srcs}
    if len(set(bases.values())) > 1:
        raise MergeInputError(
            f"The adapters were trained on different base models: {bases}. {advice}; if these are the same weights "
            "under different names, pass base_model='<id>' (--base-model)."
        )
    return next(iter(bases.values()))

