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
            key: str, n_resamples: int, tensor_labels: frozenset[str] | set[str] = frozenset()) -> dict[str, Any]:
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
                              "seeds": [int(s) for s in seeds], "tensor": label in tensor_labels}
    return out


TENSOR_TYPES = ("cp", "tucker")


def is_tensor(method: dict) -> bool:
    """A method record of the JSON (``methods`` list) is a tensor merge (CP or Tucker)."""
    return bool(method.get("tensor", method["combination_type"] in TENSOR_TYPES))


def by_rank(hits: dict[str, dict], summary: dict, methods: list[dict], tasks: list[str], heldout: list[str],
            n_resamples: int, prefix: str = "") -> dict[str, dict]:
    """Per output rank R: every merge at R against the best *matrix* merge at the same R (highest test mean), in
    domain and on the held-out tasks; ``prefix`` selects derived rows (``"per-skill: "``). Works on any record that
    stores per-prompt hits, so older JSON files can be re-read at matched rank."""
    out: dict[str, dict] = {}
    for R in sorted({m["out_rank"] for m in methods if m.get("out_rank")}):
        at = [m for m in methods if m.get("out_rank") == R and prefix + m["label"] in summary]
        labels = [prefix + m["label"] for m in at]
        refs = [prefix + m["label"] for m in at if not is_tensor(m)]
        tensor = {prefix + m["label"] for m in at if is_tensor(m)}
        out[str(R)] = {"in_domain": compare(hits, summary, labels, refs, tasks, "mean", n_resamples, tensor),
                       "heldout": compare(hits, summary, labels, refs, heldout, "heldout_mean", n_resamples, tensor)
                       if heldout else {}}
    return out


def verdicts(records: dict[str, dict], rank: int | None = None, margin: float = 0.02) -> dict[str, dict]:
    """The decision rule over regimes: ``records`` maps a regime name to its ``by_rank`` result at R = ``rank``
    (``{"in_domain": compare(...)}``). For each tensor row: per regime its difference and interval to the best
    matrix merge, ``win`` (diff >= margin, interval above 0), ``worse`` (interval below 0); ``wins`` if it wins in at
    least one regime and is significantly worse in none."""
    out: dict[str, dict] = {}
    for regime, comp in records.items():
        for label, row in comp.get("rows", {}).items():
            if not row.get("tensor"):
                continue
            cell = {"diff": row["diff"], "low": row["low"], "high": row["high"], "reference": comp["reference"],
                    "win": row["diff"] >= margin and row["low"] > 0, "worse": row["high"] < 0}
            out.setdefault(label, {"regimes": {}})["regimes"][regime] = cell
    for v in out.values():
        cells = v["regimes"].values()
        v["wins"] = any(c["win"] for c in cells) and not any(c["worse"] for c in cells)
    return out
