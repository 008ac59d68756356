"""The ``library`` regime of the quality benchmark: TC-LoRA's protocol on one pooled mixture.

    python -m benchmarks.quality --regime library            # 16 tasks, k = 4 and 8, 3 seeds
    python -m benchmarks.quality --regime library --quick    # 4 tasks, k = 2, 1 seed (CI)

Protocol (the ``tasks`` regime's, with the adapters replaced by cluster adapters):

1. Data: the 16 tasks of ``peft_cp_merge.demo.tasks.LIBRARY_TASKS`` (six skills, several formats each) pooled into
   one training mixture; the task labels are never shown to the trainer.
2. Libraries: the library trainer (``peft_cp_merge.library.train_library``: all-MiniLM-L6-v2 prompt embeddings,
   k-means) clusters the mixture into k clusters (``--library-k``, default 4 and 8) and trains one LoRA per
   cluster; each library trains ``T x steps`` optimizer steps in total (``ceil(T x steps / k)`` per cluster), the
   same LoRA config, batch, lr and schedule for every library and the references.
3. Merges: each library's k cluster adapters merged into one through ``add_weighted_adapter`` with weights
   ``lambda / k``, every method at every output rank R of ``--rank-mults`` (R = r first), lambda chosen by the
   tasks regime's search on the trained tasks' validation prompts (first seed, reused for the others).
4. Scored on the test prompts of the trained tasks (in domain), zero-shot on held-out formats of trained skills
   (``LIBRARY_HELDOUT``) and zero-shot on two trained skills chained in one prompt (``LIBRARY_COMPOSED``).
   References on the same prompts: the base model; a multi-task LoRA trained on the whole mixture with the same
   total steps (``joint adapter``: the normalisation of the normalized column); per library, its nearest-centroid
   router (each prompt answered by the adapter of its nearest centroid) and PEFT's Arrow routing
   (``peft.create_arrow_model`` on the same cluster adapters, top-k = ``--arrow-top-k``). Routers are not merges:
   they keep all k adapters.
5. Per library and output rank: every row's difference to the best matrix merge at that R (highest in-domain test
   mean) with a paired bootstrap 95% interval over the test prompts and seeds, on each of the three test sets; the
   decision rule of ``run.DECISION_RULE`` at R = r per library.

Writes ``quality_library.{md,json,png}`` to ``--out``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import platform
import sys
import time
from dataclasses import asdict

import torch

from benchmarks.quality.adapters import LLAMA_TARGETS, AdapterConfig, build_adapters
from benchmarks.quality.merging import accuracies, build_specs, evaluate_hits, group_specs, pack_hits
from benchmarks.quality.stats import compare, is_tensor, summarize, verdicts
from peft_cp_merge._io import atomic_write_text, save_figure
from peft_cp_merge.demo.tasks import LIBRARY_COMPOSED, LIBRARY_HELDOUT, LIBRARY_TASKS, make_examples, make_splits

logger = logging.getLogger("benchmarks.quality")

LIBRARY_METHODS = ["svd", "tsv", "iso_c", "iso_cts", "core_tsv_iso", "star", "cp/weighted", "cp/orth_iso", "cp/cts",
                   "tucker"]
LIBRARY_FULL = dict(seeds=[0, 1, 2], steps=12, lr=5e-3, n_train=300, n_val=4, n_test=12, n_heldout=12,
                    rank_mults=["1", "2"], lambdas=[0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0], library_k=[4, 8],
                    check_generate=0, check_linearity="cheap", targets=LLAMA_TARGETS, methods=LIBRARY_METHODS,
                    tasks=list(LIBRARY_TASKS), heldout=list(LIBRARY_HELDOUT), composed=list(LIBRARY_COMPOSED))
LIBRARY_QUICK = dict(seeds=[0], steps=3, lr=3e-3, n_train=24, n_val=2, n_test=3, n_heldout=3, rank_mults=["1"],
                     lambdas=[1.0, 3.0], library_k=[2], check_generate=0, check_linearity="all",
                     targets=["q_proj", "v_proj"], methods=["iso_c", "cp/weighted"],
                     tasks=["sort", "reverse", "record", "month"], heldout=["record_swap"],
                     composed=["sort_then_reverse"])
REFERENCES = ("base model", "joint adapter")
ROUTERS = ("routed (nearest centroid)", "arrow", "arrow (tuned)")
TEST_SETS = (("in_domain", "mean", "trained tasks"), ("heldout", "heldout_mean", "held-out formats"),
             ("composed", "composed_mean", "composed skills"))
ARROW_TOP_K = (1, 2, 3)
ARROW_TEMPERATURES = (0.5, 1.0, 2.0)
"""The tuned Arrow row's grid: top-k in ``ARROW_TOP_K`` and k itself (those <= k) x router temperature, chosen by
validation mean on the first seed and reused for the others, as lambda is for the merges."""


def arrow_grid(k: int) -> list[tuple[int, float]]:
    """``(top_k, router_temperature)`` points searched for a library of ``k`` clusters, in order (ties: first)."""
    return [(t, temp) for t in sorted({*(x for x in ARROW_TOP_K if x <= k), k}) for temp in ARROW_TEMPERATURES]


def _summaries(results: dict[str, dict[int, dict[str, float]]], tasks, heldout, composed) -> dict[str, dict]:
    """``stats.summarize`` per row, normalised by the joint adapter, with the composed tasks' mean added."""
    own = results.get("joint adapter", {})
    out = {}
    for label, per_seed in results.items():
        if not per_seed:
            continue
        sm = summarize(per_seed, own, tasks, heldout + composed)
        sm["heldout_mean"] = summarize(per_seed, own, tasks, heldout)["heldout_mean"]
        sm["composed_mean"] = summarize(per_seed, own, tasks, composed)["heldout_mean"]
        out[label] = sm
    return out


def _comparisons(hits, summary, methods: dict[str, list[dict]], tasks, heldout, composed, n_resamples: int):
    """``{k: {R: {test set: compare(...)}}}``: every merge at R and every reference row against the best matrix
    merge of that library at the same R (the highest in-domain test mean; the same reference for all three sets)."""
    out: dict[str, dict] = {}
    for k, ms in methods.items():
        prefix = f"k={k}: "
        fixed = [*REFERENCES, *(prefix + x for x in ROUTERS)]
        for R in sorted({m["out_rank"] for m in ms if m.get("out_rank")}):
            at = [m for m in ms if m.get("out_rank") == R and prefix + m["label"] in summary]
            labels = fixed + [prefix + m["label"] for m in at]
            refs = [prefix + m["label"] for m in at if not is_tensor(m)]
            tensor = {prefix + m["label"] for m in at if is_tensor(m)}
            cell = {"in_domain": compare(hits, summary, labels, refs, tasks, "mean", n_resamples, tensor)}
            best = cell["in_domain"].get("reference")  # the same reference on the zero-shot sets
            for name, key, subset in (("heldout", "heldout_mean", heldout), ("composed", "composed_mean", composed)):
                cell[name] = compare(hits, summary, labels, [best], subset, key, n_resamples,
                                     tensor) if subset and best else {}
            out.setdefault(str(k), {})[str(R)] = cell
    return out


def main(args) -> dict:
    from tqdm.auto import tqdm

    from benchmarks.quality.run import Clock, _run_group, output_ranks, reused_lambda
    from benchmarks.quality.tc import routed_hits, train_tc_library
    from peft_cp_merge.demo.evaluate import accuracy, exact_match
    from peft_cp_merge.library import set_arrow_routing
    from peft_cp_merge.models import load_model_and_tokenizer

    progress = not args.no_progress
    clock = Clock()
    t_start = time.perf_counter()
    tasks, heldout, composed = list(args.tasks), list(args.heldout), list(args.composed)
    seeds, r, T = list(args.seeds), args.rank, len(args.tasks)
    lambdas = [float(x) for x in args.lambdas]
    logger.info("library regime: %d pooled tasks, held-out %s, composed %s, k = %s, seeds %s, r=%d, %d threads",
                T, heldout, composed, args.library_k, seeds, r, torch.get_num_threads())

    t0 = time.perf_counter()
    base, tok = load_model_and_tokenizer(args.model, device=args.device)
    bare = copy.deepcopy(base)  # an unwrapped copy for Arrow, which wraps its base model in place
    splits = make_splits(tasks, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test, seed=0)
    train = {t: splits[t]["train"] for t in tasks}
    val = {t: splits[t]["validation"] for t in tasks}
    test = {t: splits[t]["test"] for t in tasks}
    test |= {t: make_examples(t, args.n_heldout, split="test", seed=0) for t in heldout + composed}
    clock.add("load_model_and_data", time.perf_counter() - t0)
    cfg = AdapterConfig.from_args(args)

    t0 = time.perf_counter()
    base_hits = {t: exact_match(base, tok, test[t], batch_size=args.eval_batch_size) for t in test}
    clock.add("eval_base", time.perf_counter() - t0)
    results: dict[str, dict[int, dict[str, float]]] = {"base model": {s: accuracies(base_hits) for s in seeds},
                                                       "joint adapter": {}}
    hits: dict[str, dict[int, dict[str, str]]] = {"base model": {s: pack_hits(base_hits) for s in seeds}}
    merge_runs: dict[str, dict[int, dict]] = {}
    methods: dict[str, list[dict]] = {}
    linearity: dict[str, dict] = {}
    libraries: dict[str, dict] = {}
    skipped: list[dict] = []
    arrow_tuned: dict[str, dict] = {}
    first = seeds[0]
    state = dict(args=args, tasks=tasks, heldout=heldout, composed=composed, seeds=seeds, results=results,
                 hits=hits, merge_runs=merge_runs, methods=methods, linearity=linearity, libraries=libraries,
                 skipped=skipped, clock=clock, t_start=t_start, cfg=cfg, arrow_tuned=arrow_tuned)

    def record(label: str, seed: int, h: dict[str, list[bool]]) -> None:
        hits.setdefault(label, {})[seed] = pack_hits(h)
        results.setdefault(label, {})[seed] = accuracies(h)

    for seed in seeds:
        t0 = time.perf_counter()
        pm, info = build_adapters(base, tok, train, cfg, seed, args.cache, joint=True, per_task=False,
                                  progress=progress)
        clock.add("train_or_load_joint", time.perf_counter() - t0)
        t0 = time.perf_counter()
        record("joint adapter", seed, evaluate_hits(pm, tok, "joint", test, args.eval_batch_size))
        clock.add("eval_references", time.perf_counter() - t0)
        libraries.setdefault("joint", {})[str(seed)] = info["joint"]
        logger.info("seed %d: joint adapter test mean %.3f", seed,
                    sum(results["joint adapter"][seed][t] for t in tasks) / T)
        for k in args.library_k:
            prefix = f"k={k}: "
            t0 = time.perf_counter()
            lib, linfo = train_tc_library(train, cfg, args.model, k, seed, args.cache)
            clock.add("train_or_load_libraries", time.perf_counter() - t0)
            libraries.setdefault(str(k), {})[str(seed)] = linfo
            k_eff = lib.num_clusters
            pm = lib.load_into(pm)
            names = lib.adapter_names
            t0 = time.perf_counter()
            record(prefix + ROUTERS[0], seed, routed_hits(pm, tok, lib, test, args.eval_batch_size))
            arrow = lib.arrow_model(copy.deepcopy(bare), top_k=min(args.arrow_top_k, k_eff), rng_seed=seed)
            arrow.eval()
            record(prefix + ROUTERS[1], seed, {t: exact_match(arrow, tok, test[t], batch_size=args.eval_batch_size)
                                               for t in test})
            if str(k) not in arrow_tuned:  # the first seed: tune top-k and temperature on validation
                grid = {}
                for top_k, temp in arrow_grid(k_eff):
                    set_arrow_routing(arrow, top_k=top_k, router_temperature=temp)
                    grid[top_k, temp] = sum(accuracy(arrow, tok, val[t], batch_size=args.eval_batch_size)
                                            for t in tasks) / T
                best = max(grid, key=grid.get)  # first of the ties
                arrow_tuned[str(k)] = {"top_k": best[0], "temperature": best[1], "seed": seed,
                                       "validation": {f"{t}/{temp:g}": v for (t, temp), v in grid.items()}}
                logger.info("k=%d: Arrow tuned on validation: top_k %d, temperature %g (val %.3f; default %.3f)",
                            k, *best, grid[best], grid.get((min(args.arrow_top_k, k_eff), 1.0), -1))
            chosen = arrow_tuned[str(k)]  # a later seed's library can have fewer clusters than the first's
            set_arrow_routing(arrow, top_k=min(chosen["top_k"], k_eff), router_temperature=chosen["temperature"])
            record(prefix + ROUTERS[2], seed, {t: exact_match(arrow, tok, test[t], batch_size=args.eval_batch_size)
                                               for t in test})
            del arrow
            clock.add("eval_routers", time.perf_counter() - t0)
            specs, skip = build_specs(r, k_eff, args.density, output_ranks(args.rank_mults, r, k_eff), args.methods)
            methods[str(k)] = [s.to_dict() for s in specs]
            skipped += [x for x in skip if x not in skipped]
            modes = linearity.setdefault(str(k), {})
            for group in tqdm(group_specs(specs), desc=f"k={k} merges, seed {seed}", disable=not progress):
                fixed = reused_lambda(args, seed, first, merge_runs.get(prefix + group[0].label, {}), lambdas)
                runs = _run_group(pm, tok, group, names, seed, lambdas=lambdas, fixed_lambda=fixed, modes=modes,
                                  checks={}, check=seed == first, val=val, test=test, args=args, clock=clock,
                                  prefix="lib_")
                for label, run in runs.items():
                    hits.setdefault(prefix + label, {})[seed] = run.pop("hits")
                    results.setdefault(prefix + label, {})[seed] = run["test"]
                    merge_runs.setdefault(prefix + label, {})[seed] = run
            for n in names:
                pm.delete_adapter(n)
        base = pm.unload()
        if seed != seeds[-1]:
            write(**state, partial=True)
    return write(**state, partial=False)


def write(*, args, tasks, heldout, composed, seeds, results, hits, merge_runs, methods, linearity, libraries,
          skipped, clock, t_start, cfg, arrow_tuned, partial: bool) -> dict:
    from benchmarks.quality.run import DECISION_RULE, _versions, seed_keys

    summary = _summaries(results, tasks, heldout, composed)
    comparison = _comparisons(hits, summary, methods, tasks, heldout, composed, args.bootstrap)
    decision_inputs = {f"library (k={k})": comparison.get(str(k), {}).get(str(args.rank), {}).get("in_domain", {})
                       for k in methods}
    wall = {k: round(v, 1) for k, v in clock.t.items()}
    wall["total"] = round(time.perf_counter() - t_start, 1)
    data = {
        "benchmark": "merge quality (exact match) on a real LM",
        "regime": "library",
        "status": "partial" if partial else "complete",
        "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": "python -m benchmarks.quality " + " ".join(sys.argv[1:]) if sys.argv else "",
        "quick": args.quick, "model": cfg.model, "device": args.device, "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "platform": platform.platform(), "versions": _versions(),
        "tasks": tasks,
        "heldout_tasks": {t: list(LIBRARY_HELDOUT.get(t, ())) for t in heldout},
        "composed_tasks": {t: list(LIBRARY_COMPOSED.get(t, ())) for t in composed},
        "seeds": seeds, "library_k": list(args.library_k), "arrow_top_k": args.arrow_top_k,
        "arrow_tuned": arrow_tuned,
        "data": {"n_train": args.n_train, "n_val": args.n_val, "n_test": args.n_test, "n_heldout": args.n_heldout,
                 "data_seed": 0},
        "adapter_config": {**asdict(cfg), "target_modules": list(cfg.target_modules), "warmup_steps": 5},
        "protocol": {
            "weights": "lambda / k for each of the k cluster adapters",
            "lambda_grid": [float(x) for x in args.lambdas],
            "lambda_search": ("mean validation exact match on the trained tasks, walking the grid upwards until two "
                              "values in a row score below the best, with each method's lowest output rank; "
                              + ("on the first seed, reused for the others" if args.search_seeds == "first"
                                 else "on every seed")),
            "library_steps": "each library and the joint adapter train T * steps optimizer steps in total",
            "normalized": "mean over trained tasks of row / joint-adapter accuracy (tasks where the joint adapter "
                          "scores > 0)",
            "interval": (f"difference to the best matrix merge of the same library at the same output rank (highest "
                         f"in-domain test mean), paired bootstrap 95% interval over the test prompts and seeds "
                         f"({args.bootstrap} resamples)"),
        },
        "methods": methods,
        "decision": {"rule": DECISION_RULE, "rank": args.rank, "margin": 0.02,
                     "verdicts": verdicts(decision_inputs)},
        "skipped_methods": skipped,
        "linearity": linearity,
        "libraries": libraries,
        "results": seed_keys(results),
        "summary": summary,
        "comparison": comparison,
        "hits": seed_keys(hits),
        "merge_runs": seed_keys(merge_runs),
        "wall_seconds": wall,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.stem or "quality_library"
    atomic_write_text(args.out / f"{stem}.json", json.dumps(data, indent=1, default=str) + "\n")
    write_markdown(data, args.out / f"{stem}.md")
    write_plot(data, args.out / f"{stem}.png")
    logger.info("wrote %s (%s, %.0fs so far)", args.out / f"{stem}.md", data["status"], wall["total"])
    return data


def rank_rows(data: dict, k: str, R: str) -> list[tuple[str, str]]:
    """``(label, family)`` of the table of library ``k`` at output rank ``R``: references, routers, matrix merges,
    tensor merges (each merge group by in-domain test mean)."""
    summary, prefix = data["summary"], f"k={k}: "
    at = [m for m in data["methods"][k] if str(m.get("out_rank")) == R and prefix + m["label"] in summary]
    by_mean = lambda m: -summary[prefix + m["label"]]["mean"][0]  # noqa: E731
    rows = [(x, "reference") for x in REFERENCES if x in summary]
    rows += [(prefix + x, "router (all k adapters)") for x in ROUTERS if prefix + x in summary]
    rows += [(prefix + m["label"], "matrix") for m in sorted((m for m in at if not is_tensor(m)), key=by_mean)]
    rows += [(prefix + m["label"], "tensor") for m in sorted((m for m in at if is_tensor(m)), key=by_mean)]
    return rows


def _arrow_tuned_text(data: dict) -> str:
    tuned = data.get("arrow_tuned") or {}
    if not tuned:
        return "(No tuned Arrow row in this record.)"
    grid = ", ".join(f"{t}/{temp:g}" for t, temp in arrow_grid(max(int(k) for k in tuned)))
    chosen = []
    for k, v in sorted(tuned.items(), key=lambda x: int(x[0])):
        val = v["validation"][f"{v['top_k']}/{v['temperature']:g}"]
        chosen.append(f"k = {k}: top-{v['top_k']}, temperature {v['temperature']:g} (validation {val:.3f})")
    chosen = "; ".join(chosen)
    return (f"Row `arrow (tuned)`: top-k and router temperature chosen on validation (mean exact match of the "
            f"trained tasks) on seed {next(iter(tuned.values()))['seed']} from the grid top-k/temperature {grid} "
            f"(top-k <= k), reused for the other seeds, as lambda is for the merges; chosen: {chosen}.")


def write_markdown(data: dict, path) -> None:
    from benchmarks.quality.report import _ci, _fmt, decision_lines

    summary, r = data["summary"], data["adapter_config"]["rank"]
    cfg, d, wall = data["adapter_config"], data["data"], data["wall_seconds"]
    lines = [
        f"# Merge quality, library regime (TC-LoRA's protocol): {data['model']}", "",
        f"Status: **{data['status']}**{' (quick mode)' if data['quick'] else ''}. Generated {data['created']} by "
        f"`{data['command']}` on {data['device']} ({data['torch_threads']} torch threads, {data['cpu_count']} CPUs); "
        f"total wall time {wall.get('total', 0) / 60:.1f} min.", "",
        f"**Setup.** One pooled mixture of {len(data['tasks'])} procedural tasks ({', '.join(data['tasks'])}), "
        f"{d['n_train']} training prompts each, task labels hidden from the trainer; libraries of k = "
        f"{', '.join(map(str, data['library_k']))} clusters trained by `peft_cp_merge.library.train_library` "
        f"(MiniLM embeddings, k-means, one LoRA per cluster), each with {cfg['steps']} x T = "
        f"{cfg['steps'] * len(data['tasks'])} optimizer steps in total, like the joint adapter; LoRA r={r}, "
        f"alpha={cfg['alpha']:g}, modules {', '.join(cfg['target_modules'])}, batch {cfg['batch_size']}, lr "
        f"{cfg['lr']:g}. Merges: the k cluster adapters, weights lambda/k, lambda from "
        f"{data['protocol']['lambda_grid']} by {data['protocol']['lambda_search']}. Test: {d['n_test']} prompts per "
        f"trained task, {d['n_heldout']} per "
        f"held-out format (" + "; ".join(f"{t}: {', '.join(s)}" for t, s in data["heldout_tasks"].items())
        + ") and per composed task (" + "; ".join(f"{t}: {' + '.join(s)}" for t, s in data["composed_tasks"].items())
        + f"); seeds {data['seeds']}. Normalized: {data['protocol']['normalized']}. Routers (nearest centroid, "
        f"Arrow) keep all k adapters: references, not merges. Row `arrow`: PEFT's defaults (top-"
        f"{data['arrow_top_k']}, router temperature 1.0, no GenKnowSub), untuned; its top-k experts are mixed with "
        f"softmax weights that sum to 1. " + _arrow_tuned_text(data), "",
    ]
    lines += decision_lines(data)
    for k, per_r in data["comparison"].items():
        lines += [f"## Library k = {k}", ""]
        lib = data["libraries"].get(k, {})
        if lib:
            lines += ["| seed | clusters | steps per cluster | cluster sizes | purity | NMI |",
                      "|---:|---:|---:|---|---:|---:|"]
            lines += [f"| {s} | {i['num_clusters']} | {i['steps_per_cluster']} | {i['cluster_sizes']} | "
                      f"{i['purity']:.3f} | {i['nmi']:.3f} |" for s, i in sorted(lib.items(), key=lambda x: int(x[0]))]
            lines += [""]
        for R in sorted(per_r, key=lambda x: (int(x) != r, int(x))):
            comp = per_r[R]
            ref = comp.get("in_domain", {}).get("reference", "?")
            lines += [f"### k = {k}, R = {R}{' (= r)' if int(R) == r else ''}: best matrix merge {ref}", "",
                      "| row | family | trained mean | normalized | diff [95% CI] | held-out mean | diff [95% CI] | "
                      "composed mean | diff [95% CI] | lambda |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for label, fam in rank_rows(data, k, R):
                sm = summary[label]
                n = len(sm["seeds"])  # a partial record has fewer seeds than planned
                runs = data["merge_runs"].get(label, {})
                lam = ", ".join("n/a" if x["lambda"] is None else f"{x['lambda']:g}" for x in runs.values())
                cells = [f"**{label}**" if fam == "reference" else f"{label} (best)" if label == ref else label, fam,
                         _fmt(sm["mean"], n), _fmt(sm["normalized"], n)]
                for name, key, _ in TEST_SETS:
                    cells += ([_fmt(sm[key], n)] if name != "in_domain" else []) + [
                        _ci(comp.get(name, {}).get("rows", {}).get(label))]
                lines.append("| " + " | ".join(cells + [lam]) + " |")
            lines += [""]
        R = str(r)
        if R in per_r:
            every = data["tasks"] + list(data["heldout_tasks"]) + list(data["composed_tasks"])
            lines += [f"Per task at R = r (k = {k}; test exact match, mean over seeds):", "",
                      "| row | " + " | ".join(every) + " |", "|---|" + "---:|" * len(every)]
            for label, _ in rank_rows(data, k, R):
                pt = summary[label]["per_task"]
                lines.append(f"| {label} | " + " | ".join(_fmt([pt[t][0], 0.0], 1) if t in pt else "–"
                                                          for t in every) + " |")
            lines += [""]
    lines += ["Diff: the row's mean test exact match minus that of the best matrix merge of the same library at the "
              "same R (chosen on the trained tasks' in-domain mean and used as the reference on all three test "
              "sets), " + data["protocol"]["interval"] + "; **bold** when the interval excludes 0; fractions, "
              "not points.", ""]
    for s in data.get("skipped_methods", []):
        lines.append(f"- Skipped `{s['method']}`: {s['reason']}.")
    lines += ["", "## Wall times (seconds)", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in wall.items()]
    lines += ["", "Package versions: " + ", ".join(f"{k} {v}" for k, v in data["versions"].items()) + ".", ""]
    atomic_write_text(path, "\n".join(lines))


def write_plot(data: dict, path) -> None:
    """Per library at R = r: each row's difference to the best matrix merge, with its interval, on the three test
    sets (red: tensor merges, blue: matrix merges, grey: references and routers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    r = str(data["adapter_config"]["rank"])
    ks = [k for k in data["comparison"] if r in data["comparison"][k]]
    if not ks:
        return
    n_rows = max(len(rank_rows(data, k, r)) for k in ks)
    fig, axes = plt.subplots(len(ks), len(TEST_SETS), figsize=(15, 0.3 * n_rows * len(ks) + 2.5), squeeze=False)
    colors = {"tensor": "tab:red", "matrix": "tab:blue"}
    for i, k in enumerate(ks):
        comp, rows = data["comparison"][k][r], rank_rows(data, k, r)
        for j, (name, _, title) in enumerate(TEST_SETS):
            ax = axes[i][j]
            cells = comp.get(name, {}).get("rows", {})
            ref = comp.get(name, {}).get("reference")
            pts = [(lab, (0.0, 0.0, 0.0) if lab == ref else (cells[lab]["diff"], cells[lab]["low"],
                                                              cells[lab]["high"]), fam)
                   for lab, fam in rows if lab == ref or lab in cells]
            y = np.arange(len(pts))
            d = np.array([p[1][0] for p in pts])
            err = np.array([[p[1][0] - p[1][1] for p in pts], [p[1][2] - p[1][0] for p in pts]])
            ax.errorbar(d, y, xerr=err, fmt="none", ecolor="0.3", capsize=2)
            ax.scatter(d, y, c=[colors.get(p[2], "0.5") for p in pts], zorder=3)
            ax.axvline(0, color="0.5", lw=0.8)
            ax.set_yticks(y, [p[0].removeprefix(f"k={k}: ") for p in pts] if j == 0 else [""] * len(pts),
                          fontsize=7)
            ax.invert_yaxis()
            ax.set_title(f"k = {k}, R = r = {r}: {title}", fontsize=9)
    for ax in axes[-1]:
        ax.set_xlabel("diff to the best matrix merge (paired 95% CI)")
    save_figure(fig, path)
