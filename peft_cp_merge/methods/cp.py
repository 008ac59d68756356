"""CP merge: a joint Canonical Polyadic decomposition of the stacked task updates (TC-LoRA, CP Merging).

Per module, the task updates ``X_t = s_t B_t A_t`` (out x in) stack into a T x out x in tensor X, which is never
built. Every CP-ALS iterate of X lies in the span of the LoRA factors: the mode-1 factor update is
``sum_t X_t V diag(C_t) (...)^{-1} = sum_t B_t [s_t (A_t V) diag(C_t) (...)^{-1}]``, a combination of the columns of
``[B_1 .. B_T]``, and likewise for mode 2 with the rows of the ``A_t``. So the factors are kept as coordinates,

    U = [B_1 .. B_T] U~,   V = [s_1 A_1; ..; s_T A_T]^T V~        (U~, V~: (T r) x R),

and an iteration only needs the Gram matrices ``W_B = [B_t]^T [B_t]`` and ``W_A = [s_t A_t] [s_t A_t]^T``
((T r) x (T r)): ``A_t V = (W_A V~)_t``, ``U^T U = U~^T W_B U~``, and so on. These are exactly tensorly's ``parafac``
iterates on X (same update order, normal equations, ``abs_rec_error`` stopping rule, ``normalize_factors=False``),
at two (T r)^2 x R products per iteration whatever the layer size, for a whole *batch* of equal-shape modules (all
the q_proj, k_proj, ... of a model) at once. ``init="svd"`` is tensorly's (leading singular vectors of each
unfolding, ``svd_flip`` signs) computed from one (T r) x (T r) eigenproblem per mode, so the merge equals dense
``parafac(X, init="svd")`` to float precision (the tests check this against tensorly). ``init="random"`` draws
tensorly's ``random_cp`` on the orthonormal core ``G = X x_2 Q_B^T x_3 Q_A^T`` (see :func:`compressed_core`).

The merged update is ``dW = U diag(g) V^T`` (U, V with unit columns, ``lambda_r = |C_r| |U_r| |V_r|`` the
component magnitudes, ``c_r = C_r / |C_r|`` the unit task loadings, ``a_tr = w_t c_tr`` the weighted loadings),
written as a rank-R LoRA balanced between B and A (scaling 1). ``cp_variant`` chooses ``g`` (and, for some
variants, what is decomposed).
Each variant's hypothesis was written down before it was measured (``benchmarks/README.md`` has the results):

    weighted   (default)  g_r = lambda_r sum_t a_tr  (= sum_t w_t X^_t, the least-squares CP reconstruction).
    authors               the TC-LoRA authors' later code (mttl ``CPMergeAfter`` with ``cpd_n_iter_max``): the
                          ``weighted`` formula on the *unscaled* products ``B_t A_t`` (LoRA scaling ignored, as they
                          did); with every w_t = 1 (their fixed coefficient 1.0) it is their ``sum_t X^_t``.
    authors_v1            the authors' first version: ``dW = U_raw V_raw^T``, task factor dropped, unnormalised
                          factors, weights unused; its scale is uncontrolled (scored 0 in our first benchmark).
    sign_elect            TIES at the level of components without pruning: elect sign(sum_t a_tr), keep only the
                          agreeing a_tr, sum them. Hypothesis: opposing task loadings cancel a component.
    ties                  TIES on the loadings: per task keep the ``cp_density`` fraction of components with the
                          largest |lambda_r c_tr|, elect the sign from the pruned unweighted loadings, disjoint mean
                          of the agreeing weighted ones. Hypothesis: small loadings are noise that interferes.
    balanced              decompose the tasks normalised to |X_t| = 1, restore the norms in the merge
                          (g_r = lambda_r sum_t w_t |X_t| c_tr). Hypothesis: a least-squares fit spends components on
                          the strongest tasks; equal norms let weak tasks keep theirs.
    isotropic             |g_r| replaced by its mean over the components (signs kept), as Iso-C flattens the
                          spectrum. Hypothesis: weak components carry the weak tasks.
    split                 shared/specific split by the loading vector: a component is task-specific when one task
                          holds at least ``cp_split_threshold`` of its loading energy (c_tr^2); shared components
                          get ``lambda_r sum_t a_tr`` (averaged over the tasks), specific ones the full weight mass,
                          ``lambda_r (sum_t w_t) c_t*r``. Hypothesis: averaging dilutes task-specific directions by T
                          (what TSV and Iso-CTS avoid); CP says which directions are specific, so undo it for those.
    spread                the soft version of ``split``: g_r = lambda_r (sum_t a_tr) T / n_r with n_r =
                          (sum_t |c_tr|)^2 (the loading's participation number, 1 for a specific component, T for a
                          uniform one). Same hypothesis, no threshold.
    orth                  CP + whitening: the unit U and V replaced by their orthogonal polar factors (as TSV does
                          with task singular vectors) and the magnitudes refit by least squares to the weighted sum,
                          g_r = u_r^T (sum_t w_t X_t) v_r. Hypothesis: CP components are not orthogonal, so shared
                          directions are counted in several components (interference); whitening removes that.

Variants for the rank-constrained, shared-structure regime (issue 21; hypotheses written before measuring):

    orth_iso              ``orth`` with a flat spectrum: after the polar factors and the refit, every non-zero
                          |g_r| (``> max(out, in) eps max |g|``) is replaced by their mean, signs kept. Hypothesis:
                          isotropic merges win every table we have and ``orth`` is the one CP change that helped;
                          together they are the CP analogue of Iso-C (CP chooses the R directions, which Iso-C takes
                          from the SVD of the sum, the spectrum is flat), which should matter most at R = r, where a
                          matrix merge must drop directions by the sum's energy alone.
    keep                  fit more components than you keep: CP-ALS at rank K = ``cp_fit_rank`` (0: sum_t r_t; at
                          least R, at most sum_t r_t), keep R of the K components by their task loadings
                          (``cp_keep``), then ``orth_iso`` on the kept ones. ``cp_keep="energy"``: the R largest
                          |lambda_r sum_t a_tr| (the weighted merge's magnitudes); ``"cover"``: round robin over the
                          tasks (ordered by |w_t| |X_t|, largest first), each taking its strongest remaining
                          component by |w_t lambda_r c_tr|, until R are kept; ``"agreement"``: the R largest
                          energies times the sign agreement of the loadings, |sum_t a_tr| / sum_t |a_tr|;
                          ``"shared"``: the R largest energies times the normalised participation number
                          (sum_t |c_tr|)^2 / T (1/T for a one-task component, 1 for a uniform one). Hypothesis: a
                          rank-R fit spends its components on the best least-squares compromise, and a component that
                          serves one strong task can crowd out what a weak task needs; a larger fit separates shared
                          and specific components first, and choosing by loading keeps what the tasks need: by energy,
                          by each task's own strongest (``cover``), by agreement (components the tasks pull in
                          opposite directions are interference), or by sharing (at R = r one adapter can only keep
                          what several tasks use; ``shared`` tests that, the opposite bet to ``cover``). At K = R it
                          is ``orth_iso``.
    cts                   a CP analogue of Iso-CTS: with the budget N = min(R, sum_t r_t, out, in) split by
                          ``iso.iso_cts_budget(N, T, cp_common_fraction)`` into k_c common and n per task, the common
                          directions are a rank-k_c joint CP fit (unit u_r, sign(g_r) v_r, magnitude |g_r| of the
                          weighted formula), and each task adds the n leading singular triplets of its weighted update
                          outside their span, ``(I - P_U) w_t X_t``; all collected U and V are orthogonalised (polar
                          factors, as Iso-CTS and TSV) and the spectrum is the mean of the collected magnitudes.
                          Hypothesis: Iso-CTS beats Iso-C by giving each task its own directions outside the shared
                          ones; a joint CP fit separates what the tasks share better than the SVD of the sum (which
                          is dominated by the strongest tasks), so its common components should be the better
                          shared part. k_c = 0 leaves no CP at all (a flat TSV), N = T: only common components.

``cp_beta`` (every variant; default 1.0, off): CtM's task-slice balancing (``tucker``) for CP. Decompose
``c_t X_t`` with ``c_t = (beta |X_t| + (1 - beta) mean_s |X_s|) / |X_t|`` and merge with the weights ``w_t / c_t``,
so the merge still reconstructs ``sum_t w_t X^_t`` (``cp_beta=0`` with ``weighted`` is ``balanced``). Hypothesis (as
``balanced``, CtM's README beta = 0.25): a least-squares fit spends components on the strongest tasks; a partial
balance lets weak tasks keep theirs without making noise-level tasks as loud as the strongest.

All variants but the two ``authors`` ones are linear in a common scale of the weights. Deviation from the authors'
code: they ran dense ``parafac`` with ``init="random"`` and rank 4 on ``A @ B``; we decompose the scaled updates
``X_t`` (so ``lora_alpha`` counts; ``authors`` drops the scaling to match them) and default to a deterministic SVD
init and rank = max adapter rank.

``cp_init="tasks"`` starts from the tasks' own SVDs (task t's components with loading e_t, the R strongest kept):
at ``R >= sum r_t`` that start is already an exact CP of X, where plain ALS from an SVD start converges slowly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorly as tl
import torch
from tensorly.random import random_cp

from ..errors import MergeInputError
from ._linalg import balanced, gram, single_threaded, top_eigh
from .iso import iso_cts_budget
from .registry import LoraFactors, merge_method
from .tsv import polar, task_svd

CP_INITS = ("svd", "random", "tasks")
CP_VARIANTS = ("weighted", "authors", "authors_v1", "sign_elect", "ties", "balanced", "isotropic", "split", "spread",
               "orth")
CP_VARIANTS += ("orth_iso", "keep", "cts")  # issue 21's variants for the rank-constrained regime (docstring)
CP_KEEPS = ("energy", "cover", "agreement", "shared")


def _validate(opts: Mapping[str, Any]) -> None:  # cp_init and cp_variant: checked by the registry (choices)
    n = opts["cp_n_iter_max"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise MergeInputError(f"cp_n_iter_max must be a positive integer, got {n!r}.")
    tol = opts["cp_tol"]
    if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not tol >= 0:
        raise MergeInputError(f"cp_tol must be a non-negative number, got {tol!r}.")
    for key in ("cp_density", "cp_split_threshold"):
        x = opts[key]
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0.0 < x <= 1.0:
            raise MergeInputError(f"{key} must be a number in (0, 1], got {x!r}.")
    for key in ("cp_beta", "cp_common_fraction"):
        x = opts[key]
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0.0 <= x <= 1.0:
            raise MergeInputError(f"{key} must be a number in [0, 1], got {x!r}.")
    k = opts["cp_fit_rank"]
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise MergeInputError(f"cp_fit_rank must be a non-negative integer (0: the sum of the adapters' ranks), "
                              f"got {k!r}.")


def _stack(groups: list[list[LoraFactors]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Bs, As)``, (N, T r, out) and (N, T r, in): each module's ``B_t^T`` and ``s_t A_t`` stacked in T blocks of r
    rows (r = the largest rank; lower-rank tasks get zero rows), written once into preallocated tensors."""
    N, T, r = len(groups), len(groups[0]), max(f.rank for f in groups[0])
    f0 = groups[0][0]
    alloc = f0.B.new_empty if all(f.rank == r for f in groups[0]) else f0.B.new_zeros  # zeros only for padding
    Bs = alloc(N, T * r, f0.B.shape[0])
    As = alloc(N, T * r, f0.A.shape[1])
    for n, g in enumerate(groups):
        for t, f in enumerate(g):
            Bs[n, t * r: t * r + f.rank].copy_(f.B.T)
            As[n, t * r: t * r + f.rank].copy_(f.A).mul_(f.scaling)
    return Bs, As


def _gram(M: torch.Tensor) -> torch.Tensor:
    return gram(M).double()  # the one large product of a merge, (T r)^2 (out + in): on the caller's threads


def _blocks(W: torch.Tensor, T: int) -> torch.Tensor:
    """The T diagonal r x r blocks of each (N, T r, T r) ``W``, as (N, T, r, r)."""
    N, S, _ = W.shape
    return W.view(N, T, S // T, T, S // T).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)


def _basis(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal basis of the row space of each ``M`` (N, S, n), from its Gram matrix ``M M^T`` (float64).

    From ``M M^T = W L W^T``, ``Q = M^T W L^{-1/2}`` (n x S) is orthonormal; directions with ``L < S eps L_max``
    (dependent rows) get a zero column instead. Returns ``(coords, lift)``: ``coords = Q^T M^T`` (N, S, S), the rows'
    coordinates in the basis, and ``lift = W L^{-1/2}``, so that ``Q @ X = M^T @ (lift @ X)``.
    """
    evals, W = torch.linalg.eigh(gram)
    keep = evals > gram.shape[1] * torch.finfo(torch.float64).eps * evals[:, -1:].clamp_min(0)
    lift = W * torch.where(keep, evals.clamp_min(torch.finfo(torch.float64).tiny).rsqrt(), 0.0)[:, None, :]
    return lift.mT @ gram, lift


def _core(W_B: torch.Tensor, W_A: torch.Tensor, ranks: list[int]):
    """``(P, R, lift_B, lift_A)``: the tasks' factors in orthonormal bases ``Q_B = Bs^T lift_B``, ``Q_A = As^T lift_A``
    of the stacked factors' spans (K = sum r_t columns), so that the core is ``G_t = P_t R_t^T`` (P, R: (N, T, K, r),
    zero-padded to the largest rank r; lift: (N, T r, K), zero on the padding rows of Bs / As)."""
    T, r = len(ranks), max(ranks)
    real = torch.tensor([t * r + i for t, rt in enumerate(ranks) for i in range(rt)], device=W_B.device)
    (coords_B, lift_B), (coords_A, lift_A) = (_basis(W[:, real][:, :, real]) for W in (W_B, W_A))
    N, K = coords_B.shape[:2]

    def split(coords):  # (N, K, K) -> (N, T, K, r)
        out = coords.new_zeros(N, T * r, K)
        out[:, real] = coords.mT
        return out.view(N, T, r, K).mT

    def pad(lift):
        out = lift.new_zeros(N, T * r, K)
        out[:, real] = lift
        return out

    return split(coords_B), split(coords_A), pad(lift_B), pad(lift_A)


def compressed_core(factors: list[LoraFactors]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(G, Q_B, Q_A)`` for one module, with ``X = G x_2 Q_B x_3 Q_A`` exactly, Q_B and Q_A orthonormal
    (K = sum r_t columns, zero columns for dependent directions), G: (T, K, K)."""
    Bs, As = _stack([factors])
    P, R, lift_B, lift_A = _core(_gram(Bs), _gram(As), [f.rank for f in factors])
    G = torch.einsum("tar,tbr->tab", P[0], R[0])
    return G.to(Bs.dtype), Bs[0].mT @ lift_B[0].to(Bs.dtype), As[0].mT @ lift_A[0].to(As.dtype)


def _solve(gram: torch.Tensor, mttkrp: torch.Tensor) -> torch.Tensor:
    """``mttkrp @ gram^{-1}`` for each batch entry. The ALS normal equations are symmetric positive definite and only
    R x R, so the inverse comes from a Cholesky factor and is applied by one product (far cheaper than a triangular
    solve with (T r) right-hand sides); a pseudo-inverse where one is singular (Cholesky fails)."""
    L, info = torch.linalg.cholesky_ex(gram)
    bad = info != 0
    if not bad.any():
        return mttkrp @ torch.cholesky_inverse(L)
    L[bad] = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)  # placeholder, replaced below
    inv = torch.cholesky_inverse(L)
    inv[bad] = torch.linalg.pinv(gram[bad])
    return mttkrp @ inv


def _psd_sqrt(M: torch.Tensor) -> torch.Tensor:
    evals, vecs = torch.linalg.eigh(M)
    return (vecs * evals.clamp_min(0).sqrt()[..., None, :]) @ vecs.mT


def _leading(W: torch.Tensor, W_other: torch.Tensor, M: torch.Tensor, T: int, rank: int, rng,
             flip: bool = True) -> torch.Tensor:
    """Coordinates (w.r.t. the rows of ``M``) of the ``rank`` leading left singular vectors of the unfolding.

    The mode-1 unfolding is ``X_(1) = Bs^T F`` with ``F = blockdiag(s_t A_t)``, so ``X_(1) X_(1)^T = Bs^T D Bs``,
    ``D = blockdiag(W_A[tt])``. With ``D^{1/2} W_B D^{1/2} = Z L Z^T`` (T r x T r), the left singular vectors are
    ``Bs^T D^{1/2} Z L^{-1/2}``: one small eigendecomposition, never an out x out or out x in matrix. Directions with
    ``L < S eps L_max`` (fewer than ``rank`` independent ones) get uniform random coordinates, as tensorly pads. With
    ``flip``, signs follow tensorly's ``svd_flip``: the largest-magnitude entry of each full-length vector is positive
    (this needs the full vectors, one n x (T r) x rank product).
    """
    N, S, _ = W.shape
    r = S // T
    F = _psd_sqrt(_blocks(W_other, T))  # (N, T, r, r)
    W5 = W.view(N, T, r, T, r)
    FWF = torch.einsum("ntij,ntjul,nulk->ntiuk", F, W5, F).reshape(N, S, S)
    evals, Z = top_eigh(FWF, rank)  # descending; Lanczos at large T r
    good = evals > S * torch.finfo(torch.float64).eps * evals[:, :1].clamp_min(torch.finfo(torch.float64).tiny)
    coords = torch.einsum("ntij,ntjk->ntik", F, Z.view(N, T, r, -1)).reshape(N, S, -1)
    coords = coords * torch.where(good, evals.clamp_min(torch.finfo(torch.float64).tiny).rsqrt(), 0.0)[:, None, :]
    if not bool(good.all()):
        pad = torch.as_tensor(rng.random_sample((N, S, rank)), dtype=coords.dtype).to(coords.device)
        coords = torch.where(good[:, None, :], coords, pad)
    if not flip:
        return coords
    full = M.mT @ coords.to(M.dtype)  # (N, n, rank): the vectors themselves, for the sign convention only
    sign = torch.sign(full.gather(1, full.abs().argmax(1, keepdim=True))).to(coords.dtype)
    return coords * torch.where(sign == 0, 1.0, sign)


def _independent(Us: torch.Tensor, Vh: torch.Tensor, order: torch.Tensor, k: int, rank: int) -> torch.Tensor:
    """The first ``rank`` of the components ``order`` (flat ``task * k + comp`` indices) whose rank-1 matrices
    ``u v^T`` are linearly independent of those kept before them (relative residual above 1e-6).

    Repeated (or proportional) tasks have identical components; kept twice, they make the ALS normal equations
    singular and ALS stays in the span of the copies, far from the CP of the tensor. Without repeats this is
    ``order[:rank]``. Works on the ``len x len`` Gram matrix ``(u_i . u_j)(v_i . v_j)`` of the kept components.
    """
    kept: list[int] = []
    for c in order.tolist():
        if len(kept) == rank:
            break
        u, v = Us[c // k, :, c % k], Vh[c // k, c % k, :]
        if kept:
            Uk = Us[[i // k for i in kept], :, [i % k for i in kept]]  # (len, KB)
            Vk = Vh[[i // k for i in kept], [i % k for i in kept], :]  # (len, KA)
            g = (Uk @ u) * (Vk @ v)
            G = (Uk @ Uk.T) * (Vk @ Vk.T)
            if float(1.0 - g @ torch.linalg.solve(G, g)) < 1e-12:
                continue
        kept.append(c)
    return torch.tensor(kept, dtype=torch.long, device=order.device)


def _tasks_init(P, R, rank: int, random_state: int | None):
    """Start from each task's own SVD: components (e_t, u_ti, s_ti v_ti), the ``rank`` strongest kept.

    At ``rank = sum r_t`` this start is already an exact CP of the core.
    """
    N, T, KB, r = P.shape
    G = torch.einsum("ntar,ntbr->ntab", P, R)
    Us, S, Vh = torch.linalg.svd(G, full_matrices=False)  # (N, T, KB, k), (N, T, k), (N, T, k, KA)
    k = S.shape[-1]
    Ui, Vi = [], []
    for n in range(N):
        order = _independent(Us[n], Vh[n], torch.argsort(S[n].reshape(-1), descending=True), k, rank)
        task, comp = order // k, order % k
        U_n, V_n = Us[n, task, :, comp].T, (S[n, task, comp][:, None] * Vh[n, task, comp, :]).T
        missing = min(rank, T * k) - len(order)
        if missing:  # repeated tasks: small random components instead of copies of chosen ones
            rng = np.random.RandomState(random_state)
            scale = float(S[n].max()) * 1e-3 if S[n].numel() else 1e-3
            U_n = torch.cat([U_n, torch.as_tensor(rng.standard_normal((KB, missing)), dtype=P.dtype).to(P.device)], 1)
            V_n = torch.cat([V_n, scale * torch.as_tensor(rng.standard_normal((V_n.shape[0], missing)),
                                                          dtype=P.dtype).to(P.device)], 1)
        Ui.append(U_n)
        Vi.append(V_n)
    U, V = torch.stack(Ui), torch.stack(Vi)
    if rank > U.shape[2]:  # more components than the cores have: small random extra ones
        rng = np.random.RandomState(random_state)
        extra = rank - U.shape[2]
        scale = float(S.max()) * 1e-3 if S.numel() else 1e-3
        U, V = (
            torch.cat([M, torch.as_tensor(rng.standard_normal((N, M.shape[1], extra)), dtype=P.dtype).to(P.device)
                       * (scale if i == 1 else 1.0)], dim=2)
            for i, M in enumerate((U, V))
        )
    return U, V


def _init(Bs, As, W_B, W_A, ranks: list[int], rank: int, cp_init: str, random_state: int | None,
          flip: bool = True):
    """Initial ``(U, V)`` as coordinates w.r.t. the rows of Bs / As (N, T r, rank), as tensorly's ``initialize_cp``
    makes them on the full tensor (``svd``) or on the orthonormal core (``random``, ``tasks``). The mode-0 start is
    never needed: ALS updates mode 0 first, from modes 1 and 2.

    ``flip=False`` skips the ``svd_flip`` sign convention. ALS is sign-equivariant (negating column k of the U start
    negates column k of the final C and U; of the V start, of C and V), so only the ``authors`` variant, which
    drops C, depends on it.
    """
    T = len(ranks)
    if cp_init == "svd":
        rng = np.random.RandomState(random_state)
        return _leading(W_B, W_A, Bs, T, rank, rng, flip), _leading(W_A, W_B, As, T, rank, rng, flip)
    P, R, lift_B, lift_A = _core(W_B, W_A, ranks)
    N, S = P.shape[0], P.shape[2]
    if cp_init == "random":  # tensorly's own random start (uniform factors from RandomState(seed)), as parafac
        with tl.backend_context("pytorch"):
            start = random_cp(
                (T, S, S), rank, random_state=random_state, normalise_factors=False, dtype=P.dtype, device=P.device
            )
        U, V = (f.expand(N, -1, -1) for f in start.factors[1:])
    else:
        U, V = _tasks_init(P, R, rank, random_state)
    return lift_B @ U, lift_A @ V


def cp_als(W_B, W_A, U, V, T: int, *, n_iter_max: int = 100, tol: float = 1e-8):
    """Batched CP-ALS of the task x out x in tensors ``X_t = s_t B_t A_t``, each factor kept as coordinates w.r.t. the
    stacked LoRA factors: ``U_full = Bs^T U``, ``V_full = As^T V``; only the Gram matrices ``W_B = Bs Bs^T`` and
    ``W_A = As As^T`` (N, T r, T r) are needed. Returns ``(C, U, V)`` with ``X ~ [[C, U_full, V_full]]`` (weights 1).

    These are tensorly's ``parafac`` iterates on the full tensor (same order, normal equations and ``abs_rec_error``
    stopping rule, ``normalize_factors=False``), written without it: the mode-1 MTTKRP is ``sum_t X_t V_full diag(C_t)
    = Bs^T Y`` with block t of ``Y`` equal to ``(A_t V_full) diag(C_t) = (W_A V)_t diag(C_t)``, so an iteration costs
    two (T r)^2 x rank products, whatever the layer size. A module stops once its relative error
    ``sqrt(|X|^2 + |[[C,U,V]]|^2 - 2 <X, [[C,U,V]]>) / |X|`` changes by less than ``tol``, keeping its factors while
    the others go on.
    """
    N, S, rank = U.shape
    r = S // T

    def blockwise(M, C):  # block t of M (N, S, rank) times diag(C[:, t])
        return (M.view(N, T, r, rank) * C[:, :, None, :]).view(N, S, rank)

    norm2 = (_blocks(W_B, T) * _blocks(W_A, T).mT).sum((1, 2, 3))  # sum_t tr(B_t^T B_t A_t A_t^T)
    norm = norm2.sqrt().clamp_min(torch.finfo(U.dtype).tiny)
    BU, AV = W_B @ U, W_A @ V
    UtU, VtV = U.mT @ BU, V.mT @ AV
    C = U.new_ones(N, T, rank)
    active = torch.ones(N, dtype=torch.bool, device=U.device)
    prev = torch.zeros_like(norm)
    for iteration in range(n_iter_max):
        C_new = _solve(UtU * VtV, (BU * AV).view(N, T, r, rank).sum(2))
        CtC = C_new.mT @ C_new
        U_new = _solve(CtC * VtV, blockwise(AV, C_new))
        BU_new = W_B @ U_new
        UtU_new = U_new.mT @ BU_new
        mttkrp = blockwise(BU_new, C_new)
        V_new = _solve(CtC * UtU_new, mttkrp)
        AV_new = W_A @ V_new
        VtV_new = V_new.mT @ AV_new
        keep = active[:, None, None]
        pairs = ((C_new, C), (U_new, U), (V_new, V), (BU_new, BU), (AV_new, AV), (UtU_new, UtU), (VtV_new, VtV))
        if bool(active.all()):
            C, U, V, BU, AV, UtU, VtV = (new for new, _ in pairs)
        else:
            C, U, V, BU, AV, UtU, VtV = (torch.where(keep, new, old) for new, old in pairs)
        if not tol:
            continue
        model2 = (CtC * UtU_new * VtV_new).sum((1, 2))
        err = (norm2 + model2 - 2 * (mttkrp * AV_new).sum((1, 2))).abs().sqrt() / norm
        if iteration >= 1:
            active = active & ((prev - err).abs() >= tol)
        prev = torch.where(keep[:, 0, 0], err, prev)
        if not active.any():
            break
    return C, U, V


@merge_method(
    "cp",
    pretty_name="CP merge (joint Canonical Polyadic decomposition)",
    reference=(
        "TC-LoRA: Tensorized Clustered LoRA Merging for Multi-Task Interference (2025); "
        "CP Merging: Joint LoRA Merging using Canonical Polyadic Decomposition (TMLR submission, 2025)"
    ),
    rank_option="cp_rank",
    options={
        "cp_init": "svd",
        "cp_random_state": 0,
        "cp_n_iter_max": 100,
        "cp_tol": 1e-8,
        "cp_variant": "weighted",
        "cp_density": 1.0,
        "cp_split_threshold": 0.5,
        "cp_beta": 1.0,
        "cp_fit_rank": 0,
        "cp_keep": "energy",
        "cp_common_fraction": 0.8,
    },
    choices={"cp_init": CP_INITS, "cp_variant": CP_VARIANTS, "cp_keep": CP_KEEPS},
    validate=_validate,
    batched=True,
)
@single_threaded()  # the rest is small (T r)-sized work: see _linalg.single_threaded
def cp_merge(
    groups: list[list[LoraFactors]],
    weights: torch.Tensor,
    *,
    rank: int,
    cp_init: str = "svd",
    cp_random_state: int | None = 0,
    cp_n_iter_max: int = 100,
    cp_tol: float = 1e-8,
    cp_variant: str = "weighted",
    cp_density: float = 1.0,
    cp_split_threshold: float = 0.5,
    cp_beta: float = 1.0,
    cp_fit_rank: int = 0,
    cp_keep: str = "energy",
    cp_common_fraction: float = 0.8,
) -> list[LoraFactors]:
    """Merge a batch of modules' adapters (same shapes and ranks; ``weights`` (N, T)) by rank-``rank`` CP.

    ``rank`` above ``sum_t r_t`` is capped there (the tasks' own SVDs already give an exact CP of that rank, and
    ALS with surplus components has singular normal equations); the registry's ``merge_batch`` pads back to ``rank``.
    ``cp_density`` is used by ``cp_variant="ties"``, ``cp_split_threshold`` by ``"split"``, ``cp_fit_rank`` and
    ``cp_keep`` by ``"keep"``, ``cp_common_fraction`` by ``"cts"``, ``cp_beta`` by all (module docstring).
    """
    rank = min(rank, sum(f.rank for f in groups[0]))
    out_rank, cts_split = rank, None
    if cp_variant == "keep":  # fit K >= R components, keep R of them (_keep_columns)
        rank = min(max(cp_fit_rank or sum(f.rank for f in groups[0]), rank), sum(f.rank for f in groups[0]))
    elif cp_variant == "cts":  # the CP fit gives the k_c common components (_cts)
        cts_split = iso_cts_budget(min(rank, *groups[0][0].shape), len(groups[0]), cp_common_fraction)
        rank = max(cts_split[0], 1)
    if cp_variant == "authors":  # the authors decomposed the unscaled products B_t A_t
        groups = [[LoraFactors(f.A, f.B, 1.0) for f in g] for g in groups]
    Bs, As = _stack(groups)
    N, T = len(groups), len(groups[0])
    # ALS runs in float64 whatever the adapters' dtype: it only touches (T r) x (T r) Gram matrices, and a partly
    # converged float32 ALS drifted from the float64 iterates by 4e-3 relative (SmolLM2 adapters, rank 4).
    W_B, W_A = _gram(Bs), _gram(As)
    dtype = Bs.dtype
    weights = weights.to(dtype)
    user_weights = weights  # before balanced / cp_beta fold the task norms into them (cts's task-specific part)
    if cp_variant == "balanced":  # decompose X_t / |X_t|; the norms go back into the weights
        task_norm = (_blocks(W_B, T) * _blocks(W_A, T).mT).sum((2, 3)).sqrt()  # (N, T)
        inv = torch.where(task_norm > 0, 1.0 / task_norm.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
        d = inv.repeat_interleave(Bs.shape[1] // T, dim=1)  # (N, T r)
        As = As * d[:, :, None].to(dtype)
        W_A = W_A * d[:, :, None] * d[:, None, :]
        weights = weights * task_norm.to(dtype)
    if cp_beta != 1.0:  # CtM's slice balancing: decompose c_t X_t, merge with w_t / c_t
        task_norm = (_blocks(W_B, T) * _blocks(W_A, T).mT).sum((2, 3)).clamp_min(0).sqrt()  # (N, T)
        target = cp_beta * task_norm + (1.0 - cp_beta) * task_norm.mean(dim=1, keepdim=True)
        c = torch.where(task_norm > 0, target / task_norm.clamp_min(torch.finfo(torch.float64).tiny), 1.0)
        d = c.repeat_interleave(Bs.shape[1] // T, dim=1)  # (N, T r)
        As = As * d[:, :, None].to(dtype)
        W_A = W_A * d[:, :, None] * d[:, None, :]
        weights = weights / c.to(dtype)
    U0, V0 = _init(Bs, As, W_B, W_A, [f.rank for f in groups[0]], rank, cp_init, cp_random_state,
                   flip=cp_variant == "authors_v1")
    C, U_c, V_c = cp_als(W_B, W_A, U0, V0, T, n_iter_max=cp_n_iter_max, tol=cp_tol)
    if cp_variant == "orth":
        return _orth_refit(Bs, As, W_B, W_A, U_c, V_c, weights, T)
    if cp_variant == "keep":
        U_c, V_c = _keep_columns(W_B, W_A, C, U_c, V_c, weights, T, out_rank, cp_keep)
    if cp_variant in ("orth_iso", "keep"):
        return _orth_refit(Bs, As, W_B, W_A, U_c, V_c, weights, T, flat=True)
    if cp_variant == "cts":
        return _cts(groups, weights, user_weights, Bs, As, C, U_c, V_c, *cts_split)
    C = C.to(dtype)
    U, V = Bs.mT @ U_c.to(dtype), As.mT @ V_c.to(dtype)
    tiny = torch.finfo(dtype).tiny
    nc, nu, nv = C.norm(dim=1), U.norm(dim=1), V.norm(dim=1)  # (N, R)
    if cp_variant == "authors_v1":
        g = nu * nv
    else:
        g = nc * nu * nv * _loading_coefficients(C / nc.clamp_min(tiny)[:, None], weights, nc * nu * nv, cp_variant,
                                                 cp_density, cp_split_threshold)
        if cp_variant == "isotropic":
            g = torch.sign(g) * g.abs().mean(dim=1, keepdim=True)
    if not torch.isfinite(g).all():
        raise MergeInputError("CP-ALS diverged (non-finite factors); try cp_init='tasks' or a smaller cp_rank.")
    U, V = U / nu.clamp_min(tiny)[:, None], V / nv.clamp_min(tiny)[:, None]
    return [balanced(U[n], g[n], V[n]) for n in range(N)]


def _loading_coefficients(c: torch.Tensor, w: torch.Tensor, lam: torch.Tensor, variant: str, density: float,
                          threshold: float) -> torch.Tensor:
    """Per component, the factor of ``lambda_r`` in the merged update (N, R), from the unit loadings ``c`` (N, T, R),
    the weights ``w`` (N, T) and the magnitudes ``lam`` (N, R): see the module docstring's variant table."""
    T = c.shape[1]
    a = w[:, :, None] * c  # (N, T, R)
    if variant == "sign_elect":
        sign = torch.sign(a.sum(dim=1, keepdim=True))
        return torch.where(torch.sign(a) == sign, a, torch.zeros_like(a)).sum(dim=1)
    if variant == "ties":
        R = c.shape[2]
        contrib = c * lam[:, None, :]  # task t's share of component r, unweighted
        k = max(1, int(density * R))
        kth = contrib.abs().topk(k, dim=2).values[..., -1:]  # (N, T, 1): each task's k-th largest magnitude
        pruned = torch.where(contrib.abs() >= kth, c, torch.zeros_like(c))
        sign = torch.sign(pruned.sum(dim=1, keepdim=True))
        sign = torch.where(sign == 0, 1.0, sign)  # PEFT's ties: a zero sum elects +
        agree = (torch.sign(pruned) == sign) & (pruned != 0)
        kept = torch.where(agree, w[:, :, None] * pruned, torch.zeros_like(pruned))
        return kept.sum(dim=1) / agree.sum(dim=1).clamp_min(1)
    total = a.sum(dim=1)  # (N, R): the weighted formula
    if variant == "split":
        share = c.square()  # unit loadings: the energy shares sum to 1 over the tasks
        top_share, top = share.max(dim=1)
        own = w.sum(dim=1, keepdim=True) * c.gather(1, top[:, None, :])[:, 0]
        return torch.where(top_share >= threshold, own, total)
    if variant == "spread":
        return total * T / c.abs().sum(dim=1).square().clamp_min(1.0)
    return total  # weighted, authors, balanced (its norms are already in w), isotropic (flattened by the caller)


def _orth_refit(Bs, As, W_B, W_A, U_c, V_c, weights, T: int, flat: bool = False) -> list[LoraFactors]:
    """``orth``: polar factors of the unit-column U and V (coordinates ``U_c`` w.r.t. the rows of Bs, ``V_c`` of As),
    then ``g_r = u_r^T (sum_t w_t X_t) v_r``. All on (T r) x R coordinates: the polar factor of ``M = Bs^T U_c`` is
    ``M (M^T M)^{-1/2}`` with ``M^T M = U_c^T W_B U_c`` (R x R), and ``u_r^T B_t`` / ``s_t A_t v_r`` are block t of
    ``W_B U_c`` / ``W_A V_c``; directions of a rank-deficient M get a zero column (partial isometry)."""

    def polar(W, X):
        gram = X.mT @ W @ X
        d = gram.diagonal(dim1=1, dim2=2).clamp_min(torch.finfo(gram.dtype).tiny).rsqrt()
        gram = gram * d[:, :, None] * d[:, None, :]  # unit columns first
        evals, vecs = torch.linalg.eigh(gram)
        keep = evals > gram.shape[-1] * torch.finfo(gram.dtype).eps * evals[:, -1:].clamp_min(0)
        root = torch.where(keep, evals.clamp_min(torch.finfo(gram.dtype).tiny).rsqrt(), 0.0)
        return (X * d[:, None, :]) @ (vecs * root[:, None, :]) @ vecs.mT

    U_c, V_c = polar(W_B, U_c), polar(W_A, V_c)
    N, S, R = U_c.shape
    r = S // T
    proj = ((W_B @ U_c) * (W_A @ V_c)).view(N, T, r, R).sum(2)  # (N, T, R): u_r^T X_t v_r
    g = (weights.to(proj.dtype)[:, :, None] * proj).sum(1)
    if flat:  # orth_iso, keep: every non-zero |g_r| replaced by their mean (signs kept)
        g = _flat(g, max(Bs.shape[2], As.shape[2]))
    if not torch.isfinite(g).all():
        raise MergeInputError("CP-ALS diverged (non-finite factors); try cp_init='tasks' or a smaller cp_rank.")
    dtype = Bs.dtype
    U, V = Bs.mT @ U_c.to(dtype), As.mT @ V_c.to(dtype)
    return [balanced(U[n], g[n].to(dtype), V[n]) for n in range(N)]


def _flat(g: torch.Tensor, size: int) -> torch.Tensor:
    """Each row of ``g`` (N, R) with its non-zero entries (``|g| > size eps max |g|``) replaced by their mean
    magnitude, signs kept; the numerically zero ones set to 0."""
    mag = g.abs()
    keep = mag > size * torch.finfo(g.dtype).eps * mag.amax(dim=1, keepdim=True)
    mean = (mag * keep).sum(dim=1, keepdim=True) / keep.sum(dim=1, keepdim=True).clamp_min(1)
    return torch.where(keep, torch.sign(g) * mean, torch.zeros_like(g))


def _keep_columns(W_B, W_A, C, U_c, V_c, weights, T: int, rank: int, how: str):
    """``keep``: the ``rank`` of the K fitted components chosen by ``how`` (module docstring), as the columns of
    ``U_c``, ``V_c`` (coordinates w.r.t. the rows of Bs / As). ``|w_t lambda_r c_tr| = |w_t C_tr| |u_r| |v_r|``."""
    N, S, K = U_c.shape
    if rank >= K:
        return U_c, V_c
    nu = (U_c * (W_B @ U_c)).sum(1).clamp_min(0).sqrt()  # (N, K): |U_r| = sqrt(U_c^T W_B U_c)_rr
    nv = (V_c * (W_A @ V_c)).sum(1).clamp_min(0).sqrt()
    a = weights.to(C.dtype)[:, :, None] * C * (nu * nv)[:, None, :]  # (N, T, K): w_t lambda_r c_tr
    if how in ("energy", "agreement", "shared"):
        score = a.sum(1).abs()
        if how == "agreement":
            score = score * score / a.abs().sum(1).clamp_min(torch.finfo(a.dtype).tiny)
        elif how == "shared":
            c = C / C.norm(dim=1, keepdim=True).clamp_min(torch.finfo(C.dtype).tiny)
            score = score * c.abs().sum(1).square() / T
        idx = score.topk(rank, dim=1).indices
    else:  # cover: round robin over the tasks by |w_t| |X_t|, each taking its strongest remaining component
        norm = (_blocks(W_B, T) * _blocks(W_A, T).mT).sum((2, 3)).clamp_min(0).sqrt()
        order = torch.argsort((weights.abs().to(norm.dtype) * norm), dim=1, descending=True, stable=True)
        idx = torch.empty(N, rank, dtype=torch.long, device=C.device)
        for n in range(N):
            free = torch.ones(K, dtype=torch.bool, device=C.device)
            for j in range(rank):
                t = int(order[n, j % T])
                score = torch.where(free, a[n, t].abs(), -1.0)
                idx[n, j] = int(score.argmax())
                free[idx[n, j]] = False
    pick = idx[:, None, :].expand(N, S, rank)
    return U_c.gather(2, pick), V_c.gather(2, pick)


def _cts(groups, weights, user_weights, Bs, As, C, U_c, V_c, k_c: int, n_task: int) -> list[LoraFactors]:
    """``cts`` (module docstring): the k_c CP components (unit u_r, sign(g_r) v_r, |g_r|) plus each task's ``n_task``
    leading triplets of ``(I - P_U) w_t X_t`` outside their span, polar factors, mean spectrum. Per module, all in
    factored form (out x (k_c + T n) and in x (k_c + T n) matrices at most). ``weights`` are the merge weights of
    the decomposed tasks (``w_t / c_t`` under ``cp_beta``), ``user_weights`` the ``w_t`` of the raw factors."""
    dtype = Bs.dtype
    results = []
    for n, g_factors in enumerate(groups):
        out, inn = g_factors[0].shape
        eps = max(out, inn) * torch.finfo(dtype).eps
        Us, Vs, Ss = [], [], []
        if k_c > 0:
            Ck = C[n, :, :k_c].to(dtype)
            U, V = Bs[n].mT @ U_c[n, :, :k_c].to(dtype), As[n].mT @ V_c[n, :, :k_c].to(dtype)
            nu, nv = U.norm(dim=0), V.norm(dim=0)
            g = (weights[n].to(dtype)[:, None] * Ck).sum(0) * nu * nv  # lambda_r sum_t a_tr
            good = g.abs() > eps * g.abs().max().clamp_min(torch.finfo(dtype).tiny)
            U, V, g = U[:, good] / nu[good], V[:, good] / nv[good] * torch.sign(g[good]), g[good].abs()
            Us.append(U)
            Vs.append(V)
            Ss.append(g)
        Q = torch.linalg.qr(Us[0])[0] if Us and Us[0].shape[1] else None
        for f, w in zip(g_factors, user_weights[n]):
            if n_task == 0:
                break
            A_w = (w * f.scaling) * f.A
            B_perp = f.B - Q @ (Q.T @ f.B) if Q is not None else f.B
            U_t, S_t, V_t = task_svd(LoraFactors(A_w, B_perp, 1.0))
            scale = torch.linalg.matrix_norm(f.B, ord=2) * torch.linalg.matrix_norm(A_w, ord=2)
            m = min(n_task, int((S_t > eps * scale).sum()))
            Us.append(U_t[:, :m])
            Vs.append(V_t[:, :m])
            Ss.append(S_t[:m])
        S_all = torch.cat(Ss) if Ss else Bs.new_zeros(0)
        if S_all.numel() == 0:  # every update is zero
            results.append(LoraFactors(As.new_zeros(1, inn), Bs.new_zeros(out, 1), 1.0))
            continue
        if not torch.isfinite(S_all).all():
            raise MergeInputError("CP-ALS diverged (non-finite factors); try cp_init='tasks' or a smaller cp_rank.")
        U_hat, V_hat = torch.cat(Us, dim=1), torch.cat(Vs, dim=1)
        results.append(balanced(polar(U_hat), S_all.mean().expand(S_all.numel()), polar(V_hat)))
    return results
