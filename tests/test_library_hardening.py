"""Hostile and broken inputs to the adapter library (issue 13): a malformed ``library.json`` or centroids file, bad
``library merge`` arguments, an offline push, bad training data, mistyped config values, a missing base model and
an unusable ``output_dir``. Each is one line on stderr with exit code 2 and no traceback, and nothing is written."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from _library import make_rows, make_tiny_model, tiny_config, write_jsonl
from safetensors.torch import load_file, save_file
from test_hardening import _cli as _cli_one_line

from peft_cp_merge.cli import main as cli_main
from peft_cp_merge.library import AdapterLibrary, LibraryExistsError, LibraryFormatError, train_library


def _cli(argv, capsys):
    """Run the CLI: (exit code, last stderr line). Training logs its progress on stderr, so the error is checked to
    be the last line, one line, with no traceback anywhere; commands that log nothing must print only that line."""
    if argv[1] != "train":
        return _cli_one_line(argv, capsys)
    capsys.readouterr()
    try:
        rc = cli_main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1] if err.strip() else ""
    if rc != 0:
        assert last.startswith(("error:", "peft-cp-merge library train: error:")), err
    return rc, last


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("libhard")
    return tmp, make_tiny_model(tmp / "model"), write_jsonl(tmp / "data.jsonl", make_rows())


@pytest.fixture(scope="module")
def lib(tiny):
    tmp, model, data = tiny
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        return train_library(tiny_config(tmp, model, data, tmp / "lib", max_steps=1))


def _corrupt(lib, dst: Path, meta=None, centroids=None) -> Path:
    shutil.copytree(lib.path, dst)
    if meta is not None:
        (dst / "library.json").write_text(json.dumps(meta(json.loads((dst / "library.json").read_text()))))
    if centroids is not None:
        save_file(centroids(load_file(str(dst / "centroids.safetensors"))), str(dst / "centroids.safetensors"))
    return dst


def _drop_size(m):
    for c in m["clusters"]:
        del c["size"]
    return m


BAD_LIBRARIES = {
    "a list": (lambda m: [m], None, "not a peft-cp-merge/adapter-library file"),
    "version abc": (lambda m: {**m, "format_version": "abc"}, None, "format_version"),
    "version from the future": (lambda m: {**m, "format_version": 99}, None, "Upgrade peft-cp-merge"),
    "clusters not a list": (lambda m: {**m, "clusters": 3}, None, "`clusters`"),
    "no clusters": (lambda m: {**m, "clusters": []}, None, "`clusters`"),
    "cluster without size": (_drop_size, None, "clusters.0.size"),
    "negative size": (lambda m: {**m, "clusters": [{**c, "size": -1} for c in m["clusters"]]}, None, "size"),
    "too many clusters": (lambda m: {**m, "clusters": m["clusters"] * 2000}, None, "`clusters`"),
    "no centroids tensor": (None, lambda t: {"x": torch.zeros(1)}, "must hold `centroids`"),
    "centroids of the wrong count": (None, lambda t: {**t, "centroids": t["centroids"][:1]}, "shape (3, dim)"),
    "integer centroids": (None, lambda t: {**t, "centroids": t["centroids"].long()}, "finite floats"),
    "nan centroids": (None, lambda t: {**t, "centroids": t["centroids"] * float("nan")}, "finite floats"),
    "assignments out of range": (None, lambda t: {**t, "assignments": t["assignments"] + 7}, "cluster ids"),
}


@pytest.mark.parametrize("label", list(BAD_LIBRARIES))
def test_malformed_library_is_refused(lib, tmp_path, capsys, label):
    meta, centroids, message = BAD_LIBRARIES[label]
    bad = _corrupt(lib, tmp_path / "bad", meta, centroids)
    with pytest.raises(LibraryFormatError, match=re.escape(message)):
        AdapterLibrary.from_pretrained(bad)
    rc, err = _cli(["library", "info", str(bad)], capsys)
    assert rc == 2 and message.split("`")[0] in err
    rc, err = _cli(["library", "merge", str(bad), "--out", str(tmp_path / "out")], capsys)
    assert rc == 2 and not (tmp_path / "out").exists()


def test_garbage_centroids_file(lib, tmp_path, capsys):
    bad = _corrupt(lib, tmp_path / "bad")
    (bad / "centroids.safetensors").write_bytes(b"\x00" * 7)
    rc, err = _cli(["library", "info", str(bad)], capsys)
    assert rc == 2 and "not a readable safetensors file" in err


@pytest.mark.parametrize("argv, message", [
    (["--weights", "1"], "1 weight(s) for 3 clusters"),
    (["--weights", "abc"], "one number per cluster"),
    (["--weights", "size", "1"], "one number per cluster"),
    (["--clusters", "9"], "Clusters [9] do not exist"),
    (["--option", "cp_init"], "expected KEY=VALUE"),
    (["--option", "cp_init=[svd"], "not valid YAML"),
    (["--rank", "1000000"], "rank"),
])
def test_library_merge_bad_arguments(lib, tmp_path, capsys, argv, message):
    rc, err = _cli(["library", "merge", str(lib.path), "--out", str(tmp_path / "out"), *argv], capsys)
    assert rc == 2 and message in err and not (tmp_path / "out").exists()


def test_library_merge_refuses_existing_out_before_merging(lib, tmp_path, capsys, monkeypatch):
    (tmp_path / "out").mkdir()
    monkeypatch.setattr(AdapterLibrary, "merge", lambda *a, **k: pytest.fail("merged before checking --out"))
    rc, err = _cli(["library", "merge", str(lib.path), "--out", str(tmp_path / "out")], capsys)
    assert rc == 2 and "already exists" in err


def test_offline_push_is_one_line(lib, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    rc, err = _cli(["library", "push", str(lib.path), "me/lib"], capsys)
    assert rc == 2 and "HF_HUB_OFFLINE" in err


def test_library_copy_is_atomic(lib, tmp_path, monkeypatch):
    copy = lib.save_pretrained(tmp_path / "copy")
    assert AdapterLibrary.from_pretrained(copy).meta["clusters"] == lib.meta["clusters"]
    with pytest.raises(LibraryExistsError, match="already exists"):
        lib.save_pretrained(copy)

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(shutil, "copytree", broken)
    with pytest.raises(OSError, match="disk full"):
        lib.save_pretrained(tmp_path / "copy2")
    with pytest.raises(OSError, match="disk full"):
        lib.save_pretrained(copy, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]  # no temp folder, the old copy intact
    AdapterLibrary.from_pretrained(copy)


BAD_DATA = {
    "not utf-8.jsonl": (b'{"prompt": "\xff\xfe", "completion": "a"}\n', "not UTF-8 text"),
    "broken.jsonl": (b'{"prompt": "a", "completion": "b"}\n{oops\n', "line 2"),
    "rows.jsonl": (b"[1, 2]\n", "Example 0 is a list"),
    "empty-completion.csv": (b"prompt,completion\nhello,\nhi,there\n", "Example 0 `completion` is empty"),
    "blank-text.jsonl": (b'{"text": "  "}\n', "Example 0 `text` is empty"),
    "empty.jsonl": (b"\n", "The dataset is empty"),
    "scalar.json": (b"3", "must hold a list of examples"),
}


@pytest.mark.parametrize("name", list(BAD_DATA))
def test_bad_training_data_writes_nothing(tiny, tmp_path, capsys, monkeypatch, name):
    _, model, _ = tiny
    content, message = BAD_DATA[name]
    (tmp_path / name).write_bytes(content)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc, err = _cli(["library", "train", "--base-model", str(model), "--dataset", str(tmp_path / name),
                    "--output-dir", str(tmp_path / "out"), "--num-clusters", "2"], capsys)
    assert rc == 2 and message in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("override, message", [
    ("num_clusters=abc", "`num_clusters`: 'abc'"),
    ("lora_r=[1]", "`lora_r`: [1]"),
    ("learning_rate=fast", "`learning_rate`"),
    ("overwrite=maybe", "`overwrite`: 'maybe'"),
    ("overwrite='no'", "`overwrite`: 'no'"),
    ("target_modules=5", "`target_modules`"),
    ("target_modules=[]", "at least one module"),
    ("num_clusterz=4", "Unknown config field"),
    ("num_clusters", "expected KEY=VALUE"),
    ("num_clusters=[1", "not valid YAML"),
])
def test_mistyped_config_values(tiny, tmp_path, capsys, override, message):
    _, model, data = tiny
    rc, err = _cli(["library", "train", "--base-model", str(model), "--dataset", str(data),
                    "--output-dir", str(tmp_path / "out"), "--set", override], capsys)
    assert rc == 2 and message in err and not (tmp_path / "out").exists()


def test_missing_base_model_writes_nothing(tiny, tmp_path, capsys, monkeypatch):
    _, _, data = tiny
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for base in (str(tmp_path / "no-model"), "./no-model", "no/such/model"):
        rc, err = _cli(["library", "train", "--base-model", base, "--dataset", str(data),
                        "--output-dir", str(tmp_path / "out")], capsys)
        assert rc == 2 and "no such model folder" in err and not (tmp_path / "out").exists()
    # a single-name Hub id (as "gpt2") is an id, not a missing folder: offline, transformers' own error is reported
    rc, err = _cli(["library", "train", "--base-model", "no-such-model-xyz", "--dataset", str(data),
                    "--output-dir", str(tmp_path / "out")], capsys)
    assert rc == 2 and "Cannot load the base model 'no-such-model-xyz'" in err and not (tmp_path / "out").exists()


def test_bad_yaml_in_a_config_flag(tiny, tmp_path, capsys):
    _, model, data = tiny
    rc, err = _cli(["library", "train", "--base-model", str(model), "--dataset", str(data),
                    "--output-dir", str(tmp_path / "out"), "--num-clusters", "[1"], capsys)
    assert rc == 2 and "argument --num-clusters: '[1' is not valid YAML" in err and not (tmp_path / "out").exists()


def test_unusable_output_dir(tiny, tmp_path, capsys, monkeypatch):
    _, model, data = tiny
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["library", "train", "--base-model", str(model), "--dataset", str(data), "--num-clusters", "2"]
    (tmp_path / "file").write_text("mine")
    rc, err = _cli(argv + ["--output-dir", str(tmp_path / "file")], capsys)
    assert rc == 2 and "is a file" in err and (tmp_path / "file").read_text() == "mine"
    rc, err = _cli(argv + ["--output-dir", str(tmp_path / "file"), "--overwrite"], capsys)
    assert rc == 2 and "is a file" in err and (tmp_path / "file").read_text() == "mine"
    # overwrite deletes a library, never a folder of other files
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("mine")
    rc, err = _cli(argv + ["--output-dir", str(tmp_path / "home"), "--overwrite"], capsys)
    assert rc == 2 and "no adapter library" in err and (tmp_path / "home" / "notes.txt").read_text() == "mine"
    # a folder whose library.json is garbage is not resumed into
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "library.json").write_text("[]")
    rc, err = _cli(argv + ["--output-dir", str(tmp_path / "broken")], capsys)
    assert rc == 2 and "overwrite: true" in err
