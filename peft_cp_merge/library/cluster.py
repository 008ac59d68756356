"""Clustering of example embeddings (scikit-learn KMeans), small-cluster folding, routing and the cluster plot.

Embeddings are L2-normalised, so Euclidean KMeans on them is spherical k-means up to the centroid norm; routing
scores a new input by cosine similarity to the (normalised) centroids:
``w = softmax(top_k(cos(e, c_j)) / temperature)``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .._io import save_figure
from .errors import ClusteringError

logger = logging.getLogger(__name__)


@dataclass
class Clustering:
    """Result of :func:`cluster_embeddings`.

    Attributes:
        centroids: ``(k, dim)`` float32, L2-normalised mean of each cluster's embeddings.
        assignments: ``(n,)`` int64 cluster id of every example, ids ``0..k-1`` all non-empty.
        silhouette: ``{k: score}`` for every k tried (empty when ``num_clusters`` was given).
        folded: ``{small cluster size: target}`` record of folds, for the log and the library card.
    """

    centroids: torch.Tensor
    assignments: torch.Tensor
    silhouette: dict[int, float] = field(default_factory=dict)
    folded: list[str] = field(default_factory=list)

    @property
    def num_clusters(self) -> int:
        return int(self.centroids.shape[0])

    def sizes(self) -> list[int]:
        return torch.bincount(self.assignments, minlength=self.num_clusters).tolist()


def _kmeans(x: np.ndarray, k: int, *, n_init: int, seed: int) -> np.ndarray:
    from sklearn.cluster import KMeans

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "found fewer distinct clusters": handled by dropping empty clusters
        return KMeans(n_clusters=k, init="k-means++", n_init=n_init, random_state=seed).fit_predict(x)


def _centroids(x: np.ndarray, labels: np.ndarray, ids: Sequence[int]) -> np.ndarray:
    c = np.stack([x[labels == i].mean(0) for i in ids])
    return c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)


def cluster_embeddings(
    embeddings: torch.Tensor,
    *,
    num_clusters: int | None = None,
    k_range: tuple[int, int] = (2, 8),
    min_cluster_size: int = 1,
    n_init: int = 10,
    seed: int = 0,
) -> Clustering:
    """KMeans (k-means++, ``n_init`` restarts, ``random_state=seed``) on ``embeddings``.

    ``num_clusters=None`` picks k in ``k_range`` (clipped to ``n - 1``) with the best silhouette score. Then
    empty clusters are dropped and, smallest first, clusters with fewer than ``min_cluster_size`` examples are
    folded into the cluster with the nearest centroid, until none is left below the minimum (or one cluster
    remains). Cluster ids are renumbered ``0..k-1`` by decreasing size, ties by first example.
    """
    x = embeddings.detach().float().cpu().numpy()
    n = x.shape[0]
    if n == 0:
        raise ClusteringError("No embeddings to cluster: the dataset is empty.")
    silhouette: dict[int, float] = {}
    if num_clusters is not None:
        if num_clusters > n:
            raise ClusteringError(
                f"num_clusters={num_clusters} but there are only {n} examples. Use num_clusters <= {n}, or null to "
                "choose it by silhouette."
            )
        labels = _kmeans(x, num_clusters, n_init=n_init, seed=seed) if num_clusters > 1 else np.zeros(n, int)
    else:
        lo, hi = k_range[0], min(k_range[1], n - 1)
        if n < 3 or lo > hi:
            raise ClusteringError(
                f"Choosing the number of clusters by silhouette needs more than min_clusters={k_range[0]} examples; "
                f"there are {n}. Set num_clusters explicitly or provide more data."
            )
        from sklearn.metrics import silhouette_score

        best = None
        for k in range(lo, hi + 1):
            lab = _kmeans(x, k, n_init=n_init, seed=seed)
            if len(set(lab.tolist())) < 2:
                continue
            silhouette[k] = float(silhouette_score(x, lab, metric="cosine"))
            if best is None or silhouette[k] > silhouette[best[0]] + 1e-9:
                best = (k, lab)
        if best is None:
            raise ClusteringError("All examples embed to the same point; there is nothing to cluster. "
                                  "Set num_clusters=1 or check the text fields.")
        labels = best[1]
        logger.info("silhouette by k: %s -> k=%d", {k: round(v, 3) for k, v in silhouette.items()}, best[0])

    ids = sorted(set(labels.tolist()))
    if num_clusters is not None and len(ids) < num_clusters:
        logger.warning("KMeans left %d of %d clusters empty (duplicate embeddings); they are dropped.",
                       num_clusters - len(ids), num_clusters)
    folded: list[str] = []
    while len(ids) > 1:
        sizes = {i: int((labels == i).sum()) for i in ids}
        small = min(ids, key=lambda i: (sizes[i], i))
        if sizes[small] >= min_cluster_size:
            break
        cent = dict(zip(ids, _centroids(x, labels, ids)))
        target = max((i for i in ids if i != small), key=lambda i: float(cent[i] @ cent[small]))
        labels = np.where(labels == small, target, labels)
        folded.append(f"cluster of {sizes[small]} example(s) folded into one of {sizes[target]}")
        ids.remove(small)
    if folded:
        logger.warning("min_cluster_size=%d: %s", min_cluster_size, "; ".join(folded))
    if len(ids) == 1 and int((labels == ids[0]).sum()) < min_cluster_size:
        raise ClusteringError(
            f"All {n} examples together are fewer than min_cluster_size={min_cluster_size}; no cluster can be "
            "trained. Lower min_cluster_size or provide more data."
        )
    # renumber: decreasing size, ties by first occurrence (stable across runs and platforms)
    first = {i: int(np.argmax(labels == i)) for i in ids}
    order = sorted(ids, key=lambda i: (-int((labels == i).sum()), first[i]))
    remap = {old: new for new, old in enumerate(order)}
    new_labels = np.array([remap[v] for v in labels.tolist()], dtype=np.int64)
    cents = _centroids(x, new_labels, range(len(order)))
    return Clustering(torch.from_numpy(cents.astype(np.float32)), torch.from_numpy(new_labels), silhouette, folded)


@dataclass
class Routing:
    """Routing of new inputs: ``ids[i]`` are the ``top_k`` clusters of input ``i`` (best first), ``weights[i]``
    their soft weights (sum to 1), ``scores[i]`` their cosine similarities."""

    ids: torch.Tensor
    weights: torch.Tensor
    scores: torch.Tensor

    @property
    def top1(self) -> list[int]:
        return self.ids[:, 0].tolist()


def route_embeddings(embeddings: torch.Tensor, centroids: torch.Tensor, *, top_k: int = 1,
                     temperature: float = 0.05) -> Routing:
    """Cosine similarity to the centroids, top ``k``, softmax with ``temperature`` over the kept clusters."""
    k = centroids.shape[0]
    if not 1 <= top_k <= k:
        raise ValueError(f"top_k must be between 1 and the number of clusters ({k}), got {top_k}.")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    e = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    c = torch.nn.functional.normalize(centroids.float(), dim=-1)
    scores, ids = (e @ c.T).topk(top_k, dim=-1)
    return Routing(ids, torch.softmax(scores / temperature, dim=-1), scores)


def plot_clusters(embeddings: torch.Tensor, assignments: torch.Tensor, path: str | Path, *,
                  title: str = "Training examples by cluster") -> Path:
    """PNG: the embeddings projected to 2-D by PCA, coloured by cluster, next to a bar chart of cluster sizes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    x = embeddings.float().cpu().numpy()
    a = assignments.cpu().numpy()
    k = int(a.max()) + 1
    xy = PCA(n_components=2, random_state=0).fit_transform(x) if x.shape[0] >= 2 and x.shape[1] >= 2 else \
        np.zeros((x.shape[0], 2))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    cmap = plt.get_cmap("tab10" if k <= 10 else "tab20")
    for i in range(k):
        m = a == i
        ax1.scatter(xy[m, 0], xy[m, 1], s=10, alpha=0.7, color=cmap(i % cmap.N), label=f"cluster {i}")
    ax1.set_title(title)
    ax1.set_xlabel("PC 1")
    ax1.set_ylabel("PC 2")
    if k <= 20:
        ax1.legend(fontsize=7, markerscale=1.5, loc="best")
    sizes = np.bincount(a, minlength=k)
    ax2.bar(range(k), sizes, color=[cmap(i % cmap.N) for i in range(k)])
    ax2.set_xlabel("cluster")
    ax2.set_ylabel("examples")
    ax2.set_title("Cluster sizes")
    ax2.set_xticks(range(k))
    return save_figure(fig, path)


# --- clustering adapters by their parameters (AdapterLibrary.from_adapters) ---------------------------------------

def _gaussian(rows: int, cols: int, key: str, seed: int) -> torch.Tensor:
    """A ``rows x cols`` N(0, 1) matrix determined by ``key`` (a module and side) and ``seed``, the same for every
    adapter, so their sketches are comparable."""
    import zlib

    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    return torch.randn(rows, cols, generator=g, dtype=torch.float64)


def sketch_adapters(sources, *, sketch_dim: int = 16, seed: int = 0, progress: bool = True) -> np.ndarray:
    """One row per adapter: the concatenation over modules of ``Psi_m^T (s B A) Omega_m / sketch_dim``, a
    ``sketch_dim x sketch_dim`` two-sided Gaussian sketch of each module's update, computed from the factors as
    ``(Psi^T B)(A Omega)`` (never the dense ``out x in`` update).

    ``sources`` are resolved :class:`peft_cp_merge.files.sources.AdapterSource` objects; their modules are read from
    the safetensors headers and the factors one adapter at a time (memory: one adapter's factors plus its sketch).
    A module an adapter does not have contributes zeros (its update is zero). The Gaussian test matrices are shared
    by every adapter (seeded per module), so ``<sketch_1, sketch_2>`` is an unbiased estimate of ``sum_m <dW1_m,
    dW2_m>_F``: cosines of sketches approximate cosines of the updates themselves (Johnson-Lindenstrauss).
    """
    import contextlib

    from tqdm.auto import tqdm

    from ..files.sources import index_modules, open_weights

    shapes: dict[str, tuple[int, int]] = {}
    per_source: list[dict] = []
    with contextlib.ExitStack() as stack:
        for src in sources:  # headers only: the modules and shapes of every adapter, checked as for a merge
            index = index_modules([src], [open_weights(src, stack)])
            per_source.append({name: entries[0] for name, entries in index.items()})
    for entries in per_source:
        for name, e in entries.items():
            out_in = (e.b_shape[0], int(np.prod(e.a_shape[1:])))
            if shapes.setdefault(name, out_in) != out_in:
                raise ClusteringError(
                    f"Module {name!r} has shape {out_in} in one adapter and {shapes[name]} in another: the adapters "
                    "are not for the same base model architecture."
                )
    names = sorted(shapes)
    q = sketch_dim
    rows = np.zeros((len(sources), len(names) * q * q), dtype=np.float32)
    tests = {}
    for i, (src, entries) in enumerate(tqdm(list(zip(sources, per_source)), desc="sketch adapters", unit="adapter",
                                            disable=not progress)):
        with contextlib.ExitStack() as stack:
            fh = open_weights(src, stack)
            for j, name in enumerate(names):
                e = entries.get(name)
                if e is None:
                    continue
                out, inp = shapes[name]
                if name not in tests:
                    tests[name] = (_gaussian(out, q, name + ":out", seed), _gaussian(inp, q, name + ":in", seed))
                psi, omega = tests[name]
                A = fh.get_tensor(e.a_key).flatten(1).double()
                B = fh.get_tensor(e.b_key).flatten(1).double()
                sk = (psi.T @ B) @ (A @ omega) * (e.scaling / q)
                rows[i, j * q * q:(j + 1) * q * q] = sk.flatten().numpy()
    if not np.isfinite(rows).all():
        bad = sorted({sources[i].spec for i in np.nonzero(~np.isfinite(rows).all(1))[0]})
        raise ClusteringError(f"Adapters {bad[:3]} have non-finite (inf/NaN) weights; they cannot be clustered.")
    return rows


def embed_sketches(rows: np.ndarray, *, components: int = 32, seed: int = 0) -> np.ndarray:
    """Rows L2-normalised (each adapter counts by direction, not by the size of its update), reduced with
    scikit-learn's ``TruncatedSVD`` (randomized, no centring: cosine geometry is kept) to at most ``components``
    dimensions, and normalised again: the adapter embedding k-means runs on."""
    from sklearn.decomposition import TruncatedSVD

    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    zero = np.nonzero(norms[:, 0] == 0)[0]
    if len(zero):
        raise ClusteringError(f"Adapter(s) {zero.tolist()[:5]} (by position) have an all-zero update (e.g. "
                              "untrained LoRA B = 0); they have no direction to cluster by. Leave them out.")
    x = rows / norms
    n, d = x.shape
    c = min(components, n - 1, d - 1)
    if c >= 1:
        x = TruncatedSVD(n_components=c, algorithm="randomized", random_state=seed).fit_transform(x)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def cluster_adapters(sources, *, num_clusters: int | None = None, k_range: tuple[int, int] = (2, 16),
                     sketch_dim: int = 16, components: int = 32, n_init: int = 10, seed: int = 0,
                     progress: bool = True) -> tuple[Clustering, np.ndarray]:
    """Model-based clustering of LoRA adapters (mttl's MBC, "Towards Modular LLMs by Building and Reusing a Library
    of LoRAs"): embed each adapter by its parameters and run k-means on cosine similarity.

    mttl flattens each adapter's LoRA factors and reduces them with a truncated SVD. Flattened factors depend on the
    factorisation, not only on the update: ``B A = (B G)(G^-1 A)`` for any invertible ``G``, so two adapters with the
    same update but different initialisations (different seeds, other trainers, Hub LoRAs) can look unrelated. Here
    each adapter is instead a sketch of its updates (:func:`sketch_adapters`, from the factors, linear in the update
    and invariant to the factorisation), then L2-normalised, reduced with ``TruncatedSVD`` and normalised again
    (:func:`embed_sketches`); k-means on unit rows is spherical k-means, and with ``num_clusters=None`` k is the one
    in ``k_range`` with the best cosine silhouette (:func:`cluster_embeddings`, which also renumbers clusters by
    decreasing size). Returns the clustering (centroids in that embedding space) and the embedding.
    """
    n = len(sources)
    if n == 0:
        raise ClusteringError("No adapters to cluster.")
    if num_clusters is not None and not 1 <= num_clusters <= n:
        raise ClusteringError(f"num_clusters={num_clusters} for {n} adapters: give 1 <= num_clusters <= {n}, or None "
                              "to choose it by silhouette.")
    if num_clusters is None and n < 3:
        raise ClusteringError(f"Choosing the number of clusters by silhouette needs at least 3 adapters; got {n}. "
                              "Pass num_clusters.")
    emb = embed_sketches(sketch_adapters(sources, sketch_dim=sketch_dim, seed=seed, progress=progress),
                         components=components, seed=seed)
    clustering = cluster_embeddings(torch.from_numpy(emb.astype(np.float32)), num_clusters=num_clusters,
                                    k_range=k_range, n_init=n_init, seed=seed)
    return clustering, emb
