"""Iso-C, Iso-CTS and core-space TIES in factored form, against dense references written from the papers' formulas;
core-space TSV / Iso-C against ``tsv`` / ``iso_c``; the PEFT and adapter-file front ends."""

import math

import pytest
import torch
from _models import delta_matrix, dense_core_space, dense_ties, make_peft_model
from _models import lora_layers as _layers
from _models import random_factors as _factors
from _models import rel_err as _rel

from peft_cp_merge import LoraFactors, MergeInputError, get_merge_method, merge_adapters
from peft_cp_merge.integrations.peft import get_lora_factors
from peft_cp_merge.methods.iso import iso_cts_budget

iso_c, iso_cts, core_ties, tsv = (get_merge_method(n) for n in ("iso_c", "iso_cts", "core_ties", "tsv"))


def _f32(fs):
    return [LoraFactors(f.A.float(), f.B.float(), f.scaling) for f in fs]


# ---------------------------------------------------------------- dense references, from the papers' formulas


def _nonzero(S, shape):
    return int((S > max(shape) * torch.finfo(S.dtype).eps * S[0]).sum())


def _polar(M):
    P, _, Qh = torch.linalg.svd(M, full_matrices=False)
    return P @ Qh


def _dense_iso_c(X, rank):
    """Iso-C: SVD of the weighted sum, its K non-zero singular values replaced by their mean, min(R, K) kept."""
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    K = _nonzero(S, X.shape)
    k = min(rank, K)
    return S[:K].mean() * U[:, :k] @ Vh[:k]


def _dense_iso_cts(Ys, k_c, n):
    """Iso-CTS on dense weighted updates Y_t with k_c common and n task-specific directions per task: top k_c of
    sum Y_t, top n of each Y_t - U_c U_c^T Y_t (numerically zero ones dropped), polar factors, mean spectrum."""
    X = sum(Ys)
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    kc = min(k_c, _nonzero(S, X.shape))
    Uc = U[:, :kc]
    us, ss, vs = [Uc], [S[:kc]], [Vh[:kc].T]
    for Y in Ys:
        u, s, vh = torch.linalg.svd(Y - Uc @ Uc.T @ Y, full_matrices=False)
        m = min(n, int((s > 1e-10 * torch.linalg.matrix_norm(Y, ord=2)).sum()))
        us.append(u[:, :m])
        ss.append(s[:m])
        vs.append(vh[:m].T)
    return torch.cat(ss).mean() * _polar(torch.cat(us, 1)) @ _polar(torch.cat(vs, 1)).T


def _dense_core_tsv(fs, w):
    """TSV applied to the dense cores (official core-space TSV: int(min(core shape) / T) triplets per task, the
    non-zero ones, polar factors of the concatenated core singular vectors, w_t S_t blocks), lifted."""
    U_B, V_A, cores = dense_core_space(fs)
    k = min(cores[0].shape) // len(fs)
    us, ss, vs = [], [], []
    for M, wt in zip(cores, w):
        u, s, vh = torch.linalg.svd(M, full_matrices=False)
        m = min(k, _nonzero(s, M.shape))
        us.append(u[:, :m])
        ss.append(wt * s[:m])
        vs.append(vh[:m].T)
    merged = _polar(torch.cat(us, 1)) @ torch.diag(torch.cat(ss)) @ _polar(torch.cat(vs, 1)).T
    return U_B @ merged @ V_A.T


def _weighted(fs, w):
    return [wt * f.delta() for wt, f in zip(w, fs)]


# ---------------------------------------------------------------- iso_c


@pytest.mark.parametrize("rank", [1, 4, 9, 30])
def test_iso_c_equals_dense_formula(rank):
    fs, w = _factors([2, 3, 4]), [0.7, -0.3, 1.2]
    got = iso_c(fs, w, rank=rank)
    assert got.scaling == 1.0 and got.rank == min(rank, 9)
    assert _rel(got.B @ got.A, _dense_iso_c(sum(_weighted(fs, w)), rank)) < 1e-10
    assert torch.allclose(got.B.norm(dim=0), got.A.norm(dim=1))  # balanced
    S = torch.linalg.svdvals(got.B @ got.A)[: got.rank]
    assert float(S.max() - S.min()) < 1e-10 * float(S.max())  # isotropic


def test_iso_c_flattens_only_the_nonzero_spectrum():
    fs = _factors([2, 3, 4])
    got = iso_c(fs, [0.7, 0.0, 1.2], rank=9)  # the sum has rank 6 in a 14 x 11 matrix
    assert got.rank == 6
    dense = sum(_weighted(fs, [0.7, 0.0, 1.2]))
    assert _rel(got.B @ got.A, _dense_iso_c(dense, 9)) < 1e-10
    same = iso_c([fs[0], fs[2]], [0.7, 1.2], rank=9)
    assert _rel(got.B @ got.A, same.B @ same.A) < 1e-10
    # flattening all min(out, in) = 11 values (the official dense rule) would be different
    U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
    assert _rel(got.B @ got.A, S.mean() * U @ Vh) > 0.5
    # identical tasks: rank 3
    twice = iso_c([fs[1], fs[1]], [1.0, 1.0], rank=6)
    assert twice.rank == 3 and _rel(twice.B @ twice.A, _dense_iso_c(2 * fs[1].delta(), 3)) < 1e-10


def test_iso_c_wide_and_zero():
    fs = _factors([6, 7], out=5, inn=9)  # sum of ranks above out: K = 5
    got = iso_c(fs, [0.4, 0.9], rank=8)
    assert got.rank == 5 and _rel(got.B @ got.A, _dense_iso_c(sum(_weighted(fs, [0.4, 0.9])), 8)) < 1e-10
    zero = iso_c([LoraFactors(f.A * 0, f.B, 1.0) for f in fs], [1.0, 1.0], rank=3)
    assert zero.rank == 1 and float((zero.B @ zero.A).abs().max()) == 0.0


# ---------------------------------------------------------------- iso_cts


@pytest.mark.parametrize(
    "N,T,f,expected",
    [
        (9, 3, 0.8, (6, 1)),  # official rule: int(7.2) = 7, round(2 / 3) = 1 per task, common 9 - 3 = 6
        (9, 3, 0.5, (3, 2)),  # round(5 / 3) = 2
        (4, 3, 0.8, (1, 1)),  # official: round(1 / 3) = 0 task-specific; raised to 1
        (3, 2, 0.8, (1, 1)),  # official: round(0.5) = 0; raised to 1
        (16, 8, 0.8, (8, 1)),
        (8, 8, 0.8, (8, 0)),  # N = T: one each would leave no common direction
        (2, 2, 0.8, (2, 0)),
        (9, 3, 0.0, (0, 3)),
        (7, 2, 0.1, (1, 3)),  # official: round(3.5) = 4 per task, 8 > 7 (negative common size); capped at 7 // 2
        (9, 3, 1.0, (9, 0)),
        (4096, 8, 0.8, (3280, 102)),
    ],
)
def test_iso_cts_budget_rule(N, T, f, expected):
    assert iso_cts_budget(N, T, f) == expected
    k_c, n = expected
    official_common = int(N * f)
    official_n = round((N - official_common) / T)
    if 1 <= official_n <= N // T:  # no clamp: exactly the official rule
        assert (k_c, n) == (N - T * official_n, official_n)


@pytest.mark.parametrize(
    "ranks,out,inn,rank,f,k_c,n",
    [
        ([2, 3, 4], 14, 11, 9, 0.8, 6, 1),
        ([2, 3, 4], 14, 11, 4, 0.8, 1, 1),
        ([4, 4], 14, 11, 3, 0.8, 1, 1),
        ([2, 3, 4], 14, 11, 30, 0.5, 3, 2),
        ([2, 2], 14, 11, 2, 0.8, 2, 0),
        ([3, 3, 3], 14, 11, 9, 0.0, 0, 3),
        ([6, 7], 5, 9, 8, 0.8, 3, 1),
        ([3, 4], 14, 11, 7, 0.1, 1, 3),
    ],
)
def test_iso_cts_equals_dense_reference(ranks, out, inn, rank, f, k_c, n):
    fs, w = _factors(ranks, out=out, inn=inn, seed=3), [0.7, -0.3, 1.2][: len(ranks)]
    got = iso_cts(fs, w, rank=rank, common_space_fraction=f)
    assert got.scaling == 1.0 and got.rank == k_c + sum(min(n, r) for r in ranks)
    assert _rel(got.B @ got.A, _dense_iso_cts(_weighted(fs, w), k_c, n)) < 1e-8
    S = torch.linalg.svdvals(got.B @ got.A)[: got.rank]
    assert float(S.max() - S.min()) < 1e-8 * float(S.max())  # isotropic


def test_iso_cts_special_cases():
    fs, w = _factors([2, 3, 4]), [0.7, -0.3, 1.2]
    # all common (f = 1) at the full budget is Iso-C
    a, b = iso_cts(fs, w, rank=9, common_space_fraction=1.0), iso_c(fs, w, rank=9)
    assert _rel(a.B @ a.A, b.B @ b.A) < 1e-10
    # the default fraction differs from Iso-C (the task-specific directions matter)
    c = iso_cts(fs, w, rank=9)
    assert _rel(c.B @ c.A, b.B @ b.A) > 1e-2
    # a single task: common = its top 3 triplets, task-specific = the 4th: Iso-C of the task
    one = iso_cts([fs[2]], [0.6], rank=4)
    assert one.rank == 4 and _rel(one.B @ one.A, _dense_iso_c(0.6 * fs[2].delta(), 4)) < 1e-10
    # identical tasks: the sum spans them, the projected tasks are numerically zero and contribute nothing
    twice = iso_cts([fs[1], fs[1]], [1.0, 1.0], rank=6)
    assert twice.rank == 3 and _rel(twice.B @ twice.A, _dense_iso_c(2 * fs[1].delta(), 3)) < 1e-10
    # a zero weight: that task contributes no task-specific direction
    zw = iso_cts(fs, [0.7, 0.0, 1.2], rank=4)  # N = 4: one common direction, one per task
    assert zw.rank == 1 + 2 and _rel(zw.B @ zw.A, _dense_iso_cts(_weighted(fs, [0.7, 0.0, 1.2]), 1, 1)) < 1e-8
    # ... and at the full budget the common space (6 directions) spans the other two tasks: Iso-C
    zw = iso_cts(fs, [0.7, 0.0, 1.2], rank=9)
    assert zw.rank == 6 and _rel(zw.B @ zw.A, _dense_iso_c(sum(_weighted(fs, [0.7, 0.0, 1.2])), 9)) < 1e-10
    zero = iso_cts([LoraFactors(f.A * 0, f.B, 1.0) for f in fs], w, rank=3)
    assert zero.rank == 1 and float((zero.B @ zero.A).abs().max()) == 0.0


# ---------------------------------------------------------------- core space


# the dense reference of core_ties: test_baselines.test_ties_merges_equal_dense_reference


def test_core_ties_basics():
    fs = _factors([2, 3, 4])
    # cores are lossless: one task gives back its weighted update
    one = core_ties([fs[1]], [-0.5], rank=3)
    assert _rel(one.B @ one.A, -0.5 * fs[1].delta()) < 1e-10
    # TIES is not task arithmetic, and core-space TIES is not KnOTS-TIES
    w = [0.7, -0.3, 1.2]
    got = core_ties(fs, w, rank=9)
    assert _rel(got.B @ got.A, sum(_weighted(fs, w))) > 1e-2
    knots = get_merge_method("knots")(fs, w, rank=9)
    assert _rel(got.B @ got.A, knots.B @ knots.A) > 1e-2
    # wide module (S > out): U_B is out x out, cores 5 x 9
    wide = _factors([6, 7], out=5, inn=9)
    got = core_ties(wide, [0.4, 0.9], rank=8, density=0.5)
    U_B, V_A, cores = dense_core_space(wide)
    assert cores[0].shape == (5, 9) and got.rank == 5
    assert _rel(got.B @ got.A, U_B @ dense_ties(cores, [0.4, 0.9], 0.5, "total") @ V_A.T) < 1e-8
    zero = core_ties([LoraFactors(f.A * 0, f.B, 1.0) for f in fs], w, rank=3)
    assert zero.rank == 1 and float((zero.B @ zero.A).abs().max()) == 0.0


@pytest.mark.parametrize("ranks,out,inn", [([3, 3, 3], 14, 11), ([2, 3, 4], 14, 11), ([4, 4], 14, 11), ([6, 7], 5, 9)])
def test_core_space_tsv_is_tsv_at_sum_of_ranks(ranks, out, inn):
    fs, w = _factors(ranks, out=out, inn=inn, seed=5), [0.7, -0.3, 1.2][: len(ranks)]
    S = sum(ranks)
    got = tsv(fs, w, rank=S)
    core = _dense_core_tsv(fs, w)
    assert _rel(got.B @ got.A, core) < 1e-10
    assert _rel(core, sum(_weighted(fs, w))) > 1e-2  # not trivially the sum
    # and core-space Iso-C (isotropize the summed core) is iso_c at svd_rank = sum r_t
    U_B, V_A, cores = dense_core_space(fs)
    Uc, Sc, Vch = torch.linalg.svd(sum(wt * M for wt, M in zip(w, cores)), full_matrices=False)
    iso = iso_c(fs, w, rank=S)
    assert _rel(iso.B @ iso.A, Sc.mean() * U_B @ Uc @ Vch @ V_A.T) < 1e-10


# ---------------------------------------------------------------- shared properties


@pytest.mark.parametrize(
    "name,options",
    [("iso_c", {}), ("iso_cts", {}), ("iso_cts", {"common_space_fraction": 0.3}), ("core_ties", {"density": 0.4})],
)
def test_linear_in_a_common_weight_scale(name, options):
    m, fs, w = get_merge_method(name), _factors([2, 3, 4], seed=7), torch.tensor([0.7, -0.3, 1.2], dtype=torch.float64)
    base = m(fs, w, rank=6, **options)
    for lam in (0.3, -2.0):
        got = m(fs, lam * w, rank=6, **options)
        assert _rel(got.B @ got.A, lam * (base.B @ base.A)) < 1e-10, lam


@pytest.mark.parametrize(
    "name,options", [("iso_c", {}), ("iso_cts", {}), ("core_ties", {}), ("core_ties", {"density": 0.5})]
)
def test_float32_agrees_with_float64(name, options):
    m, fs, w = get_merge_method(name), _factors([2, 3, 4], seed=2), [0.5, 0.8, -0.4]
    got, got32 = m(fs, w, rank=5, **options), m(_f32(fs), w, rank=5, **options)
    assert got32.A.dtype == torch.float32 and got32.B.dtype == torch.float32
    assert _rel((got32.B @ got32.A).double(), got.B @ got.A) < 1e-4


@pytest.mark.parametrize(
    "name,kwargs,match",
    [
        ("iso_cts", {"common_space_fraction": -0.1}, "common_space_fraction must be a number in \\[0, 1\\]"),
        ("iso_cts", {"common_space_fraction": 1.5}, "common_space_fraction must be a number in \\[0, 1\\]"),
        ("iso_cts", {"common_space_fraction": True}, "common_space_fraction must be a number"),
        ("iso_cts", {"common_space_fraction": "0.5"}, "common_space_fraction must be a number"),
        ("core_ties", {"density": 0.0}, "density must be a number in \\(0, 1\\]"),
        ("core_ties", {"density": 1.5}, "density must be a number in \\(0, 1\\]"),
        ("core_ties", {"majority_sign_method": "median"}, "majority_sign_method='median' is not supported"),
    ],
)
def test_bad_options(name, kwargs, match):
    with pytest.raises(MergeInputError, match=match):
        get_merge_method(name)(_factors([2, 2]), [0.5, 0.5], **kwargs)


def test_registry_entries():  # unknown options: test_baselines.test_unknown_options_list_valid_ones
    for m in (iso_c, iso_cts, core_ties):
        assert m.rank_option == "svd_rank" and m.peft_combination_type and "2025" in m.reference
    assert dict(iso_cts.options) == {"common_space_fraction": 0.8}
    assert dict(core_ties.options) == {"density": 1.0, "majority_sign_method": "total"}
    with pytest.raises(Exception, match="Unknown merge method 'core_tsv'"):
        get_merge_method("core_tsv")


# ---------------------------------------------------------------- front ends

ADAPTERS = {
    "x": {"r": 2, "lora_alpha": 4},
    "y": {"r": 3, "lora_alpha": 3, "rank_pattern": {"lin0": 4}, "alpha_pattern": {"conv2": 8}},
    "z": {"r": 2, "lora_alpha": 2, "use_rslora": True},
}
W = [0.5, -0.3, 0.9]


@pytest.mark.parametrize(
    "method,kwargs",
    [
        ("iso_c", {"svd_rank": 8}),
        ("iso_c", {}),
        ("iso_cts", {"svd_rank": 5, "common_space_fraction": 0.5}),
        ("core_ties", {"svd_rank": 3, "density": 0.5}),
        ("tsv", {"svd_rank": 4}),
        ("tsv", {}),
        ("knots", {"svd_rank": 3, "density": 0.5}),
        ("knots", {}),
    ],
)
def test_peft_route(method, kwargs):
    """Every SVD-family method routed through add_weighted_adapter equals the registry on PEFT's own factors (ranks,
    rank/alpha patterns, rsLoRA, Embedding, Conv and Conv1D layers)."""
    model = make_peft_model(ADAPTERS)
    names = list(ADAPTERS)
    model.add_weighted_adapter(names, W, "m", combination_type=method, **kwargs)
    R = kwargs.get("svd_rank", 4)  # default: the largest adapter rank (4, from rank_pattern)
    cfg = model.peft_config["m"]
    assert (cfg.r, cfg.lora_alpha, cfg.use_rslora) == (R, R, False)
    options = {k: v for k, v in kwargs.items() if k != "svd_rank"}
    m = get_merge_method(method)
    for key, layer in _layers(model).items():
        assert layer.scaling["m"] == 1.0 and get_lora_factors(layer, "m").rank == R
        got = m([get_lora_factors(layer, n) for n in names], W, rank=R, **options)
        assert _rel(delta_matrix(layer, "m"), got.B @ got.A) < 1e-10, key
        if method == "iso_c":  # and independently, the dense formula on PEFT's own per-adapter deltas
            dense = sum(w * delta_matrix(layer, n) for n, w in zip(names, W))
            assert _rel(delta_matrix(layer, "m"), _dense_iso_c(dense, R)) < 1e-8, key


def test_peft_route_bad_option_leaves_model_unchanged():
    model = make_peft_model({"x": {"r": 2}, "y": {"r": 2}})
    before = set(model.peft_config)
    with pytest.raises(MergeInputError, match="common_space_fraction must be a finite number"):
        model.add_weighted_adapter(["x", "y"], [0.5, 0.5], "m", combination_type="iso_cts", common_space_fraction="a")
    with pytest.raises(MergeInputError, match="common_space_fraction must be a number in \\[0, 1\\]"):
        model.add_weighted_adapter(["x", "y"], [0.5, 0.5], "m", combination_type="iso_cts", common_space_fraction=2)
    assert set(model.peft_config) == before


def test_merge_adapters_equals_peft_route(tmp_path):
    model = make_peft_model(ADAPTERS)
    for config in model.peft_config.values():
        config.base_model_name_or_path = "tiny-net"
    model.save_pretrained(tmp_path / "src", save_embedding_layers=False)  # no Hub lookup of the base
    paths = [str(tmp_path / "src" / n) for n in ADAPTERS]
    merged = merge_adapters(paths, W, method="iso_cts", rank=4, progress=False, common_space_fraction=0.5)
    merged.save_pretrained(tmp_path / "out")
    model.load_adapter(str(tmp_path / "out"), adapter_name="file")
    model.add_weighted_adapter(list(ADAPTERS), W, "peft", combination_type="iso_cts", svd_rank=4,
                               common_space_fraction=0.5)
    for key, layer in _layers(model).items():
        assert layer.scaling["file"] == 1.0
        assert _rel(delta_matrix(layer, "file"), delta_matrix(layer, "peft")) < 1e-8, key
        S = torch.linalg.svdvals(delta_matrix(layer, "file"))  # rank 4 (1 common + 1 per task), isotropic
        assert math.isclose(S[0], S[3], rel_tol=1e-6) and S[4] < 1e-6 * S[0], key
