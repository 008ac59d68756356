"""The 2025-2026 anchors (``dc_merge``, ``star``, ``lora_lego``, ``core_tsv_iso``) against dense references written
from the papers' formulas and the official codes' steps; hand-checkable identities; the PEFT route."""

import math

import numpy as np
import pytest
import torch
from _models import delta_matrix, dense_core_space, dense_truncated, make_peft_model
from _models import lora_layers as _layers
from _models import random_factors as _factors
from _models import rel_err as _rel
from sklearn.cluster import KMeans

from peft_cp_merge import LoraFactors, MergeInputError, get_merge_method
from peft_cp_merge.integrations.peft import get_lora_factors

dc, star, lego, core_tsv_iso = (get_merge_method(n) for n in ("dc_merge", "star", "lora_lego", "core_tsv_iso"))
W3 = [0.7, -0.3, 1.2]


def _polar(M):
    P, _, Qh = torch.linalg.svd(M, full_matrices=False)
    return P @ Qh


def _task_svd(X):
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    n = int((S > 1e-10 * S[0]).sum())
    return U[:, :n], S[:n], Vh[:n].T


# ---------------------------------------------------------------- dense references


def _dense_dc(Xs, w, rank, smoothing="flat", rho=5.0, density=0.001):
    """DC-Merge as the official ``dc_merge`` on dense task updates (per-task rank = its non-zero rank): smoothed
    top-r SVDs, polar cover bases, keep_topk_percent, ties_small with the weights, block-diagonal mask, truncated."""
    parts = [_task_svd(X) for X in Xs]
    smoothed = []
    for U, S, V in parts:
        r = S.numel()
        if smoothing == "linear" and r > 1:
            d = torch.linspace(min(rho, float(S[0] / S[-1])), 1.0, r, dtype=S.dtype)
            d = d / d.sum()
        else:
            d = torch.ones_like(S) / r
        smoothed.append(U @ torch.diag(S.sum() * d) @ V.T)
    P, Q = _polar(torch.cat([p[0] for p in parts], 1)), _polar(torch.cat([p[2] for p in parts], 1))
    Ms = []
    for Xs_t in smoothed:
        M = P.T @ Xs_t @ Q
        k = max(1, int(density * M.numel()))
        Ms.append(M * (M.abs() >= torch.topk(M.abs().flatten(), k).values.min()))
    stack = torch.stack(Ms)
    summed = stack.sum(0)
    mask = torch.sign(stack) == torch.sign(summed)[None]
    wt = torch.as_tensor(w, dtype=stack.dtype).reshape(-1, 1, 1)
    agg = (stack * wt * mask).sum(0) / mask.sum(0).clamp(min=1)
    agg = torch.where(summed == 0, torch.zeros_like(agg), agg)
    block = torch.zeros_like(agg)
    start = 0
    for _, S, _ in parts:
        block[start : start + S.numel(), start : start + S.numel()] = 1
        start += S.numel()
    return dense_truncated(P @ (agg * block) @ Q.T, rank)


def _dense_star(Xs, w, rank, eta=40.0):
    """STAR as the official ``star`` on dense updates (non-zero spectrum), then the weighted sum, truncated."""
    out = 0
    for X, wt in zip(Xs, w):
        U, S, V = _task_svd(X)
        cum = torch.cumsum(S, 0)
        k = min(int(torch.searchsorted(cum, (S.sum() * eta / 100).reshape(1))) + 1, S.numel())
        out = out + wt * U[:, :k] @ torch.diag(S.sum() / S[:k].sum() * S[:k]) @ V[:, :k].T
    return dense_truncated(out, rank)


def _dense_lego(fs, w, rank, seed=0):
    """CtM's ``merge_MSUs``: units [a_i; b_i] (here with sqrt|w_t s_t| and its sign on b), KMeans, centroid max-norm
    rescale, B times sqrt(N / R); returns B A."""
    units = []
    for f, wt in zip(fs, w):
        c = wt * f.scaling
        for i in range(f.rank):
            units.append(np.concatenate([math.sqrt(abs(c)) * f.A[i].numpy(), np.sign(c) * math.sqrt(abs(c))
                                         * f.B[:, i].numpy()]))
    msu = np.stack(units)
    km = KMeans(n_clusters=rank, n_init=10, random_state=seed).fit(msu)
    centers = km.cluster_centers_.copy()
    for c in range(rank):
        cluster = msu[km.labels_ == c]
        centers[c] *= np.abs(cluster).max(axis=1).mean() / np.abs(centers[c]).max()
    inn = fs[0].A.shape[1]
    A, B = torch.as_tensor(centers[:, :inn]), torch.as_tensor(centers[:, inn:].T) * math.sqrt(len(msu) / rank)
    return B @ A


def _dense_core_tsv_iso(fs, w, rank):
    """Core-space merging's tsv + isotropize on the dense cores (int(min(core) / T) triplets per task, polar
    factors, w_t S_t), truncated to ``rank`` (CtM's --low_rank), non-zero singular values flattened, lifted."""
    U_B, V_A, cores = dense_core_space(fs)
    k = min(cores[0].shape) // len(fs)
    us, ss, vs = [], [], []
    for M, wt in zip(cores, w):
        u, s, v = _task_svd(M)
        us.append(u[:, :k])
        ss.append(wt * s[:k])
        vs.append(v[:, :k])
    merged = _polar(torch.cat(us, 1)) @ torch.diag(torch.cat(ss)) @ _polar(torch.cat(vs, 1)).T
    U, S, Vh = torch.linalg.svd(merged, full_matrices=False)
    n = min(rank, int((S > 1e-10 * S[0]).sum()))
    return U_B @ (S[:n].mean() * U[:, :n] @ Vh[:n]) @ V_A.T


def _deltas(fs):
    return [f.delta() for f in fs]


# ---------------------------------------------------------------- dc_merge


@pytest.mark.parametrize(
    "ranks,out,rank,kw",
    [
        ([2, 3, 2], 6, 3, {"density": 0.3}),  # 7 task directions in a 6-wide layer: polar factors, orthonormal rows
        ([3, 3, 3], 14, 3, {}),
        ([3, 3, 3], 14, 9, {}),
        ([3, 3, 3], 14, 6, {"density": 0.1}),
        ([2, 3, 4], 14, 9, {"smoothing": "linear", "density": 0.2}),
        ([2, 3, 4], 14, 4, {"smoothing": "linear", "rho": 2.0, "density": 1.0}),
        ([4, 4], 14, 8, {"density": 0.05}),
    ],
)
def test_dc_merge_equals_dense(ranks, out, rank, kw):
    fs, w = _factors(ranks, out=out, inn=20, seed=2), W3[: len(ranks)]
    got = dc(fs, w, rank=rank, **kw)
    assert got.scaling == 1.0 and got.rank <= min(rank, sum(ranks))
    assert _rel(got.B @ got.A, _dense_dc(_deltas(fs), w, rank, **kw)) < 1e-8


def test_dc_merge_orthogonal_tasks_flat_is_the_flattened_sum():
    """Tasks in disjoint subspaces: the cover bases are the tasks' own, each M_t is its flat spectrum on the diagonal
    of its block (3 of 36 entries; the rest is round-off, pruned by density 0.09):
    dW = sum_t w_t (mean S_t) U_t V_t^T."""
    g = torch.Generator().manual_seed(1)
    QB = torch.linalg.qr(torch.randn(14, 6, generator=g, dtype=torch.float64))[0]
    QA = torch.linalg.qr(torch.randn(11, 6, generator=g, dtype=torch.float64))[0]
    fs = [LoraFactors(torch.randn(3, 3, generator=g, dtype=torch.float64) @ QA[:, 3 * t : 3 * t + 3].T,
                      QB[:, 3 * t : 3 * t + 3] @ torch.randn(3, 3, generator=g, dtype=torch.float64), 0.5 + t)
          for t in range(2)]
    w = [0.8, -0.5]
    ref = 0
    for f, wt in zip(fs, w):
        U, S, V = _task_svd(f.delta())
        ref = ref + wt * S.mean() * U @ V.T
    got = dc(fs, w, rank=6, density=0.09)
    assert _rel(got.B @ got.A, ref) < 1e-10
    # the official density (0.1% of 36 entries: one per task) keeps one direction per task
    assert dc(fs, w, rank=6).rank == 2


# ---------------------------------------------------------------- star


@pytest.mark.parametrize("ranks,rank,eta", [([3, 3, 3], 3, 40.0), ([3, 3, 3], 9, 40.0), ([2, 3, 4], 6, 70.0),
                                            ([2, 3, 4], 9, 100.0), ([4, 4], 2, 10.0)])
def test_star_equals_dense(ranks, rank, eta):
    fs, w = _factors(ranks, seed=3), W3[: len(ranks)]
    got = star(fs, w, rank=rank, eta=eta)
    assert _rel(got.B @ got.A, _dense_star(_deltas(fs), w, rank, eta)) < 1e-8


def test_star_keeps_the_nuclear_norm_and_full_eta_is_the_sum():
    (f,) = _factors([4], seed=4)
    S = torch.linalg.svdvals(f.delta())[:4]
    got = star([f], [1.0], rank=4)
    k = int((torch.cumsum(S, 0) < 0.4 * S.sum()).sum()) + 1  # the fewest holding 40% of the nuclear norm
    assert got.rank == k < 4
    assert math.isclose(float(torch.linalg.svdvals(got.B @ got.A).sum()), float(S.sum()), rel_tol=1e-10)
    fs = _factors([2, 3], seed=4)
    full = star(fs, [0.5, 0.5], rank=5, eta=100.0)
    assert _rel(full.B @ full.A, 0.5 * fs[0].delta() + 0.5 * fs[1].delta()) < 1e-10


# ---------------------------------------------------------------- lora_lego


@pytest.mark.parametrize("ranks,rank", [([3, 3, 3], 3), ([3, 3, 3], 6), ([2, 3, 4], 5)])
def test_lora_lego_equals_dense(ranks, rank):
    fs, w = _factors(ranks, seed=5), [abs(x) for x in W3[: len(ranks)]]
    got = lego(fs, w, rank=rank)
    assert got.rank == rank
    assert _rel(got.B @ got.A, _dense_lego(fs, w, rank)) < 1e-8


def test_lora_lego_identities():
    fs = _factors([2, 3], seed=6)
    w = [0.6, -0.8]
    # one cluster per unit: each centroid is its unit (rescale 1, sqrt(N / R) = 1): PEFT's cat, sum_t w_t X_t
    got = lego(fs, w, rank=5)
    assert _rel(got.B @ got.A, sum(wt * f.delta() for wt, f in zip(w, fs))) < 1e-10
    # two copies of one adapter, R = r: the clusters are the unit pairs, B gets sqrt(2 r / r)
    twice = lego([fs[1], fs[1]], [1.0, 1.0], rank=3)
    assert _rel(twice.B @ twice.A, math.sqrt(2) * fs[1].delta()) < 1e-10
    # a zero weight leaves its units out
    assert _rel(lego(fs, [0.6, 0.0], rank=2).B @ lego(fs, [0.6, 0.0], rank=2).A, 0.6 * fs[0].delta()) < 1e-10
    # linear in a common scale of the weights (k-means is scale- and reflection-equivariant)
    base = lego(fs, w, rank=3)
    for lam in (0.25, -3.0):
        scaled = lego(fs, [lam * x for x in w], rank=3)
        assert _rel(scaled.B @ scaled.A, lam * (base.B @ base.A)) < 1e-8, lam


# ---------------------------------------------------------------- core_tsv_iso


@pytest.mark.parametrize("ranks,out,inn,rank", [([3, 3, 3], 14, 11, 3), ([3, 3, 3], 14, 11, 6), ([3, 3, 3], 14, 11, 9),
                                                ([2, 3, 4], 14, 11, 4), ([6, 7], 5, 9, 3)])
def test_core_tsv_iso_equals_dense(ranks, out, inn, rank):
    fs, w = _factors(ranks, out=out, inn=inn, seed=7), W3[: len(ranks)]
    got = core_tsv_iso(fs, w, rank=rank)
    assert _rel(got.B @ got.A, _dense_core_tsv_iso(fs, w, rank)) < 1e-8
    S = torch.linalg.svdvals(got.B @ got.A)[: got.rank]
    assert float(S.max() - S.min()) < 1e-8 * float(S.max())


def test_core_tsv_iso_is_iso_cts_without_common_space_at_full_rank_only():
    fs, w = _factors([3, 3, 3], seed=8), W3
    full, cts = core_tsv_iso(fs, w, rank=9), get_merge_method("iso_cts")(fs, w, rank=9, common_space_fraction=0.0)
    assert _rel(full.B @ full.A, cts.B @ cts.A) < 1e-10
    low = core_tsv_iso(fs, w, rank=3)  # at R = r it is its own merge: not iso_cts, iso_c nor tsv at that rank
    for name, kw in [("iso_cts", {"common_space_fraction": 0.0}), ("iso_cts", {}), ("iso_c", {}), ("tsv", {})]:
        other = get_merge_method(name)(fs, w, rank=3, **kw)
        assert _rel(low.B @ low.A, other.B @ other.A) > 1e-2, name


# ---------------------------------------------------------------- shared properties and options


ALL = [("dc_merge", {"density": 0.2}), ("dc_merge", {"smoothing": "linear"}), ("star", {}), ("lora_lego", {}),
       ("core_tsv_iso", {})]


@pytest.mark.parametrize("name,kw", ALL)
def test_valid_at_r_2r_sum_r_zero_and_dtype(name, kw):
    m, fs = get_merge_method(name), _factors([3, 3, 3], seed=9)
    for R in (3, 6, 9):
        got = m(fs, W3, rank=R, **kw)
        assert got.rank <= R and torch.isfinite(got.B @ got.A).all() and float((got.B @ got.A).norm()) > 0, R
    zero = m([LoraFactors(f.A * 0, f.B, 1.0) for f in fs], W3, rank=3, **kw)
    assert float((zero.B @ zero.A).abs().max()) == 0.0
    base = m(fs, W3, rank=4, **kw)
    if name != "lora_lego":  # lora_lego: test_lora_lego_identities
        scaled = m(fs, [-2.0 * x for x in W3], rank=4, **kw)
        assert _rel(scaled.B @ scaled.A, -2.0 * (base.B @ base.A)) < 1e-10
    got32 = m([LoraFactors(f.A.float(), f.B.float(), f.scaling) for f in fs], W3, rank=4, **kw)
    assert got32.A.dtype == torch.float32 and _rel((got32.B @ got32.A).double(), base.B @ base.A) < 1e-4


@pytest.mark.parametrize(
    "name,kwargs,match",
    [
        ("dc_merge", {"density": 0.0}, "density must be a number in \\(0, 1\\]"),
        ("dc_merge", {"rho": 0.5}, "rho must be a number in \\[1, inf\\]"),
        ("dc_merge", {"smoothing": "avg"}, "smoothing='avg' is not supported"),
        ("star", {"eta": 0.0}, "eta must be a number in \\(0, 100\\]"),
        ("star", {"eta": "40"}, "eta must be a number"),
        ("lora_lego", {"lego_n_init": 0}, "lego_n_init must be a positive integer"),
    ],
)
def test_bad_options(name, kwargs, match):
    with pytest.raises(MergeInputError, match=match):
        get_merge_method(name)(_factors([2, 2]), [0.5, 0.5], **kwargs)


# ---------------------------------------------------------------- through PEFT's add_weighted_adapter

ADAPTERS = {
    "x": {"r": 2, "lora_alpha": 4},
    "y": {"r": 3, "lora_alpha": 3, "rank_pattern": {"lin0": 4}, "alpha_pattern": {"conv2": 8}},
    "z": {"r": 2, "lora_alpha": 2, "use_rslora": True},
}
W = [0.5, -0.3, 0.9]
DENSE = {"dc_merge": lambda Xs, R, kw: _dense_dc(Xs, W, R, **kw), "star": lambda Xs, R, kw: _dense_star(Xs, W, R)}


@pytest.mark.parametrize("method,kw", [("dc_merge", {"density": 0.3}), ("star", {}), ("lora_lego", {}),
                                       ("core_tsv_iso", {})])
def test_peft_route(method, kw):
    model = make_peft_model(ADAPTERS)
    names, R = list(ADAPTERS), 3
    model.add_weighted_adapter(names, W, "m", combination_type=method, svd_rank=R, **kw)
    cfg = model.peft_config["m"]
    assert (cfg.r, cfg.lora_alpha, cfg.use_rslora) == (R, R, False)
    m = get_merge_method(method)
    for key, layer in _layers(model).items():
        assert layer.scaling["m"] == 1.0
        got = delta_matrix(layer, "m")
        ref = m([get_lora_factors(layer, n) for n in names], W, rank=R, **kw)
        assert _rel(got, ref.B @ ref.A) < 1e-10, key
        if method in DENSE:  # and the dense formula on PEFT's own per-adapter deltas
            assert _rel(got, DENSE[method]([delta_matrix(layer, n) for n in names], R, kw)) < 1e-8, key
