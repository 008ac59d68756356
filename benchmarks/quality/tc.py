"""TC-LoRA end to end with the library trainer: pool every task's training data, cluster it (MiniLM embeddings,
KMeans with k clusters), train one LoRA per cluster (``peft_cp_merge.library.train_library``), load the library into
the benchmark's PeftModel (``AdapterLibrary.load_into``) and merge the cluster adapters with
``add_weighted_adapter`` (weights ``lambda / k``, lambda searched on validation as for the per-task merges).

Each library trains the same total number of optimizer steps as the T per-task adapters (``T * steps``), split
evenly over its k clusters (``ceil(T * steps / k)`` steps each), with the same LoRA config, batch size, learning
rate, warm-up, schedule and clipping. Libraries are cached in ``<cache>/<hash>/tc_k<k>`` (the trainer resumes or
reuses a library whose config and data match).
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from pathlib import Path

from peft_cp_merge.demo.evaluate import exact_match
from peft_cp_merge.demo.tasks import Example

from .adapters import AdapterConfig

logger = logging.getLogger("benchmarks.quality")


def purity(assignments: list[int], labels: list[str]) -> float:
    """Cluster purity: the share of examples whose cluster's majority task is their own task."""
    by_cluster: dict[int, Counter] = {}
    for c, t in zip(assignments, labels):
        by_cluster.setdefault(c, Counter())[t] += 1
    return sum(cnt.most_common(1)[0][1] for cnt in by_cluster.values()) / max(len(labels), 1)


def cluster_table(assignments: list[int], labels: list[str]) -> dict[str, dict[str, int]]:
    """``{cluster: {task: count}}``."""
    table: dict[str, dict[str, int]] = {}
    for c, t in zip(assignments, labels):
        row = table.setdefault(str(c), {})
        row[t] = row.get(t, 0) + 1
    return dict(sorted(table.items(), key=lambda kv: int(kv[0])))


def train_tc_library(train: dict[str, list[Example]], cfg: AdapterConfig, model_arg: str | None, k: int, seed: int,
                     cache: Path):
    """Train (or reuse) the k-cluster library on the pooled training data. Returns ``(library, info)``."""
    from sklearn.metrics import normalized_mutual_info_score

    from peft_cp_merge.library import LibraryTrainConfig, train_library

    tasks = list(train)
    rows = [{"prompt": e.prompt, "completion": e.completion, "task": e.task} for t in tasks for e in train[t]]
    steps = math.ceil(len(tasks) * cfg.steps / k)
    out = cache / cfg.key(seed) / f"tc_k{k}_{'-'.join(sorted(tasks))}"
    config = LibraryTrainConfig(
        output_dir=str(out), base_model=model_arg, num_clusters=k, max_steps=steps, batch_size=cfg.batch_size,
        learning_rate=cfg.lr, warmup_steps=5, max_length=cfg.max_length, lora_r=cfg.rank, lora_alpha=cfg.alpha,
        lora_dropout=0.0, target_modules=list(cfg.target_modules), seed=seed, log_every=10,
    )
    t0 = time.perf_counter()
    lib = train_library(config, dataset=rows)
    seconds = time.perf_counter() - t0
    assignments = lib.assignments.tolist()
    labels = [r["task"] for r in rows]
    info = {
        "k_requested": k, "num_clusters": lib.num_clusters, "steps_per_cluster": steps,
        "total_steps": steps * lib.num_clusters, "cluster_sizes": lib.sizes, "purity": purity(assignments, labels),
        "nmi": float(normalized_mutual_info_score(labels, assignments)),
        "clusters": cluster_table(assignments, labels), "seconds": seconds, "path": str(out),
        "train_seconds_recorded": lib.meta.get("train_seconds_last_run"),
    }
    logger.info("TC-LoRA k=%d (seed %d): %d clusters, sizes %s, purity %.3f, NMI %.3f, %.0fs", k, seed,
                lib.num_clusters, lib.sizes, info["purity"], info["nmi"], seconds)
    return lib, info


def routed_hits(pm, tok, lib, data: dict[str, list[Example]], batch_size: int = 32) -> dict[str, list[bool]]:
    """Per task, whether each test prompt is answered exactly by the cluster adapter it is routed to (top-1 cosine
    similarity to the library's centroids): the library used as a router, a reference for the merges."""
    examples = [e for ex in data.values() for e in ex]
    routed = lib.route([e.prompt for e in examples]).top1
    hits: dict[int, bool] = {}
    for c in sorted(set(routed)):
        idx = [i for i, r in enumerate(routed) if r == c]
        pm.set_adapter(f"cluster_{c}")
        for i, h in zip(idx, exact_match(pm, tok, [examples[i] for i in idx], batch_size=batch_size)):
            hits[i] = h
    out, i = {}, 0
    for task, ex in data.items():
        out[task] = [hits[j] for j in range(i, i + len(ex))]
        i += len(ex)
    return out


def routed_accuracy(pm, tok, lib, data: dict[str, list[Example]], batch_size: int = 32) -> dict[str, float]:
    """Exact match per task of :func:`routed_hits`."""
    return {t: sum(h) / len(h) for t, h in routed_hits(pm, tok, lib, data, batch_size).items()}
