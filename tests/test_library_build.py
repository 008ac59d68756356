"""AdapterLibrary.from_adapters / `library build`: clustering existing LoRAs by their parameters (planted groups,
silhouette, factorisation invariance, sketch cosines against dense updates), each cluster equal to merge_adapters of
its members, library.json members, info/merge/arrow_model on the result, route refused, refusals, the CLI."""

import json
import shutil

import numpy as np
import pytest
import torch
from _library import make_tiny_model
from safetensors.torch import load_file, save_file

from peft_cp_merge import merge_adapters
from peft_cp_merge._io import OutputRefusedError, SourceChangedError
from peft_cp_merge.errors import MergeInputError, UnknownMergeMethodError
from peft_cp_merge.library import AdapterLibrary, LibraryConfigError, LibraryError, LibraryExistsError
from peft_cp_merge.library.cluster import cluster_adapters, sketch_adapters
from peft_cp_merge.library.library import adapter_checksum

pytestmark = pytest.mark.usefixtures("hub_offline")


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A PEFT LoRA (r=2, q_proj/v_proj) of the tiny Llama: its config and tensor names/shapes."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    tmp = tmp_path_factory.mktemp("build")
    model = make_tiny_model(tmp / "model")
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(model),
                        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    pm.save_pretrained(str(tmp / "template"), save_embedding_layers=False)
    return tmp, model, tmp / "template"


def _write(template, folder, tensors, base=None):
    folder.mkdir(parents=True)
    cfg = json.loads((template / "adapter_config.json").read_text())
    if base is not None:
        cfg["base_model_name_or_path"] = base
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
    return folder


def _planted(template, root, k, per, noise=0.1, seed=0):
    """``per`` adapters per prototype: the prototype's update plus noise, each re-factorised with a random
    invertible G (B G, G^-1 A: same update, unrelated factors). Returns folders and planted labels."""
    g = torch.Generator().manual_seed(seed)
    keys = load_file(str(template / "adapter_model.safetensors"))
    protos = [{n: torch.randn(t.shape, generator=g) for n, t in keys.items()} for _ in range(k)]
    folders, labels = [], []
    for p in range(k):
        for c in range(per):
            t = {}
            for n, v in protos[p].items():
                if "lora_A" not in n:
                    continue
                b = n.replace("lora_A", "lora_B")
                A = v + noise * torch.randn(v.shape, generator=g)
                B = protos[p][b] + noise * torch.randn(protos[p][b].shape, generator=g)
                G = torch.eye(A.shape[0]) + 0.8 * torch.randn(A.shape[0], A.shape[0], generator=g)
                t[n], t[b] = torch.linalg.solve(G, A), B @ G
            folders.append(_write(template, root / f"p{p}_{c}", t))
            labels.append(p)
    return folders, labels


def _same_partition(a, b):
    return {frozenset(i for i, x in enumerate(a) if x == v) for v in set(a)} == \
        {frozenset(i for i, x in enumerate(b) if x == v) for v in set(b)}


def _sources(folders):
    from peft_cp_merge.files.sources import resolve_source

    return [resolve_source(str(f)) for f in folders]


def test_sketch_is_factorisation_invariant_and_tracks_dense_cosines(template, tmp_path):
    _, _, tpl = template
    folders, _ = _planted(tpl, tmp_path, 3, 3, noise=0.5)
    srcs = _sources(folders)
    rows = sketch_adapters(srcs, sketch_dim=16, progress=False)
    # the same update under another factorisation has the same sketch
    t = load_file(str(folders[0] / "adapter_model.safetensors"))
    G = torch.tensor([[2.0, 1.0], [0.5, -1.0]])
    t2 = {n: (torch.linalg.solve(G, v) if "lora_A" in n else v @ G) for n, v in t.items()}
    again = sketch_adapters(_sources([_write(tpl, tmp_path / "refac", t2)]), sketch_dim=16, progress=False)
    np.testing.assert_allclose(again[0], rows[0], rtol=1e-4, atol=1e-6)
    # sketch cosines estimate the cosines of the dense updates (sum over modules of <dW1, dW2>_F)
    dense = []
    for f in folders:
        w = load_file(str(f / "adapter_model.safetensors"))
        dense.append(torch.cat([(2.0 * w[n.replace("lora_A", "lora_B")] @ w[n]).flatten()
                                for n in sorted(w) if "lora_A" in n]).double())
    d = torch.stack(dense)
    d = d / d.norm(dim=1, keepdim=True)
    s = torch.from_numpy(rows).double()
    s = s / s.norm(dim=1, keepdim=True)
    assert (s @ s.T - d @ d.T).abs().max() < 0.12


def test_clustering_recovers_planted_groups_and_silhouette_picks_k(template, tmp_path):
    _, _, tpl = template
    for k in (2, 4):
        folders, labels = _planted(tpl, tmp_path / f"k{k}", k, 4, seed=k)
        clustering, emb = cluster_adapters(_sources(folders), num_clusters=None, k_range=(2, 8), progress=False)
        assert clustering.num_clusters == k, clustering.silhouette
        assert max(clustering.silhouette, key=clustering.silhouette.get) == k
        assert _same_partition(clustering.assignments.tolist(), labels)
        assert emb.shape[0] == len(folders) and np.allclose(np.linalg.norm(emb, axis=1), 1)
    given, _ = cluster_adapters(_sources(folders), num_clusters=4, progress=False)
    assert _same_partition(given.assignments.tolist(), labels) and given.silhouette == {}


def test_flattened_factors_would_not_recover_them(template, tmp_path):
    """Why the sketch: with re-factorised copies, k-means on the flattened factors themselves (mttl's raw
    embedding) does not find the planted groups, while the sketch does (previous test)."""
    from sklearn.cluster import KMeans

    _, _, tpl = template
    folders, labels = _planted(tpl, tmp_path, 4, 4, seed=4)
    flat = np.stack([np.concatenate([v.flatten().numpy() for _, v in sorted(load_file(
        str(f / "adapter_model.safetensors")).items())]) for f in folders])
    flat /= np.linalg.norm(flat, axis=1, keepdims=True)
    assert not _same_partition(KMeans(4, n_init=10, random_state=0).fit_predict(flat).tolist(), labels)


@pytest.fixture(scope="module")
def built(template, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("built")
    _, _, tpl = template
    folders, labels = _planted(tpl, tmp / "src", 3, 3, seed=7)
    lib = AdapterLibrary.from_adapters([str(f) for f in folders], out=tmp / "lib", progress=False)
    return lib, folders, labels


def test_from_adapters_library_lists_members_and_clusters_equal_their_merge(built):
    lib, folders, labels = built
    meta = json.loads((lib.path / "library.json").read_text())
    assert meta["kind"] == "built" and meta["format_version"] == 2 and meta["num_adapters"] == 9
    assert meta["embedding_model"] is None and not (lib.path / "centroids.safetensors").exists()
    assert meta["written_by"] == {"tool": "peft-cp-merge", "kind": "adapter-library"}  # overwrite may replace it
    assert lib.num_clusters == 3 and lib.sizes == [3, 3, 3] and lib.kind == "built"
    listed = [[m["source"] for m in c["members"]] for c in meta["clusters"]]
    assert sorted(x for c in listed for x in c) == sorted(str(f) for f in folders)
    assert _same_partition([next(i for i, c in enumerate(listed) if str(f) in c) for f in folders], labels)
    for c in meta["clusters"]:
        assert c["status"] == "done" and c["rank"] == 2 and c["sha256"] == adapter_checksum(lib.path / c["name"])
        ref = merge_adapters([m["source"] for m in c["members"]], method="cp", rank=2, progress=False)
        got = load_file(str(lib.path / c["name"] / "adapter_model.safetensors"))
        assert got.keys() == ref.tensors.keys()
        for key in got:
            torch.testing.assert_close(got[key], ref.tensors[key])
        cfg = json.loads((lib.path / c["name"] / "adapter_config.json").read_text())
        assert cfg["r"] == 2 and sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
    assert "| cluster_0 | 3 | 33.3% | done |" in (lib.path / "README.md").read_text()
    assert not [p for p in lib.path.parent.iterdir() if p.name.startswith(".tmp")]


def test_built_library_merges_routes_by_arrow_and_refuses_text_routing(built, template, tmp_path):
    from transformers import AutoModelForCausalLM

    lib, _, _ = built
    again = AdapterLibrary.from_pretrained(lib.path)
    assert again.meta["clusters"] == lib.meta["clusters"] and again.centroids is None
    merged = again.merge(method="cp", weights="size")
    ref = merge_adapters([str(lib.path / f"cluster_{i}") for i in range(3)], weights=[1 / 3] * 3, method="cp",
                         progress=False)
    for key, v in ref.tensors.items():
        torch.testing.assert_close(merged.tensors[key], v)
    with pytest.raises(LibraryError, match="no text centroids.*arrow_model"):
        again.route(["hello"])
    import peft
    from packaging.version import Version

    from peft_cp_merge.library.arrow import ARROW_MIN_PEFT

    if Version(peft.__version__) >= Version(ARROW_MIN_PEFT):
        arrow = again.arrow_model(AutoModelForCausalLM.from_pretrained(template[1]), top_k=2, rng_seed=0)
        assert arrow(torch.tensor([[1, 2, 3]])).logits.shape[-1] > 0 and arrow.arrow_clusters == [0, 1, 2]
    else:  # the oldest supported peft (.ci/compat.sh) predates Arrow
        with pytest.raises(LibraryError, match=r"Arrow routing needs peft >= 0\.18\.0"):
            again.arrow_model(AutoModelForCausalLM.from_pretrained(template[1]), top_k=2, rng_seed=0)
    copy = again.save_pretrained(tmp_path / "copy")
    assert AdapterLibrary.from_pretrained(copy).kind == "built"


def test_cli_build_and_info(template, tmp_path, capsys):
    from peft_cp_merge.cli import main

    _, _, tpl = template
    folders, labels = _planted(tpl, tmp_path / "src", 2, 3, seed=3)
    out = tmp_path / "lib"
    assert main(["library", "build", *map(str, folders), "--out", str(out), "--max-clusters", "4"]) == 0
    text = capsys.readouterr().out
    assert "6 adapters in 2 clusters" in text and "| cluster | adapters | share | status | members |" in text
    lib = AdapterLibrary.from_pretrained(out)
    assert _same_partition([next(i for i, c in enumerate(lib.meta["clusters"])
                                 if str(f) in [m["source"] for m in c["members"]]) for f in folders], labels)
    assert main(["library", "info", str(out)]) == 0
    assert "built from 6 existing adapters" in capsys.readouterr().out
    # an existing --out is refused, then replaced with --overwrite (now with 3 clusters)
    before = (out / "library.json").read_text()
    assert main(["library", "build", *map(str, folders), "--out", str(out), "--num-clusters", "3"]) != 0
    assert "already exists" in capsys.readouterr().err and (out / "library.json").read_text() == before
    assert main(["library", "build", *map(str, folders), "--out", str(out), "--num-clusters", "3",
                 "--overwrite"]) == 0
    assert AdapterLibrary.from_pretrained(out).num_clusters == 3


def test_refusals(template, tmp_path):
    _, _, tpl = template
    folders, _ = _planted(tpl, tmp_path / "src", 2, 2, seed=1)
    srcs = [str(f) for f in folders]
    out = tmp_path / "lib"
    with pytest.raises(OutputRefusedError, match="is inside the source"):
        AdapterLibrary.from_adapters(srcs, 2, out=folders[0] / "lib", progress=False)
    with pytest.raises(OutputRefusedError, match="not written by peft-cp-merge"):  # holds the sources
        AdapterLibrary.from_adapters(srcs, 2, out=tmp_path / "src", overwrite=True, progress=False)
    assert all((f / "adapter_model.safetensors").is_file() for f in folders)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(LibraryExistsError, match="already exists"):
        AdapterLibrary.from_adapters(srcs, 2, out=mine, progress=False)
    with pytest.raises(OutputRefusedError):  # overwrite replaces only a library this package wrote
        AdapterLibrary.from_adapters(srcs, 2, out=mine, overwrite=True, progress=False)
    assert (mine / "notes.txt").read_text() == "keep"
    with pytest.raises(LibraryConfigError, match="are the same adapter"):
        AdapterLibrary.from_adapters(srcs + [srcs[0] + "/"], 2, out=out, progress=False)
    other = tmp_path / "other"
    shutil.copytree(folders[0], other)
    cfg = json.loads((other / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "someone/another-model"
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(MergeInputError, match="different base models"):
        AdapterLibrary.from_adapters(srcs + [str(other)], 2, out=out, progress=False)
    with pytest.raises(UnknownMergeMethodError):
        AdapterLibrary.from_adapters(srcs, 2, out=out, method="nope", progress=False)
    with pytest.raises(LibraryConfigError, match="num_clusters='2'"):
        AdapterLibrary.from_adapters(srcs, "2", out=out, progress=False)
    with pytest.raises(LibraryError, match="num_clusters=5 for 4 adapters"):
        AdapterLibrary.from_adapters(srcs, 5, out=out, progress=False)
    with pytest.raises(LibraryConfigError, match="non-empty list"):
        AdapterLibrary.from_adapters(srcs[0], 2, out=out, progress=False)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_library_json_of_a_built_library_is_checked(built, tmp_path):
    from peft_cp_merge.library import LibraryFormatError

    lib, _, _ = built
    bad = tmp_path / "bad"
    shutil.copytree(lib.path, bad)
    meta = json.loads((bad / "library.json").read_text())
    del meta["clusters"][1]["members"]
    (bad / "library.json").write_text(json.dumps(meta))
    with pytest.raises(LibraryFormatError, match="members"):
        AdapterLibrary.from_pretrained(bad)
    meta["format_version"] = 3
    (bad / "library.json").write_text(json.dumps(meta))
    with pytest.raises(LibraryFormatError, match="format version 3.*reads up to 2"):
        AdapterLibrary.from_pretrained(bad)


def test_a_source_changed_after_clustering_is_refused(template, tmp_path, monkeypatch):
    """The adapters merged are the ones clustered: a source rewritten in between stops the build, nothing written."""
    import os

    from peft_cp_merge.library import build

    _, _, tpl = template
    folders, _ = _planted(tpl, tmp_path / "src", 2, 2, seed=5)
    real = build.plan_build

    def plan_then_touch(*args, **kwargs):
        plan = real(*args, **kwargs)
        f = folders[1] / "adapter_model.safetensors"
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
        return plan

    monkeypatch.setattr(build, "plan_build", plan_then_touch)
    with pytest.raises(SourceChangedError, match="changed while building the library"):
        AdapterLibrary.from_adapters([str(f) for f in folders], 2, out=tmp_path / "lib", progress=False)
    assert not (tmp_path / "lib").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
