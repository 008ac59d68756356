"""TC-LoRA end to end: cluster a multi-task dataset in embedding space, train one LoRA per cluster, CP-merge the
library into one adapter, and compare exact match per task: base model, routed cluster adapters, merged adapter.

Offline on the embedded defaults (SmolLM2-135M-Instruct + all-MiniLM-L6-v2, a generated 4-task dataset; a few
minutes on 2 CPU cores):

    python examples/tc_lora.py

On a GPU machine with a Hub model and dataset (prompt/completion, messages or text columns; a `task` column, if
present, gives the per-task rows of the table):

    python examples/tc_lora.py --model HuggingFaceTB/SmolLM2-360M-Instruct --dataset user/my-multitask-data \\
        --steps 200 --batch-size 32 --n-train 2000

Rerunning with the same arguments resumes (or reuses) the library in --out.
"""

from __future__ import annotations

import argparse
import logging
import random
import time
from collections import defaultdict
from pathlib import Path

import torch

import peft_cp_merge  # noqa: F401  (registers combination_type="cp" with PEFT)
from peft_cp_merge.demo.evaluate import exact_match
from peft_cp_merge.demo.tasks import TASKS, Example, make_splits
from peft_cp_merge.library import AdapterLibrary, LibraryError, LibraryTrainConfig, read_rows, train_library
from peft_cp_merge.models import load_model_and_tokenizer

logger = logging.getLogger("tc_lora")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="Hub id or local path (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dataset", default=None, help="Hub dataset id or local file (default: generated tasks)")
    p.add_argument("--tasks", nargs="+", default=["add", "reverse", "weekday", "record"], choices=sorted(TASKS),
                   help="generated tasks (when --dataset is not given)")
    p.add_argument("--n-train", type=int, default=48, help="training examples per task (generated data)")
    p.add_argument("--n-test", type=int, default=24, help="test examples per task (generated data)")
    p.add_argument("--num-clusters", type=int, default=None, help="default: chosen by silhouette")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank of each cluster adapter and of the merge")
    p.add_argument("--steps", type=int, default=24, help="training steps per cluster")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--parallel-mode", default="data", choices=["data", "clusters"])
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("outputs/tc_lora"), help="library, merged adapter and data")
    return p.parse_args(argv)


def _data(args) -> tuple[list[dict], list[Example]]:
    """Training rows and test examples."""
    if args.dataset is None:
        splits = make_splits(args.tasks, n_train=args.n_train, n_val=1, n_test=args.n_test, seed=args.seed)
        train = [e.to_dict() for t in args.tasks for e in splits[t]["train"]]
        test = [e for t in args.tasks for e in splits[t]["test"]]
        return train, test
    rows = read_rows(args.dataset)
    if not rows or "prompt" not in rows[0] or "completion" not in rows[0]:
        raise SystemExit("--dataset needs prompt/completion columns for exact-match evaluation.")
    random.Random(args.seed).shuffle(rows)
    n_test = max(1, len(rows) // 10)
    test = [Example(r["prompt"], r["completion"], str(r.get("task", "all"))) for r in rows[:n_test]]
    return rows[n_test:], test


def _merge(lib: AdapterLibrary, args, pm):
    """CP-merge through the adapter-file engine; PEFT's add_weighted_adapter if this checkout lacks the engine."""
    out = args.out / "merged_cp"
    weights = [1.0] * lib.num_clusters
    try:
        merged = lib.merge(method="cp", weights=weights, rank=args.rank)
        merged.save_pretrained(str(out))
        pm.load_adapter(str(out), adapter_name="merged_cp")
        return "file engine (AdapterLibrary.merge)"
    except LibraryError as e:
        logger.warning("%s -- merging in PEFT instead", e)
        pm.add_weighted_adapter(lib.adapter_names, weights, "merged_cp", combination_type="cp", cp_rank=args.rank)
        pm.save_pretrained(str(args.out), selected_adapters=["merged_cp"])
        return "PEFT add_weighted_adapter(combination_type='cp')"


def main(argv=None) -> dict[str, dict[str, float]]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    t_all = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    train_rows, test = _data(args)

    config = LibraryTrainConfig(
        output_dir=str(args.out / "library"), base_model=args.model, num_clusters=args.num_clusters,
        max_clusters=max(8, len(args.tasks) + 2), max_steps=args.steps, batch_size=args.batch_size,
        learning_rate=args.lr, max_length=args.max_length, lora_r=args.rank, lora_alpha=2 * args.rank,
        parallel_mode=args.parallel_mode, mixed_precision=args.mixed_precision, seed=args.seed, log_every=8,
    )
    t0 = time.perf_counter()
    lib = train_library(config, dataset=train_rows)
    train_s = time.perf_counter() - t0
    print(f"\n{lib}\n\n{lib.cluster_table()}\n")

    model, tok = load_model_and_tokenizer(args.model, device="cuda" if torch.cuda.is_available() else None)
    pm = lib.load_into(model)
    t0 = time.perf_counter()
    how = _merge(lib, args, pm)
    merge_s = time.perf_counter() - t0

    by_task: dict[str, list[Example]] = defaultdict(list)
    for e in test:
        by_task[e.task].append(e)
    routed = lib.route([e.prompt for e in test]).top1
    route_of = {id(e): c for e, c in zip(test, routed)}
    rows: dict[str, dict[str, float]] = {"base model": {}, "routed cluster adapter": {}, "CP-merged adapter": {}}
    for task, examples in by_task.items():
        with pm.disable_adapter():
            rows["base model"][task] = sum(exact_match(pm, tok, examples)) / len(examples)
        hits = 0
        for c in sorted({route_of[id(e)] for e in examples}):
            pm.set_adapter(f"cluster_{c}")
            hits += sum(exact_match(pm, tok, [e for e in examples if route_of[id(e)] == c]))
        rows["routed cluster adapter"][task] = hits / len(examples)
        pm.set_adapter("merged_cp")
        rows["CP-merged adapter"][task] = sum(exact_match(pm, tok, examples)) / len(examples)
    for scores in rows.values():
        scores["mean"] = sum(scores.values()) / len(by_task)

    cols = [*by_task, "mean"]
    n = {t: len(v) for t, v in by_task.items()}
    print(f"\nExact match per task ({', '.join(f'{t}: {n[t]}' for t in by_task)} test prompts; "
          f"{lib.num_clusters} clusters, rank {args.rank}, {args.steps} steps per cluster):\n")
    print("| adapter | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, scores in rows.items():
        print(f"| {name} | " + " | ".join(f"{scores[c]:.3f}" for c in cols) + " |")
    home: dict[str, list[int]] = defaultdict(list)  # clusters holding each task's training examples
    for r, c in zip(train_rows, lib.assignments.tolist()):
        home[str(r.get("task", "all"))].append(c)
    majority = {t: max(set(cs), key=cs.count) for t, cs in home.items()}
    agree = sum(majority.get(e.task) == c for e, c in zip(test, routed)) / len(test)
    print(f"\nRouting: {agree:.1%} of test prompts go to the cluster holding most of their task's training examples."
          f"\nLibrary: {lib.path} (train {train_s:.0f}s); CP merge via {how} in {merge_s:.1f}s; total "
          f"{time.perf_counter() - t_all:.0f}s.")
    return rows


if __name__ == "__main__":
    main()
