"""An adapter library from LoRAs that already exist (:meth:`AdapterLibrary.from_adapters`, ``peft-cp-merge library
build``): cluster the adapters by their parameters (:func:`.cluster.cluster_adapters`), merge each cluster's members
into one adapter (:func:`peft_cp_merge.files.merge_adapters`, any registered method) and write them as a library.
:func:`plan_build` checks and clusters (writes nothing); ``from_adapters`` writes the plan atomically.

A built library has the layout of a trained one (``library.json``, ``cluster_<i>/``, ``README.md``) with
``"kind": "built"`` and format version 2: each cluster lists its ``members`` (the sources, Hub ones pinned to the
downloaded commit); there are no training examples, so no text centroids, and :meth:`AdapterLibrary.route` refuses
it (:meth:`AdapterLibrary.arrow_model` routes it per token; :meth:`AdapterLibrary.merge` merges it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._io import MARKER_FIELD, check_disjoint, check_output_folder, file_identities, marker, now, package_versions
from .errors import LibraryConfigError, LibraryExistsError

logger = logging.getLogger(__name__)

BUILT_FORMAT_VERSION = 2
"""``format_version`` of a built library (``kind: built``); trained libraries keep version 1."""

DEFAULT_BUILD_METHOD = "cp"
"""Merge method of a cluster's members when none is given."""

MAX_SOURCES = 4096
"""Most adapters one build takes (the same bound as the clusters a library.json may list)."""


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class BuildPlan:
    """A checked build (:func:`plan_build`): the resolved sources, their clustering and each cluster's rank.
    Nothing is written until :meth:`AdapterLibrary.from_adapters` writes it (:meth:`merge_cluster`, :meth:`meta`)."""

    out: Path
    sources: list  # AdapterSource
    base_model: str | None
    members: list[list[int]]
    ranks: list[int | None]
    clustering: Any
    method: str
    rank: int | None
    options: dict[str, Any]
    settings: dict[str, Any]
    identities: dict[str, tuple[int, int, int, int]]  # the source files as clustered (size, mtime, inode, device)

    @property
    def num_clusters(self) -> int:
        return len(self.members)

    @property
    def source_paths(self) -> list[Path]:
        return [s.path for s in self.sources]

    @property
    def needed_bytes(self) -> int:
        """About what the library takes on disk: one adapter file (the largest source's) per cluster."""
        return self.num_clusters * max(s.weights_file.stat().st_size for s in self.sources)

    def merge_cluster(self, i: int, folder: Path, name: str) -> dict[str, Any]:
        """Merge cluster ``i``'s members into the new adapter folder ``folder``; returns its ``library.json``
        entry (without the sha256)."""
        from ..files.merge import merge_adapters

        ids = self.members[i]
        merged = merge_adapters([str(self.sources[j].path) for j in ids], method=self.method, rank=self.ranks[i],
                                base_model=self.base_model, progress=False, **self.options)
        merged.recipe["sources"] = [self.sources[j].record() for j in ids]  # the user's names, not cache paths
        merged.save_pretrained(folder)
        logger.info("cluster %d: merged %d adapter(s) with %s at rank %d", i, len(ids), self.method,
                    merged.recipe["rank"])
        return {"id": i, "name": name, "size": len(ids), "status": "done", "rank": merged.recipe["rank"],
                "previews": [self.sources[j].spec for j in ids[:3]],
                "members": [{"index": j, **self.sources[j].record()} for j in ids]}

    def meta(self, fmt: str, clusters: list[dict[str, Any]]) -> dict[str, Any]:
        """The built library's ``library.json``."""
        return {
            "format": fmt,
            "format_version": BUILT_FORMAT_VERSION,
            "kind": "built",
            "status": "complete",
            "created": now(),
            "base_model": self.base_model,
            "embedding_model": None,
            "num_adapters": len(self.sources),
            "clustering": {"method": "kmeans", "space": "adapter updates (two-sided Gaussian sketch, TruncatedSVD)",
                           "num_clusters": self.num_clusters, **self.settings,
                           "silhouette": {str(c): v for c, v in self.clustering.silhouette.items()}},
            "merge": {"method": self.method, "rank": self.rank, "options": dict(self.options),
                      "weights": "1/size per cluster"},
            "clusters": clusters,
            "versions": package_versions(),
            MARKER_FIELD: marker("adapter-library"),  # what lets overwrite=True replace it later
        }


def plan_build(
    sources: Sequence[str | Path],
    out: str | Path,
    *,
    num_clusters: int | None = None,
    method: str = DEFAULT_BUILD_METHOD,
    rank: int | None = None,
    base_model: str | None = None,
    min_clusters: int = 2,
    max_clusters: int = 16,
    sketch_dim: int = 16,
    components: int = 32,
    n_init: int = 10,
    seed: int = 0,
    overwrite: bool = False,
    token: str | bool | None = None,
    progress: bool = True,
    **options: Any,
) -> BuildPlan:
    """Check every argument, resolve the sources (Hub ids downloaded), refuse duplicates, mixed base models and an
    output that exists (unless ``overwrite``) or overlaps a source, cluster the adapters and choose the ranks.
    Writes nothing. See :meth:`AdapterLibrary.from_adapters`."""
    from ..config import check_option_types
    from ..files.sources import common_base_model, resolve_source
    from ..methods import get_merge_method
    from .cluster import cluster_adapters

    # 1. every argument checked before anything is read or written
    if isinstance(sources, (str, Path)) or not isinstance(sources, Sequence) or not sources:
        raise LibraryConfigError("sources must be a non-empty list of adapter folders or Hub ids.")
    if len(sources) > MAX_SOURCES:
        raise LibraryConfigError(f"{len(sources)} sources: at most {MAX_SOURCES} adapters per library.")
    if not all(isinstance(s, (str, Path)) for s in sources):
        raise LibraryConfigError("Every source must be a folder path or a Hub id string.")
    if not isinstance(out, (str, Path)):
        raise LibraryConfigError(f"out must be a folder path, got {out!r}.")
    if num_clusters is not None and (not _is_int(num_clusters) or num_clusters < 1):
        raise LibraryConfigError(f"num_clusters={num_clusters!r}: give a positive integer, or None to choose it by "
                                 "silhouette.")
    for name, v, lo in (("min_clusters", min_clusters, 2), ("max_clusters", max_clusters, 2),
                        ("sketch_dim", sketch_dim, 1), ("components", components, 1), ("n_init", n_init, 1)):
        if not _is_int(v) or v < lo:
            raise LibraryConfigError(f"{name}={v!r}: give an integer >= {lo}.")
    if min_clusters > max_clusters:
        raise LibraryConfigError(f"min_clusters={min_clusters} > max_clusters={max_clusters}.")
    if not _is_int(seed):
        raise LibraryConfigError(f"seed={seed!r}: give an integer.")
    if not isinstance(overwrite, bool):
        raise LibraryConfigError(f"overwrite={overwrite!r}: give True or False.")
    if not isinstance(method, str):
        raise LibraryConfigError(f"method={method!r}: give the name of a merge method, e.g. 'cp'.")
    m = get_merge_method(method)  # unknown names refused here, listing the registered ones
    check_option_types(m, options)
    m.resolve_options(dict(options))
    m.resolve_rank(rank, option="rank")
    out = Path(out)
    try:  # an existing out only with overwrite, and then only a library this package wrote
        check_output_folder(out, overwrite=overwrite, kind="adapter-library")
    except FileExistsError as e:
        raise LibraryExistsError(str(e)) from None

    # 2. the sources: resolved (Hub ids downloaded), distinct, one base model
    srcs = [resolve_source(s, token=token) for s in sources]
    seen: dict[str, str] = {}
    for s in srcs:
        key = os.path.realpath(s.path)
        if key in seen:
            raise LibraryConfigError(f"Sources {seen[key]!r} and {s.spec!r} are the same adapter; give each adapter "
                                     "once (a duplicate would weigh twice in its cluster).")
        seen[key] = s.spec
    check_disjoint(out, sources=[s.path for s in srcs])  # an overwrite there would delete the adapters being read
    identities = file_identities([f for s in srcs for f in (s.path / "adapter_config.json", s.weights_file)])
    base_model = common_base_model(srcs, base_model, "A library is for one base model: build one per base model")

    # 3. cluster by parameters
    clustering, _ = cluster_adapters(srcs, num_clusters=num_clusters, k_range=(min_clusters, max_clusters),
                                     sketch_dim=sketch_dim, components=components, n_init=n_init, seed=seed,
                                     progress=progress)
    k = clustering.num_clusters
    members = [[j for j, a in enumerate(clustering.assignments.tolist()) if a == i] for i in range(k)]
    logger.info("clustered %d adapters into %d clusters of sizes %s", len(srcs), k, [len(c) for c in members])

    # 4. one rank for every cluster (what Arrow needs): the given one, else the largest source rank where every
    #    cluster's merge can have it (a merged update's rank is at most the sum of its members' ranks)
    ranks: list[int | None] = [rank] * k
    if rank is None:
        top = max(s.config.r for s in srcs)
        ranks = [top if sum(srcs[j].config.r for j in c) >= top else None for c in members]
        if None in ranks:
            logger.warning("Clusters %s cannot reach rank %d (their members' ranks sum to less), so they keep their "
                           "own rank: this library is not Arrow-ready. Pass rank=R (--rank) for one rank.",
                           [i for i, r in enumerate(ranks) if r is None], top)
    settings = {"sketch_dim": sketch_dim, "components": components, "seed": seed}
    return BuildPlan(out, srcs, base_model, members, ranks, clustering, method, rank, dict(options), settings,
                     identities)
