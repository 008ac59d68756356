"""Hostile and broken inputs (issue 13): each class is a clear error (exit code 2 and one line on the command line,
no traceback), nothing is written, nothing is allocated first, and ``add_weighted_adapter`` leaves the model as it
was. One test per class of bad input, most of them parametrised tables."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from _hub import fake_hf_api
from _models import cli_one_line, make_peft_model, save_tiny_adapters
from safetensors.torch import load_file, save_file

import peft_cp_merge.files.merge as engine
from peft_cp_merge import LoraFactors, MergeInputError, _io, get_merge_method, load_recipe, merge_adapters
from peft_cp_merge.files.recipe import Recipe

ADAPTERS = {"x": {"r": 2, "lora_alpha": 4}, "y": {"r": 3, "lora_alpha": 3, "rank_pattern": {"lin0": 4}}}
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two float32 PEFT adapters of TinyNet saved as plain folders (base model 'tiny-net')."""
    root = tmp_path_factory.mktemp("adapters")
    return save_tiny_adapters(root, ADAPTERS, dtype=torch.float32)[1]


@pytest.fixture(scope="module")
def card(saved, tmp_path_factory):
    """The README.md model card of a real merge of the two adapters."""
    out = tmp_path_factory.mktemp("merged") / "merged"
    merge_adapters(saved, rank=2, progress=False).save_pretrained(out)
    return out / "README.md"


_cli = cli_one_line  # (exit code, stderr); a failure is exactly one line, no traceback


def _leftovers(folder: Path):
    return [p.name for p in folder.iterdir() if p.name.startswith((".tmp", ".old", ".peft-cp-merge"))]


def _copy(src, dst):
    shutil.copytree(src, dst)
    return Path(dst)


# --- 1. recipes are data: a card or recipe never chooses where to write, overwrite or push ---------------------------

def _hostile_card(card: Path, dst: Path, extra: str) -> Path:
    """``card`` with ``extra`` YAML lines added to its recipe block."""
    text = card.read_text()
    marker = "<!-- peft-cp-merge recipe -->\n```yaml\n"
    assert marker in text
    dst.write_text(text.replace(marker, marker + extra))
    return dst


@pytest.mark.parametrize("extra", [
    "out: ../victim\n",
    "overwrite: true\n",
    "overwrite: 'no'\n",
    "push_to_hub: evil-org/stolen\n",
    "out: ../victim\noverwrite: true\npush_to_hub: evil-org/stolen\n",
])
def test_hostile_card_cannot_choose_output_overwrite_or_push(card, tmp_path, capsys, monkeypatch, extra):
    calls = fake_hf_api(monkeypatch)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("mine")
    work = tmp_path / "work"
    work.mkdir()
    hostile = _hostile_card(card, work / "README.md", extra)
    with pytest.raises(MergeInputError, match="command line"):
        load_recipe(hostile)
    for flags in ([], ["--out", str(tmp_path / "mine")], ["--out", str(victim), "--push-to-hub", "me/mine"]):
        rc, err = _cli(["merge", "--recipe", str(hostile), "--no-progress", *flags], capsys)
        assert rc == 2 and "command line" in err
        assert any(f in err for f in ("--out", "--overwrite", "--push-to-hub"))
    assert sorted(os.listdir(victim)) == ["precious.txt"] and not (tmp_path / "mine").exists()
    assert calls == [] and _leftovers(tmp_path) == [] and sorted(os.listdir(work)) == ["README.md"]


def test_plain_yaml_recipe_cannot_choose_output_either(saved, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"sources": saved, "rank": 2, "out": str(tmp_path / "out")}))
    rc, err = _cli(["merge", "--recipe", str(recipe), "--no-progress"], capsys)
    assert rc == 2 and "--out" in err and not (tmp_path / "out").exists()


_BAD_RECIPES = {
    "unknown key": ({"sources": ["a"], "rnak": 2}, "Valid fields: .*'rank'"),
    "not a mapping": (["a", "b"], "must be a YAML mapping"),
    "rank string": ({"sources": ["a"], "rank": "3"}, "`rank` must be a positive integer"),
    "rank bool": ({"sources": ["a"], "rank": True}, "`rank` must be a positive integer"),
    "rank float": ({"sources": ["a"], "rank": 1e9}, "`rank` must be a positive integer"),
    "batch size zero": ({"sources": ["a"], "batch_size": 0}, "`batch_size` must be a positive integer"),
    "weights strings": ({"sources": ["a"], "weights": ["a"]}, "`weights` must be a list of finite numbers"),
    "weights scalar": ({"sources": ["a"], "weights": 0.5}, "`weights` must be a list"),
    "weights inf": ({"sources": ["a"], "weights": [float("inf")]}, "finite numbers"),
    "sources string": ({"sources": "a"}, "`sources` must be a non-empty list"),
    "source revision int": ({"sources": [{"source": "u/r", "revision": 5}]}, "a source must be"),
    "source extra key": ({"sources": [{"source": "u/r", "out": "x"}]}, "a source must be"),
    "method list": ({"sources": ["a"], "method": ["cp"]}, "`method` must be a non-empty string"),
    "dtype": ({"sources": ["a"], "dtype": "int8"}, "`dtype` must be one of"),
    "device": ({"sources": ["a"], "device": 0}, "`device` must be a non-empty string"),
    "options list": ({"sources": ["a"], "options": [1]}, "`options` must be a mapping"),
}


@pytest.mark.parametrize("label", list(_BAD_RECIPES))
def test_recipe_schema_is_typed(label, tmp_path, capsys):
    recipe, msg = _BAD_RECIPES[label]
    with pytest.raises(MergeInputError, match=msg):
        Recipe.parse(recipe)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    rc, err = _cli(["merge", "--recipe", str(path), "--out", str(tmp_path / "out"), "--no-progress"], capsys)
    assert rc == 2 and re.search(msg, err) and not (tmp_path / "out").exists()


def test_recipe_file_garbage(tmp_path, capsys):
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00garbage")
    (tmp_path / "bad.yaml").write_text("sources: [a\n")
    (tmp_path / "README.md").write_text("# just a card\n")
    for name, msg in [("bin.yaml", "not UTF-8"), ("bad.yaml", "not valid YAML"), ("README.md", "no peft-cp-merge"),
                      ("missing.yaml", "does not exist")]:
        rc, err = _cli(["merge", "--recipe", str(tmp_path / name), "--out", str(tmp_path / "o"), "--no-progress"],
                       capsys)
        assert rc == 2 and msg in err, name


# --- 2. limits before allocation -------------------------------------------------------------------------------------

def test_huge_rank_refused_before_anything_is_read(saved, tmp_path, capsys, monkeypatch):
    def no_allocation(*a, **kw):
        raise AssertionError("a tensor was read before the rank was checked")

    monkeypatch.setattr(engine, "LoraFactors", no_allocation)
    for rank in (10**9, 9):  # the sum of the ranks is at most 4 + 2 = 6 (lin0); min(out, in) at most 16
        with pytest.raises(MergeInputError, match="Pass rank <= 6"):
            merge_adapters(saved, rank=rank, progress=False)
        with pytest.raises(MergeInputError, match="Pass rank <= 6"):
            merge_adapters(saved, cp_rank=rank, progress=False)
    rc, err = _cli(["merge", *saved, "--rank", "1000000000", "--out", str(tmp_path / "o"), "--no-progress"], capsys)
    assert rc == 2 and "rank <= 6" in err and not (tmp_path / "o").exists()


def test_huge_rank_in_add_weighted_adapter_leaves_model_unchanged():
    model = make_peft_model(ADAPTERS)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for method, kw in [("cp", {"cp_rank": 10**6}), ("tsv", {"svd_rank": 10**9}), ("knots", {"svd_rank": 7})]:
        start = time.perf_counter()
        with pytest.raises(MergeInputError, match="Pass .*_rank <= 6"):
            model.add_weighted_adapter(list(ADAPTERS), [0.5, 0.5], "m", combination_type=method, **kw)
        assert time.perf_counter() - start < 5
        assert set(model.peft_config) == set(ADAPTERS)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    # the largest useful rank is accepted, and the default is the largest adapter rank (4, lin0)
    model.add_weighted_adapter(list(ADAPTERS), [0.5, 0.5], "ok", combination_type="cp", cp_rank=6)
    model.add_weighted_adapter(list(ADAPTERS), [0.5, 0.5], "default", combination_type="cp")
    assert (model.peft_config["ok"].r, model.peft_config["default"].r) == (6, 4)



def test_one_rank_rule_in_the_registry():
    """`resolve_rank` is the rank rule of both front ends (hand-computed): default = largest source rank, limit =
    max over modules of min(sum r_t, out, in) (or the default if larger); `merge_batch` pads every result to it,
    also for a chunk of modules whose own limit is lower than the whole merge's (the file engine's streaming)."""
    cp = get_merge_method("cp")
    modules = [([2, 3], 16, 4), ([1, 1], 8, 8)]  # limits min(5, 16, 4) = 4 and min(2, 8, 8) = 2
    assert cp.resolve_rank(None, modules) == 3 and cp.resolve_rank(4, modules) == 4
    with pytest.raises(MergeInputError, match="`cp_rank`=5 is larger .* Pass cp_rank <= 4"):
        cp.resolve_rank(5, modules)
    assert cp.resolve_rank(3, [([3], 16, 2)]) == 3  # the default (largest source rank) is always allowed
    for bad in (0, -1, 2.0, "3", True):
        with pytest.raises(MergeInputError, match="`rank` must be a positive integer"):
            cp.resolve_rank(bad, option="rank")
    assert cp.resolve_rank(None) is None
    g = torch.Generator().manual_seed(0)

    def lora(r, out, inp):
        return LoraFactors(torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g), 1.0)

    small = [lora(1, 8, 8), lora(1, 8, 8)]
    with pytest.raises(MergeInputError, match="Pass cp_rank <= 2"):
        cp.merge_batch([small], [[0.5, 0.5]], rank=4)
    (padded,) = cp.merge_batch([small], [[0.5, 0.5]], rank=4, all_modules=modules)
    (plain,) = cp.merge_batch([small], [[0.5, 0.5]], rank=4, all_modules=modules, pad=False)
    assert padded.rank == 4 and plain.rank == 2 and torch.equal(padded.A[2:], torch.zeros(2, 8))
    assert torch.allclose(padded.B @ padded.A, plain.B @ plain.A)
    assert cp(small, [0.5, 0.5], rank=10**6).rank == 2  # the math-level call: no padding, nothing allocated


def _rewrite(folder: Path, fn):
    tensors = load_file(folder / WEIGHTS)
    save_file({k: v.contiguous() for k, v in fn(tensors).items()}, folder / WEIGHTS)


def _bad_weights(src, tmp):
    """label -> (folder, message): safetensors files that are not usable LoRA factors."""
    cases = {}
    d = _copy(src, tmp / "int")
    _rewrite(d, lambda t: {k: (v * 100).to(torch.int32) for k, v in t.items()})
    cases["int32 factors"] = (d, "only floating-point factors")
    d = _copy(src, tmp / "bool")
    _rewrite(d, lambda t: {k: v > 0 for k, v in t.items()})
    cases["bool factors"] = (d, "only floating-point factors")
    d = _copy(src, tmp / "empty")
    save_file({}, d / WEIGHTS)
    cases["no tensors"] = (d, "holds no LoRA tensors")
    d = _copy(src, tmp / "trunc")
    data = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(data[: len(data) // 2])
    cases["truncated"] = (d, "not a readable safetensors file")
    d = _copy(src, tmp / "garbage")
    (d / WEIGHTS).write_bytes(b"this is not a safetensors file")
    cases["garbage"] = (d, "not a readable safetensors file")
    d = _copy(src, tmp / "zero-bytes")
    (d / WEIGHTS).write_bytes(b"")
    cases["zero bytes"] = (d, "not a readable safetensors file")
    d = _copy(src, tmp / "rank0")
    _rewrite(d, lambda t: {k: v[:0] if "lora_A" in k or "embedding_A" in k else v[:, :0] for k, v in t.items()})
    cases["rank-0 factors"] = (d, "same rank r >= 1")
    d = _copy(src, tmp / "rank-mismatch")
    _rewrite(d, lambda t: {k: v[:1] if "lora_A" in k or "embedding_A" in k else v[:, :1] for k, v in t.items()})
    cases["config rank != tensors"] = (d, "gives module .* rank 2, but its factors have rank 1")
    d = _copy(src, tmp / "huge")
    _rewrite(d, lambda t: {k: v * 1e30 for k, v in t.items()})  # squares overflow float32
    cases["factors near float32's limit"] = (d, "products overflow float32")
    d = _copy(src, tmp / "1d")
    _rewrite(d, lambda t: {k: v.flatten() for k, v in t.items()})
    cases["1-D factors"] = (d, "expected A \\(r, in, ...\\)")
    return cases


def test_bad_weight_files(saved, tmp_path, capsys):
    for label, (folder, msg) in _bad_weights(saved[0], tmp_path / "bad").items():
        for method in ("cp", "tsv") if label.startswith("factors near") else ("cp",):
            with pytest.raises(MergeInputError, match=msg):
                merge_adapters([saved[1], str(folder)], method=method, progress=False)
        rc, err = _cli(["merge", saved[1], str(folder), "--out", str(tmp_path / "out"), "--no-progress"], capsys)
        assert rc == 2 and re.search(msg, err), label
        assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == [], label


def test_registry_refuses_int_and_rank0_factors():
    cp = get_merge_method("cp")
    ints = LoraFactors(torch.ones(2, 5, dtype=torch.int32), torch.ones(4, 2, dtype=torch.int32))
    with pytest.raises(MergeInputError, match="only floating-point"):
        cp([ints, ints], [0.5, 0.5])
    empty = LoraFactors(torch.zeros(0, 5), torch.zeros(4, 0))
    with pytest.raises(MergeInputError, match="rank-0"):
        get_merge_method("tsv")([empty], [1.0])


_BAD_CONFIGS = {
    "a list": ([1, 2], "must hold a JSON object"),
    "a string": ("LORA", "must hold a JSON object"),
    "null": (None, "must hold a JSON object"),
    "r string": ({"r": "8"}, "r='8'; the LoRA rank must be a positive integer"),
    "r 1e9": ({"r": 1e9}, "r=1000000000.0; the LoRA rank must be a positive integer"),
    "r huge int": ({"r": 10**9}, "rank 1000000000, but its factors have rank 2"),
    "r zero": ({"r": 0}, "the LoRA rank must be a positive integer"),
    "r bool": ({"r": True}, "the LoRA rank must be a positive integer"),
    "rank_pattern": ({"rank_pattern": {"lin0": -1}}, "rank_pattern=.* positive integers"),
    "rank_pattern huge": ({"rank_pattern": {"lin0": 10**9}}, "rank 1000000000, but its factors have rank 2"),
    "alpha": ({"lora_alpha": "x"}, "lora_alpha='x'"),
    "alpha nan": ({"lora_alpha": float("nan")}, "lora_alpha=nan"),
    "rslora string": ({"use_rslora": "no"}, "use_rslora='no'; it must be true or false"),
    "targets": ({"target_modules": 5}, "target_modules=5"),
    "base model": ({"base_model_name_or_path": ["a"]}, "base_model_name_or_path"),
}


@pytest.mark.parametrize("label", [*_BAD_CONFIGS, "invalid json", "not utf-8"])
def test_bad_adapter_config(saved, tmp_path, capsys, label):
    folder = _copy(saved[0], tmp_path / "bad")
    if label == "invalid json":
        (folder / CONFIG).write_text("{'r': 2,")
        msg = "is not valid JSON"
    elif label == "not utf-8":
        (folder / CONFIG).write_bytes(b'{"r": "\xff"}')
        msg = "is not valid JSON"
    else:
        change, msg = _BAD_CONFIGS[label]
        cfg = json.loads((folder / CONFIG).read_text())
        (folder / CONFIG).write_text(json.dumps({**cfg, **change} if isinstance(change, dict) else change))
    with pytest.raises(MergeInputError, match=msg):
        merge_adapters([saved[1], str(folder)], progress=False)
    rc, err = _cli(["merge", saved[1], str(folder), "--out", str(tmp_path / "out"), "--no-progress"], capsys)
    assert rc == 2 and re.search(msg, err) and not (tmp_path / "out").exists()


BIG = [1e12, 1e12]  # merged factors of size ~sqrt(1e12) / sqrt(n): beyond float16's 65504


def test_float16_overflow_is_an_error_naming_float32(saved, tmp_path, capsys):
    with pytest.raises(MergeInputError, match="overflow float16.*--dtype float32"):
        merge_adapters(saved, BIG, dtype="float16", progress=False)
    rc, err = _cli(["merge", *saved, "--weights", *map(str, BIG), "--dtype", "float16", "--out", str(tmp_path / "o"),
                    "--no-progress"], capsys)
    assert rc == 2 and "--dtype float32" in err and not (tmp_path / "o").exists() and _leftovers(tmp_path) == []
    # float16 sources: the default output dtype is theirs; with dtype="float32" nothing passes through float16
    half = [_copy(s, tmp_path / f"half{i}") for i, s in enumerate(saved)]
    for d in half:
        _rewrite(d, lambda t: {k: v.half() for k, v in t.items()})
    with pytest.raises(MergeInputError, match="overflow float16"):
        merge_adapters(half, BIG, progress=False)
    merged = merge_adapters(half, BIG, dtype="float32", progress=False)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in merged.tensors.values())


def test_float16_overflow_in_add_weighted_adapter_leaves_model_unchanged():
    model = make_peft_model(ADAPTERS, dtype=torch.float16)
    with pytest.raises(MergeInputError, match="overflow float16"):
        model.add_weighted_adapter(list(ADAPTERS), BIG, "m", combination_type="cp")
    assert set(model.peft_config) == set(ADAPTERS)
    assert not any(".m." in k for k in model.state_dict())


_BAD_OPTIONS = {
    "random_state str": ({"cp_random_state": "abc"}, ["--option", "cp_random_state=abc"], "cp_random_state must be"),
    "random_state neg": ({"cp_random_state": -1}, ["--option", "cp_random_state=-1"], "cp_random_state must be"),
    "random_state float": ({"cp_random_state": 1.5}, ["--option", "cp_random_state=1.5"], "integer seed"),
    "n_iter str": ({"cp_n_iter_max": "10"}, ["--option", "cp_n_iter_max='10'"], "cp_n_iter_max must be an integer"),
    "tol str": ({"cp_tol": "small"}, ["--option", "cp_tol=small"], "cp_tol must be a finite number"),
    "init int": ({"cp_init": 3}, ["--option", "cp_init=3"], "cp_init must be a string"),
    "device": ({"device": "banana"}, ["--device", "banana"], "device='banana' is not usable here"),
    "batch size 0": ({"batch_size": 0}, ["--batch-size", "0"], "batch_size`? must be a positive integer"),
    "batch size -3": ({"batch_size": -3}, ["--batch-size", "-3"], "batch_size`? must be a positive integer"),
    "rank 0": ({"rank": 0}, ["--rank", "0"], "rank`? must be a positive integer"),
    "rank float": ({"rank": 2.5}, ["--rank", "2.5"], "rank`? must be a positive integer|invalid int value"),
    "rank str": ({"rank": "3"}, ["--rank", "three"], "rank`? must be a positive integer|invalid int value"),
    "dtype": ({"dtype": "int8"}, ["--dtype", "int8"], "dtype='int8' is not supported|invalid choice"),
    "weights": ({"weights": ["a", "b"]}, ["--weights", "a", "b"], "weights must be|invalid float value"),
    "unknown option": ({"cp_magic": 1}, ["--option", "cp_magic=1"], "Unknown option"),
    "option syntax": (None, ["--option", "cp_init"], "expected KEY=VALUE"),
}


@pytest.mark.parametrize("label", list(_BAD_OPTIONS))
def test_bad_option_types(saved, tmp_path, capsys, monkeypatch, label):
    kw, argv, msg = _BAD_OPTIONS[label]
    if kw is not None:
        with pytest.raises(ValueError, match=msg):
            merge_adapters(saved, progress=False, **kw)
    monkeypatch.setattr(engine, "resolve_source", lambda *a, **k: pytest.fail("sources read before options checked"))
    rc, err = _cli(["merge", *saved, *argv, "--out", str(tmp_path / "o"), "--no-progress"], capsys)
    assert rc == 2 and re.search(msg, err) and not (tmp_path / "o").exists()


def test_bad_option_types_in_add_weighted_adapter():
    model = make_peft_model(ADAPTERS)
    for kw, msg in [({"cp_random_state": "abc"}, "cp_random_state must be"), ({"cp_tol": "x"}, "cp_tol must be"),
                    ({"cp_rank": "4"}, "`cp_rank` must be a positive integer")]:
        with pytest.raises(MergeInputError, match=msg):
            model.add_weighted_adapter(list(ADAPTERS), [0.5, 0.5], "m", combination_type="cp", **kw)
    with pytest.raises(MergeInputError, match="`weights` must be a list of 2 numbers"):
        model.add_weighted_adapter(list(ADAPTERS), ["a", "b"], "m", combination_type="cp")
    assert set(model.peft_config) == set(ADAPTERS)


# --- 3. the output folder is checked before the merge runs ----------------------------------------------------------

def test_unwritable_out_detected_before_the_merge(saved, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(engine, "merge_adapters", lambda *a, **k: pytest.fail("merged before --out was checked"))
    (tmp_path / "file").write_text("x")
    cases = [
        (["--out", str(tmp_path / "file" / "out")], "is a file, not a folder"),
        (["--out", str(tmp_path / "file")], "already exists"),
        (["--out", str(tmp_path / "file"), "--overwrite"], "is not a folder"),
        (["--push-to-hub", "not a repo id!"], "not a valid Hub repo id"),
    ]
    if os.name == "posix" and os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "ro").mkdir(mode=0o500)
        cases.append((["--out", str(tmp_path / "ro" / "out")], "is not writable"))
    for flags, msg in cases:
        rc, err = _cli(["merge", *saved, "--no-progress", *flags], capsys)
        assert rc == 2 and msg in err, flags
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"] + (["ro"] if len(cases) > 4 else [])
    assert (tmp_path / "file").read_text() == "x"


# --- 4. atomic folders --------------------------------------------------------------------------------------------

def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_temp_folder_names_and_stale_cleanup(tmp_path):
    seen = []

    def write(folder):
        seen.append(folder.name)
        (folder / "f").write_text("new")

    _io.atomic_folder(tmp_path / "out", write)
    m = _io._TEMP_NAME.match(seen[0])
    assert m and m["kind"] == "tmp" and int(m["pid"]) == os.getpid() and m["tag"] == "out"
    # leftovers of killed runs: a dead process's temp folder (and an earlier version's), and a live one
    host, dead = m["host"], _dead_pid()
    stale = tmp_path / f".tmp.{host}.{dead}.abcd1234.out"
    legacy = tmp_path / ".tmp-out-abcd1234"
    live = tmp_path / f".tmp.{host}.{os.getpid()}.abcd1234.out"
    other = tmp_path / f".tmp.{host}.{dead}.abcd1234.other"
    for d in (stale, legacy, live, other):
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes(b"half written")
    hour_ago = time.time() - 7200
    os.utime(legacy, (hour_ago, hour_ago))
    _io.atomic_folder(tmp_path / "out", write, overwrite=True)
    assert not stale.exists() and not legacy.exists()
    assert live.exists() and other.exists()  # a running writer's, and another target's, are left alone
    # a run killed between the two renames of an overwrite (where the exchange is unsupported): target missing,
    # the old folder set aside; the next write puts it back first (so without overwrite it is refused)
    shutil.rmtree(tmp_path / "out")
    aside = tmp_path / f".old.{host}.{dead}.abcd1234.out"
    aside.mkdir()
    (aside / "f").write_text("old")
    with pytest.raises(FileExistsError):
        _io.atomic_folder(tmp_path / "out", write)
    assert (tmp_path / "out" / "f").read_text() == "old" and not aside.exists()


def test_killed_write_is_cleaned_by_the_next_run(tmp_path):
    """A merge killed mid-write (os._exit, no cleanup) leaves a temp folder; the next run removes it."""
    script = (
        "import importlib.util, os, sys\n"
        f"spec = importlib.util.spec_from_file_location('_io', {str(Path(_io.__file__))!r})\n"
        "io = importlib.util.module_from_spec(spec); spec.loader.exec_module(io)\n"
        "def write(folder):\n"
        "    (folder / 'adapter_model.safetensors').write_bytes(b'half')\n"
        "    os._exit(9)\n"
        f"io.atomic_folder(io.Path({str(tmp_path / 'out')!r}), write)\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert r.returncode == 9, r.stderr[-2000:]
    assert len(_leftovers(tmp_path)) == 1 and not (tmp_path / "out").exists()
    _io.atomic_folder(tmp_path / "out", lambda f: (f / "f").write_text("ok"))
    assert _leftovers(tmp_path) == [] and (tmp_path / "out" / "f").read_text() == "ok"


@pytest.mark.parametrize("renameat2", ["native", "fallback"])
def test_overwrite_race_and_replacement(tmp_path, monkeypatch, renameat2):
    if renameat2 == "fallback":
        monkeypatch.setattr(_io, "_renameat2", lambda *a: False)
    target = tmp_path / "out"

    def write_while_someone_creates_target(folder):
        (folder / "f").write_text("mine")
        target.mkdir()  # an empty folder appears meanwhile: os.rename would silently replace it

    with pytest.raises(FileExistsError, match="appeared while it was being written"):
        _io.atomic_folder(target, write_while_someone_creates_target)
    assert target.is_dir() and list(target.iterdir()) == [] and _leftovers(tmp_path) == []
    # overwrite: replaced in one step (the target path exists throughout), the old content deleted
    (target / "old.txt").write_text("old")
    _io.atomic_folder(target, lambda f: (f / "f").write_text("new"), overwrite=True)
    assert sorted(os.listdir(target)) == ["f"] and _leftovers(tmp_path) == []
    # a failing write leaves the target as it was and no temp folder

    def boom(folder):
        (folder / "partial").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _io.atomic_folder(target, boom, overwrite=True)
    assert sorted(os.listdir(target)) == ["f"] and _leftovers(tmp_path) == []
    # a link is never followed or replaced by an overwrite
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        _io.atomic_folder(tmp_path / "link", lambda f: None, overwrite=True)
    assert (tmp_path / "link").is_symlink()


# --- 5. deterministic outputs ----------------------------------------------------------------------------------------

_SAVE = """
import sys
from peft_cp_merge import merge_adapters
merge_adapters(sys.argv[2:], [0.6, 0.4], rank=3, progress=False).save_pretrained(sys.argv[1])
"""


def test_same_merge_gives_byte_identical_files(saved, tmp_path):
    merge_adapters(saved, [0.6, 0.4], rank=3, progress=False).save_pretrained(tmp_path / "a")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # set iteration order differs from this process's
    r = subprocess.run([sys.executable, "-c", _SAVE, str(tmp_path / "b"), *saved], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    targets = json.loads((tmp_path / "a" / "adapter_config.json").read_text())["target_modules"]
    assert targets == sorted(targets)
