"""CtM's Tucker-2 merge (``tucker``) in core space, against dense tensorly ``partial_tucker`` on the full
out x in x T tensor and the paper's formulas; the PEFT and adapter-file front ends."""

import pytest
import tensorly as tl
import torch
from _models import delta_matrix, dense_ties, make_peft_model
from _models import lora_layers as _layers
from _models import random_factors as _factors
from _models import rel_err as _rel
from tensorly.decomposition import partial_tucker

from peft_cp_merge import LoraFactors, MergeInputError, UnknownMergeOptionError, get_merge_method
from peft_cp_merge.integrations.peft import get_lora_factors
from peft_cp_merge.methods.tucker import hooi

tucker = get_merge_method("tucker")


def _dense_tucker(Xs, w, rank, beta=0.25, how="ties", density=0.25, sign="total", isotropize=False):
    """CtM on dense updates (the paper's steps, without core space): stack X_t into out x in x T, rescale slice t to
    beta |X_t| + (1 - beta) mean_s |X_s|, partial_tucker ranks [R, R] on modes 0 and 1, C_t = U0^T X_t U1 on the raw
    X_t, merge (TIES / weighted sum / sign election), dW = U0 C U1^T (optionally with a flat spectrum)."""
    X = torch.stack(Xs, dim=-1)
    n = X.norm(dim=(0, 1))
    Xn = X / n * (beta * n + (1 - beta) * n.mean())
    R = min(rank, *X.shape[:2], sum(int(torch.linalg.matrix_rank(x)) for x in Xs))
    with tl.backend_context("pytorch"):
        (_, (U0, U1)), _ = partial_tucker(Xn, rank=[R, R], modes=[0, 1], n_iter_max=1000, tol=1e-6, init="svd")
    C = [U0.T @ x @ U1 for x in Xs]
    wt = torch.as_tensor(w, dtype=X.dtype)
    if how == "ties":
        M = dense_ties(C, w, density, sign)
    elif how == "sum":
        M = sum(a * c for a, c in zip(wt, C))
    else:  # sign_elect: elect sign(sum_t w_t C_t), sum the agreeing w_t C_t
        a = torch.stack([x * c for x, c in zip(wt, C)])
        M = (a * (torch.sign(a) == torch.sign(a.sum(0)))).sum(0)
    if isotropize:
        P, s, Qh = torch.linalg.svd(M)
        k = int((s > 1e-10 * s[0]).sum())
        M = s[:k].mean() * P[:, :k] @ Qh[:k]
    return U0 @ M @ U1.T


def _weighted(fs, w):
    return [wt * f.delta() for wt, f in zip(w, fs)]


# ---------------------------------------------------------------- the dense reference


@pytest.mark.parametrize(
    "ranks,out,inn,rank,kw",
    [
        ([3, 3, 3], 14, 11, 3, {}),  # R = r, CtM's defaults (beta 0.25, TIES top 25%)
        ([3, 3, 3], 14, 11, 6, {}),  # R = 2r
        ([3, 3, 3], 14, 11, 9, {}),  # R = sum r_t
        ([2, 3, 4], 14, 11, 4, {"beta": 1.0}),
        ([2, 3, 4], 14, 11, 4, {"beta": 0.0, "density": 0.5, "majority_sign_method": "frequency"}),
        ([2, 3, 4], 14, 11, 3, {"tucker_merge": "sum"}),
        ([2, 3, 4], 14, 11, 5, {"tucker_merge": "sign_elect"}),
        ([2, 3, 4], 14, 11, 4, {"isotropize": True, "density": 1.0}),
        ([6, 7], 5, 9, 8, {"density": 0.6}),  # sum r_t > out: R capped at out = 5
    ],
)
def test_equals_dense_partial_tucker(ranks, out, inn, rank, kw):
    fs, w = _factors(ranks, out=out, inn=inn, seed=4), [0.7, -0.3, 1.2][: len(ranks)]
    got = tucker(fs, w, rank=rank, **kw)
    assert got.scaling == 1.0 and got.rank == min(rank, out, inn, sum(ranks))
    ref = _dense_tucker([f.delta() for f in fs], w, rank, **{k.replace("tucker_merge", "how").replace(
        "majority_sign_method", "sign"): v for k, v in kw.items()})
    assert _rel(got.B @ got.A, ref) < 1e-8
    assert torch.allclose(got.B.norm(dim=0), got.A.norm(dim=1))  # balanced


def test_hooi_equals_tensorly_partial_tucker_on_a_batch():
    """The batched HOOI against tensorly's partial_tucker module by module: the same subspaces (projections F F^T;
    the signs are fixed by the caller), on cores of unequal difficulty (one converges late)."""
    g = torch.Generator().manual_seed(3)
    G = torch.randn(4, 3, 9, 7, generator=g, dtype=torch.float64)
    G[1] = G[1] * torch.tensor([1.0, 1e-3, 1.0], dtype=torch.float64)[:, None, None]
    F0, F1 = hooi(G, 3)
    for n in range(4):
        with tl.backend_context("pytorch"):
            (_, (R0, R1)), _ = partial_tucker(G[n].permute(1, 2, 0), rank=[3, 3], modes=[0, 1], n_iter_max=1000,
                                              tol=1e-6, init="svd")
        assert _rel(F0[n] @ F0[n].T, R0 @ R0.T) < 1e-8 and _rel(F1[n] @ F1[n].T, R1 @ R1.T) < 1e-8, n
        assert torch.allclose(F0[n].T @ F0[n], torch.eye(3, dtype=torch.float64), atol=1e-12)


def test_batch_equals_one_module_at_a_time():
    groups = [_factors([3, 2, 4], seed=s) for s in range(3)] + [_factors([2, 2], out=12, inn=9, seed=9)]
    weights = [[0.2, 0.5, 0.3], [1.0, -0.5, 0.4], [0.3, 0.3, 0.3], [0.6, 0.4]]
    batch = tucker.merge_batch(groups, weights, rank=3, where=[f"m{i}" for i in range(4)])
    for g, w, got in zip(groups, weights, batch):
        one = tucker(g, w, rank=3)
        assert _rel(got.B @ got.A, one.B @ one.A) < 1e-10


def test_full_rank_sum_is_the_weighted_sum_and_rank_r_is_not():
    fs, w = _factors([3, 3, 3], seed=1), [0.7, -0.3, 1.2]
    target = sum(_weighted(fs, w))
    full = tucker(fs, w, rank=9, tucker_merge="sum")  # the Tucker subspaces are the whole core space
    assert _rel(full.B @ full.A, target) < 1e-10
    low = tucker(fs, w, rank=3, tucker_merge="sum")  # the projection onto rank-3 subspaces loses part of it
    assert _rel(low.B @ low.A, target) > 1e-2
    ties = tucker(fs, w, rank=9)  # TIES on the coordinates is not task arithmetic
    assert _rel(ties.B @ ties.A, target) > 1e-2


def test_beta_balances_the_tasks():
    fs = _factors([3, 3, 3], seed=2)
    fs[2] = LoraFactors(fs[2].A, 0.05 * fs[2].B, fs[2].scaling)  # one weak task
    w = [1.0, 1.0, 1.0]
    raw, balanced = tucker(fs, w, rank=3, beta=1.0), tucker(fs, w, rank=3, beta=0.0)
    assert _rel(raw.B @ raw.A, balanced.B @ balanced.A) > 1e-2
    # equal norms keep more of the weak task: its share of the merged update, projected on its own directions
    weak = fs[2].delta()
    U, _, Vh = torch.linalg.svd(weak, full_matrices=False)
    P, Q = U[:, :3], Vh[:3].T

    def share(m):
        return float((P.T @ (m.B @ m.A) @ Q).norm())

    assert share(balanced) > share(raw)


def test_single_task_and_zero_and_duplicates():
    fs = _factors([3, 2])
    one = tucker([fs[0]], [-0.5], rank=3, tucker_merge="sum")
    assert _rel(one.B @ one.A, -0.5 * fs[0].delta()) < 1e-10
    zero = tucker([LoraFactors(f.A * 0, f.B, 1.0) for f in fs], [1.0, 1.0], rank=2)
    assert zero.rank == 1 and float((zero.B @ zero.A).abs().max()) == 0.0
    # a zero task keeps the others' norms (no NaN from its zero slice norm)
    part = tucker([fs[0], LoraFactors(fs[1].A * 0, fs[1].B, 1.0)], [1.0, 1.0], rank=3, tucker_merge="sum")
    assert torch.isfinite(part.A).all() and _rel(part.B @ part.A, fs[0].delta()) < 1e-10
    cancel = tucker([fs[0], fs[0]], [1.0, -1.0], rank=3, tucker_merge="sum")
    assert float((cancel.B @ cancel.A).norm()) < 1e-10 * float(fs[0].delta().norm())


@pytest.mark.parametrize("how", ["ties", "sum", "sign_elect"])
def test_linear_order_and_dtype(how):
    fs, w = _factors([2, 3, 4], seed=7), torch.tensor([0.7, -0.3, 1.2], dtype=torch.float64)
    base = tucker(fs, w, rank=4, tucker_merge=how)
    for lam in (0.3, -2.0):
        got = tucker(fs, lam * w, rank=4, tucker_merge=how)
        assert _rel(got.B @ got.A, lam * (base.B @ base.A)) < 1e-10, lam
    perm = [2, 0, 1]
    got = tucker([fs[i] for i in perm], w[perm], rank=4, tucker_merge=how)
    assert _rel(got.B @ got.A, base.B @ base.A) < 1e-6
    got32 = tucker([LoraFactors(f.A.float(), f.B.float(), f.scaling) for f in fs], w, rank=4, tucker_merge=how)
    assert got32.A.dtype == torch.float32
    assert _rel((got32.B @ got32.A).double(), base.B @ base.A) < 1e-4


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"beta": 1.5}, "beta must be a number in \\[0, 1\\]"),
        ({"beta": True}, "beta must be a number"),
        ({"density": 0.0}, "density must be a number in \\(0, 1\\]"),
        ({"tucker_merge": "mean"}, "tucker_merge='mean' is not supported"),
        ({"majority_sign_method": "median"}, "majority_sign_method='median' is not supported"),
        ({"tucker_n_iter_max": 0}, "tucker_n_iter_max must be a positive integer"),
        ({"tucker_tol": -1.0}, "tucker_tol must be a non-negative number"),
        ({"rank": 0}, "`svd_rank` must be a positive integer"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(MergeInputError, match=match):
        tucker(_factors([2, 2]), [0.5, 0.5], **kwargs)


def test_registry_entry():
    assert tucker.peft_combination_type and tucker.rank_option == "svd_rank" and "ICML 2026" in tucker.reference
    assert tucker.options["beta"] == 0.25 and tucker.options["density"] == 0.25
    assert tucker.options["tucker_merge"] == "ties"
    with pytest.raises(UnknownMergeOptionError, match="Valid options: beta, density"):
        tucker(_factors([2, 2]), [0.5, 0.5], topK=25)


# ---------------------------------------------------------------- front ends

ADAPTERS = {
    "x": {"r": 2, "lora_alpha": 4},
    "y": {"r": 3, "lora_alpha": 3, "rank_pattern": {"lin0": 4}, "alpha_pattern": {"conv2": 8}},
    "z": {"r": 2, "lora_alpha": 2, "use_rslora": True},
}
W = [0.5, -0.3, 0.9]


@pytest.mark.parametrize("kwargs", [{"svd_rank": 3}, {"svd_rank": 2, "tucker_merge": "sum", "beta": 1.0}])
def test_peft_route(kwargs):
    """add_weighted_adapter(combination_type="tucker") equals the dense reference on PEFT's own per-adapter deltas
    (ranks, rank/alpha patterns, rsLoRA, Embedding, Conv and Conv1D layers)."""
    model = make_peft_model(ADAPTERS)
    names = list(ADAPTERS)
    model.add_weighted_adapter(names, W, "m", combination_type="tucker", **kwargs)
    R = kwargs["svd_rank"]
    cfg = model.peft_config["m"]
    assert (cfg.r, cfg.lora_alpha, cfg.use_rslora) == (R, R, False)
    options = {k: v for k, v in kwargs.items() if k != "svd_rank"}
    for key, layer in _layers(model).items():
        assert layer.scaling["m"] == 1.0 and get_lora_factors(layer, "m").rank == R
        got = delta_matrix(layer, "m")
        ref = tucker([get_lora_factors(layer, n) for n in names], W, rank=R, **options)
        assert _rel(got, ref.B @ ref.A) < 1e-10, key
        Xs = [delta_matrix(layer, n) for n in names]
        dense = _dense_tucker(Xs, W, R, **{k.replace("tucker_merge", "how"): v for k, v in options.items()})
        assert _rel(got, dense) < 1e-8, key
