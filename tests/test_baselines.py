"""The SVD-family baselines (``svd``, ``tsv``, ``knots``) in factored form, against dense references and PEFT."""

import peft
import pytest
import torch
from _models import delta_matrix, dense_core_space, dense_ties, dense_truncated, make_peft_model
from _models import lora_layers as _layers
from _models import random_factors as _factors
from _models import rel_err as _rel
from packaging.version import Version

from peft_cp_merge import LoraFactors, MergeInputError, UnknownMergeOptionError, get_merge_method
from peft_cp_merge.integrations.peft import get_lora_factors

svd, tsv, knots = (get_merge_method(n) for n in ("svd", "tsv", "knots"))
_PEFT_SVD_SCALES_ONCE = Version(peft.__version__) >= Version("0.21")  # peft #3111


# ---------------------------------------------------------------- dense references, from the papers' formulas


def _dense_tsv(Xs, w, rank):
    """TSV-Merge on dense updates: per-task SVD, k = min(R, out, in) // T triplets each (non-zero ones only; the R
    largest |w_t| s if over budget), polar factors of the concatenated U and V, dW = U_perp diag(w_t S_t) V_perp^T."""
    out, inn = Xs[0].shape
    budget = min(rank, out, inn)
    k = max(1, budget // len(Xs))
    cols = []  # (strength, u, w s, v)
    for X, wt in zip(Xs, w):
        U, S, Vh = torch.linalg.svd(X, full_matrices=False)
        nonzero = int((S > max(out, inn) * torch.finfo(S.dtype).eps * S[0]).sum())
        cols += [(abs(wt) * S[i], U[:, i], wt * S[i], Vh[i]) for i in range(min(k, nonzero))]
    if len(cols) > budget:
        cols = sorted(cols, key=lambda c: -float(c[0]))[:budget]
    U_hat = torch.stack([c[1] for c in cols], 1)
    V_hat = torch.stack([c[3] for c in cols], 1)

    def polar(M):
        P, _, Qh = torch.linalg.svd(M, full_matrices=False)
        return P @ Qh

    return polar(U_hat) @ torch.diag(torch.stack([c[2] for c in cols])) @ polar(V_hat).T


def _dense_knots(Xs, w, rank, density=1.0, sign="total"):
    """KnOTS-TIES on dense updates: SVD of [X_1 .. X_T] (s > 1e-5 kept), TIES on each S V_t (top-k by magnitude,
    sign elected on the pruned tensors, weights, disjoint mean), dW = U merged, truncated to ``rank``."""
    inn = Xs[0].shape[1]
    U, S, Vh = torch.linalg.svd(torch.cat(Xs, dim=1), full_matrices=False)
    keep = S > 1e-5
    U, S, Vh = U[:, keep], S[keep], Vh[keep]
    flip = torch.sign(U[U.abs().argmax(0), torch.arange(U.shape[1])])  # svd_flip: largest |entry| of U positive
    U, Vh = U * flip, Vh * flip[:, None]
    tasks = [torch.diag(S) @ Vh[:, t * inn : (t + 1) * inn] for t in range(len(Xs))]
    return dense_truncated(U @ dense_ties(tasks, w, density, sign), rank)


# ---------------------------------------------------------------- svd


@pytest.mark.parametrize("rank", [1, 4, 9, 30])
def test_svd_equalsdense_truncated(rank):
    fs, w = _factors([2, 3, 4]), [0.7, -0.3, 1.2]
    got = svd(fs, w, rank=rank)
    assert got.scaling == 1.0 and got.rank == min(rank, 9)
    ref = dense_truncated(sum(wt * f.delta() for wt, f in zip(w, fs)), rank)
    assert _rel(got.B @ got.A, ref) < 1e-10
    assert torch.allclose(got.B.norm(dim=0), got.A.norm(dim=1))  # balanced


def test_svd_batch_equals_one_module_at_a_time():
    groups = [_factors([2, 3], seed=s) for s in range(3)]
    weights = [[0.5, 0.5], [1.0, -2.0], [0.1, 0.9]]
    batch = svd.merge_batch(groups, weights, rank=3)
    for g, w, got in zip(groups, weights, batch):
        one = svd(g, w, rank=3)
        assert _rel(got.B @ got.A, one.B @ one.A) < 1e-12


def test_svd_wide_rank_and_float32():
    fs = _factors([6, 7], out=5, inn=9)  # sum of ranks above out
    got = svd(fs, [1.0, 1.0], rank=8)
    assert got.rank == 5
    assert _rel(got.B @ got.A, fs[0].delta() + fs[1].delta()) < 1e-10
    fs32 = [LoraFactors(f.A.float(), f.B.float(), f.scaling) for f in fs]
    got32 = svd(fs32, [1.0, 1.0], rank=3)
    assert got32.A.dtype == torch.float32
    assert _rel((got32.B @ got32.A).double(), dense_truncated(fs[0].delta() + fs[1].delta(), 3)) < 1e-5


def test_svd_equals_peft_svd_on_a_peft_model():
    targets = ["emb", "lin0", "conv2", "c1d"]  # PEFT's own svd mishandles Conv1d/Conv3d (peft #3769)
    adapters = {
        "x": {"r": 2, "lora_alpha": 4, "target_modules": targets},
        "y": {"r": 3, "lora_alpha": 3, "rank_pattern": {"lin0": 4}, "target_modules": targets},
        "z": {"r": 2, "lora_alpha": 2, "use_rslora": True, "target_modules": targets},
    }
    model = make_peft_model(adapters)
    names, w, R = list(adapters), [0.5, -0.8, 1.3], 3
    model.add_weighted_adapter(names, w, "peft_svd", combination_type="svd", svd_rank=R)
    layers = _layers(model)
    assert {type(layers[k]).__name__ for k in targets} == {"Embedding", "Linear", "Conv2d"}
    assert layers["c1d"].fan_in_fan_out
    for key, layer in layers.items():
        factors = [get_lora_factors(layer, n) for n in names]
        got = svd(factors, w, rank=R)
        # our svd is the truncated SVD of the weighted deltas
        ref = dense_truncated(sum(wt * delta_matrix(layer, n) for n, wt in zip(names, w)), R)
        assert _rel(got.B @ got.A, ref) < 1e-10, key
        # PEFT's svd before 0.21 applied each adapter's scaling twice (peft #3111): its weights were w_t * s_t
        peft_w = w if _PEFT_SVD_SCALES_ONCE else [wt * f.scaling for wt, f in zip(w, factors)]
        theirs = svd(factors, peft_w, rank=R)
        # PEFT rounds the weights to float32 (torch.tensor(weights)): ~1e-8 relative on a float64 model
        assert _rel(theirs.B @ theirs.A, delta_matrix(layer, "peft_svd")) < 1e-6, key
    # the scalings differ from 1 here (x: 2, y: 1 and 0.75 on lin0, z: sqrt 2), so the two versions are told apart
    assert sorted(float(layers["lin0"].scaling[n]) for n in names) == pytest.approx([0.75, 2**0.5, 2.0])


# ---------------------------------------------------------------- tsv


@pytest.mark.parametrize(
    "ranks,rank",
    [([2, 3, 4], 9), ([2, 3, 4], 4), ([4, 4], 3), ([2, 3, 4, 1], 2), ([5, 6], 30), ([3, 1, 2], 6)],
)
def test_tsv_equals_dense_reference(ranks, rank):
    fs, w = _factors(ranks, out=14, inn=11), [0.7, -0.3, 1.2, 0.4][: len(ranks)]
    got = tsv(fs, w, rank=rank)
    assert got.scaling == 1.0 and got.rank <= min(rank, 11)
    assert _rel(got.B @ got.A, _dense_tsv([f.delta() for f in fs], w, rank)) < 1e-8


def test_tsv_official_k_when_rank_covers_the_matrix():
    # out=in=6, T=3: official k = 2 per task; with svd_rank >= 6 exactly that rule applies
    fs, w = _factors([3, 3, 3], out=6, inn=6), [1.0, 1.0, 1.0]
    got = tsv(fs, w, rank=20)
    assert got.rank == 6
    assert _rel(got.B @ got.A, _dense_tsv([f.delta() for f in fs], w, 20)) < 1e-8


def test_tsv_single_task_reproduces_weighted_update():
    (f,) = _factors([3])
    got = tsv([f], [0.6], rank=3)
    assert _rel(got.B @ got.A, 0.6 * f.delta()) < 1e-10


def test_tsv_orthogonal_tasks_give_the_weighted_sum():
    g = torch.Generator().manual_seed(1)
    QB = torch.linalg.qr(torch.randn(14, 7, generator=g, dtype=torch.float64))[0]
    QA = torch.linalg.qr(torch.randn(11, 7, generator=g, dtype=torch.float64))[0]
    fs, start = [], 0
    for t, r in enumerate([2, 3, 2]):  # disjoint column / row subspaces
        B = QB[:, start : start + r] @ torch.randn(r, r, generator=g, dtype=torch.float64)
        A = torch.randn(r, r, generator=g, dtype=torch.float64) @ QA[:, start : start + r].T
        fs.append(LoraFactors(A, B, 0.5 + t))
        start += r
    w = [0.3, -1.1, 0.8]
    target = sum(wt * f.delta() for wt, f in zip(w, fs))
    got = tsv(fs, w, rank=9)  # k = 9 // 3 = 3 triplets per task: all of them
    assert _rel(got.B @ got.A, target) < 1e-10
    got = tsv(fs, w, rank=7)  # k = 2: task 1 loses its weakest triplet
    assert _rel(got.B @ got.A, target) > 1e-3
    # overlapping subspaces do change the result (the orthogonalisation is not a no-op)
    fs2, w2 = _factors([2, 3, 2]), [0.3, -1.1, 0.8]
    got = tsv(fs2, w2, rank=9)
    assert _rel(got.B @ got.A, sum(wt * f.delta() for wt, f in zip(w2, fs2))) > 1e-2


def test_tsv_weights_scale_the_blocks_linearly():
    fs = _factors([2, 3, 2])
    one = tsv(fs, [1.0, 1.0, 1.0], rank=7)
    alpha = tsv(fs, [0.4, 0.4, 0.4], rank=7)
    assert _rel(alpha.B @ alpha.A, 0.4 * (one.B @ one.A)) < 1e-10


# ---------------------------------------------------------------- knots


def _dense_core_ties(Xs, fs, w, rank, density, sign):
    """Core-space TIES on dense matrices: TIES on the cores U_B^T X_t V_A, lifted, truncated to ``rank``."""
    U_B, V_A, cores = dense_core_space(fs)
    assert cores[0].shape == (9, 9)
    return dense_truncated(U_B @ dense_ties(cores, w, density, sign) @ V_A.T, rank)


@pytest.mark.parametrize("method", ["knots", "core_ties"])
@pytest.mark.parametrize(
    "density,sign,rank",
    [(1.0, "total", 9), (0.3, "total", 9), (0.5, "frequency", 9), (0.7, "total", 3), (1.0, "frequency", 2)],
)
def test_ties_merges_equal_dense_reference(method, density, sign, rank):
    fs, w = _factors([2, 3, 4]), [0.7, -0.3, 1.2]
    got = get_merge_method(method)(fs, w, rank=rank, density=density, majority_sign_method=sign)
    assert got.scaling == 1.0 and got.rank <= min(rank, 9)
    Xs = [f.delta() for f in fs]
    ref = _dense_knots(Xs, w, rank, density, sign) if method == "knots" else _dense_core_ties(Xs, fs, w, rank,
                                                                                               density, sign)
    assert _rel(got.B @ got.A, ref) < 1e-8
    if method == "core_ties":  # cores are full (9 x 9 here): the output rank is exactly min(rank, 9)
        assert got.rank == min(rank, 9)


def test_knots_single_task_reproduces_the_update():
    (f,) = _factors([3])
    got = knots([f], [1.0], rank=3)
    assert _rel(got.B @ got.A, f.delta()) < 1e-10
    got = knots([f], [-0.5], rank=3)
    assert _rel(got.B @ got.A, -0.5 * f.delta()) < 1e-10


def test_knots_drops_singular_values_below_threshold():
    fs = _factors([2, 2])
    tiny = LoraFactors(fs[1].A * 1e-4, fs[1].B * 1e-4, 1.0)  # singular values ~1e-7 < 1e-5: dropped
    got = knots([fs[0], tiny], [1.0, 1.0], rank=4)
    assert got.rank == 2  # only task 0's two directions survive
    zero = knots([LoraFactors(f.A * 0, f.B, 1.0) for f in fs], [1.0, 1.0], rank=2)
    assert float((zero.B @ zero.A).abs().max()) == 0.0


def test_knots_float32_keeps_dtype():
    fs = _factors([2, 3])
    fs32 = [LoraFactors(f.A.float(), f.B.float(), f.scaling) for f in fs]
    got, got32 = knots(fs, [0.5, 0.5], rank=5), knots(fs32, [0.5, 0.5], rank=5)
    assert got32.A.dtype == torch.float32 and got32.B.dtype == torch.float32
    assert _rel((got32.B @ got32.A).double(), got.B @ got.A) < 1e-4


# ---------------------------------------------------------------- through PEFT's add_weighted_adapter


# every routed method against the registry on one PEFT model: test_iso_core.test_peft_route


def test_svd_is_not_routed_and_peft_svd_is_untouched():
    targets = ["emb", "lin0", "conv2", "c1d"]
    model = make_peft_model({"x": {"r": 2, "target_modules": targets}, "y": {"r": 2, "target_modules": targets}})
    assert not svd.peft_combination_type and tsv.peft_combination_type and knots.peft_combination_type
    model.add_weighted_adapter(["x", "y"], [0.5, 0.5], "s", combination_type="svd", svd_rank=2, svd_clamp=0.99)
    assert "s" in model.peft_config  # PEFT's own svd (with its own options) still runs


# ---------------------------------------------------------------- bad options


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"density": 0.0}, "density must be a number in \\(0, 1\\]"),
        ({"density": 1.5}, "density must be a number in \\(0, 1\\]"),
        ({"density": True}, "density must be a number"),
        ({"density": "0.5"}, "density must be a number"),
        ({"majority_sign_method": "median"}, "majority_sign_method='median' is not supported; use one of"),
    ],
)
def test_knots_bad_options(kwargs, match):
    with pytest.raises(MergeInputError, match=match):
        knots(_factors([2, 2]), [0.5, 0.5], **kwargs)


@pytest.mark.parametrize(
    "name,bad,valid",
    [
        ("tsv", {"density": 0.5}, "\\(none\\)"),
        ("knots", {"topK": 20}, "density, majority_sign_method"),
        ("svd", {"svd_clamp": 0.9}, "\\(none\\)"),
        ("iso_c", {"common_space_fraction": 0.5}, "\\(none\\)"),
        ("iso_cts", {"density": 0.5}, "common_space_fraction"),
        ("core_ties", {"topK": 20}, "density, majority_sign_method"),
    ],
)
def test_unknown_options_list_valid_ones(name, bad, valid):
    msg = f"Unknown option\\(s\\) \\['{next(iter(bad))}'\\] for merge method '{name}'. Valid options: {valid}"
    with pytest.raises(UnknownMergeOptionError, match=msg):
        get_merge_method(name)(_factors([2, 2]), [0.5, 0.5], **bad)


def test_rank_must_be_positive():
    with pytest.raises(MergeInputError, match="`svd_rank` must be a positive integer"):
        tsv(_factors([2, 2]), [0.5, 0.5], rank=0)


def test_bad_options_through_peft_leave_model_unchanged():
    model = make_peft_model({"x": {"r": 2}, "y": {"r": 2}})
    before = set(model.peft_config)
    with pytest.raises(MergeInputError, match="density must be a number in"):
        model.add_weighted_adapter(["x", "y"], [0.5, 0.5], "m", combination_type="knots", density=2)
    with pytest.raises(UnknownMergeOptionError, match="`svd_clamp` belongs to PEFT's own SVD types"):
        model.add_weighted_adapter(["x", "y"], [0.5, 0.5], "m", combination_type="tsv", svd_clamp=0.9)
    with pytest.raises(MergeInputError, match="`svd_rank` must be a positive integer"):
        model.add_weighted_adapter(["x", "y"], [0.5, 0.5], "m", combination_type="tsv", svd_rank=0)
    assert set(model.peft_config) == before
    assert all("m" not in layer.lora_A for layer in _layers(model).values())
