"""What an adapter library folder holds while it is trained, and how a rerun resumes it: the first
``library.json``, the resume-or-refuse check of ``output_dir``, which clusters are finished (sha256 verified), and
the atomic write of one finished cluster adapter. :mod:`.train` decides when; this module decides what is on disk."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .._io import MARKER_FIELD, atomic_folder, atomic_write_json, marker, now, package_versions
from .cluster import Clustering
from .config import NOT_FINGERPRINTED, LibraryTrainConfig
from .errors import LibraryExistsError, LibraryFormatError
from .library import (
    FORMAT,
    FORMAT_VERSION,
    LIBRARY_FILE,
    PLOT_FILE,
    STATE_FILE,
    _read_meta,
    adapter_checksum,
    cluster_dirname,
)

RUN_DIR = ".run"
"""Per-run scratch in ``output_dir`` (a failing rank's traceback); removed when the library is complete."""


def base_model_id(config: LibraryTrainConfig) -> str:
    """The Hub id recorded for the base model (the embedded default is recorded as its Hub id)."""
    from ..models import _HUB_ID, DEFAULT_MODEL

    return _HUB_ID if config.base_model in (None, DEFAULT_MODEL) else str(config.base_model)


def _config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(old) | set(new) if k not in NOT_FINGERPRINTED and old.get(k) != new.get(k))


def check_output(out: Path, config: LibraryTrainConfig) -> dict[str, Any] | None:
    """The existing library.json to resume from, ``None`` for a fresh run; raise when the folder holds anything
    else (never mix two runs in one library). ``out`` is not a file (checked by the caller)."""
    if not out.exists() or not any(p for p in out.iterdir() if p.name != RUN_DIR):
        return None
    meta_file = out / LIBRARY_FILE
    if not meta_file.is_file():
        raise LibraryExistsError(
            f"{out} exists and is not an adapter library (no {LIBRARY_FILE}). Choose an empty or new output_dir, "
            "or set overwrite: true to delete it."
        )
    try:
        meta = _read_meta(out)
    except LibraryFormatError as e:
        raise LibraryExistsError(f"{e} Set overwrite: true to delete it and start over, or choose another "
                                 "output_dir.") from None
    if meta.get("config_fingerprint") != config.fingerprint():
        diff = _config_diff(meta.get("training", {}), config.to_dict())
        raise LibraryExistsError(
            f"{out} holds a library trained with a different config (fields that differ: {diff or 'format'}). "
            "Refusing to mix two runs: rerun with the same config to resume, choose another output_dir, or set "
            "overwrite: true to start over."
        )
    return meta


def cluster_finished(out: Path, c: int, meta: dict[str, Any] | None) -> bool:
    """A cluster folder exists, has its files and matches its recorded sha256 (library.json or its own state)."""
    folder = out / cluster_dirname(c)
    state_file = folder / STATE_FILE
    if not state_file.is_file():
        return False
    try:
        state = json.loads(state_file.read_text())
        actual = adapter_checksum(folder)
    except (OSError, json.JSONDecodeError):
        return False
    recorded = {state.get("sha256")}
    if meta is not None and meta["clusters"][c].get("sha256"):
        recorded.add(meta["clusters"][c]["sha256"])
    return recorded == {actual}


def public_stats(stats: dict[str, Any]) -> dict[str, Any]:
    """The training stats of a cluster that go into ``library.json`` (the losses stay in its own state file)."""
    keys = ("steps", "loss_first", "loss_last", "trained_by_ranks", "examples_per_rank", "seconds")
    return {k: stats[k] for k in keys if k in stats}


def initial_meta(config, clustering: Clustering, records, data_fp: str, dim: int) -> dict[str, Any]:
    """The first ``library.json`` of a run: format, fingerprints, clustering, every cluster ``pending``."""
    clusters = []
    for c, size in enumerate(clustering.sizes()):
        idx = torch.nonzero(clustering.assignments == c).flatten().tolist()
        previews = [records[i].embed_text[:160] for i in idx[:3]]
        clusters.append({"id": c, "name": cluster_dirname(c), "size": size, "previews": previews,
                         "status": "pending"})
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "status": "training",
        "created": now(),
        "base_model": base_model_id(config),
        "embedding_model": config.embedding_model,
        "embedding_dim": dim,
        "num_examples": len(records),
        "data_fingerprint": data_fp,
        "config_fingerprint": config.fingerprint(),
        "clustering": {"method": "kmeans", "num_clusters": clustering.num_clusters,
                       "silhouette": {str(k): v for k, v in clustering.silhouette.items()},
                       "folded": clustering.folded},
        "plot": PLOT_FILE,
        "clusters": clusters,
        "training": config.to_dict(),
        "versions": package_versions(),
        MARKER_FIELD: marker("adapter-library"),  # what lets `overwrite: true` replace it (never a name alone)
    }


def save_cluster(peft_model, name: str, out: Path, stats: dict[str, Any], base_id: str) -> str:
    """Write ``cluster_<i>/`` with :func:`peft_cp_merge._io.atomic_folder` (replacing a stale one); returns its
    sha256."""
    peft_model.peft_config[name].base_model_name_or_path = base_id
    sha = ""

    def write(tmp: Path) -> None:
        nonlocal sha
        peft_model.save_pretrained(str(tmp), selected_adapters=[name], safe_serialization=True)
        sub = tmp / name  # PEFT saves a non-default adapter in a subfolder of that name
        if sub.is_dir():
            for f in sub.iterdir():
                os.replace(f, tmp / f.name)
            sub.rmdir()
        sha = adapter_checksum(tmp)
        state = {"sha256": sha, **{k: v for k, v in stats.items() if k != "losses"}, "losses": stats["losses"],
                 "finished": now()}
        atomic_write_json(tmp / STATE_FILE, state)

    atomic_folder(out / name, write, overwrite=True)
    return sha
