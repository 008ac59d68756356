"""Quickstart: train three small LoRA adapters, merge them with `cp`, PEFT's `svd` and `linear`, compare.

Runs offline on the embedded SmolLM2-135M-Instruct (a few minutes on 2 CPU cores). It prints exact match on
100 test prompts per task and, for each merge, its difference to `cp` with a paired bootstrap 95% interval over
those prompts, so an ordering that one or two prompts could flip is visible as an interval that contains 0:

    python examples/quickstart.py

Any causal LM works: `--model HuggingFaceTB/SmolLM2-360M-Instruct --device cuda`.
"""

from __future__ import annotations

import argparse
import logging
import platform
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

import peft_cp_merge  # noqa: F401  (registers combination_type="cp" with PEFT)
from peft_cp_merge.demo.evaluate import exact_match, paired_difference
from peft_cp_merge.demo.tasks import TASKS, make_splits
from peft_cp_merge.demo.training import train_lora
from peft_cp_merge.models import load_model_and_tokenizer

logger = logging.getLogger("quickstart")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="Hub id or local path (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--tasks", nargs="+", default=["reverse", "record", "month"], choices=sorted(TASKS))
    p.add_argument("--rank", type=int, default=8, help="LoRA rank of each adapter and of the merged adapter")
    p.add_argument("--steps", type=int, default=30, help="training steps per adapter")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--n-train", type=int, default=200)
    p.add_argument("--n-test", type=int, default=100, help="test prompts per task")
    p.add_argument("--weight", type=float, default=1.0, help="weight of every adapter in the merges")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path("outputs/quickstart"), help="where the cp-merged adapter goes")
    return p.parse_args(argv)


def main(argv=None) -> dict[str, dict[str, float]]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.manual_seed(args.seed)
    model, tok = load_model_and_tokenizer(args.model, device=args.device)
    data = make_splits(args.tasks, n_train=args.n_train, n_val=1, n_test=args.n_test, seed=args.seed)
    config = LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    model = get_peft_model(model, config, adapter_name=args.tasks[0])
    for task in args.tasks[1:]:
        model.add_adapter(task, config)

    t0 = time.perf_counter()
    for task in args.tasks:
        losses = train_lora(
            model, tok, data[task]["train"], adapter_name=task, steps=args.steps, batch_size=args.batch_size,
            lr=args.lr, seed=args.seed,
        )
        logger.info("trained %s: loss %.3f -> %.3f", task, losses[0], losses[-1])
    train_time = time.perf_counter() - t0

    weights = [args.weight] * len(args.tasks)
    merges = {
        "cp": {"combination_type": "cp", "cp_rank": args.rank},
        "svd": {"combination_type": "svd", "svd_rank": args.rank},
        "linear": {"combination_type": "linear"},
    }
    merge_time = {}
    for name, kwargs in merges.items():
        t = time.perf_counter()
        model.add_weighted_adapter(args.tasks, weights, f"merged_{name}", **kwargs)
        merge_time[name] = time.perf_counter() - t

    rows: dict[str, dict[str, float]] = {}
    hits: dict[str, list[list[bool]]] = {}
    for row, adapter_of in [("own adapter", lambda task: task)] + [
        (f"merged {name}", lambda task, name=name: f"merged_{name}") for name in merges
    ]:
        rows[row], hits[row] = {}, []
        for task in args.tasks:
            model.set_adapter(adapter_of(task))
            hits[row].append(exact_match(model, tok, data[task]["test"]))
            rows[row][task] = sum(hits[row][-1]) / len(hits[row][-1])
        rows[row]["mean"] = sum(rows[row].values()) / len(args.tasks)

    out = args.out
    model.save_pretrained(out, selected_adapters=["merged_cp"])
    cols = [*args.tasks, "mean"]
    print(f"\nExact match on {args.n_test} test prompts per task (weights {weights}, rank {args.rank}):\n")
    print(f"(this machine: {platform.machine()}, {platform.processor() or 'cpu'}, torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads on {args.device}; the adapters, so the scores, differ a little between "
          "machines and thread counts)\n")
    print("| adapter | " + " | ".join(cols) + " | mean minus cp's [95% CI] | merge time (s) |")
    print("|---" * (len(cols) + 3) + "|")
    for row, scores in rows.items():
        method = row.removeprefix("merged ")
        timing = f"{merge_time[method]:.2f}" if method in merge_time else ""
        d = paired_difference(hits[row], hits["merged cp"]) if row != "merged cp" else None
        diff = f"{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]" if d else ""
        print(f"| {row} | " + " | ".join(f"{scores[t]:.3f}" for t in cols) + f" | {diff} | {timing} |")
    print("\nAn interval that contains 0 means these prompts cannot tell the two apart.")
    print(f"\nTraining took {train_time:.0f}s. The cp-merged adapter is in {out / 'merged_cp'}.")
    return rows


if __name__ == "__main__":
    main()
