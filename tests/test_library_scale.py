"""The trainer at library scale (tiny Llama): many clusters trained, killed mid-way and resumed, then `library info`
and `merge`; the per-cluster bookkeeping stays linear in k (checksums, library.json writes, one card) and the
per-cluster garbage collection scans only that cluster's objects (the base model is frozen out of it). k = 12 in the
default suite, k = 64 with --runslow. Wall times are measured by hand (see the README), not asserted here."""

import gc
import json

import pytest
import torch
from _library import make_rows, make_tiny_model, offline, run_cli, tiny_config, write_jsonl

from peft_cp_merge import merge_adapters
from peft_cp_merge.demo.tasks import TASKS
from peft_cp_merge.library import AdapterLibrary, train_library
from peft_cp_merge.library import library as library_mod
from peft_cp_merge.library import store as store_mod
from peft_cp_merge.library import train as train_mod

pytestmark = pytest.mark.usefixtures("hub_offline")


def _counting(monkeypatch, module, name, calls, key=None):
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        if key is None or key(*args):
            calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


def _kill_resume_info_merge(tmp_path, monkeypatch, capsys, k, kill_at):
    model = make_tiny_model(tmp_path / "model")
    per_task = -(-2 * k // len(TASKS))  # about two examples per cluster
    data = write_jsonl(tmp_path / "data.jsonl", make_rows(tuple(TASKS), n=per_task))
    out = tmp_path / "lib"
    cfg = tiny_config(tmp_path, model, data, out, num_clusters=k, max_steps=1, batch_size=2, warmup_steps=0,
                      kmeans_n_init=1, log_every=100)
    (tmp_path / "c.yaml").write_text(cfg.to_yaml())
    r = run_cli(["train", "--config", str(tmp_path / "c.yaml")], fail=f"cluster={kill_at},step=1,mode=exit",
                timeout=900)
    assert r.returncode == 17, r.stderr[-3000:]
    meta = json.loads((out / "library.json").read_text())
    status = [c["status"] for c in meta["clusters"]]
    assert len(status) == k and status == ["done"] * kill_at + ["pending"] * (k - kill_at)
    finished = {c: (out / f"cluster_{c}" / "adapter_model.safetensors").stat().st_mtime_ns for c in range(kill_at)}

    # resume, counting the per-cluster bookkeeping and watching the collector during training
    calls: list[str] = []
    for module in (store_mod, train_mod, library_mod):
        _counting(monkeypatch, module, "adapter_checksum", calls)
    _counting(monkeypatch, train_mod, "render_card", calls)
    _counting(monkeypatch, train_mod, "atomic_write_json", calls, key=lambda path, *_: path.name == "library.json")
    frozen = []
    real_collect = gc.collect

    def collect(*args, **kwargs):
        frozen.append(gc.get_freeze_count())
        return real_collect(*args, **kwargs)

    monkeypatch.setattr(gc, "collect", collect)
    with offline(threads=1):
        lib = train_library(cfg)
    monkeypatch.setattr(gc, "collect", real_collect)
    pending = k - kill_at
    assert lib.meta["status"] == "complete" and lib.num_clusters == k
    assert all(c["status"] == "done" for c in lib.meta["clusters"])
    assert {c: (out / f"cluster_{c}" / "adapter_model.safetensors").stat().st_mtime_ns for c in finished} == finished
    # linear in k: each cluster's checksum taken once when it is verified on resume (finished ones) or saved (the
    # others), once at the end and once when opened; one library.json write per trained cluster (+ the final one);
    # the card once, not once per cluster
    assert calls.count("adapter_checksum") == 3 * k
    assert calls.count("atomic_write_json") == pending + 1
    assert calls.count("render_card") == 1
    # every cluster's collect ran with the model frozen out of it, and nothing stays frozen afterwards
    assert len(frozen) >= pending and min(frozen[-pending:]) > 10_000
    assert gc.get_freeze_count() == 0

    # info and merge on the resumed library
    from peft_cp_merge.cli import main

    assert main(["library", "info", str(out)]) == 0
    shown = capsys.readouterr().out
    assert f"clusters:        {k}" in shown and f"| cluster_{k - 1} |" in shown
    merged = AdapterLibrary.from_pretrained(out).merge(method="cp", weights="size", progress=False)
    sizes = lib.sizes
    ref = merge_adapters([str(out / f"cluster_{i}") for i in range(k)], weights=[s / sum(sizes) for s in sizes],
                         method="cp", progress=False)
    assert merged.tensors.keys() == ref.tensors.keys() and merged.recipe["rank"] == 2
    for key, v in ref.tensors.items():
        torch.testing.assert_close(merged.tensors[key], v)
    assert main(["library", "merge", str(out), "--out", str(tmp_path / "merged"), "--weights", "size"]) == 0
    assert (tmp_path / "merged" / "adapter_model.safetensors").is_file()


def test_twelve_clusters_killed_resumed_info_merge(tmp_path, monkeypatch, capsys):
    _kill_resume_info_merge(tmp_path, monkeypatch, capsys, k=12, kill_at=5)


@pytest.mark.slow
def test_sixty_four_clusters_killed_resumed_info_merge(tmp_path, monkeypatch, capsys):
    _kill_resume_info_merge(tmp_path, monkeypatch, capsys, k=64, kill_at=40)
