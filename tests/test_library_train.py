"""Library trainer end to end on a tiny random Llama (one process): layout, resume, kill-and-resume, refusing to
mix runs, round trips (local and through a Hub cache offline), push at the HfApi boundary, CLI."""

import hashlib
import json
import shutil

import pytest
import torch
from _hub import fake_hf_api
from _library import make_rows, make_tiny_model, offline, run_cli, tiny_config, write_jsonl
from safetensors.torch import load_file

from peft_cp_merge.library import (
    AdapterLibrary,
    ClusteringError,
    LibraryDataError,
    LibraryExistsError,
    LibraryFormatError,
    train_library,
)
from peft_cp_merge.library.library import adapter_checksum

pytestmark = pytest.mark.usefixtures("hub_offline")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lib")
    model = make_tiny_model(tmp / "model")
    data = write_jsonl(tmp / "data.jsonl", make_rows())
    return tmp, model, data


@pytest.fixture(scope="module")
def ref(tiny):
    """The reference library: one uninterrupted single-process run."""
    tmp, model, data = tiny
    with offline(threads=1):
        return train_library(tiny_config(tmp, model, data, tmp / "ref"))


def _weights(path):
    return {c.name: load_file(str(c / "adapter_model.safetensors")) for c in sorted(path.glob("cluster_*"))}


def _assert_same_weights(a, b, atol=1e-6):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert wa[name].keys() == wb[name].keys()
        for k in wa[name]:
            torch.testing.assert_close(wa[name][k], wb[name][k], atol=atol, rtol=0, msg=f"{name} {k}")


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_layout_and_metadata(ref):
    p = ref.path
    names = {f.name for f in p.iterdir()}
    assert {"library.json", "centroids.safetensors", "clusters.png", "README.md", "cluster_0", "cluster_1",
            "cluster_2"} <= names
    assert not [n for n in names if n.startswith(".")]  # no temporary leftovers
    meta = json.loads((p / "library.json").read_text())
    assert meta["format_version"] == 1 and meta["status"] == "complete" and meta["num_examples"] == 36
    assert meta["embedding_model"] == "sentence-transformers/all-MiniLM-L6-v2" and meta["embedding_dim"] == 384
    assert meta["training"]["lora_r"] == 2 and "torch" in meta["versions"] and "peft" in meta["versions"]
    # MiniLM separates the three generated tasks: each cluster is one task
    for c in meta["clusters"]:
        assert c["size"] == 12 and c["status"] == "done" and c["steps"] == 3 and len(c["previews"]) == 3
        assert c["sha256"] == adapter_checksum(p / c["name"])
        starts = {prev.split()[0] for prev in c["previews"]}
        assert len(starts) == 1, c["previews"]
    assert (p / "clusters.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (p / "README.md").read_text()
    assert "library_name: peft" in card and "| cluster_2 | 12 | 33.3% | done |" in card
    t = load_file(str(p / "centroids.safetensors"))
    assert t["centroids"].shape == (3, 384) and t["assignments"].tolist().count(0) == 12
    cfg = json.loads((p / "cluster_0" / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
    assert not list(p.glob("cluster_*/*.bin"))


def test_rerun_resumes_without_retraining(ref, tiny, caplog):
    tmp, model, data = tiny
    before = {f: (f.stat().st_mtime_ns, _sha(f)) for f in ref.path.glob("cluster_*/adapter_model.safetensors")}
    with caplog.at_level("INFO"):
        lib = train_library(tiny_config(tmp, model, data, ref.path, parallel_mode="clusters"))
    assert "already trained (checksums verified)" in caplog.text
    assert {f: (f.stat().st_mtime_ns, _sha(f)) for f in before} == before
    assert lib.num_clusters == 3


def test_refuses_to_mix_runs(ref, tiny, tmp_path):
    tmp, model, data = tiny
    with pytest.raises(LibraryExistsError, match=r"different config \(fields that differ: \['lora_r'\]\)"):
        train_library(tiny_config(tmp, model, data, ref.path, lora_r=4))
    other = write_jsonl(tmp_path / "other.jsonl", make_rows(n=11))
    with pytest.raises(LibraryExistsError, match="different data"):
        train_library(tiny_config(tmp, model, other, ref.path))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(LibraryExistsError, match="not an adapter library"):
        train_library(tiny_config(tmp, model, data, tmp_path / "junk"))
    assert (tmp_path / "junk" / "notes.txt").read_text() == "mine"  # untouched


def test_kill_mid_cluster_then_resume(ref, tiny, tmp_path):
    tmp, model, data = tiny
    out = tmp_path / "killed"
    cfg = tiny_config(tmp, model, data, out)
    (tmp_path / "c.yaml").write_text(cfg.to_yaml())
    r = run_cli(["train", "--config", str(tmp_path / "c.yaml")], fail="cluster=1,step=2,mode=exit")
    assert r.returncode == 17, r.stderr[-3000:]
    meta = json.loads((out / "library.json").read_text())
    assert meta["status"] == "training" and [c["status"] for c in meta["clusters"]] == ["done", "pending", "pending"]
    assert (out / "cluster_0").is_dir() and not (out / "cluster_1").exists()
    f0 = out / "cluster_0" / "adapter_model.safetensors"
    saved = (f0.stat().st_mtime_ns, _sha(f0))
    assert meta["clusters"][0]["sha256"] == adapter_checksum(out / "cluster_0")

    with offline(threads=1):
        lib = train_library(cfg)
    assert (f0.stat().st_mtime_ns, _sha(f0)) == saved  # the finished cluster was not retrained
    assert lib.meta["status"] == "complete"
    _assert_same_weights(out, ref.path)  # resumed == uninterrupted

    # a corrupted finished cluster fails its checksum and is retrained, never silently reused
    f2 = out / "cluster_2" / "adapter_model.safetensors"
    good = f2.read_bytes()
    f2.write_bytes(good[:-8] + b"\0" * 8)
    with pytest.raises(LibraryFormatError, match="sha256"):
        AdapterLibrary.from_pretrained(out)
    torch.set_num_threads(1)  # as when `good` was trained: CPU kernels are bit-reproducible per thread count only
    try:
        train_library(cfg)
    finally:
        torch.set_num_threads(2)
    assert f2.read_bytes() == good


def test_bad_inputs_end_to_end(tiny, tmp_path):
    tmp, model, data = tiny
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(LibraryDataError, match="empty"):
        train_library(tiny_config(tmp, model, empty, tmp_path / "o1"))
    fields = write_jsonl(tmp_path / "q.jsonl", [{"question": "a", "answer": "b"}] * 3)
    with pytest.raises(LibraryDataError, match="prompt_field"):
        train_library(tiny_config(tmp, model, fields, tmp_path / "o2"))
    few = write_jsonl(tmp_path / "few.jsonl", make_rows(n=1))
    with pytest.raises(ClusteringError, match="num_clusters=5 but there are only 3 examples"):
        train_library(tiny_config(tmp, model, few, tmp_path / "o3", num_clusters=5))


def test_round_trip_local_and_load_into(ref, tiny, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, model_path, _ = tiny
    copy = ref.save_pretrained(tmp_path / "copy")
    lib = AdapterLibrary.from_pretrained(copy)
    assert lib.meta["clusters"] == ref.meta["clusters"] and torch.equal(lib.centroids, ref.centroids)
    with pytest.raises(LibraryExistsError):
        ref.save_pretrained(copy)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    pm = lib.load_into(AutoModelForCausalLM.from_pretrained(model_path))
    assert set(pm.peft_config) == {"cluster_0", "cluster_1", "cluster_2"}
    for c in range(3):
        pm.set_adapter(f"cluster_{c}")
        ref_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_path),
                                              str(ref.path / f"cluster_{c}"))
        torch.testing.assert_close(pm(ids).logits, ref_model(ids).logits)
    with pytest.raises(LibraryFormatError, match="not an adapter library"):
        AdapterLibrary.from_pretrained(tmp_path)


def _hub_cache(lib_path, cache, repo="someone/tc-lora-lib", commit="a" * 40):
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    snap = repo_dir / "snapshots" / commit
    shutil.copytree(lib_path, snap)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return repo


_HUB_SCRIPT = """
import json, sys
import huggingface_hub
from transformers import AutoModelForCausalLM
from peft_cp_merge.library import AdapterLibrary, LibraryFormatError

calls = []
real = huggingface_hub.snapshot_download
def spy(*a, **kw):
    calls.append(kw.get("allow_patterns"))
    return real(*a, **kw)
huggingface_hub.snapshot_download = spy
repo, model = sys.argv[1], sys.argv[2]
full = AdapterLibrary.from_pretrained(repo)
one = AdapterLibrary.from_pretrained(repo, clusters=1)
pm = one.load_into(AutoModelForCausalLM.from_pretrained(model))
try:
    AdapterLibrary.from_pretrained("someone/not-cached")
    missing = None
except LibraryFormatError as e:
    missing = str(e)
print(json.dumps({"full": [str(full.path), full.available], "one": [str(one.path), one.available],
                  "adapters": sorted(pm.peft_config), "calls": calls, "missing": missing}))
"""


def test_from_hub_cache_offline_one_cluster(ref, tiny, tmp_path):
    """HF_HUB_OFFLINE=1 and HF_HUB_CACHE set before huggingface_hub is imported (it reads them once), so this
    runs in a fresh interpreter, through the real snapshot_download."""
    import subprocess
    import sys

    from _library import REPO, env

    repo = _hub_cache(ref.path, tmp_path / "hub")
    r = subprocess.run([sys.executable, "-c", _HUB_SCRIPT, repo, str(tiny[1])], cwd=REPO, capture_output=True,
                       text=True, timeout=900, env=env(HF_HUB_CACHE=str(tmp_path / "hub")))
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    snap = str(tmp_path / "hub" / "models--someone--tc-lora-lib" / "snapshots" / ("a" * 40))
    assert out["full"] == [snap, [0, 1, 2]] and out["one"] == [snap, [1]]
    assert out["calls"][1] == ["library.json", "centroids.safetensors", "clusters.png", "README.md", "cluster_1/*"]
    assert out["calls"][0][-1] == "cluster_*/*"
    assert out["adapters"] == ["cluster_1"]
    assert "offline" in out["missing"] and "someone/not-cached" in out["missing"]


def test_push_is_one_commit_at_the_hfapi_boundary(ref, monkeypatch):
    calls = fake_hf_api(monkeypatch)
    assert ref.push_to_hub("me/lib", private=True, commit_message="v1") == "https://hub/commit/1"
    assert [c[0] for c in calls] == ["init", "create_repo", "upload_folder"]
    assert calls[1][1:] == ("me/lib", {"private": True, "exist_ok": True, "repo_type": "model"})
    up = calls[2][1]
    assert up["folder_path"] == str(ref.path) and up["repo_id"] == "me/lib" and up["commit_message"] == "v1"
    assert ".*" in up["ignore_patterns"]
    with pytest.raises(Exception, match="only some clusters"):
        AdapterLibrary.from_pretrained(ref.path, clusters=[0]).push_to_hub("me/lib")


def test_cli_info(ref, capsys):
    from peft_cp_merge.cli import main

    assert main(["library", "info", str(ref.path)]) == 0
    out = capsys.readouterr().out
    assert "clusters:        3" in out and "| cluster_1 | 12 |" in out
    assert main(["library", "info", "/nonexistent/lib"]) == 2


def test_merge_through_the_file_engine(ref, tmp_path):

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = ref.merge(method="cp", rank=4)
    merged.save_pretrained(str(tmp_path / "merged"))
    cfg = json.loads((tmp_path / "merged" / "adapter_config.json").read_text())
    assert cfg["r"] == 4
    base = AutoModelForCausalLM.from_pretrained(ref.meta["training"]["base_model"])
    pm = PeftModel.from_pretrained(base, str(tmp_path / "merged"))
    assert pm(torch.tensor([[1, 2, 3]])).logits.isfinite().all()
    with pytest.raises(ValueError, match="one weight per cluster"):
        ref.merge(weights=[1.0, 2.0])
