"""CP merge: a joint Canonical Polyadic decomposition of the stacked task updates (TC-LoRA, CP Merging).

Per module, the task updates ``X_t = s_t B_t A_t`` (out x in) stack into a T x out x in tensor X. X lies in
``span(B) x span(A^T)``, so it is never built: with ``Q_B = orth([B_1 .. B_T])`` (out x K_B) and
``Q_A = orth([A_1^T .. A_T^T])`` (in x K_A), ``X = G x_2 Q_B x_3 Q_A`` exactly, where the core is
``G_t = s_t (Q_B^T B_t)(A_t Q_A)`` (K_B x K_A, K <= sum r_t). CP-ALS (tensorly ``parafac``, pytorch backend) on G,

    G ~ [[lambda; C, U~, V~]],  C: T x R (task loadings), U~: K_B x R, V~: K_A x R,

lifted back with ``U = Q_B U~`` and ``V = Q_A V~``, is CP-ALS on X with the same iterates (Q_B, Q_A orthonormal),
so with ``init="svd"`` it equals dense ``parafac(X)`` to float precision. The merged update is

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

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorly as tl
import torch
from tensorly.cp_tensor import CPTensor
from tensorly.decomposition import parafac

from ..errors import MergeInputError
from ._linalg import balanced, orth, pad_rank
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


def compressed_core(factors: list[LoraFactors]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(G, Q_B, Q_A)`` with ``X = G x_2 Q_B x_3 Q_A`` exactly (see the module docstring)."""
    Q_B = orth(torch.cat([f.B for f in factors], dim=1))
    Q_A = orth(torch.cat([f.A.T for f in factors], dim=1))
    G = torch.stack([f.scaling * (Q_B.T @ f.B) @ (f.A @ Q_A) for f in factors])
    return G, Q_B, Q_A


def _tasks_init(G: torch.Tensor, rank: int, random_state: int | None) -> CPTensor:
    """CP start from each task's own SVD: component (e_t, u_ti, s_ti v_ti), the ``rank`` strongest kept."""
    T = G.shape[0]
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)  # batched over tasks
    k = S.shape[1]
    order = torch.argsort(S.reshape(-1), descending=True)[:rank]
    task, comp = order // k, order % k
    C = torch.nn.functional.one_hot(task, T).to(G.dtype).T
    Ui = U[task, :, comp].T
    Vi = (S[task, comp][:, None] * Vh[task, comp, :]).T
    if rank > order.numel():  # more components than the tasks have: small random extra ones
        rng = np.random.RandomState(random_state)
        extra = rank - order.numel()
        scale = float(S.max()) * 1e-3 if S.numel() else 1e-3
        C, Ui, Vi = (
            torch.cat([M, torch.as_tensor(rng.standard_normal((M.shape[0], extra)), dtype=G.dtype).to(G.device)
                       * (scale if i == 2 else 1.0)], dim=1)
            for i, M in enumerate((C, Ui, Vi))
        )
    return CPTensor((torch.ones(rank, dtype=G.dtype, device=G.device), [C, Ui, Vi]))


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
)
def cp_merge(
    factors: list[LoraFactors],
    weights: torch.Tensor,
    *,
    rank: int,
    cp_init: str = "svd",
    cp_random_state: int | None = 0,
    cp_n_iter_max: int = 100,
    cp_tol: float = 1e-8,
    cp_variant: str = "weighted",
) -> LoraFactors:
    """Merge one module's adapters by a rank-``rank`` CP decomposition of their compressed core.

    ``rank`` above ``sum_t r_t`` is capped there (the tasks' own SVDs already give an exact CP of that rank, and
    ALS with surplus components has singular normal equations); the result is zero-padded back to ``rank``.
    """
    requested, rank = rank, min(rank, sum(f.rank for f in factors))
    G, Q_B, Q_A = compressed_core(factors)
    # ALS on the small core runs in float64 whatever the adapters' dtype: it costs little at K x K, and a
    # partly converged float32 ALS drifted from the float64 iterates by 4e-3 relative (SmolLM2 adapters, rank 4).
    dtype, G, weights = G.dtype, G.double(), weights.double()
    with tl.backend_context("pytorch"), warnings.catch_warnings():
        # cp_rank above the number of tasks is normal: tensorly then pads the SVD init of that mode, and warns.
        warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs")
        init = _tasks_init(G, rank, cp_random_state) if cp_init == "tasks" else cp_init
        cp = parafac(
            G, rank, init=init, n_iter_max=cp_n_iter_max, tol=cp_tol, random_state=cp_random_state,
            normalize_factors=False,
        )
    C, U_core, V_core = cp.factors
    C, U_core, V_core, lam, weights = (x.to(dtype) for x in (C, U_core, V_core, cp.weights, weights))
    U, V = Q_B @ U_core, Q_A @ V_core
    if cp_variant == "authors":
        nu, nv = U.norm(dim=0), V.norm(dim=0)
        g = lam * nu * nv
    else:
        nc, nu, nv = C.norm(dim=0), U.norm(dim=0), V.norm(dim=0)
        lam = lam * nc * nu * nv
        a = weights[:, None] * (C / nc.clamp_min(torch.finfo(C.dtype).tiny))  # T x R
        if cp_variant == "sign_elect":
            sign = torch.sign(a.sum(dim=0, keepdim=True))
            a = torch.where(torch.sign(a) == sign, a, torch.zeros_like(a))
        g = lam * a.sum(dim=0)
    tiny = torch.finfo(U.dtype).tiny
    if not torch.isfinite(g).all():
        raise MergeInputError("CP-ALS diverged (non-finite factors); try cp_init='tasks' or a smaller cp_rank.")
    return pad_rank(balanced(U / nu.clamp_min(tiny), g, V / nv.clamp_min(tiny)), requested)
