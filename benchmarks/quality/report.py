"""quality.md (tables) and quality.png (per-task bars per method) from the benchmark's JSON record."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from peft_cp_merge._io import atomic_write_text, save_figure

REFERENCE_ROWS = ("base model", "own adapter", "joint adapter")


def _fmt(ms: list[float], n_seeds: int) -> str:
    m, s = ms
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "–"
    return f"{m:.3f}" if n_seeds <= 1 else f"{m:.3f} ± {s:.3f}"


def _lambda_cell(data: dict, label: str) -> str:
    runs = data["merge_runs"].get(label)
    if not runs:
        return ""
    lams = [runs[s]["lambda"] for s in sorted(runs, key=int)]
    if all(x is None for x in lams):
        return "n/a (weights ignored)"
    return ", ".join(f"{x:g}" for x in lams)


def _ci(row: dict | None) -> str:
    if not row:
        return ""
    star = "**" if row["low"] > 0 or row["high"] < 0 else ""
    return f"{star}{row['diff']:+.3f} [{row['low']:+.3f}, {row['high']:+.3f}]{star}"


def _table(data: dict, rows: list[str], summary: dict, extra: dict[str, str] | None = None,
           rank_of: dict[str, str] | None = None, comparison: dict | None = None,
           heldout_comparison: dict | None = None) -> list[str]:
    tasks, heldout = data["tasks"], list(data.get("heldout_tasks", {}))
    comp = (comparison or {}).get("rows", {})
    hcomp = (heldout_comparison or {}).get("rows", {})
    head = ["", "out rank", "seeds", *tasks, "mean", "normalized", "diff to best matrix merge [95% CI]"]
    head += [*heldout, "held-out mean", "held-out diff [95% CI]"] if heldout else []
    head += ["lambda (per seed)"] if extra else []
    n_num = len(tasks) + 3 + (len(heldout) + 2 if heldout else 0)
    sep = "|---|---:|---:|" + "---:|" * n_num + ("---|" if extra else "")
    lines = ["| " + " | ".join(head) + " |", sep]
    for label in rows:
        if label not in summary:
            continue
        sm = summary[label]
        seeds_n = len(sm["seeds"])
        ref = label in ((comparison or {}).get("reference"), (heldout_comparison or {}).get("reference"))
        name = f"**{label}**" if label in REFERENCE_ROWS else f"{label} (best matrix merge)" if ref else label
        cells = [name, (rank_of or {}).get(label, ""), str(seeds_n)]
        cells += [_fmt(sm["per_task"][t], seeds_n) for t in tasks]
        cells += [_fmt(sm["mean"], seeds_n), _fmt(sm["normalized"], seeds_n), _ci(comp.get(label))]
        if heldout:
            cells += [_fmt(sm["per_task"].get(t, [float("nan")] * 2), seeds_n) for t in heldout]
            cells += [_fmt(sm.get("heldout_mean", [float("nan")] * 2), seeds_n), _ci(hcomp.get(label))]
        if extra is not None:
            cells.append(extra.get(label, ""))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def ablation_table(data: dict) -> list[str]:
    """The CP variants side by side: hypothesis, validation mean (first seed, at its chosen lambda), test mean +- std,
    difference to the best matrix merge with its interval, held-out mean and difference, merge time."""
    from benchmarks.quality.merging import CP_HYPOTHESES

    summary, comp = data["summary"], data.get("comparison", {})
    ind, held = comp.get("in_domain", {}).get("rows", {}), comp.get("heldout", {}).get("rows", {})
    first = str(data["seeds"][0])
    n = len(data["seeds"])
    ref = comp.get("in_domain", {}).get("reference", "?")
    lines = [f"| CP configuration | hypothesis | validation mean (seed {first}) | test mean | diff to {ref} "
             "[95% CI] | held-out mean | held-out diff [95% CI] | merge (s) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for m in data["methods"]:
        label = m["label"]
        if m["combination_type"] not in ("cp", "tucker") or label not in summary:
            continue
        run = data["merge_runs"].get(label, {}).get(first, {})
        curve = run.get("val_curve") or {}
        val = f"{max(c['mean'] for c in curve.values()):.3f}" if curve else "–"
        variant = m["method"].split("/", 1)[1] if m["method"].startswith("cp/") else m["method"]
        secs = [r["merge_seconds"] for r in data["merge_runs"].get(label, {}).values()]
        sm = summary[label]
        lines.append(f"| {label} | {CP_HYPOTHESES.get(variant, '')} | {val} | {_fmt(sm['mean'], n)} | "
                     f"{_ci(ind.get(label))} | {_fmt(sm.get('heldout_mean', [float('nan')] * 2), n)} | "
                     f"{_ci(held.get(label))} | {sum(secs) / max(len(secs), 1):.1f} |")
    return lines


def _tc_summary(data: dict, seeds: list[str]) -> dict[str, Any]:
    """Summaries restricted to the TC-LoRA seeds (so per-task merges and TC rows compare on the same seeds)."""
    from benchmarks.quality.stats import summarize as _summary

    own = {int(s): v for s, v in data["results"]["own adapter"].items() if s in seeds}
    out = {}
    for label, per_seed in data["results"].items():
        sub = {int(s): v for s, v in per_seed.items() if s in seeds}
        if sub:
            out[label] = _summary(sub, own, data["tasks"], list(data.get("heldout_tasks", {})))
    return out


def _pt(sm: dict, own: dict, t: str) -> str:
    """A per-task cell: raw exact match (mean over seeds) and, in parentheses, merged / own adapter."""
    m = sm["per_task"].get(t, [float("nan")])[0]
    if m is None or math.isnan(m):
        return "–"
    o = own.get("per_task", {}).get(t, [float("nan")])[0]
    return f"{m:.2f} ({m / o:.2f})" if o and not math.isnan(o) and o > 0 else f"{m:.2f}"


def rank_tables(data: dict, by_rank: dict, prefix: str = "", title: str = "") -> list[str]:
    """One table per output rank, R = r first: the references, then the matrix merges, then the tensor merges at
    that R (each group by test mean), with each merge's difference to the best matrix merge at the same R and its
    paired 95% interval, in domain and on the held-out (unseen) tasks; per task raw (merged / own)."""
    from benchmarks.quality.stats import is_tensor

    summary, tasks = data["summary"], data["tasks"]
    heldout = list(data.get("heldout_tasks", {}))
    n = len(data["seeds"])
    own = summary.get("own adapter", {})
    methods = data.get("per_skill_methods" if prefix else "methods") or []
    r = data["adapter_config"]["rank"]
    out: list[str] = []
    for R in sorted(by_rank, key=lambda x: (int(x) != r, int(x))):
        comp, hcomp = by_rank[R].get("in_domain", {}), by_rank[R].get("heldout", {})
        at = [m for m in methods if str(m.get("out_rank")) == R and prefix + m["label"] in summary]
        if not at:
            continue
        key = lambda m: -summary[prefix + m["label"]]["mean"][0]  # noqa: E731
        matrix = sorted((m for m in at if not is_tensor(m)), key=key)
        tensor = sorted((m for m in at if is_tensor(m)), key=key)
        ref = comp.get("reference", "?")
        href = f"; held-out: {hcomp['reference']}" if hcomp.get("reference") not in (None, ref) else ""
        out += [f"### {title}R = {R}{' (= r)' if int(R) == r else ''}: best matrix merge {ref}{href}", "",
                "| merge | family | mean | normalized | diff to best matrix [95% CI] | "
                + (f"{', '.join(heldout)} mean | held-out diff [95% CI] | " if heldout else "")
                + " | ".join(tasks) + " |",
                "|---|---|---:|---:|---:|" + ("---:|---:|" if heldout else "") + "---:|" * len(tasks)]
        rows = [(x, "reference") for x in REFERENCE_ROWS if x in summary]
        rows += [(prefix + m["label"], "matrix") for m in matrix] + [(prefix + m["label"], "tensor") for m in tensor]
        for label, fam in rows:
            sm = summary[label]
            name = f"**{label}**" if fam == "reference" else f"{label} (best)" if label == ref else label
            cells = [name, fam, _fmt(sm["mean"], n), _fmt(sm["normalized"], n), _ci(comp.get("rows", {}).get(label))]
            if heldout:
                cells += [_fmt(sm.get("heldout_mean", [float("nan")] * 2), n), _ci(hcomp.get("rows", {}).get(label))]
            cells += [_pt(sm, own, t) for t in tasks]
            out.append("| " + " | ".join(cells) + " |")
        out += [""]
    return out


def decision_lines(data: dict) -> list[str]:
    dec = data.get("decision")
    if not dec:
        return []
    lines = ["## Decision rule and verdict", "", f"Rule (written into the benchmark before the test split was "
             f"scored): {dec['rule']}.", ""]
    v = dec.get("verdicts", {})
    if not v:
        return lines + ["No tensor merge at R = r in this run.", ""]
    regimes = sorted({reg for x in v.values() for reg in x["regimes"]})
    lines += ["| tensor merge (R = r) | " + " | ".join(f"{reg}: diff to best matrix [95% CI]" for reg in regimes)
              + " | verdict in this run |", "|---|" + "---:|" * len(regimes) + "---|"]
    for label, x in sorted(v.items(), key=lambda kv: -max(c["diff"] for c in kv[1]["regimes"].values())):
        cells = []
        for reg in regimes:
            c = x["regimes"].get(reg)
            cells.append(_ci(c) + f" vs {c['reference']}" if c else "")
        verdict = ("wins here" if x["wins"] else "significantly worse here"
                   if any(c["worse"] for c in x["regimes"].values()) else "no win (not separable or < 2 points)")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {verdict} |")
    winners = [label for label, x in v.items() if x["wins"]]
    lines += ["", ("Tensor merges that meet the rule in this run: " + ", ".join(winners) + " (the rule also needs "
                   "them not significantly worse in the other regimes' runs).") if winners else
              "**No tensor merge meets the rule in this run.**", ""]
    return lines


def write_markdown(data: dict, path: Path) -> None:
    tasks, seeds = data["tasks"], data["seeds"]
    n = len(seeds)
    if not seeds:
        return
    proto, cfg, d = data["protocol"], data["adapter_config"], data["data"]
    summary = data["summary"]
    wall = data["wall_seconds"]
    lines = [
        f"# Merge quality on a real LM: {data['model']}",
        "",
        f"Status: **{data['status']}**{' (quick mode)' if data['quick'] else ''}. Generated {data['created']} by "
        f"`{data['command']}` on {data['device']} ({data['torch_threads']} torch threads, {data['cpu_count']} CPUs); "
        f"total wall time {wall.get('total', 0) / 60:.1f} min.",
        "",
        f"**Setup.** {len(tasks)} procedural tasks from `peft_cp_merge.demo.tasks` ({', '.join(tasks)}); "
        f"{d['n_train']} train / {d['n_val']} validation / {d['n_test']} test prompts per task, "
        f"{d.get('n_heldout', 0)} test prompts per held-out task (hash-based splits, "
        f"data seed {d['data_seed']}). One LoRA per task: r={cfg['rank']}, alpha={cfg['alpha']:g}, modules "
        f"{', '.join(cfg['target_modules'])}, {cfg['steps']} steps of batch {cfg['batch_size']}, lr {cfg['lr']:g} "
        f"(AdamW, {cfg['warmup_steps']} warm-up steps, linear decay, clip 1.0), max length {cfg['max_length']}. "
        f"Seeds {seeds} (adapter init, data order, DARE's random drop; data and splits fixed). The joint adapter "
        f"(all tasks' data, {cfg['joint_steps']} steps = the per-task adapters' total) and the TC-LoRA libraries "
        f"are trained on seed(s) {proto['ref_seeds']} only, to fit the CPU budget. Merges: `add_weighted_adapter` "
        f"with weights lambda/T, lambda from the grid {proto['lambda_grid']} by {proto['lambda_search']}; density "
        f"{proto['density']:g} for ties_svd, dare_ties_svd, magnitude_prune_svd and knots; PEFT's svd types with "
        f"`svd_full_matrices=False` (same truncated result, less work). Evaluation of merges: "
        f"{proto['merge_evaluation']}. Metric: exact match (teacher-forced, equals greedy decoding; checked "
        f"below), mean ± {proto['std']}; normalized = {proto['normalized']}.",
        "",
    ]
    if data.get("regime") == "sources":
        ss = data["skill_sources"]
        n_src = len(next(iter(ss.values()))["train"])
        lines += [f"**Regime: sources** (CP Merging's premise). {len(ss)} skills x {n_src} data sources; each "
                  "source teaches the skill with its own vocabulary, phrasing and answer format "
                  "(`peft_cp_merge.demo.tasks.SKILL_SOURCES`); one adapter per (skill, source), all merged into one; "
                  "each skill's unseen source is scored zero-shot (the held-out columns; its own-adapter reference is "
                  "the mean of the skill's source adapters on it). Skills: " + "; ".join(
                      f"{k}: trained on {', '.join(v['train'])}, unseen {v['unseen']}" for k, v in ss.items()) + ".",
                  ""]
    lines += decision_lines(data)
    comp = data.get("comparison", {})
    if comp.get("by_rank"):
        lines += ["## Headline per output rank (all adapters merged into one; test split)", "",
                  "Per output rank R, R = r first (one merged adapter as cheap as one input adapter): the "
                  "references, the matrix merges, then the tensor merges (cp variants, tucker). Diff: mean test "
                  "exact match minus that of the best matrix merge at the same R (highest test mean, the strongest "
                  "baseline), paired bootstrap 95% interval over the same test prompts and seeds; **bold** when it "
                  "excludes 0; fractions, not points. Per task: raw exact match (merged / own adapter).", ""]
        lines += rank_tables(data, comp["by_rank"])
    if comp.get("per_skill_by_rank"):
        lines += ["## Single skill: each skill's source adapters merged alone (test split)", "",
                  "Rows `per-skill: <merge>`: for every skill, its source adapters merged alone by the method (same "
                  "lambda search, on that skill's validation prompts); each source and unseen source scored with "
                  "its own skill's merge, so the rows cover the same prompts as the tables above.", ""]
        lines += rank_tables(data, comp["per_skill_by_rank"], prefix="per-skill: ", title="single skill, ")
    lines += ["## Per-task adapters merged (test split)", ""]
    rank_of = {m["label"]: str(m["out_rank"]) for m in data["methods"]}
    rank_of.update({"own adapter": str(cfg["rank"]), "joint adapter": str(cfg["rank"])})
    rows = list(REFERENCE_ROWS) + [m["label"] for m in data["methods"]]
    extra = {label: _lambda_cell(data, label) for label in rows}
    comp = data.get("comparison", {})
    lines += _table(data, rows, summary, extra, rank_of, comp.get("in_domain"), comp.get("heldout"))
    lines += ["", f"Diff: mean test exact match minus that of the best matrix merge (any rank) "
              f"({comp.get('in_domain', {}).get('reference', '?')} in-domain, "
              f"{comp.get('heldout', {}).get('reference', '?')} held-out), {proto.get('interval', '')}; **bold** "
              "when the interval excludes 0. Held-out tasks (no adapter trained on them; the trained skills they "
              "reuse): " + "; ".join(f"{t} ({', '.join(src)})" for t, src in data.get("heldout_tasks", {}).items())
              + ".", "", "## CP variants (ablation)", "",
              "Every configuration gets the same lambda search on validation; the hypotheses were written before "
              "the first run.", ""]
    lines += ablation_table(data)
    lines += [""]
    ranked = sorted((m["label"] for m in data["methods"] if m["label"] in summary),
                    key=lambda label: -summary[label]["mean"][0])
    if ranked:
        lines += ["Merges ranked by mean test exact match: " + "; ".join(
            f"{i + 1}. {label} ({summary[label]['mean'][0]:.3f})" for i, label in enumerate(ranked)) + "."]
        lines += [""]

    tc = data.get("tc_lora", {})
    if tc.get("runs"):
        tc_seeds = sorted(tc["runs"], key=int)
        lines += [f"## TC-LoRA pipeline (seed{'s' if len(tc_seeds) > 1 else ''} {', '.join(tc_seeds)})", "",
                  "The pooled training data of all tasks, clustered by the library trainer (all-MiniLM-L6-v2 "
                  "prompt embeddings, KMeans), one LoRA per cluster with the same config; each library trains "
                  f"{cfg['steps']} x T = {cfg['steps'] * len(tasks)} steps in total, split evenly over its clusters. "
                  "Cluster adapters merged with weights lambda/k (same lambda search). "
                  f"The TC-LoRA part runs on {len(tc_seeds)} of the {n} seeds to fit the CPU budget; the per-task "
                  "rows below are restricted to the same seed(s) (lambda: the per-task merges' lambda of that seed; "
                  "TC merges search their own).", "",
                  "| k | clusters | steps per cluster | cluster sizes | purity | NMI | train (s) |",
                  "|---:|---:|---:|---|---:|---:|---:|"]
        for s in tc_seeds:
            for k, run in sorted(tc["runs"][s].items(), key=lambda kv: int(kv[0])):
                i = run["info"]
                lines.append(f"| {k} | {i['num_clusters']} | {i['steps_per_cluster']} | {i['cluster_sizes']} | "
                             f"{i['purity']:.3f} | {i['nmi']:.3f} | {i['seconds']:.0f} |")
        lines += [""]
        sub = _tc_summary(data, tc_seeds)
        tc_rows = ["joint adapter", "own adapter"]
        tc_rows += [label for label in sub if label.startswith("TC ")]
        merged = sorted({label.split(": ", 1)[1] for label in sub if label.startswith("TC ") and "routed" not in
                         label})
        tc_rows[2:2] = [label for label in merged if label in sub]
        tc_extra = {}
        for s in tc_seeds:
            for k, run in tc["runs"][s].items():
                for label, m in run["merges"].items():
                    lam = m["lambda"]
                    tc_extra.setdefault(f"TC k={k}: {label}", []).append("n/a" if lam is None else f"{lam:g}")
        extra = {label: _lambda_cell(data, label) for label in merged}
        extra.update({k: ", ".join(v) for k, v in tc_extra.items()})
        rank_tc = {**rank_of, **{label: rank_of.get(label.split(": ", 1)[1], "") for label in sub
                                 if label.startswith("TC ")}}
        lines += _table(data, tc_rows, sub, extra, rank_tc, comp.get("tc_in_domain"), comp.get("tc_heldout"))
        lines += ["", "Rows: per-task adapters merged (`<method> R=<rank>`), TC-LoRA cluster adapters merged "
                  "(`TC k=<k>: <method>`), and the library used as a router (`routed cluster adapter`: each test "
                  "prompt answered by the adapter of its nearest centroid; not a merge, a reference).", ""]

    lines += ["## Lambda search (validation mean exact match, first seed)", "",
              "| merge | linear in lambda? | " + " | ".join(f"lambda={x:g}" for x in proto["lambda_grid"]) + " |",
              "|---|---|" + "---:|" * len(proto["lambda_grid"])]
    for label, runs in data["merge_runs"].items():
        if label not in data["linearity"]:  # single-skill runs ("<skill>: <merge>"): their lambda is in the JSON
            continue
        first = runs.get(str(seeds[0]))
        if not first or not first.get("val_curve"):
            continue
        lin = data["linearity"].get(label, {})
        curve = first["val_curve"]
        err = lin.get("rel_err")
        how = f"{lin.get('mode', '?')} ({err:.1e})" if err is not None else f"{lin.get('mode', '?')} (by construction)"
        lines.append(f"| {label} | {how} | " + " | ".join(
            f"{curve[str(float(x))]['mean']:.3f}" if str(float(x)) in curve else "" for x in proto["lambda_grid"])
            + " |")
    lines += ["", "`linear`: a real merge at the largest lambda equals lambda x the merge at lambda=1 (relative "
              "error in parentheses), so the validation curve scales the lambda=1 merge; `ignored`: the weights "
              "do not change the merge (cp/authors), evaluated once; `nonlinear` methods would get a real merge per "
              "lambda. Test numbers of linear methods are the lambda=1 merge with its LoRA scaling multiplied by the "
              "chosen lambda, which equals the real merge at that lambda to the relative error shown.", ""]

    checks = data.get("generate_check") or []
    lines += ["## Checks and notes", ""]
    sl = data.get("svd_slice_check")
    if sl:
        lines.append(f"- {sl['compared']}: relative error {sl['rel_err']:.1e}.")
    lin = data.get("linearity", {})
    if lin:
        worst = max((v.get("rel_err") or 0.0 for v in lin.values() if v.get("mode") == "linear"), default=0.0)
        unchecked = [k for k, v in lin.items() if v.get("mode") == "linear" and v.get("rel_err") is None]
        other = [f"{k}: {v['mode']}" for k, v in lin.items() if v.get("mode") != "linear"]
        lines.append(f"- Linearity in the weights' scale (real merge at lambda={max(proto['lambda_grid']):g} vs "
                     f"scaled lambda=1 merge): largest relative error among linear methods {worst:.1e}"
                     + (f"; not linear: {', '.join(other)}" if other else "")
                     + ("; not checked in this run (PEFT's pruning merges, linear by construction; checked by "
                        f"`--quick`): {', '.join(unchecked)}" if unchecked else "") + ".")
    if checks:
        agree = sum(c["agree"] for c in checks)
        total = sum(c["checked"] for c in checks)
        hits = sum(c["hits"] for c in checks)
        lines.append(f"- Teacher-forced exact match vs `model.generate` (greedy) on {total} test prompts (own "
                     f"adapters and the cp/weighted merge, first seed): {agree}/{total} verdicts agree "
                     f"({hits} exact hits among them).")
    for s in data.get("skipped_methods", []):
        lines.append(f"- Skipped `{s['method']}`: {s['reason']}.")
    lines.append("- `cp/authors` is merged as the authors' code applied it: every weight 1.0, no lambda search; "
                 "`cp/authors_v1` ignores the weights (task factor dropped), so it has no lambda.")
    lines.append("- `cat` has output rank T x r; `linear` (PEFT) adds the A and B factors separately (rank r), "
                 "which is not the weighted sum of the updates.")
    lines += ["", "## Wall times (seconds)", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in data["wall_seconds"].items()]
    lines += ["", "Package versions: " + ", ".join(f"{k} {v}" for k, v in data["versions"].items()) + ".", ""]
    atomic_write_text(path, "\n".join(lines))


def write_plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    summary, tasks = data["summary"], data["tasks"]
    r = data["adapter_config"]["rank"]
    bars = [x for x in REFERENCE_ROWS if x in summary]
    bars += [m["label"] for m in data["methods"] if m["label"] in summary and m["out_rank"] in (r, None)
             or m["method"] == "cat"]
    bars = [b for b in dict.fromkeys(bars) if b in summary]
    all_rows = [label for label in summary]
    diffs = []  # (label, diff, low, high, tensor): every merge against the best matrix merge at its own R
    for key in ("by_rank", "per_skill_by_rank"):
        for _, comp in sorted(data.get("comparison", {}).get(key, {}).items(), key=lambda kv: int(kv[0])):
            rows = comp.get("in_domain", {}).get("rows", {})
            if comp.get("in_domain", {}).get("reference"):
                diffs.append((f"{comp['in_domain']['reference']} (best matrix)", 0.0, 0.0, 0.0, False))
            for label, row in sorted(rows.items(), key=lambda kv: (kv[1].get("tensor", False), -kv[1]["diff"])):
                diffs.append((label, row["diff"], row["low"], row["high"], row.get("tensor", False)))
    heights = [5, 0.28 * len(all_rows) + 1] + ([0.28 * len(diffs) + 1] if diffs else [])
    fig, axes = plt.subplots(len(heights), 1, figsize=(max(10, 1.3 * len(tasks) + 4), sum(heights) + 4),
                             gridspec_kw={"height_ratios": heights})
    ax1, ax2 = axes[0], axes[1]
    if diffs:
        ax3 = axes[2]
        y3 = np.arange(len(diffs))
        d = np.array([x[1] for x in diffs])
        err = np.array([[x[1] - x[2] for x in diffs], [x[3] - x[1] for x in diffs]])
        ax3.errorbar(d, y3, xerr=err, fmt="none", ecolor="0.3", capsize=2)
        ax3.scatter(d, y3, c=["tab:red" if x[4] else "tab:blue" for x in diffs], zorder=3)
        ax3.axvline(0, color="0.5", lw=0.8)
        ax3.axvline(0.02, color="tab:green", lw=0.8, ls="--")
        ax3.set_yticks(y3, [x[0] for x in diffs], fontsize=7)
        ax3.invert_yaxis()
        ax3.set_xlabel("difference to the best matrix merge at the same output rank (test mean; paired 95% CI)")
        ax3.set_title("Matched output rank (red: tensor merges; dashed: the decision rule's +2 points)")
    cmap = plt.get_cmap("tab20")
    x = np.arange(len(tasks) + 1)
    width = 0.85 / max(len(bars), 1)
    for i, label in enumerate(bars):
        sm = summary[label]
        means = [sm["per_task"][t][0] for t in tasks] + [sm["mean"][0]]
        stds = [sm["per_task"][t][1] for t in tasks] + [sm["mean"][1]]
        ax1.bar(x - 0.425 + (i + 0.5) * width, means, width, yerr=stds if len(data["seeds"]) > 1 else None,
                label=label, color=cmap(i % 20), capsize=1.5, error_kw={"elinewidth": 0.6})
    ax1.set_xticks(x, [*tasks, "mean"])
    ax1.set_ylabel("exact match (test)")
    ax1.set_ylim(0, 1.05)
    ax1.set_title(f"Per-task exact match: references and merges at output rank r={r} "
                  f"(mean ± std over {len(data['seeds'])} seed(s))")
    ax1.legend(fontsize=7, ncol=1, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    means = [summary[label]["mean"][0] for label in all_rows]
    stds = [summary[label]["mean"][1] for label in all_rows]
    y = np.arange(len(all_rows))
    colors = ["0.4" if label in REFERENCE_ROWS else "tab:red" if "cp/" in label or "tucker" in label
              else "tab:blue" for label in all_rows]
    ax2.barh(y, means, xerr=stds if len(data["seeds"]) > 1 else None, color=colors, capsize=2)
    ax2.set_yticks(y, all_rows, fontsize=7)
    ax2.invert_yaxis()
    ax2.set_xlim(0, 1)
    ax2.set_xlabel("mean exact match over tasks (test)")
    ax2.set_title("Every row: mean over tasks (grey: references, red: tensor merges, blue: matrix merges)")
    save_figure(fig, path)
