"""Scaling in T: does the ranking of merges change as the library grows?

    python -m benchmarks.quality.scaling                          # tasks regime, T = 6, 12, 24, seed 0, R = r
    python -m benchmarks.quality.scaling --regime sources         # sources regime, T = 6, 12, 24 (2, 4, 8 skills)
    python -m benchmarks.quality.scaling --quick                  # T = 2, 3 (a smoke run)

Each T is one ordinary run of ``python -m benchmarks.quality`` (same protocol: the lambda search on validation, the
paired bootstrap against the best matrix merge at R = r) on the first T tasks of a fixed order, so the T = 6 tasks
are inside the T = 12 ones, and adapters are shared through the cache: ``tasks`` takes :data:`TASK_ORDER` (the
first six are the tasks regime's default), ``sources`` takes the first T / 3 skills of
``peft_cp_merge.demo.tasks.SKILL_SOURCES`` with their three sources each (T any multiple of 3 up to 24, the 8
skills' 24 sources). One seed, output rank r only, no joint adapter and no TC-LoRA part, the strongest methods of
the earlier runs (:data:`METHODS`), 20 training steps per adapter and 12 test prompts per task
(:data:`RUN_DEFAULTS`). Every run writes its own ``<stem>_T<T>.{md,json,png}``; this script then writes
``<stem>.{md,json,png}``: per T, every merge's test mean, its difference to the best matrix merge with the 95%
interval, and its place in the ranking. Extra arguments after ``--`` go to every run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.quality.stats import is_tensor  # noqa: E402
from peft_cp_merge._io import atomic_write_text, save_figure  # noqa: E402

logger = logging.getLogger("benchmarks.quality")
ROOT = Path(__file__).resolve().parents[2]
TASK_ORDER = ("sort", "reverse", "count", "max", "record", "month",  # the tasks regime's default six
              "add", "units", "weekday", "python", "rev_colors", "rev_pylist",
              "look_json", "look_pipe", "max_which", "max_scores", "rev_cities", "look_xml", "max_call", "sort_desc",
              "record_swap", "min", "sort_then_reverse", "max_then_add")
METHODS = ["iso_c", "core_tsv_iso", "cp/weighted", "cp/orth_iso", "tucker"]
RUN_DEFAULTS = ["--steps", "20", "--n-train", "300", "--n-val", "4", "--n-test", "12", "--lambdas", "0.25", "0.5", "1",
                "2", "4", "8", "16", "32"]
"""Settings of every full run (the sources regime's run settings: T = 24 adapters fit the budget); arguments after
``--`` override them."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--regime", choices=["tasks", "sources"], default="tasks")
    p.add_argument("--T", type=int, nargs="+", default=None, help="numbers of adapters (default 6 12 24; sources: "
                   "any multiple of 3 up to 3 x the skills of SKILL_SOURCES, 24; quick 2 3)")
    p.add_argument("--quick", action="store_true", help="T = 2, 3 with the quick mode's settings")
    p.add_argument("--methods", nargs="+", default=None, help=f"default: {' '.join(METHODS)}")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--stem", default=None, help="default: quality_scaling (sources: quality_scaling_sources)")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="after --: arguments for every run")
    args = p.parse_args(argv)
    if args.T is None:
        args.T = [2, 3] if args.quick else [6, 12, 24]
    if args.regime == "tasks" and max(args.T) > len(TASK_ORDER):
        p.error(f"--T: the tasks regime has {len(TASK_ORDER)} tasks")
    if args.regime == "sources":
        from peft_cp_merge.demo.tasks import SKILL_SOURCES

        top = 3 * len(SKILL_SOURCES)
        if any(t % 3 or not 3 <= t <= top for t in args.T):
            p.error(f"--T: the sources regime takes multiples of 3 from 3 to {top} (1-{len(SKILL_SOURCES)} skills x "
                    "their 3 sources)")
    args.stem = args.stem or ("quality_scaling" if args.regime == "tasks" else "quality_scaling_sources")
    args.rest = [a for a in args.rest if a != "--"]
    return args


def run_argv(args, T: int) -> list[str]:
    """The ``python -m benchmarks.quality`` arguments of the run with T adapters."""
    from peft_cp_merge.demo.tasks import SKILL_SOURCES

    argv = ["--regime", args.regime, "--seeds", "0", "--rank-mults", "1", "--ref-seeds", "0", "--tc-k", "0",
            "--check-generate", "0", "--methods", *(args.methods or METHODS), "--out", str(args.out),
            "--stem", f"{args.stem}_T{T}"]
    argv += ["--quick"] if args.quick else RUN_DEFAULTS
    if args.regime == "tasks":
        argv += ["--tasks", *TASK_ORDER[:T], "--heldout"]
    else:
        argv += ["--skills", *list(SKILL_SOURCES)[: T // 3], "--single-skill", "none"]
    return argv + args.rest


def summarize(records: dict[int, dict]) -> dict:
    """Per T: every merge at R = r with its test mean, diff to the best matrix merge [95% CI] and place."""
    out: dict[str, dict] = {}
    for T, data in sorted(records.items()):
        r = str(data["adapter_config"]["rank"])
        comp = data["comparison"]["by_rank"].get(r, {}).get("in_domain", {})
        methods = [m for m in data["methods"] if str(m.get("out_rank")) == r and m["label"] in data["summary"]]
        ranked = sorted(methods, key=lambda m: -data["summary"][m["label"]]["mean"][0])
        out[str(T)] = {"reference": comp.get("reference"), "tasks": data["tasks"], "rows": {
            m["method"]: {"mean": data["summary"][m["label"]]["mean"][0], "place": i + 1, "tensor": is_tensor(m),
                          "normalized": data["summary"][m["label"]]["normalized"][0],
                          **{k: comp.get("rows", {}).get(m["label"], {}).get(k) for k in ("diff", "low", "high")}}
            for i, m in enumerate(ranked)}, "wall_seconds": data["wall_seconds"].get("total")}
    return out


def write(summary: dict, args, path: Path) -> None:
    from benchmarks.quality.report import _ci

    Ts = list(summary)
    methods = list(dict.fromkeys(m for s in summary.values() for m in s["rows"]))
    lines = [f"# Scaling in T ({args.regime} regime): merges at output rank R = r", "",
             "Generated by `python -m benchmarks.quality.scaling " + " ".join(sys.argv[1:]) + "`; one seed, one run "
             "of the benchmark per T (records `" + f"{args.stem}_T<T>.json`), the first T tasks of a fixed order. "
             "Cell: test mean (place) and the difference to the best matrix merge at R = r with its paired 95% "
             "interval; **bold** when the interval excludes 0.", "",
             "| merge | family | " + " | ".join(f"T = {T}" for T in Ts) + " |", "|---|---|" + "---|" * len(Ts)]
    for m in methods:
        cells = []
        for T in Ts:
            row = summary[T]["rows"].get(m)
            if not row:
                cells.append("–")
                continue
            ci = "best matrix" if row["diff"] is None else _ci(row)
            cells.append(f"{row['mean']:.3f} ({row['place']}); {ci}")
        tensor = any(summary[T]["rows"].get(m, {}).get("tensor") for T in Ts)
        lines.append(f"| {m} | {'tensor' if tensor else 'matrix'} | " + " | ".join(cells) + " |")
    lines += ["", "Wall time per run (s): " + ", ".join(f"T = {T}: {summary[T]['wall_seconds']:.0f}" for T in Ts)
              + ".", "", "Tasks at the largest T: " + ", ".join(summary[Ts[-1]]["tasks"]) + ".", ""]
    atomic_write_text(path.with_suffix(".md"), "\n".join(lines))
    atomic_write_text(path.with_suffix(".json"), json.dumps(summary, indent=1) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in methods:
        xs = [int(T) for T in Ts if m in summary[T]["rows"]]
        ys = [summary[str(T)]["rows"][m]["mean"] for T in xs]
        tensor = summary[str(xs[0])]["rows"][m]["tensor"]
        ax.plot(xs, ys, marker="o", ls="--" if tensor else "-", label=f"{m} ({'tensor' if tensor else 'matrix'})")
    ax.set_xlabel("number of merged adapters T")
    ax.set_ylabel("mean test exact match at R = r")
    ax.set_xticks([int(T) for T in Ts])
    ax.set_title(f"Scaling in T, {args.regime} regime (one seed)")
    ax.legend(fontsize=7)
    save_figure(fig, path.with_suffix(".png"))


def main(argv=None) -> dict:
    from benchmarks.quality.run import main as run_main

    args = parse_args(argv)
    records, saved = {}, sys.argv
    for T in args.T:
        argv = run_argv(args, T)
        sys.argv = ["benchmarks.quality", *argv]  # the record's `command` is this run's own
        try:
            records[T] = run_main(argv)
        finally:
            sys.argv = saved
    summary = summarize(records)
    write(summary, args, args.out / args.stem)
    logger.info("wrote %s", (args.out / args.stem).with_suffix(".md"))
    return summary


if __name__ == "__main__":
    main()
