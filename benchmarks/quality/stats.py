"""Summary statistics of the quality benchmark's records: mean and sample std over seeds, per-task and normalized
means, and paired bootstrap comparisons against the best reference. Used by ``run.py`` (to build the record) and
``report.py`` (to re-summarize subsets of seeds); it imports neither, so the two do not import each other."""

from __future__ import annotations

import math
from typing import Any


def ms(xs) -> list[float]:
    """[mean, sample std] of the non-NaN values (std 0 for one value, NaN for none)."""
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return [float("nan"), float("nan")]
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return [m, s]


def summarize(per_seed: dict[int, dict[str, float]], own: dict[int, dict[str, float]], tasks: list[str],
              heldout: list[str] = ()) -> dict:
    """Mean and sample std over seeds of each task, of the task mean, of the normalized mean and of the held-out
    tasks' mean."""
    seeds = sorted(per_seed)
    every = list(tasks) + [t for t in heldout if any(t in per_seed[s] for s in seeds)]
    out: dict[str, Any] = {"per_task": {t: ms([per_seed[s].get(t, float("nan")) for s in seeds]) for t in every}}
    out["mean"] = ms([sum(per_seed[s][t] for t in tasks) / len(tasks) for s in seeds])
    norms = []
    for s in seeds:
        ratios = [per_seed[s][t] / own[s][t] for t in tasks if s in own and own[s].get(t, 0) > 0]
        norms.append(sum(ratios) / len(ratios) if ratios else float("nan"))
    out["normalized"] = ms(norms)
    present = [t for t in heldout if all(t in per_seed[s] for s in seeds)]
    out["heldout_mean"] = ms([sum(per_seed[s][t] for t in present) / len(present) for s in seeds]
                              if present else [])
    out["seeds"] = seeds
    return out


def compare(hits: dict[str, dict], summary: dict, labels: list[str], references: list[str], tasks: list[str],
            key: str, n_resamples: int) -> dict[str, Any]:
    """Each of ``labels`` against the best of ``references`` (highest ``summary[...][key]`` mean on test: the
    strongest baseline, which is conservative for the others): the mean difference over the common seeds and its
    paired bootstrap 95% interval over the test prompts of ``tasks``."""
    from peft_cp_merge.demo.evaluate import paired_difference

    refs = [r for r in references if r in summary and r in hits and not math.isnan(summary[r][key][0])]
    if not refs or not tasks:
        return {}
    best = max(refs, key=lambda r: summary[r][key][0])
    out: dict[str, Any] = {"reference": best, "rows": {}}
    for label in labels:
        if label not in hits or label == best:
            continue
        seeds = sorted(set(hits[label]) & set(hits[best]), key=int)
        if not seeds or any(t not in hits[label][s] for s in seeds for t in tasks):
            continue
        cells_a = [[c == "1" for c in hits[label][s][t]] for s in seeds for t in tasks]
        cells_b = [[c == "1" for c in hits[best][s][t]] for s in seeds for t in tasks]
        out["rows"][label] = {**paired_difference(cells_a, cells_b, n_resamples=n_resamples),
                              "seeds": [int(s) for s in seeds]}
    return out
