"""The CP variants for the rank-constrained regime (``orth_iso``, ``keep``, ``cts``, ``cp_beta``) against dense
tensorly CP of the full T x out x in tensor and the formulas of cp.py's module docstring; the PEFT route."""

import pytest
import tensorly as tl
import torch
from _models import capped_svd, delta_matrix, make_peft_model
from _models import lora_layers as _layers
from _models import random_factors as _factors
from _models import rel_err as _rel
from tensorly.decomposition import parafac

from peft_cp_merge import LoraFactors, MergeInputError, get_merge_method
from peft_cp_merge.integrations.peft import get_lora_factors
from peft_cp_merge.methods.iso import iso_cts_budget

cp = get_merge_method("cp")


# ---------------------------------------------------------------- dense references


def _dense_cp(X, rank):
    """``(lam, c, U, V)`` of dense tensorly parafac (svd init, as cp): magnitudes, unit loadings, unit factors."""
    with tl.backend_context("pytorch"):
        res = parafac(X, rank, init="svd", svd=capped_svd, n_iter_max=100, tol=1e-8, random_state=0)
    C, U, V = res.factors
    C = C * res.weights
    lam = C.norm(dim=0) * U.norm(dim=0) * V.norm(dim=0)
    return lam, C / C.norm(dim=0), U / U.norm(dim=0), V / V.norm(dim=0)


def _polar(M):
    P, _, Qh = torch.linalg.svd(M, full_matrices=False)
    return P @ Qh


def _flat(g):
    keep = g.abs() > 1e-10 * g.abs().max()
    return torch.where(keep, torch.sign(g) * g.abs()[keep].mean(), torch.zeros_like(g))


def _orth_iso(U, V, Y):
    """Polar factors of the unit CP factors, magnitudes refit to the weighted sum Y, flat spectrum."""
    Up, Vp = _polar(U), _polar(V)
    return Up @ torch.diag(_flat(torch.diag(Up.T @ Y @ Vp))) @ Vp.T


def _stack(fs):
    return torch.stack([f.delta() for f in fs])


def _dense_keep(fs, w, rank, fit_rank, how):
    X, Y = _stack(fs), sum(wt * f.delta() for wt, f in zip(w, fs))
    lam, c, U, V = _dense_cp(X, fit_rank)
    a = w[:, None] * c * lam  # (T, K): w_t lambda_r c_tr
    if how in ("energy", "agreement", "shared"):
        score = a.sum(0).abs()
        if how == "agreement":  # energy times sign agreement |sum_t a| / sum_t |a|
            score = score * score / a.abs().sum(0)
        elif how == "shared":  # energy times the normalised participation number (sum_t |c_t|)^2 / T
            score = score * c.abs().sum(0) ** 2 / len(fs)
        keep = torch.argsort(score, descending=True)[:rank].tolist()
    else:  # cover: tasks by |w_t| |X_t| in turn, each its strongest remaining component
        order = torch.argsort(w.abs() * X.flatten(1).norm(dim=1), descending=True).tolist()
        keep = []
        for j in range(rank):
            t = order[j % len(fs)]
            keep.append(max((k for k in range(fit_rank) if k not in keep), key=lambda k: float(a[t, k].abs())))
    return _orth_iso(U[:, keep], V[:, keep], Y)


def _dense_cts(fs, w, rank, fraction):
    X = _stack(fs)
    N = min(rank, sum(f.rank for f in fs), *fs[0].shape)
    k_c, n = iso_cts_budget(N, len(fs), fraction)
    us, vs, ss = [], [], []
    if k_c:
        lam, c, U, V = _dense_cp(X, k_c)
        g = lam * (w[:, None] * c).sum(0)
        us.append(U)
        vs.append(V * torch.sign(g))
        ss.append(g.abs())
    Q = torch.linalg.qr(us[0])[0] if us else torch.zeros(X.shape[1], 0, dtype=X.dtype)
    for f, wt in zip(fs, w):
        Yt = wt * f.delta()
        u, s, vh = torch.linalg.svd(Yt - Q @ Q.T @ Yt, full_matrices=False)
        m = min(n, int((s > 1e-10 * torch.linalg.matrix_norm(Yt, ord=2)).sum()))
        us.append(u[:, :m])
        vs.append(vh[:m].T)
        ss.append(s[:m])
    return torch.cat(ss).mean() * _polar(torch.cat(us, 1)) @ _polar(torch.cat(vs, 1)).T


def _dense_beta(fs, w, rank, beta):
    """cp_beta with the weighted variant: CP of c_t X_t, merged with w_t / c_t."""
    X = _stack(fs)
    n = X.flatten(1).norm(dim=1)
    cfac = (beta * n + (1 - beta) * n.mean()) / n
    lam, c, U, V = _dense_cp(X * cfac[:, None, None], rank)
    return U @ torch.diag(lam * ((w / cfac)[:, None] * c).sum(0)) @ V.T


W3 = torch.tensor([0.7, 0.3, -0.4], dtype=torch.float64)


# ---------------------------------------------------------------- each variant against its dense formula


@pytest.mark.parametrize("rank", [2, 4, 8])
def test_orth_iso_equals_dense(rank):
    fs = _factors([2, 3, 3], seed=1)
    got = cp(fs, W3, rank=rank, cp_variant="orth_iso")
    _, _, U, V = _dense_cp(_stack(fs), rank)
    assert _rel(got.B @ got.A, _orth_iso(U, V, sum(wt * f.delta() for wt, f in zip(W3, fs)))) < 1e-8
    S = torch.linalg.svdvals(got.B @ got.A)[:rank]
    assert float(S.max() - S.min()) < 1e-8 * float(S.max())  # isotropic


@pytest.mark.parametrize("how", ["energy", "cover", "agreement", "shared"])
@pytest.mark.parametrize("rank,fit_rank", [(2, 5), (3, 0), (4, 6)])
def test_keep_equals_dense(how, rank, fit_rank):
    fs = _factors([2, 3, 3], seed=1)
    got = cp(fs, W3, rank=rank, cp_variant="keep", cp_fit_rank=fit_rank, cp_keep=how)
    ref = _dense_keep(fs, W3, rank, fit_rank or 8, how)
    assert got.rank == rank and _rel(got.B @ got.A, ref) < 1e-8


def test_keep_at_its_own_rank_is_orth_iso_and_the_choice_matters():
    fs = _factors([2, 3, 3], seed=1)
    a = cp(fs, W3, rank=3, cp_variant="keep", cp_fit_rank=3)
    b = cp(fs, W3, rank=3, cp_variant="orth_iso")
    assert _rel(a.B @ a.A, b.B @ b.A) < 1e-12
    energy = cp(fs, W3, rank=3, cp_variant="keep", cp_fit_rank=8)
    assert _rel(energy.B @ energy.A, b.B @ b.A) > 1e-2
    # with one weak task, energy keeps only the strong tasks' components and cover gives the weak one its own
    fs[1] = LoraFactors(fs[1].A, 0.2 * fs[1].B, fs[1].scaling)
    energy = cp(fs, W3, rank=3, cp_variant="keep", cp_fit_rank=8)
    cover = cp(fs, W3, rank=3, cp_variant="keep", cp_fit_rank=8, cp_keep="cover")
    U, _, Vh = torch.linalg.svd(fs[1].delta(), full_matrices=False)

    def weak_share(m):
        return float((U[:, :3].T @ (m.B @ m.A) @ Vh[:3].T).norm() / (m.B @ m.A).norm())

    assert weak_share(cover) > 1.5 * weak_share(energy)


def test_keep_criteria_on_planted_components():
    """Three orthogonal rank-1 components, an exact CP of rank 3: P in every task with loadings (3, 3, -2.5), Q only
    in task 0 (3), S only in task 1 (4); weights 1/3. Energies |sum_t a|: S 4/3, P 7/6, Q 1; agreement scores
    (energy * |sum a| / sum |a|): S 4/3, Q 1, P 0.48; shared scores (energy * (sum |c|)^2 / T): P 1.16, S 0.44,
    Q 0.33. So at R = 1 energy keeps S and shared keeps P; at R = 2 energy keeps {S, P} and agreement {S, Q}."""
    g = torch.Generator().manual_seed(0)
    Uo = torch.linalg.qr(torch.randn(14, 3, generator=g, dtype=torch.float64))[0]
    Vo = torch.linalg.qr(torch.randn(11, 3, generator=g, dtype=torch.float64))[0]
    P, Q, S = ((Uo[:, i : i + 1], Vo[:, i : i + 1]) for i in range(3))

    def task(*parts):
        return LoraFactors(torch.cat([c * v.T for c, (_, v) in parts]), torch.cat([u for _, (u, _) in parts], 1), 1.0)

    fs = [task((3.0, P), (3.0, Q)), task((3.0, P), (4.0, S)), task((-2.5, P))]
    w = [1 / 3] * 3

    def kept(rank, how):  # which planted components span the merged update
        m = cp(fs, w, rank=rank, cp_variant="keep", cp_fit_rank=3, cp_keep=how, cp_n_iter_max=500)
        D = m.B @ m.A
        return {name for name, (u, v) in zip("PQS", (P, Q, S)) if float((u.T @ D @ v).abs()) > 1e-6 * float(D.norm())}

    assert kept(1, "energy") == {"S"} and kept(1, "shared") == {"P"} and kept(1, "agreement") == {"S"}
    assert kept(2, "energy") == {"S", "P"} and kept(2, "agreement") == {"S", "Q"} and kept(2, "shared") == {"P", "S"}
    assert kept(1, "cover") == {"S"}  # cover: task 1 (the largest |w_t| |X_t|) takes its strongest, S


@pytest.mark.parametrize(
    "ranks,rank,fraction", [([2, 3, 3], 4, 0.8), ([3, 3, 3], 9, 0.5), ([3, 3, 3], 6, 0.8), ([2, 3, 3], 8, 0.0),
                            ([4, 4], 3, 0.8), ([3, 3, 3], 3, 0.8)],
)
def test_cts_equals_dense(ranks, rank, fraction):
    fs, w = _factors(ranks, seed=3), W3[: len(ranks)]
    got = cp(fs, w, rank=rank, cp_variant="cts", cp_common_fraction=fraction)
    assert got.rank <= min(rank, sum(ranks))
    assert _rel(got.B @ got.A, _dense_cts(fs, w, rank, fraction)) < 1e-8
    S = torch.linalg.svdvals(got.B @ got.A)[: got.rank]
    assert float(S.max() - S.min()) < 1e-8 * float(S.max())  # isotropic


def test_cts_is_not_iso_cts_nor_orth_iso():
    fs = _factors([3, 3, 3], seed=3)
    got = cp(fs, W3, rank=6, cp_variant="cts")
    iso = get_merge_method("iso_cts")(fs, W3, rank=6)
    orth = cp(fs, W3, rank=6, cp_variant="orth_iso")
    assert _rel(got.B @ got.A, iso.B @ iso.A) > 1e-2 and _rel(got.B @ got.A, orth.B @ orth.A) > 1e-2


@pytest.mark.parametrize("beta", [0.0, 0.25, 0.7])
def test_cp_beta_equals_dense(beta):
    fs = _factors([2, 3, 3], seed=5)
    fs[2] = LoraFactors(fs[2].A, 0.1 * fs[2].B, fs[2].scaling)  # one weak task: the balancing matters
    got = cp(fs, W3, rank=4, cp_beta=beta)
    assert _rel(got.B @ got.A, _dense_beta(fs, W3, 4, beta)) < 1e-8
    assert _rel(got.B @ got.A, cp(fs, W3, rank=4).B @ cp(fs, W3, rank=4).A) > 1e-3


def test_cp_beta_zero_is_balanced_and_combines_with_variants():
    fs = _factors([2, 3, 3], seed=5)
    a, b = cp(fs, W3, rank=4, cp_beta=0.0), cp(fs, W3, rank=4, cp_variant="balanced")
    assert _rel(a.B @ a.A, b.B @ b.A) < 1e-8
    # with orth_iso: the fit on balanced slices, the refit to the raw weighted sum
    X = _stack(fs)
    n = X.flatten(1).norm(dim=1)
    _, _, U, V = _dense_cp(X * (n.mean() / n)[:, None, None], 4)
    got = cp(fs, W3, rank=4, cp_beta=0.0, cp_variant="orth_iso")
    assert _rel(got.B @ got.A, _orth_iso(U, V, sum(wt * f.delta() for wt, f in zip(W3, fs)))) < 1e-8


# ---------------------------------------------------------------- shared properties


VARIANTS = [{"cp_variant": "orth_iso"}, {"cp_variant": "keep"}, {"cp_variant": "keep", "cp_keep": "cover"},
            {"cp_variant": "cts"}, {"cp_beta": 0.25}, {"cp_beta": 0.25, "cp_variant": "orth"}]


@pytest.mark.parametrize("kw", VARIANTS)
def test_valid_at_r_2r_and_sum_r(kw):
    fs, w = _factors([3, 3, 3], seed=6), W3
    for R in (3, 6, 9):
        got = cp(fs, w, rank=R, **kw)
        assert got.rank <= R and torch.isfinite(got.B @ got.A).all() and float((got.B @ got.A).norm()) > 0, R


@pytest.mark.parametrize("kw", VARIANTS)
def test_linear_in_a_common_weight_scale_and_dtype(kw):
    fs = _factors([2, 3, 3], seed=7)
    base = cp(fs, W3, rank=4, **kw)
    for lam in (0.3, -2.0):
        got = cp(fs, lam * W3, rank=4, **kw)
        assert _rel(got.B @ got.A, lam * (base.B @ base.A)) < 1e-8, lam
    got32 = cp([LoraFactors(f.A.float(), f.B.float(), f.scaling) for f in fs], W3, rank=4, **kw)
    assert got32.A.dtype == torch.float32 and _rel((got32.B @ got32.A).double(), base.B @ base.A) < 1e-3


def test_batch_equals_one_module_at_a_time():
    groups = [_factors([3, 2, 4], seed=s) for s in range(3)]
    weights = [[0.2, 0.5, 0.3], [1.0, -0.5, 0.4], [0.3, 0.3, 0.3]]
    for kw in VARIANTS:
        batch = cp.merge_batch(groups, weights, rank=4, **kw)
        for g, w, got in zip(groups, weights, batch):
            one = cp(g, w, rank=4, **kw)
            assert _rel(got.B @ got.A, one.B @ one.A) < 1e-10, kw


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cp_beta": 1.5}, "cp_beta must be a number in \\[0, 1\\]"),
        ({"cp_common_fraction": -0.1}, "cp_common_fraction must be a number in \\[0, 1\\]"),
        ({"cp_fit_rank": -1}, "cp_fit_rank must be a non-negative integer"),
        ({"cp_keep": "loading"}, "cp_keep='loading' is not supported"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(MergeInputError, match=match):
        cp(_factors([2, 2]), [0.5, 0.5], **kwargs)


# ---------------------------------------------------------------- through PEFT's add_weighted_adapter

ADAPTERS = {
    "x": {"r": 2, "lora_alpha": 4},
    "y": {"r": 3, "lora_alpha": 3, "rank_pattern": {"lin0": 4}, "alpha_pattern": {"conv2": 8}},
    "z": {"r": 2, "lora_alpha": 2, "use_rslora": True},
}
W = [0.5, -0.3, 0.9]


@pytest.mark.parametrize("kw", [{"cp_variant": "orth_iso"}, {"cp_variant": "keep", "cp_keep": "cover"},
                                {"cp_variant": "cts"}, {"cp_beta": 0.25}])
def test_peft_route(kw):
    model = make_peft_model(ADAPTERS)
    names, R = list(ADAPTERS), 3
    model.add_weighted_adapter(names, W, "m", combination_type="cp", cp_rank=R, **kw)
    assert model.peft_config["m"].r == R
    w = torch.tensor(W, dtype=torch.float64)
    for key, layer in _layers(model).items():
        assert layer.scaling["m"] == 1.0
        fs = [get_lora_factors(layer, n) for n in names]
        ref = cp(fs, W, rank=R, **kw)
        got = delta_matrix(layer, "m")
        assert _rel(got, ref.B @ ref.A) < 1e-10, key
        if kw == {"cp_variant": "orth_iso"}:  # and the dense formula on PEFT's own per-adapter deltas
            X = torch.stack([delta_matrix(layer, n) for n in names])
            _, _, U, V = _dense_cp(X, R)
            assert _rel(got, _orth_iso(U, V, torch.einsum("t,toi->oi", w, X))) < 1e-8, key
