"""TC-LoRA adapter libraries: cluster training examples in embedding space, train one LoRA per cluster, keep them
as a library (folder or Hub repo), route new inputs to clusters, and CP-merge the library into one adapter.

    from peft_cp_merge.library import LibraryTrainConfig, train_library, AdapterLibrary

    lib = train_library(LibraryTrainConfig(dataset="data.jsonl", output_dir="my-library", num_clusters=4))
    merged = lib.merge(method="cp")
    merged.save_pretrained("merged-adapter")
"""

from .cluster import Clustering, Routing, cluster_embeddings, plot_clusters, route_embeddings
from .config import DEFAULT_EMBEDDING_MODEL, LibraryTrainConfig
from .data import Record, normalize, read_rows
from .embed import embed_texts, load_embedder, resolve_embedding_model
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
from .library import AdapterLibrary
from .train import train_library

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
    "load_embedder",
    "normalize",
    "plot_clusters",
    "read_rows",
    "resolve_embedding_model",
    "route_embeddings",
    "train_library",
]
