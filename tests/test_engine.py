"""The adapter-file engine (``merge_adapters``), its model card / recipe, the Hub boundary and the ``merge`` CLI."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from _hub import fake_hf_api
from _models import assert_loads_with_plain_peft, delta_matrix, inputs, save_tiny_adapters
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

import peft_cp_merge
from peft_cp_merge import MergeInputError, UnknownMergeMethodError, UnknownMergeOptionError, merge_adapters
from peft_cp_merge.cli import main as cli_main
from peft_cp_merge.methods import get_merge_method, list_merge_methods

ADAPTERS = {
    "x": {"r": 2, "lora_alpha": 4},
    "y": {"r": 3, "lora_alpha": 3, "rank_pattern": {"lin0": 4}, "alpha_pattern": {"conv2": 8}},
    "z": {"r": 2, "lora_alpha": 2, "use_rslora": True, "target_modules": ["emb", "lin0", "conv2", "c1d"]},
}
W = [0.5, 0.3, -0.2]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The PEFT model and its three adapters saved as plain PEFT folders (float64, base_model 'tiny-net')."""
    root = tmp_path_factory.mktemp("adapters")
    return save_tiny_adapters(root, ADAPTERS)


def _layers(model):
    return {k: m for k, m in model.base_model.model.named_modules() if isinstance(m, LoraLayer)}


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _snapshot(d: Path):
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


def _methods():
    names = list_merge_methods(peft_only=True)
    return names + (["svd"] if "svd" in list_merge_methods() and "svd" not in names else [])


@pytest.mark.parametrize("method", _methods())
def test_file_engine_equals_peft_front_end(saved, tmp_path, method):
    """Same adapters, same method: the folder merge loaded back into PEFT gives add_weighted_adapter's update
    For the registry's ``svd`` (not routed through add_weighted_adapter, PEFT has its own) the reference is PEFT's
    svd formula on the dense update, truncated SVD of ``sum_t w_t dW_t``: PEFT's own ``svd`` path fails on this
    model's Conv3d layer (peft 0.21 ``torch.diag`` size mismatch), and ``tests/test_baselines.py`` compares with it
    on the layers it supports."""
    model, paths = saved
    m = get_merge_method(method)
    rank = 4
    merged = merge_adapters(paths, W, method=method, rank=rank, progress=False)
    assert merged.config.r == merged.config.lora_alpha == rank and not merged.config.use_rslora
    merged.save_pretrained(tmp_path / "out")
    name = f"file_{method}"
    ref = f"peft_{method}"
    try:
        model.load_adapter(str(tmp_path / "out"), adapter_name=name)
        if m.peft_combination_type:
            model.add_weighted_adapter(list(ADAPTERS), W, ref, combination_type=method, **{m.rank_option: rank})
        for key, layer in _layers(model).items():
            assert layer.scaling[name] == 1.0
            if m.peft_combination_type:
                expected = delta_matrix(layer, ref)
            else:
                dense = sum(w * delta_matrix(layer, n) for n, w in zip(ADAPTERS, W) if n in layer.scaling)
                U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
                expected = U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank]
            assert _rel(delta_matrix(layer, name), expected) < 1e-6, (method, key)
    finally:
        for n in (name, ref):
            if n in model.peft_config:
                model.delete_adapter(n)


def test_merge_equals_sum_at_full_rank_and_order_invariant(saved):
    """cp at the sum of ranks (8, in lin0: the largest rank allowed) reproduces PEFT's `cat` update,
    sum_t w_t s_t B_t A_t; order does not matter."""
    model, paths = saved
    a = merge_adapters(paths, W, rank=8, progress=False, cp_init="tasks")
    b = merge_adapters(paths[::-1], W[::-1], rank=8, progress=False, cp_init="tasks")
    for key, layer in _layers(model).items():
        k = f"base_model.model.{key}"
        A_key = next(n for n in a.tensors if n.startswith(k + ".") and ("lora_A" in n or "embedding_A" in n))
        B_key = A_key.replace("lora_A", "lora_B").replace("embedding_A", "embedding_B")
        da = a.tensors[B_key].flatten(1) @ a.tensors[A_key].flatten(1)
        db = b.tensors[B_key].flatten(1) @ b.tensors[A_key].flatten(1)
        ref = sum(w * delta_matrix(layer, n) for n, w in zip(ADAPTERS, W) if n in layer.scaling)
        assert _rel(da, ref) < 1e-4, key
        assert _rel(db, da) < 1e-6, key


def test_streaming_batches_give_the_same_result(saved):
    _, paths = saved
    a = merge_adapters(paths, W, rank=3, progress=False)
    b = merge_adapters(paths, W, rank=3, progress=False, batch_size=1)
    assert a.tensors.keys() == b.tensors.keys()
    for k in a.tensors:
        torch.testing.assert_close(a.tensors[k], b.tensors[k], rtol=1e-9, atol=1e-12)


def test_saved_folder_loads_with_plain_peft_and_card(saved, tmp_path):
    model, paths = saved
    merged = merge_adapters(paths, W, rank=3, dtype="float32", progress=False)
    out = merged.save_pretrained(tmp_path / "merged")
    assert sorted(os.listdir(out)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert {t.dtype for t in load_file(out / "adapter_model.safetensors").values()} == {torch.float32}
    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "peft" and meta["base_model"] == "tiny-net"
    assert meta["base_model_relation"] == "merge" and {"lora", "peft-cp-merge", "cp"} <= set(meta["tags"])
    model.load_adapter(str(out), adapter_name="m32")
    model.set_adapter("m32")
    x = inputs(seed=5)
    expected = model(x).detach()
    model.set_adapter("x")
    model.delete_adapter("m32")
    assert_loads_with_plain_peft(out, x, expected, 3, tmp_path, rtol=1e-5, atol=1e-7)


def test_recipe_from_card_reruns_to_the_same_tensors(saved, tmp_path):
    _, paths = saved
    merged = merge_adapters(paths, W, method="cp", rank=3, progress=False, cp_variant="sign_elect")
    out = merged.save_pretrained(tmp_path / "first")
    recipe = peft_cp_merge.load_recipe(out / "README.md")
    assert recipe["method"] == "cp" and recipe["options"]["cp_variant"] == "sign_elect"
    again = merge_adapters(recipe["sources"], recipe["weights"], recipe["method"], recipe["rank"],
                           progress=False, **recipe["options"])
    for k, v in merged.tensors.items():
        assert torch.equal(again.tensors[k], v), k
    # and through the CLI, with the card as --recipe
    assert cli_main(["merge", "--recipe", str(out / "README.md"), "--out", str(tmp_path / "second"),
                     "--no-progress"]) == 0
    cli = load_file(tmp_path / "second" / "adapter_model.safetensors")
    for k, v in merged.tensors.items():
        assert torch.equal(cli[k], v), k


def test_cli_merge_flags_and_yaml_recipe(saved, tmp_path, capsys):
    _, paths = saved
    args = ["merge", *paths, "--method", "cp", "--weights", *map(str, W), "--rank", "3",
            "--option", "cp_variant=authors", "--out", str(tmp_path / "a"), "--no-progress"]
    assert cli_main(args) == 0
    assert "merged 3 adapters with cp at rank 3" in capsys.readouterr().out
    api = merge_adapters(paths, W, rank=3, progress=False, cp_variant="authors")
    got = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert all(torch.equal(got[k], v) for k, v in api.tensors.items())
    # a recipe describes the merge; where to write comes only from the command line (tests/test_hardening.py)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(
        {"sources": [{"source": p} for p in paths], "weights": W, "method": "cp", "rank": 3,
         "options": {"cp_variant": "authors"}}))
    assert cli_main(["merge", "--recipe", str(tmp_path / "r.yaml"), "--no-progress"]) == 2
    assert "--out" in capsys.readouterr().err
    assert cli_main(["merge", "--recipe", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "b"),
                     "--no-progress"]) == 0
    got = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert all(torch.equal(got[k], v) for k, v in api.tensors.items())
    # an existing output folder is refused (exit 2) and left alone; --overwrite replaces it
    before = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    assert cli_main(args[:-3] + ["--out", str(tmp_path / "a"), "--rank", "2", "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == before
    assert cli_main(args + ["--overwrite", "--rank", "2"]) == 0
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["r"] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp", ".old"))]


def test_cli_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        cli_main(["merge", "--help"])
    text = capsys.readouterr().out
    for flag in ("--recipe", "--method", "--weights", "--rank", "--option", "--out", "--overwrite", "--push-to-hub",
                 "--private", "--revision", "--commit-message", "--base-model", "--device", "--dtype",
                 "--batch-size"):
        assert flag in text
    assert cli_main(["methods"]) == 0
    assert "cp_variant" in capsys.readouterr().out


# --- Hub ------------------------------------------------------------------------------------------------------------

def _hub_cache(cache: Path, repo: str, commit: str, folders: dict[str, str]) -> None:
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    for sub, src in folders.items():
        shutil.copytree(src, repo_dir / "snapshots" / commit / sub)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)


_OFFLINE = """
import json, sys
from peft_cp_merge import merge_adapters, MergeInputError
m = merge_adapters(["someone/adapters/x", "someone/adapters/y@main"], [0.5, 0.5], rank=3, progress=False)
try:
    merge_adapters(["someone/not-cached", "someone/adapters/x"], progress=False)
    err = None
except MergeInputError as e:
    err = str(e)
print(json.dumps({"sources": m.recipe["sources"], "err": err,
                  "tensors": {k: v.flatten()[:3].tolist() for k, v in m.tensors.items()}}))
"""


def test_hub_ids_from_a_prepopulated_cache_offline(saved, tmp_path):
    _, paths = saved
    commit = "c" * 40
    _hub_cache(tmp_path / "hub", "someone/adapters", commit, {"x": paths[0], "y": paths[1]})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    r = subprocess.run([sys.executable, "-c", _OFFLINE], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["sources"] == [{"source": "someone/adapters/x", "revision": commit},
                              {"source": "someone/adapters/y", "revision": commit}]
    assert "someone/not-cached" in out["err"] and "HF_HUB_OFFLINE" in out["err"]
    local = merge_adapters(paths[:2], [0.5, 0.5], rank=3, progress=False)
    for k, v in local.tensors.items():
        assert out["tensors"][k] == pytest.approx(v.flatten()[:3].tolist(), rel=1e-12), k


def test_push_to_hub_at_the_hfapi_boundary(saved, monkeypatch):
    _, paths = saved
    calls = fake_hf_api(monkeypatch, "https://hub/me/merged/commit/1")
    merged = merge_adapters(paths, W, rank=3, progress=False)
    url = merged.push_to_hub("me/merged", private=True, revision="v1", commit_message="merge it", token="tok")
    assert url == "https://hub/me/merged/commit/1"
    assert calls[:3] == [
        ("init", "tok"),
        ("create_repo", "me/merged", {"private": True, "exist_ok": True}),
        ("create_branch", "me/merged", {"branch": "v1", "exist_ok": True}),
    ]
    (kind, up), = calls[3:]
    assert kind == "upload_folder"
    assert (up["repo_id"], up["revision"], up["commit_message"]) == ("me/merged", "v1", "merge it")
    assert up["files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


# --- bad input: clear error, nothing written -------------------------------------------------------------------------

def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_config(folder, **changes):
    p = Path(folder) / "adapter_config.json"
    cfg = json.loads(p.read_text())
    cfg.update(changes)
    p.write_text(json.dumps(cfg))


def _bad_sources(paths, tmp):
    """(sources, kwargs, expected exception, message fragment)."""
    cases = {}
    cases["missing"] = ([paths[0], str(tmp / "nope")], {}, MergeInputError, "does not exist")
    (tmp / "empty").mkdir(parents=True)
    cases["no config"] = ([paths[0], str(tmp / "empty")], {}, MergeInputError, "no adapter_config.json")
    ia3 = _copy(paths[1], tmp / "ia3")
    _edit_config(ia3, peft_type="IA3")
    cases["ia3"] = ([paths[0], str(ia3)], {}, ValueError, "IA3 adapter; only LoRA")
    dora = _copy(paths[1], tmp / "dora")
    _edit_config(dora, use_dora=True)
    cases["dora"] = ([paths[0], str(dora)], {}, ValueError, "DoRA")
    other = _copy(paths[1], tmp / "other-base")
    _edit_config(other, base_model_name_or_path="another-model")
    cases["base models"] = ([paths[0], str(other)], {}, MergeInputError, "different base models")
    shapes = _copy(paths[1], tmp / "shapes")
    t = load_file(shapes / "adapter_model.safetensors")
    t["base_model.model.lin0.lora_A.weight"] = torch.zeros(4, 13, dtype=torch.float64)
    save_file(t, shapes / "adapter_model.safetensors")
    cases["shapes"] = ([paths[0], str(shapes)], {}, MergeInputError, "incompatible shapes")
    pickle = _copy(paths[1], tmp / "pickle")
    torch.save(load_file(pickle / "adapter_model.safetensors"), pickle / "adapter_model.bin")
    (pickle / "adapter_model.safetensors").unlink()
    cases["pickle"] = ([paths[0], str(pickle)], {}, MergeInputError, "pickle")
    cases["weights length"] = (paths, {"weights": [1.0, 2.0]}, MergeInputError, "one weight per adapter")
    cases["weights nan"] = (paths, {"weights": [1.0, float("nan"), 1.0]}, MergeInputError, "finite")
    cases["method"] = (paths, {"method": "magic"}, UnknownMergeMethodError, "Available: ")
    cases["option"] = (paths, {"cp_magic": 1}, UnknownMergeOptionError, "cp_variant")
    cases["variant"] = (paths, {"cp_variant": "nope"}, MergeInputError, "cp_variant='nope'")
    cases["rank"] = (paths, {"rank": 0}, MergeInputError, "positive integer")
    cases["not a hub id"] = ([paths[0], "not a hub id!"], {}, MergeInputError, "neither an existing local folder")
    return cases


def test_bad_inputs_clear_errors_and_nothing_written(saved, tmp_path):
    _, paths = saved
    for label, (sources, kw, exc, msg) in _bad_sources(paths, tmp_path / "bad").items():
        with pytest.raises(exc, match=msg):
            merge_adapters(sources, progress=False, **kw)
        # the CLI reports the same problem as an error line with exit code 2, and writes nothing
        if "weights" not in kw and "cp_magic" not in kw:
            argv = ["merge", *sources, "--out", str(tmp_path / "out"), "--no-progress"]
            argv += ["--method", kw["method"]] if "method" in kw else []
            argv += ["--rank", str(kw["rank"])] if "rank" in kw else []
            argv += ["--option", f"cp_variant={kw['cp_variant']}"] if "cp_variant" in kw else []
            assert cli_main(argv) == 2, label
            assert not (tmp_path / "out").exists(), label
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_existing_output_refused_then_overwritten(saved, tmp_path):
    _, paths = saved
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    merged = merge_adapters(paths, W, rank=2, progress=False)
    with pytest.raises(MergeInputError, match="already exists"):
        merged.save_pretrained(out)
    assert _snapshot(out) == ["keep.txt"]
    # overwrite replaces only a merged adapter this package wrote (issue 23): a folder of the user's stays
    with pytest.raises(ValueError, match="overwrite never replaces it"):
        merged.save_pretrained(out, overwrite=True)
    assert _snapshot(out) == ["keep.txt"]
    (out / "keep.txt").unlink()
    merged.save_pretrained(out, overwrite=True)  # an empty folder holds nothing to lose
    merged.save_pretrained(out, overwrite=True)  # a merged adapter written here
    assert _snapshot(out) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert _snapshot(tmp_path) == ["out", "out/README.md", "out/adapter_config.json", "out/adapter_model.safetensors"]


def test_failed_write_leaves_nothing(saved, tmp_path, monkeypatch):
    _, paths = saved
    merged = merge_adapters(paths, W, rank=2, progress=False)

    def boom(*a, **kw):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        merged.save_pretrained(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
