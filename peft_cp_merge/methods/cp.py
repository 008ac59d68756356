"""CP merge: a joint Canonical Polyadic decomposition of the stacked task updates (TC-LoRA, CP Merging).

Per module, the task updates ``X_t = s_t B_t A_t`` (out x in) stack into a T x out x in tensor X. X lies in
``span(B) x span(A^T)``, so it is never built: with ``Q_B = orth([B_1 .. B_T])`` (out x K_B) and
``Q_A = orth([A_1^T .. A_T^T])`` (in x K_A), ``X = G x_2 Q_B x_3 Q_A`` exactly, where the core is
``G_t = s_t (Q_B^T B_t)(A_t Q_A)`` (K_B x K_A, K <= sum r_t). CP-ALS (tensorly ``parafac``, pytorch backend) on G,

    G ~ [[lambda; C, U~, V~]],  C: T x R (task loadings), U~: K_B x R, V~: K_A x R,

lifted back with ``U = Q_B U~`` and ``V = Q_A V~``, is CP-ALS on X with the same iterates (Q_B, Q_A orthonormal),
so with ``init="svd"`` it equals dense ``parafac(X)`` to float precision (the tests check this against tensorly).

The ALS here is tensorly's ``parafac`` algorithm (same update order, normal equations, initialisations and
``abs_rec_error`` stopping rule, ``normalize_factors=False``) written for a *batch* of equal-shape modules and for
cores given as low-rank slices ``G_t = P_t R_t^T`` (``P_t = s_t Q_B^T B_t``, ``R_t = Q_A^T A_t^T``): every MTTKRP
then costs O(T K r R) instead of O(T K^2 R), and one call serves all the q_proj (or k_proj, ...) modules of a model.
The merged update is

    weighted   (default)  dW = U diag(lambda * C^T w) V^T  = sum_t w_t X^_t
    authors               dW = U V^T, the TC-LoRA authors' code (mttl ``CPMergeAfter``): task factor dropped,
                          unnormalised factors, weights unused
    sign_elect            per component r: a_t = w_t C[t, r]; elect sign(sum_t a_t); keep only agreeing a_t
                          (TIES on the disentangled components): dW = U diag(lambda * a_elected) V^T

written as a rank-R LoRA, balanced between B and A (scaling 1). Deviation from the authors' code: they ran dense
``parafac`` with ``init="random"`` and rank 4 on the unscaled ``A @ B``; we decompose the scaled updates ``X_t``
(so ``lora_alpha`` counts) and default to a deterministic SVD init and rank = max adapter rank.

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
from ._linalg import balanced, pad_rank
from .registry import LoraFactors, merge_method

CP_INITS = ("svd", "random", "tasks")
CP_VARIANTS = ("weighted", "authors", "sign_elect")


def _validate(opts: Mapping[str, Any]) -> None:
    if opts["cp_init"] not in CP_INITS:
        raise MergeInputError(f"cp_init={opts['cp_init']!r} is not supported; use one of {list(CP_INITS)}.")
    if opts["cp_variant"] not in CP_VARIANTS:
        raise MergeInputError(f"cp_variant={opts['cp_variant']!r} is not supported; use one of {list(CP_VARIANTS)}.")
    n = opts["cp_n_iter_max"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise MergeInputError(f"cp_n_iter_max must be a positive integer, got {n!r}.")
    tol = opts["cp_tol"]
    if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not tol >= 0:
        raise MergeInputError(f"cp_tol must be a non-negative number, got {tol!r}.")


def _basis(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal basis of the row space of each ``M`` (N, S, n), without a QR of the long n-dim side.

    From the small Gram matrix ``M M^T = W L W^T`` (float64), ``Q = M^T W L^{-1/2}`` (n x S) is orthonormal;
    directions with ``L < S eps L_max`` (dependent rows) get a zero column instead. Returns
    ``(coords, lift)``: ``coords = Q^T M^T`` (N, S, S), the rows' coordinates in the basis, and
    ``lift = W L^{-1/2}`` (N, S, S), so that ``Q @ X = M^T @ (lift @ X)``. Cost: one n x S x S product.
    """
    gram = (M @ M.mT).double()
    evals, W = torch.linalg.eigh(gram)
    keep = evals > M.shape[1] * torch.finfo(torch.float64).eps * evals[:, -1:].clamp_min(0)
    lift = W * torch.where(keep, evals.clamp_min(torch.finfo(torch.float64).tiny).rsqrt(), 0.0)[:, None, :]
    return lift.mT @ gram, lift


def _compress(groups: list[list[LoraFactors]]):
    """Batched compression: ``(P, R, lift_B, lift_A, Bs, As)`` with ``X_n,t = Q_B P_n,t R_n,t^T Q_A^T`` exactly.

    ``Q_B = Bs^T lift_B`` (out x S) and ``Q_A = As^T lift_A`` (in x S) are orthonormal bases containing every
    ``B_t`` / ``A_t^T`` (see :func:`_basis`), never formed; ``P`` (N, T, S, r) and ``R`` (N, T, S, r), zero-padded
    to the largest rank r, are the tasks' factors in those bases (``P`` carries the scaling), in float64.
    """
    Bs = torch.stack([torch.cat([f.B.T for f in g]) for g in groups])  # (N, S, out)
    As = torch.stack([torch.cat([f.A for f in g]) for g in groups])  # (N, S, in)
    coords_B, lift_B = _basis(Bs)
    coords_A, lift_A = _basis(As)
    T, r = len(groups[0]), max(f.rank for f in groups[0])
    P = coords_B.new_zeros(len(groups), T, coords_B.shape[1], r)
    R = coords_A.new_zeros(len(groups), T, coords_A.shape[1], r)
    start = 0
    for t, f in enumerate(groups[0]):
        scale = torch.tensor([g[t].scaling for g in groups], dtype=torch.float64, device=P.device)
        P[:, t, :, : f.rank] = scale[:, None, None] * coords_B[:, :, start : start + f.rank]
        R[:, t, :, : f.rank] = coords_A[:, :, start : start + f.rank]
        start += f.rank
    return P, R, lift_B, lift_A, Bs, As


def compressed_core(factors: list[LoraFactors]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(G, Q_B, Q_A)`` for one module, with ``X = G x_2 Q_B x_3 Q_A`` exactly (see the module docstring)."""
    P, R, lift_B, lift_A, Bs, As = _compress([factors])
    G = torch.einsum("tar,tbr->tab", P[0], R[0])
    return G.to(Bs.dtype), Bs[0].mT @ lift_B[0].to(Bs.dtype), As[0].mT @ lift_A[0].to(As.dtype)


def _solve(gram: torch.Tensor, mttkrp: torch.Tensor) -> torch.Tensor:
    """``mttkrp @ gram^{-1}`` for each batch entry (gram symmetric), pseudo-inverse where gram is singular."""
    x, info = torch.linalg.solve_ex(gram, mttkrp.mT)
    bad = info != 0
    if bad.any():
        x[bad] = torch.linalg.pinv(gram[bad]) @ mttkrp[bad].mT
    return x.mT


def _init(P, R, rank: int, cp_init: str, random_state: int | None):
    """Initial ``(C, U, V)``, each (N, dim, rank), as tensorly's ``initialize_cp`` makes them."""
    N, T, KB, _ = P.shape
    KA = R.shape[2]
    if cp_init == "random":  # tensorly's own random start (uniform factors from RandomState(seed)), as parafac
        with tl.backend_context("pytorch"):
            start = random_cp(
                (T, KB, KA), rank, random_state=random_state, normalise_factors=False, dtype=P.dtype, device=P.device
            )
        return tuple(f.expand(N, -1, -1).clone() for f in start.factors)
    if cp_init == "tasks":
        return _tasks_init(P, R, rank, random_state)
    # "svd": leading left singular vectors of the mode-1 / mode-2 unfoldings, from the eigenvectors of
    # unfold(G, 1) unfold(G, 1)^T = sum_t P_t (R_t^T R_t) P_t^T (K x K). The mode-0 start is never read: ALS updates
    # mode 0 first from modes 1 and 2. Where K < rank, tensorly pads with uniform random columns; so do we.
    rng = np.random.RandomState(random_state)

    def leading(F, H):
        gram = torch.einsum("ntar,ntrs,ntbs->nab", F, H.mT @ H, F)
        vecs = torch.linalg.eigh(gram).eigenvectors.flip(-1)[..., :rank]
        # tensorly's svd_flip sign convention: the largest-magnitude entry of each vector is positive
        vecs = vecs * torch.sign(vecs.gather(1, vecs.abs().argmax(1, keepdim=True)))
        if vecs.shape[-1] < rank:
            pad = torch.as_tensor(rng.random_sample((vecs.shape[1], rank - vecs.shape[-1])), dtype=P.dtype)
            vecs = torch.cat([vecs, pad.to(P.device).expand(N, -1, -1)], dim=-1)
        return vecs

    return P.new_ones(N, T, rank), leading(P, R), leading(R, P)


def _tasks_init(P, R, rank: int, random_state: int | None):
    """Start from each task's own SVD: components (e_t, u_ti, s_ti v_ti), the ``rank`` strongest kept.

    At ``rank = sum r_t`` this start is already an exact CP of the core.
    """
    N, T, KB, r = P.shape
    G = torch.einsum("ntar,ntbr->ntab", P, R)
    Us, S, Vh = torch.linalg.svd(G, full_matrices=False)  # (N, T, KB, k), (N, T, k), (N, T, k, KA)
    k = S.shape[-1]
    Cs, Ui, Vi = [], [], []
    for n in range(N):
        order = torch.argsort(S[n].reshape(-1), descending=True)[:rank]
        task, comp = order // k, order % k
        Cs.append(torch.nn.functional.one_hot(task, T).to(P.dtype).T)
        Ui.append(Us[n, task, :, comp].T)
        Vi.append((S[n, task, comp][:, None] * Vh[n, task, comp, :]).T)
    C, U, V = torch.stack(Cs), torch.stack(Ui), torch.stack(Vi)
    if rank > C.shape[2]:  # more components than the cores have: small random extra ones
        rng = np.random.RandomState(random_state)
        extra = rank - C.shape[2]
        scale = float(S.max()) * 1e-3 if S.numel() else 1e-3
        C, U, V = (
            torch.cat([M, torch.as_tensor(rng.standard_normal((N, M.shape[1], extra)), dtype=P.dtype).to(P.device)
                       * (scale if i == 2 else 1.0)], dim=2)
            for i, M in enumerate((C, U, V))
        )
    return C, U, V


def cp_als(P, R, rank: int, *, init: str = "svd", random_state: int | None = 0, n_iter_max: int = 100,
           tol: float = 1e-8):
    """Batched CP-ALS of the cores ``G_n,t = P_n,t R_n,t^T``: ``(C, U, V)`` with ``G ~ [[C, U, V]]`` (weights 1).

    Per iteration, for modes 0, 1, 2: ``F_m = MTTKRP_m(G) (hadamard_{j != m} F_j^T F_j)^{-1}``; the relative error
    ``sqrt(|G|^2 + |[[C,U,V]]|^2 - 2 <G, [[C,U,V]]>) / |G|`` is tracked per module, and a module stops once it
    changes by less than ``tol`` (tensorly's ``abs_rec_error``), keeping its factors while the others go on.
    """
    C, U, V = _init(P, R, rank, init, random_state)
    N, T, K, r = P.shape
    P2 = P.permute(0, 2, 1, 3).reshape(N, K, T * r)  # [P_1 .. P_T]: one matmul serves all tasks
    R2 = R.permute(0, 2, 1, 3).reshape(N, R.shape[2], T * r)
    norm2 = ((P.mT @ P) * (R.mT @ R).mT).sum((1, 2, 3))
    norm = norm2.sqrt().clamp_min(torch.finfo(P.dtype).tiny)
    active = torch.ones(N, dtype=torch.bool, device=P.device)
    prev = torch.zeros_like(norm)
    for iteration in range(n_iter_max):
        RV = (R2.mT @ V).reshape(N, T, r, rank)  # R_t^T V
        PU = (P2.mT @ U).reshape(N, T, r, rank)
        C_new = _solve((U.mT @ U) * (V.mT @ V), (PU * RV).sum(2))
        U_new = _solve((C_new.mT @ C_new) * (V.mT @ V), P2 @ (RV * C_new[:, :, None, :]).reshape(N, T * r, rank))
        PU = (P2.mT @ U_new).reshape(N, T, r, rank)
        mttkrp = R2 @ (PU * C_new[:, :, None, :]).reshape(N, T * r, rank)
        V_new = _solve((C_new.mT @ C_new) * (U_new.mT @ U_new), mttkrp)
        keep = active[:, None, None]
        C, U, V = (torch.where(keep, new, old) for new, old in ((C_new, C), (U_new, U), (V_new, V)))
        if not tol:
            continue
        model2 = ((C.mT @ C) * (U.mT @ U) * (V.mT @ V)).sum((1, 2))
        err = (norm2 + model2 - 2 * (mttkrp * V_new).sum((1, 2))).abs().sqrt() / norm
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
    },
    validate=_validate,
    batched=True,
)
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
) -> list[LoraFactors]:
    """Merge a batch of modules' adapters (same shapes and ranks; ``weights`` (N, T)) by rank-``rank`` CP.

    ``rank`` above ``sum_t r_t`` is capped there (the tasks' own SVDs already give an exact CP of that rank, and
    ALS with surplus components has singular normal equations); results are zero-padded back to ``rank``.
    """
    requested, rank = rank, min(rank, sum(f.rank for f in groups[0]))
    P, R, lift_B, lift_A, Bs, As = _compress(groups)
    # ALS on the small cores runs in float64 whatever the adapters' dtype: it costs little at S x r, and a
    # partly converged float32 ALS drifted from the float64 iterates by 4e-3 relative (SmolLM2 adapters, rank 4).
    C, U_core, V_core = cp_als(
        P, R, rank, init=cp_init, random_state=cp_random_state, n_iter_max=cp_n_iter_max, tol=cp_tol
    )
    dtype = Bs.dtype
    C, weights = C.to(dtype), weights.to(dtype)
    U, V = Bs.mT @ (lift_B @ U_core).to(dtype), As.mT @ (lift_A @ V_core).to(dtype)
    tiny = torch.finfo(dtype).tiny
    nc, nu, nv = C.norm(dim=1), U.norm(dim=1), V.norm(dim=1)  # (N, R)
    if cp_variant == "authors":
        g = nu * nv
    else:
        a = weights[:, :, None] * (C / nc.clamp_min(tiny)[:, None])  # (N, T, R)
        if cp_variant == "sign_elect":
            sign = torch.sign(a.sum(dim=1, keepdim=True))
            a = torch.where(torch.sign(a) == sign, a, torch.zeros_like(a))
        g = nc * nu * nv * a.sum(dim=1)
    if not torch.isfinite(g).all():
        raise MergeInputError("CP-ALS diverged (non-finite factors); try cp_init='tasks' or a smaller cp_rank.")
    U, V = U / nu.clamp_min(tiny)[:, None], V / nv.clamp_min(tiny)[:, None]
    return [pad_rank(balanced(U[n], g[n], V[n]), requested) for n in range(len(groups))]
