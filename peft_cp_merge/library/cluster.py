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
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
