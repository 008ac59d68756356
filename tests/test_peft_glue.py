"""``add_weighted_adapter(combination_type="cp")`` through PEFT, against PEFT's own results and dense tensorly CP."""


import pytest
import tensorly as tl
import torch
from _models import TARGETS, assert_loads_with_plain_peft, delta_matrix, inputs, make_peft_model
from peft import LoraConfig
from peft.tuners.lora import LoraLayer, LoraModel
from tensorly.decomposition import parafac

import peft_cp_merge
from peft_cp_merge import MergeInputError, UnknownMergeOptionError, UnsupportedAdapterError

ADAPTERS = {
    "x": {"r": 2, "lora_alpha": 4},
    "y": {"r": 3, "lora_alpha": 3, "rank_pattern": {"lin0": 4}, "alpha_pattern": {"conv2": 8}},
    "z": {"r": 2, "lora_alpha": 2, "use_rslora": True},
}


def _layers(model):
    return {k: m for k, m in model.base_model.model.named_modules() if isinstance(m, LoraLayer)}


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture
def model():
    return make_peft_model(ADAPTERS)


def test_layer_types_covered(model):
    kinds = {type(m).__name__ for m in _layers(model).values()}
    assert {"Embedding", "Linear", "Conv1d", "Conv2d", "Conv3d"} <= kinds
    assert _layers(model)["c1d"].fan_in_fan_out


def test_equals_dense_tensorly_cp_on_every_layer(model):
    names, w, R = list(ADAPTERS), [0.5, 0.3, 0.2], 3
    model.add_weighted_adapter(names, w, "m", combination_type="cp", cp_rank=R)
    cfg = model.peft_config["m"]
    assert (cfg.r, cfg.lora_alpha, cfg.use_rslora, cfg.rank_pattern, cfg.alpha_pattern) == (R, R, False, {}, {})
    assert set(cfg.target_modules) == set(TARGETS)
    for key, layer in _layers(model).items():
        assert layer.scaling["m"] == 1.0
        X = torch.stack([delta_matrix(layer, n) for n in names])
        with tl.backend_context("pytorch"):
            res = parafac(X, R, init="svd", n_iter_max=100, tol=1e-8, random_state=0)
        ref = torch.einsum("r,tr,or,ir,t->oi", res.weights, *res.factors, torch.tensor(w, dtype=X.dtype))
        assert _rel(delta_matrix(layer, "m"), ref) < 1e-10, key  # the same iterates: float64 round-off only


@pytest.mark.parametrize("init", ["svd", "tasks"])
def test_full_rank_equals_peft_cat(init):
    adapters = {k: v for k, v in ADAPTERS.items() if k != "z"}  # PEFT's cat mis-scales rslora (peft #3449)
    model = make_peft_model(adapters)
    names, w = list(adapters), [0.7, -0.4]
    model.add_weighted_adapter(names, w, "cat", combination_type="cat")
    model.add_weighted_adapter(
        names, w, "cp", combination_type="cp", cp_rank=6, cp_init=init, cp_n_iter_max=3000, cp_tol=0.0
    )
    for key, layer in _layers(model).items():
        assert _rel(delta_matrix(layer, "cp"), delta_matrix(layer, "cat")) < 1e-4, key


def test_full_rank_equals_weighted_sum_with_rslora(model):
    """At the sum of the ranks (8, in lin0: the largest cp_rank allowed) cp is exact."""
    names, w = list(ADAPTERS), [0.2, 0.5, 0.3]
    model.add_weighted_adapter(names, w, "cp", combination_type="cp", cp_rank=8, cp_init="tasks")
    for key, layer in _layers(model).items():
        ref = sum(wt * delta_matrix(layer, n) for n, wt in zip(names, w))
        assert _rel(delta_matrix(layer, "cp"), ref) < 1e-4, key


def test_opposite_weights_give_zero_and_order_is_irrelevant(model):
    model.add_weighted_adapter(["x", "x"], [1.0, -1.0], "zero", combination_type="cp")
    model.add_weighted_adapter(["x", "y", "z"], [0.5, 0.3, 0.2], "abc", combination_type="cp", cp_rank=4)
    model.add_weighted_adapter(["z", "x", "y"], [0.2, 0.5, 0.3], "cab", combination_type="cp", cp_rank=4)
    for key, layer in _layers(model).items():
        scale = float(delta_matrix(layer, "x").norm())
        assert float(delta_matrix(layer, "zero").norm()) < 1e-8 * scale, key
        assert _rel(delta_matrix(layer, "cab"), delta_matrix(layer, "abc")) < 1e-6, key


def test_adapter_absent_from_module_contributes_nothing():
    model = make_peft_model({"all": {"r": 2}, "some": {"r": 2, "target_modules": ["lin0", "conv2"]}})
    model.add_weighted_adapter(["all", "some"], [0.6, 0.4], "m", combination_type="cp", cp_rank=4, cp_init="tasks")
    for key, layer in _layers(model).items():
        ref = 0.6 * delta_matrix(layer, "all")
        if key in ("lin0", "conv2"):
            ref = ref + 0.4 * delta_matrix(layer, "some")
        assert _rel(delta_matrix(layer, "m"), ref) < 1e-4, key


def test_bf16_adapters_keep_dtype():
    model = make_peft_model({"x": {"r": 2}, "y": {"r": 2}}, dtype=torch.bfloat16)
    model.add_weighted_adapter(["x", "y"], [0.5, 0.5], "m", combination_type="cp")
    layer = _layers(model)["lin0"]
    assert layer.lora_A["m"].weight.dtype == torch.bfloat16
    assert torch.isfinite(delta_matrix(layer, "m").float()).all()


def test_works_through_peft_model_and_changes_outputs(model):
    x = inputs()
    model.set_adapter("x")
    before = model(x)
    model.add_weighted_adapter(["x", "y"], [1.0, 0.0], "only_a", combination_type="cp", cp_rank=6, cp_init="tasks")
    model.set_adapter("only_a")
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-7)


def _peft_builtin_results():
    # PEFT's svd path cannot handle Conv1d/Conv3d (peft #3769), so the built-ins are compared on the others.
    targets = ["emb", "lin0", "conv2", "c1d"]
    model = make_peft_model({"x": {"r": 2, "target_modules": targets}, "y": {"r": 2, "target_modules": targets}})
    out = {}
    for ct, kw in [("svd", {"svd_rank": 3}), ("linear", {}), ("cat", {}), ("ties", {"density": 0.5})]:
        model.add_weighted_adapter(["x", "y"], [0.6, 0.4], ct, combination_type=ct, **kw)
        out[ct] = {k: delta_matrix(m, ct) for k, m in _layers(model).items()}
    model.add_weighted_adapter(["x", "y"], [0.6, 0.4], "x", combination_type="svd")  # PEFT: silent no-op
    return out


def test_peft_builtin_types_unchanged_by_plugin():
    original = peft_cp_merge.integrations.peft.LoraModel.add_weighted_adapter._peft_cp_merge_original
    peft_cp_merge.unregister()
    try:
        assert LoraModel.add_weighted_adapter is original
        without = _peft_builtin_results()
    finally:
        peft_cp_merge.register()
        peft_cp_merge.register()  # idempotent
    assert LoraModel.add_weighted_adapter._peft_cp_merge_original is original
    with_plugin = _peft_builtin_results()
    for ct in without:
        for key in without[ct]:
            assert torch.equal(without[ct][key], with_plugin[ct][key]), (ct, key)


def test_unregister_removes_cp():
    model = make_peft_model({"x": {"r": 2}, "y": {"r": 2}})
    peft_cp_merge.unregister()
    try:
        with pytest.raises(ValueError, match="Invalid combination_type: cp"):
            model.add_weighted_adapter(["x", "y"], [0.5, 0.5], "m", combination_type="cp")
    finally:
        peft_cp_merge.register()


def test_saved_adapter_loads_with_plain_peft(tmp_path, model):
    model.add_weighted_adapter(list(ADAPTERS), [0.4, 0.4, 0.2], "merged", combination_type="cp", cp_rank=4)
    model.set_adapter("merged")
    x = inputs(seed=3)
    expected = model(x).detach()
    model.save_pretrained(tmp_path, selected_adapters=["merged"])
    assert_loads_with_plain_peft(tmp_path / "merged", x, expected, 4, tmp_path)


# --- errors: message names the fix, model left exactly as before ---------------------------------------------


def _snapshot(model):
    return (
        {k: c.to_dict() for k, c in model.peft_config.items()},
        {k: v.clone() for k, v in model.state_dict().items()},
        [(k, type(m).__name__) for k, m in model.named_modules()],
    )


def _assert_unchanged(model, snap):
    cfg, state, mods = _snapshot(model)
    assert cfg == snap[0]
    assert state.keys() == snap[1].keys()
    assert all(torch.equal(state[k], snap[1][k]) for k in state)
    assert mods == snap[2]


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((["x", "nope"], [0.5, 0.5], "m"), {}, MergeInputError, r"Adapter 'nope' does not exist.*load_adapter"),
        ((["x", "y"], [0.5, 0.5], "z"), {}, MergeInputError, r"'z' already exists.*delete_adapter"),
        ((["x", "y"], [1.0], "m"), {}, MergeInputError, "Got 1 weights for 2 adapters"),
        ((["x", "y"], [0.5, float("nan")], "m"), {}, MergeInputError, "Weights must be finite"),
        ((["x", "y"], [0.5, 0.5], "m"), {"cp_rank": 0}, MergeInputError, "`cp_rank` must be a positive integer"),
        ((["x", "y"], [0.5, 0.5], "m"), {"cp_rank": 2.5}, MergeInputError, "`cp_rank` must be a positive integer"),
        ((["x", "y"], [0.5, 0.5], "m"), {"cp_variant": "x"}, MergeInputError, "cp_variant='x' is not supported"),
        ((["x", "y"], [0.5, 0.5], "m"), {"cp_iters": 5}, UnknownMergeOptionError, r"Unknown option.*cp_n_iter_max"),
        ((["x", "y"], [0.5, 0.5], "m"), {"svd_rank": 4}, UnknownMergeOptionError, r"Unknown option.*svd_rank"),
        ((["x", "y"], [0.5, 0.5], "m"), {"svd_clamp": 0.9}, UnknownMergeOptionError, "belongs to PEFT's own SVD"),
        ((["x", "y"], [0.5, 0.5], "m", "cp", 4), {}, TypeError, "keyword arguments only"),
        (("x", [0.5], "m"), {}, MergeInputError, "non-empty list of adapter names"),
    ],
)
def test_bad_arguments_leave_model_unchanged(model, args, kwargs, error, match):
    snap = _snapshot(model)
    if len(args) == 3:
        kwargs = {"combination_type": "cp", **kwargs}
    with pytest.raises(error, match=match):
        model.add_weighted_adapter(*args, **kwargs)
    _assert_unchanged(model, snap)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"r": 2, "use_dora": True, "target_modules": ["lin0"]}, r"uses DoRA.*merge_and_unload"),
        ({"r": 2, "lora_bias": True, "target_modules": ["lin0"]}, r"lora_bias=True.*lora_bias=False"),
    ],
)
def test_unsupported_adapter_kinds(bad, match):
    model = make_peft_model({"x": {"r": 2, "target_modules": ["lin0"]}, "bad": bad})
    snap = _snapshot(model)
    with pytest.raises(UnsupportedAdapterError, match=match):
        model.add_weighted_adapter(["x", "bad"], [0.5, 0.5], "m", combination_type="cp")
    _assert_unchanged(model, snap)


def test_target_parameters_adapter_is_refused():
    model = make_peft_model({"x": {"r": 2, "target_modules": ["lin0"]}})
    model.add_adapter("p", LoraConfig(r=2, target_modules=[], target_parameters=["c1d.weight"]))
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="target_parameters|nn.Parameter"):
        model.add_weighted_adapter(["x", "p"], [0.5, 0.5], "m", combination_type="cp")
    _assert_unchanged(model, snap)


def test_non_finite_and_incompatible_factors(model):
    layer = _layers(model)["conv2"]
    with torch.no_grad():
        layer.lora_B["y"].weight[0, 0] = float("inf")
    snap = _snapshot(model)
    with pytest.raises(MergeInputError, match=r"Adapter 1 in module 'conv2' has non-finite"):
        model.add_weighted_adapter(["x", "y"], [0.5, 0.5], "m", combination_type="cp")
    _assert_unchanged(model, snap)

    model = make_peft_model(ADAPTERS)
    layer = _layers(model)["lin0"]
    layer.lora_B["y"].weight = torch.nn.Parameter(torch.randn(20, 5, dtype=torch.float64))  # r=4 A, 5-col B
    snap = _snapshot(model)
    with pytest.raises(MergeInputError, match=r"in module 'lin0' has inconsistent LoRA factors"):
        model.add_weighted_adapter(["x", "y"], [0.5, 0.5], "m", combination_type="cp")
    _assert_unchanged(model, snap)


def test_failure_during_injection_is_rolled_back(model, monkeypatch):
    snap = _snapshot(model)

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(peft_cp_merge.integrations.peft, "_freeze_adapter", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        model.add_weighted_adapter(["x", "y"], [0.5, 0.5], "m", combination_type="cp")
    _assert_unchanged(model, snap)
