"""TC-LoRA adapter libraries: cluster training examples in embedding space, train one LoRA per cluster, keep them
as a library (folder or Hub repo), route new inputs to clusters, and CP-merge the library into one adapter.

    from peft_cp_merge.library import LibraryTrainConfig, train_library, AdapterLibrary

    lib = train_library(LibraryTrainConfig(dataset="data.jsonl", output_dir="my-library", num_clusters=4))
    merged = lib.merge(method="cp")
    merged.save_pretrained("merged-adapter")
"""

from __future__ import annotations

import importlib
import importlib.util

from .._lazy import lazy_attributes
from .config import DEFAULT_EMBEDDING_MODEL, LibraryTrainConfig  # light (yaml; pydantic on validation)
from .errors import (
    ClusteringError,
    EmbeddingModelError,
    LibraryConfigError,
    LibraryDataError,
    LibraryError,
    LibraryExistsError,
    LibraryFormatError,
    RankFailedError,
)

LIBRARY_EXTRA = ("sentence_transformers", "sklearn", "datasets", "matplotlib", "accelerate")
"""The trainer's dependencies, installed with ``pip install 'peft-cp-merge[library]'`` (merging needs none)."""

_missing = [m for m in LIBRARY_EXTRA if importlib.util.find_spec(m) is None]
if _missing:
    raise ImportError(f"peft_cp_merge.library needs {', '.join(_missing)}, which are not installed. Install the "
                      "library extra: pip install 'peft-cp-merge[library]' (merging adapters does not need it).")

# public name -> the submodule that defines it, imported on first access (they import torch, sklearn, ...), so that
# `peft-cp-merge library --help` and the config stay light
_LAZY = {
    "Clustering": "cluster",
    "Routing": "cluster",
    "cluster_embeddings": "cluster",
    "plot_clusters": "cluster",
    "route_embeddings": "cluster",
    "set_arrow_routing": "arrow",
    "Record": "data",
    "normalize": "data",
    "read_rows": "data",
    "embed_texts": "embed",
    "load_embedder": "embed",
    "resolve_embedding_model": "embed",
    "AdapterLibrary": "library",
    "fit_adapter": "train",
    "train_library": "train",
}

__all__ = [
    "AdapterLibrary",
    "Clustering",
    "ClusteringError",
    "DEFAULT_EMBEDDING_MODEL",
    "EmbeddingModelError",
    "LibraryConfigError",
    "LibraryDataError",
    "LibraryError",
    "LibraryExistsError",
    "LibraryFormatError",
    "LibraryTrainConfig",
    "RankFailedError",
    "Record",
    "Routing",
    "cluster_embeddings",
    "embed_texts",
    "fit_adapter",
    "load_embedder",
    "normalize",
    "plot_clusters",
    "read_rows",
    "resolve_embedding_model",
    "route_embeddings",
    "set_arrow_routing",
    "train_library",
]

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals(), __all__)
