"""The CP method on raw factors, against dense tensorly CP and hand-checkable identities."""

from pathlib import Path

import pytest
import tensorly as tl
import torch
from _models import capped_svd
from tensorly.decomposition import parafac

from peft_cp_merge import LoraFactors, MergeInputError, UnknownMergeOptionError, get_merge_method
from peft_cp_merge.methods.cp import compressed_core

cp = get_merge_method("cp")


def _factors(ranks, out=30, inn=22, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        LoraFactors(torch.randn(r, inn, generator=g, dtype=dtype), torch.randn(out, r, generator=g, dtype=dtype),
                    0.5 + t)
        for t, r in enumerate(ranks)
    ]


def _dense_cp_merge(factors, weights, rank, **kw):
    X = torch.stack([f.delta() for f in factors])
    with tl.backend_context("pytorch"):
        res = parafac(X, rank, init="svd", svd=capped_svd, n_iter_max=100, tol=1e-8, **kw)
    return torch.einsum("r,tr,or,ir,t->oi", res.weights, *res.factors, torch.as_tensor(weights, dtype=X.dtype))


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_compressed_core_is_exact():
    fs = _factors([2, 3, 4])
    G, QB, QA = compressed_core(fs)
    X = torch.stack([f.delta() for f in fs])
    assert _rel(torch.einsum("tab,oa,ib->toi", G, QB, QA), X) < 1e-12
    assert G.shape == (3, 9, 9)


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_equals_dense_tensorly_parafac(rank):
    fs, w = _factors([3, 4, 5, 2]), [0.3, 0.2, 0.4, 0.1]
    got = cp(fs, w, rank=rank)
    assert got.scaling == 1.0 and got.A.shape == (rank, 22) and got.B.shape == (30, rank)
    assert _rel(got.B @ got.A, _dense_cp_merge(fs, w, rank)) < 1e-10  # the same iterates: float64 round-off only


@pytest.mark.parametrize("init", ["svd", "tasks"])
def test_full_rank_reproduces_weighted_sum(init):
    fs, w = _factors([3, 4, 5]), torch.tensor([0.5, -0.25, 1.5], dtype=torch.float64)
    target = sum(wt * f.delta() for wt, f in zip(w, fs))
    got = cp(fs, w, rank=12, cp_init=init, cp_n_iter_max=3000, cp_tol=0.0)
    assert _rel(got.B @ got.A, target) < 1e-4


def test_opposite_weights_cancel_and_order_does_not_matter():
    fs = _factors([3, 4, 2])
    zero = cp([fs[0], fs[0]], [1.0, -1.0], rank=3)
    assert float((zero.B @ zero.A).norm()) < 1e-8 * float(fs[0].delta().norm())
    w = [0.2, 0.5, 0.3]
    a = cp(fs, w, rank=5)
    perm = [2, 0, 1]
    b = cp([fs[i] for i in perm], [w[i] for i in perm], rank=5)
    assert _rel(b.B @ b.A, a.B @ a.A) < 1e-6


def test_float32_matches_float64_and_dtype_is_kept():
    fs = _factors([3, 4])
    w = [0.5, 0.5]
    f64 = cp(fs, w, rank=4)
    fs32 = [LoraFactors(f.A.float(), f.B.float(), f.scaling) for f in fs]
    f32 = cp(fs32, w, rank=4)
    assert f32.A.dtype == torch.float32
    assert _rel((f32.B @ f32.A).double(), f64.B @ f64.A) < 1e-4
    bf = cp([LoraFactors(f.A.bfloat16(), f.B.bfloat16(), f.scaling) for f in fs], w, rank=4)
    assert bf.A.dtype == torch.bfloat16 and torch.isfinite(bf.A.float()).all()


def test_random_init_is_seeded():
    fs, w = _factors([3, 3]), [0.5, 0.5]
    a = cp(fs, w, rank=3, cp_init="random", cp_random_state=7)
    b = cp(fs, w, rank=3, cp_init="random", cp_random_state=7)
    c = cp(fs, w, rank=3, cp_init="random", cp_random_state=8)
    assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)
    assert not torch.equal(a.A, c.A)


def _dense_variant(fs, w, rank, variant, density=1.0, threshold=0.5):
    """The variants' formulas (cp.py's module docstring) on dense tensorly CP of the full T x out x in tensor."""
    unscaled = variant == "authors"
    X = torch.stack([(f.B @ f.A) if unscaled else f.delta() for f in fs])
    norms = X.flatten(1).norm(dim=1)
    if variant == "balanced":
        X = X / norms[:, None, None]
        w = w * norms
    with tl.backend_context("pytorch"):
        res = parafac(X, rank, init="svd", svd=capped_svd, n_iter_max=100, tol=1e-8, random_state=0)
    C, U, V = res.factors
    if variant == "authors_v1":  # task factor dropped, unnormalised factors (keeps tensorly's svd_flip signs)
        return U @ torch.diag(res.weights) @ V.T
    lam = res.weights * C.norm(dim=0) * U.norm(dim=0) * V.norm(dim=0)
    c, Un, Vn = C / C.norm(dim=0), U / U.norm(dim=0), V / V.norm(dim=0)
    a = w[:, None] * c
    T = len(fs)
    if variant == "orth":
        def polar(M):
            P, _, Qh = torch.linalg.svd(M, full_matrices=False)
            return P @ Qh
        Up, Vp = polar(Un), polar(Vn)
        total = sum(wt * f.delta() for wt, f in zip(w, fs))
        return Up @ torch.diag(torch.diag(Up.T @ total @ Vp)) @ Vp.T
    coef = a.sum(0)
    if variant == "sign_elect":
        coef = (a * (torch.sign(a) == torch.sign(a.sum(0)))).sum(0)
    elif variant == "ties":
        k = max(1, int(density * rank))
        contrib = (c * lam).abs()
        pruned = torch.zeros_like(c)
        for t in range(T):
            top = torch.argsort(contrib[t], descending=True)[:k]
            pruned[t, top] = c[t, top]
        sign = torch.sign(pruned.sum(0))
        sign[sign == 0] = 1
        agree = (torch.sign(pruned) == sign) & (pruned != 0)
        coef = (w[:, None] * pruned * agree).sum(0) / agree.sum(0).clamp_min(1)
    elif variant == "split":
        for r in range(rank):
            t = int(torch.argmax(c[:, r] ** 2))
            if c[t, r] ** 2 >= threshold:
                coef[r] = w.sum() * c[t, r]
    elif variant == "spread":
        coef = coef * T / c.abs().sum(0) ** 2
    g = lam * coef
    if variant == "isotropic":
        g = torch.sign(g) * g.abs().mean()
    return Un @ torch.diag(g) @ Vn.T


@pytest.mark.parametrize(
    "variant",
    ["weighted", "authors", "authors_v1", "sign_elect", "ties", "balanced", "isotropic", "split", "spread", "orth"],
)
def test_variants_equal_their_dense_formula(variant):
    fs, w = _factors([2, 3, 3]), torch.tensor([0.7, 0.3, -0.4], dtype=torch.float64)
    kw = {"cp_density": 0.5} if variant == "ties" else {}
    got = cp(fs, w, rank=4, cp_variant=variant, **kw)
    ref = _dense_variant(fs, w, 4, variant, density=0.5)
    assert _rel(got.B @ got.A, ref) < 1e-8
    if variant not in ("authors", "authors_v1"):  # every other variant is linear in a common scale of the weights
        scaled = cp(fs, 2.5 * w, rank=4, cp_variant=variant, **kw)
        assert _rel(scaled.B @ scaled.A, 2.5 * ref) < 1e-8


def test_variants_really_differ():
    """Each variant changes the merge on adapters of unequal strength (the formulas are not vacuous here)."""
    fs = _factors([2, 3, 3])
    fs[2] = LoraFactors(fs[2].A, 0.1 * fs[2].B, fs[2].scaling)  # one weak task
    w = torch.tensor([0.7, 0.3, -0.4], dtype=torch.float64)
    base = cp(fs, w, rank=4)
    for variant in ["sign_elect", "ties", "balanced", "isotropic", "split", "spread", "orth", "authors"]:
        kw = {"cp_density": 0.5} if variant == "ties" else {}
        got = cp(fs, w, rank=4, cp_variant=variant, **kw)
        assert _rel(got.B @ got.A, base.B @ base.A) > 1e-3, variant


def test_authors_is_weighted_on_unscaled_updates():
    fs, w = _factors([2, 3]), [1.0, 1.0]
    unscaled = [LoraFactors(f.A, f.B, 1.0) for f in fs]
    a, b = cp(fs, w, rank=3, cp_variant="authors"), cp(unscaled, w, rank=3)
    assert _rel(a.B @ a.A, b.B @ b.A) < 1e-12


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cp_variant": "mean"}, "cp_variant='mean' is not supported"),
        ({"cp_init": "eye"}, "cp_init='eye' is not supported"),
        ({"cp_n_iter_max": 0}, "cp_n_iter_max must be a positive integer"),
        ({"cp_density": 0.0}, "cp_density must be a number in"),
        ({"cp_split_threshold": "high"}, "cp_split_threshold must be a number in"),
        ({"rank": 0}, "`cp_rank` must be a positive integer"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(MergeInputError, match=match):
        cp(_factors([2, 2]), [0.5, 0.5], **kwargs)


def test_unknown_option_lists_valid_ones():
    with pytest.raises(UnknownMergeOptionError, match=r"Unknown option\(s\) \['cp_seed'\].*cp_random_state"):
        cp(_factors([2, 2]), [0.5, 0.5], cp_seed=1)


def test_shape_and_finiteness_checks():
    a, b = _factors([2, 2])
    bad = LoraFactors(torch.randn(2, 21, dtype=torch.float64), b.B, 1.0)
    with pytest.raises(MergeInputError, match="incompatible shapes"):
        cp([a, bad], [0.5, 0.5])
    nan = LoraFactors(a.A.clone(), a.B.clone(), 1.0)
    nan.B[0, 0] = float("nan")
    with pytest.raises(MergeInputError, match="non-finite"):
        cp([a, nan], [0.5, 0.5])
    with pytest.raises(MergeInputError, match="Got 3 weights for 2 adapters"):
        cp([a, b], [0.3, 0.3, 0.4])
    with pytest.raises(MergeInputError, match="finite"):
        cp([a, b], [0.3, float("inf")])


def test_random_init_equals_tensorly_on_the_core():
    fs, w = _factors([3, 2, 4]), torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    G, QB, QA = compressed_core(fs)
    with tl.backend_context("pytorch"):
        res = parafac(G, 4, init="random", random_state=7, n_iter_max=100, tol=1e-8)
    C, U, V = res.factors
    ref = (QB @ U) @ torch.diag(res.weights * (C.T @ w)) @ (QA @ V).T
    got = cp(fs, w, rank=4, cp_init="random", cp_random_state=7)
    assert _rel(got.B @ got.A, ref) < 1e-6


def test_batch_equals_one_module_at_a_time():
    groups = [_factors([3, 2, 4], seed=s) for s in range(4)] + [_factors([2, 2], out=12, inn=9, seed=9)]
    weights = [[0.2, 0.5, 0.3]] * 4 + [[0.6, 0.4]]
    batch = cp.merge_batch(groups, weights, rank=4, where=[f"m{i}" for i in range(5)])
    for g, w, got in zip(groups, weights, batch):
        one = cp(g, w, rank=4)
        assert _rel(got.B @ got.A, one.B @ one.A) < 1e-10


def test_zero_and_duplicate_adapters():
    a, b = _factors([3, 2])
    fresh = LoraFactors(a.A, torch.zeros_like(a.B), a.scaling)  # a LoRA as initialised: B = 0
    out = cp([fresh, fresh], [0.5, 0.5], rank=3)
    assert torch.count_nonzero(out.B @ out.A) == 0
    dup = cp([a, a, b], [0.25, 0.25, 0.5], rank=8)  # dependent columns in the stacked factors
    ref = 0.5 * a.delta() + 0.5 * b.delta()
    assert _rel(dup.B @ dup.A, ref) < 1e-6


def test_thread_policy_small_work_single_threaded_gram_threaded(monkeypatch):
    """On contended cores (forced here: PEFT_CP_MERGE_THREADS=single) cp runs its (T r)-sized ALS on one thread
    (thread waits dominate on shared cores, issue 24), the Gram products on the caller's threads; the caller's count
    is restored, and the merge equals the one-thread merge."""
    from peft_cp_merge.methods import cp as cp_module
    from peft_cp_merge.methods._linalg import single_threaded, threaded

    monkeypatch.setenv("PEFT_CP_MERGE_THREADS", "single")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with single_threaded():
            assert torch.get_num_threads() == 1
            with threaded():
                assert torch.get_num_threads() == 2
            with single_threaded():  # nested scopes still restore the outermost caller's count
                with threaded():
                    assert torch.get_num_threads() == 2
                assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with threaded():  # outside any scope: nothing changes
            assert torch.get_num_threads() == 2

        seen = {}
        als, gram = cp_module.cp_als, torch.Tensor.__matmul__

        def spy_als(*a, **k):
            seen["als"] = torch.get_num_threads()
            return als(*a, **k)

        def spy_matmul(x, y):
            if x.ndim == 3 and y.ndim == 3 and x.shape[-1] == 22 and y.shape[-2] == 22:  # Bs As-side Gram (in=22)
                seen["gram"] = torch.get_num_threads()
            return gram(x, y)

        monkeypatch.setattr(cp_module, "cp_als", spy_als)
        monkeypatch.setattr(torch.Tensor, "__matmul__", spy_matmul)
        fs = _factors([2, 3, 4])
        merged = cp(fs, [0.5, 0.3, 0.2], rank=3)
        assert seen == {"als": 1, "gram": 2}
        assert torch.get_num_threads() == 2
        monkeypatch.setattr(torch.Tensor, "__matmul__", gram)
        monkeypatch.setattr(cp_module, "cp_als", als)
        torch.set_num_threads(1)
        ref = cp(fs, [0.5, 0.3, 0.2], rank=3)
        assert _rel(merged.B @ merged.A, ref.B @ ref.A) < 1e-12
    finally:
        torch.set_num_threads(before)


def test_thread_policy_follows_the_machine_and_the_environment(monkeypatch):
    """auto: one thread for small work only while other processes use the cores (decided once, by the outermost
    scope); caller: never fewer threads; a bad value is refused with the valid ones."""
    from peft_cp_merge.methods import _linalg
    from peft_cp_merge.methods._linalg import single_threaded, threaded

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for contended, inside in ((True, 1), (False, 2)):
            monkeypatch.setattr(_linalg, "cores_contended", lambda n, c=contended: c)
            with single_threaded():
                assert torch.get_num_threads() == inside
                monkeypatch.setattr(_linalg, "cores_contended", lambda n, c=contended: not c)
                with single_threaded():  # nested: the outermost decision holds
                    assert torch.get_num_threads() == inside
                with threaded():
                    assert torch.get_num_threads() == 2
            assert torch.get_num_threads() == 2
        monkeypatch.setattr(_linalg, "cores_contended", lambda n: True)
        monkeypatch.setenv("PEFT_CP_MERGE_THREADS", "caller")
        with single_threaded():
            assert torch.get_num_threads() == 2
        monkeypatch.setenv("PEFT_CP_MERGE_THREADS", "fast")
        with pytest.raises(ValueError, match="PEFT_CP_MERGE_THREADS='fast'.*auto, single, caller"):
            with single_threaded():
                pass
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not Path("/proc/loadavg").exists(), reason="reads Linux /proc")
def test_other_processes_on_the_cores_are_seen():
    """A CPU-bound process next to us counts as another running thread (Linux /proc); our own threads do not."""
    import subprocess
    import sys
    import time

    from peft_cp_merge.methods._linalg import _others_running

    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        assert max(_others_running() for _ in range(20)) >= 1
    finally:
        busy.kill()
        busy.wait()


def test_large_gram_and_top_eigenpairs_match_the_dense_routines():
    """The paths taken from T r >= 512 on (issue 24's library scale): the block-triangular Gram product equals
    M M^T, and the Lanczos top eigenpairs equal torch's full eigh to float64 round-off (vectors up to sign)."""
    from peft_cp_merge.methods._linalg import gram, top_eigh

    g = torch.Generator().manual_seed(0)
    M = torch.randn(2, 600, 900, generator=g, dtype=torch.float64)
    W = gram(M)
    assert _rel(W, M @ M.mT) < 1e-14
    evals, vecs = top_eigh(W, 5)
    ref_vals, ref_vecs = torch.linalg.eigh(W)
    ref_vals, ref_vecs = ref_vals.flip(-1)[:, :5], ref_vecs.flip(-1)[..., :5]
    assert float((evals - ref_vals).abs().max() / ref_vals.abs().max()) < 1e-12
    assert float(((vecs * ref_vecs).sum(1).abs() - 1).abs().max()) < 1e-8
    assert float((W @ vecs - vecs * evals[:, None, :]).norm() / W.norm()) < 1e-12


def test_cp_at_large_stacked_rank_equals_dense_tensorly():
    """T r = 512 (the Lanczos start and the block Gram): still dense tensorly's parafac result."""
    fs = _factors([4] * 128, out=40, inn=36, seed=3)
    w = torch.rand(128, generator=torch.Generator().manual_seed(1), dtype=torch.float64).tolist()
    merged = cp(fs, w, rank=4, cp_n_iter_max=20, cp_tol=0.0)
    X = torch.stack([f.delta() for f in fs])
    with tl.backend_context("pytorch"):
        res = parafac(X, 4, init="svd", svd=capped_svd, n_iter_max=20, tol=0.0)
    ref = torch.einsum("r,tr,or,ir,t->oi", res.weights, *res.factors, torch.as_tensor(w, dtype=X.dtype))
    assert _rel(merged.B @ merged.A, ref) < 1e-8
