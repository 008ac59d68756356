"""Two real ranks (gloo) under ``ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2``: both
parallel modes give the single-process library, both ranks do work, and a failing rank stops the run."""

import json
import time

import pytest
import torch
from _library import make_rows, make_tiny_model, offline, run_cli, tiny_config, write_jsonl
from safetensors.torch import load_file

from peft_cp_merge.library import train_library

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    model = make_tiny_model(tmp / "model")
    data = write_jsonl(tmp / "data.jsonl", make_rows())
    with offline(threads=1):  # the launched ranks run with OMP_NUM_THREADS=1: same float summation order
        ref = train_library(tiny_config(tmp, model, data, tmp / "single", gradient_accumulation_steps=2))
    return tmp, model, data, ref


def _launch(setup, name, **kw):
    tmp, model, data, _ = setup
    fail = kw.pop("fail", None)
    cfg = tiny_config(tmp, model, data, tmp / name, gradient_accumulation_steps=2, **kw)
    (tmp / f"{name}.yaml").write_text(cfg.to_yaml())
    t0 = time.perf_counter()
    r = run_cli(["train", "--config", str(tmp / f"{name}.yaml")], ranks=2, timeout=600, fail=fail)
    return r, tmp / name, time.perf_counter() - t0


def _compare(a, b, atol):
    for c in range(3):
        wa = load_file(str(a / f"cluster_{c}" / "adapter_model.safetensors"))
        wb = load_file(str(b / f"cluster_{c}" / "adapter_model.safetensors"))
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=0, msg=f"cluster {c} {k}")
        assert (wa[k] != 0).any()


def test_data_mode_two_ranks_equals_single_process(setup):
    r, out, _ = _launch(setup, "data2", parallel_mode="data")
    assert r.returncode == 0, r.stderr[-4000:]
    for rank in (0, 1):
        for c in range(3):
            assert f"rank {rank}/2 cluster {c} step 3/3" in r.stderr
    assert "rank 0 embedded 18 of 36 texts" in r.stderr and "rank 1 embedded 18 of 36 texts" in r.stderr
    meta = json.loads((out / "library.json").read_text())
    assert meta["num_processes"] == 2 and meta["status"] == "complete"
    for c in meta["clusters"]:
        # 3 steps x 2 micro-batches x global batch 4, split in halves: 12 examples per rank
        assert c["trained_by_ranks"] == [0, 1] and c["examples_per_rank"] == {"0": 12, "1": 12}
    ref = setup[3]
    assert [c["size"] for c in meta["clusters"]] == ref.sizes
    _compare(out, ref.path, atol=1e-5)  # gradients all-reduced: equal up to float summation order


def test_clusters_mode_two_ranks_equals_single_process(setup):
    r, out, _ = _launch(setup, "clusters2", parallel_mode="clusters")
    assert r.returncode == 0, r.stderr[-4000:]
    assert "rank 0/2: training clusters [0, 2] (clusters mode)" in r.stderr
    assert "rank 1/2: training clusters [1] (clusters mode)" in r.stderr
    meta = json.loads((out / "library.json").read_text())
    assert [c["trained_by_ranks"] for c in meta["clusters"]] == [[0], [1], [0]]
    assert [c["examples_per_rank"] for c in meta["clusters"]] == [{"0": 24}, {"1": 24}, {"0": 24}]
    _compare(out, setup[3].path, atol=0)  # no communication: bit-identical to the single-process run


@pytest.mark.parametrize("mode", ["data", "clusters"])
def test_failing_rank_stops_the_others(setup, mode):
    r, out, seconds = _launch(setup, f"fail-{mode}", parallel_mode=mode, fail="cluster=1,step=1,rank=1,mode=raise")
    assert r.returncode != 0
    assert "injected failure on rank 1 at cluster 1 step 1" in r.stderr
    assert seconds < 120  # stopped, not hung until the collective timeout
    meta = json.loads((out / "library.json").read_text())
    assert meta["status"] == "training" and meta["clusters"][1]["status"] == "pending"
    assert not (out / "cluster_1").exists()
