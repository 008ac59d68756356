"""Tucker-2 merge: CtM, Compress-then-Merge (He et al., ICML 2026), in core space.

Per module, with task updates ``X_t = s_t B_t A_t`` (out x in), weights ``w_t`` and output rank ``R``:

1. Core space (``core.core_space``, as core-space merging): ``U_B`` (out x k1) = left singular vectors of
   ``[B_1 .. B_T]``, ``V_A`` (in x k2) = right singular vectors of ``[s_1 A_1; ..; s_T A_T]``; cores
   ``M_t = U_B^T X_t V_A`` (k1 x k2, i.e. (T r) x (T r)); ``X_t = U_B M_t V_A^T`` exactly.
2. Stack the cores into a k1 x k2 x T tensor and rescale each task slice (``beta``, CtM's slice-norm balancing):

       M_t' = M_t / |M_t| * (beta |M_t| + (1 - beta) mean_s |M_s|)        (Frobenius norms)

   ``beta = 1``: raw slices; ``beta = 0``: equal norms (the mean); default 0.25, CtM's README setting.
3. Tucker-2 of the rescaled tensor, ``tensorly.decomposition.partial_tucker(M', rank=[R, R], modes=[0, 1],
   init="svd", n_iter_max=1000, tol=1e-6)`` (HOOI; the task mode is left free): orthonormal ``F0`` (k1 x R), ``F1``
   (k2 x R). Lifted: ``U0 = U_B F0`` (out x R), ``U1 = V_A F1`` (in x R), both orthonormal. Computed by
   :func:`hooi`, tensorly's iterates for a batch of equal-shape modules at once (the tests compare it with dense
   ``partial_tucker`` on the full out x in x T tensor); tensorly's per-call overhead (a full SVD of each unfolding
   per module and iteration) made a whole-model merge tens of seconds.
4. Per-task R x R coordinates of the *raw* updates, ``C_t = U0^T X_t U1 = F0^T M_t F1`` (the rescaling only
   shapes the subspaces, as in CtM).
5. Merge the ``C_t`` (``tucker_merge``):

       ties        (default) PEFT's ``ties`` on the C_t: top ``density`` (default 0.25, CtM's ``topK=25``) of each
                   C_t by magnitude, sign elected from the pruned unweighted C_t (``majority_sign_method``), task t
                   multiplied by w_t, disjoint mean (as ``knots`` and ``core_ties``).
       sum         task arithmetic, ``C = sum_t w_t C_t`` (CtM's ``tv``/``sum``; its ``mean`` is ``w_t = 1/T``).
                   This is ``P_U0 (sum_t w_t X_t) P_U1``: the weighted sum projected onto the Tucker subspaces.
       sign_elect  sign election without pruning or averaging, entrywise: elect ``sign(sum_t w_t C_t)``, sum only
                   the agreeing ``w_t C_t`` (the entry-level form of ``cp_variant="sign_elect"``). Hypothesis
                   (issue 21, written before it was measured): in the shared R x R coordinates opposing tasks cancel
                   each other; dropping the minority keeps each shared direction at the majority's full strength,
                   where TIES's disjoint mean divides it by the number of agreeing tasks.

   ``dW = U0 C U1^T``, a rank-R LoRA by construction, returned balanced (SVD of the R x R ``C``, scaling 1).
   ``isotropize=True`` replaces the non-zero singular values of ``C`` by their mean (CtM's ``--isotropize=1``).

Never out x in: the core is (T r) x (T r) x T and the lift is two thin products. A tensor merge, as ``cp``: the
fit sees every task jointly, and at ``R < sum_t r_t`` (above all ``R = r``) it chooses the shared subspaces.

Official code: ``ZhengbaoHe/compress-then-merge``, ``task_merger.py`` (``get_low_rank_components_in_core_space``,
``_merge_tensors``, ``merge_space="low_rank_core"``; README: ``--merge_method=ties --beta=0.25 --topK=25``).
Deviations:

- LoRA scaling: the official code decomposes the raw products ``B_t A_t`` (PEFT's ``lora_A``/``lora_B`` weights,
  no ``lora_alpha / r``); here the scaled updates ``s_t B_t A_t``, so that ``lora_alpha`` counts (as ``core_ties``).
  For equal scalings the subspaces are the same. ``V_A`` comes from the scaled ``s_t A_t`` (same span); the result
  does not depend on which orthonormal basis of the span the core uses (HOOI is equivariant under isometries).
- Weights: the official merge is unweighted and scaled by one global coefficient (README 0.75); here ``w_t``
  multiplies task t inside the merge (PEFT's ``ties``), so uniform ``w_t = alpha`` is the official result and the
  merge is linear in a common scale of the weights. The weights do not enter the fit (as in ``cp``).
- TIES details follow PEFT's ``ties`` (zero vote elects +, exactly ``int(density * R^2)`` entries kept, the disjoint
  mean counts the agreeing kept entries); the official ``ties_merging`` resolves zero votes by the majority sign,
  keeps threshold ties and counts non-zero entries. They differ only on exact ties.
- A task whose update is zero stays zero (the official rescale divides by its zero norm: NaN).
- Rank: ``R`` is capped at ``min(k1, k2) = min(out, in, sum_t r_t)`` (partial_tucker cannot return more orthonormal
  columns); the registry pads back to ``svd_rank``. The Tucker fit runs in float64 (official: the adapters' dtype).
- ``sign_elect`` and the option names ``tucker_merge`` / ``tucker_n_iter_max`` / ``tucker_tol`` are ours.
- ``isotropize`` flattens the non-zero spectrum only (``S > max(out, in) eps S_1``; official: ``matrix_rank``).
"""

from __future__ import annotations

from collections.abc import Mapping
from numbers import Real
from typing import Any

import torch

from ..errors import MergeInputError
from ._linalg import balanced, single_threaded, svd_flip, threaded, zero_update
from .core import core_space
from .knots import SIGN_METHODS, ties_merge
from .registry import LoraFactors, merge_method

TUCKER_MERGES = ("ties", "sum", "sign_elect")


def _validate(opts: Mapping[str, Any]) -> None:  # tucker_merge, majority_sign_method: checked by the registry
    b = opts["beta"]
    if isinstance(b, bool) or not isinstance(b, Real) or not 0.0 <= float(b) <= 1.0:
        raise MergeInputError(f"beta must be a number in [0, 1] (1: raw task norms, 0: equal norms), got {b!r}.")
    d = opts["density"]
    if isinstance(d, bool) or not isinstance(d, Real) or not 0.0 < float(d) <= 1.0:
        raise MergeInputError(
            f"density must be a number in (0, 1] (the fraction of each task's coordinates TIES keeps), got {d!r}."
        )
    n = opts["tucker_n_iter_max"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise MergeInputError(f"tucker_n_iter_max must be a positive integer, got {n!r}.")
    tol = opts["tucker_tol"]
    if isinstance(tol, bool) or not isinstance(tol, Real) or not float(tol) >= 0:
        raise MergeInputError(f"tucker_tol must be a non-negative number, got {tol!r}.")


def rescale_slices(norms: torch.Tensor, beta: float) -> torch.Tensor:
    """CtM's per-task factor ``(beta n_t + (1 - beta) mean_s n_s) / n_t`` for task norms ``n_t`` (1 where ``n_t = 0``:
    a zero task stays zero)."""
    target = beta * norms + (1.0 - beta) * norms.mean()
    return torch.where(norms > 0, target / norms.clamp_min(torch.finfo(norms.dtype).tiny), torch.ones_like(norms))


def hooi(G: torch.Tensor, rank: int, *, n_iter_max: int = 1000, tol: float = 1e-6):
    """``(F0, F1)``, (N, k1, rank) and (N, k2, rank) with orthonormal columns: tensorly's ``partial_tucker`` (HOOI,
    ``init="svd"``) of each k1 x k2 x T tensor of the batch ``G`` (N, T, k1, k2) on its two matrix modes at ranks
    [rank, rank], for all N modules at once.

    The same iterates as tensorly: the SVD start takes the leading left singular vectors of each unfolding; an
    iteration updates mode 0 from ``G x_2 F1^T`` (unfolding ``[M_1 F1 .. M_T F1]``), then mode 1 from
    ``G x_1 F0^T`` with the new F0; the error ``sqrt(|G|^2 - |core|^2) / |G|`` stops a module once it changes by
    less than ``tol`` (checked from the third iteration, as tensorly). The leading left singular vectors of an
    unfolding ``Y`` are the leading eigenvectors of the small ``Y Y^T`` (k x k), which is all this computes (tensorly
    runs a full SVD of each k x (R T) unfolding per module and iteration). Their signs are arbitrary here; the
    caller fixes them as tensorly does.
    """
    def top(S):  # leading `rank` eigenvectors of each symmetric PSD S (N, k, k)
        return torch.linalg.eigh(S)[1].flip(-1)[..., :rank]

    N = G.shape[0]
    F0 = top(torch.einsum("ntab,ntcb->nac", G, G))  # sum_t M_t M_t^T
    F1 = top(torch.einsum("ntab,ntac->nbc", G, G))  # sum_t M_t^T M_t
    norm2 = G.square().sum((1, 2, 3))
    norm = norm2.sqrt().clamp_min(torch.finfo(G.dtype).tiny)
    active = torch.ones(N, dtype=torch.bool, device=G.device)
    prev = torch.zeros_like(norm)
    for iteration in range(n_iter_max):
        Y = G @ F1[:, None]  # (N, T, k1, R): M_t F1
        F0_new = top(torch.einsum("ntar,ntbr->nab", Y, Y))
        Z = G.mT @ F0_new[:, None]  # (N, T, k2, R): M_t^T F0
        F1_new = top(torch.einsum("ntbr,ntcr->nbc", Z, Z))
        core2 = (F1_new[:, None].mT @ Z).square().sum((1, 2, 3))  # |F0^T M_t F1|^2 summed over t
        err = (norm2 - core2).abs().sqrt() / norm
        keep = active[:, None, None]
        F0, F1 = torch.where(keep, F0_new, F0), torch.where(keep, F1_new, F1)
        if iteration > 1 and tol:
            active = active & ((prev - err).abs() >= tol)
        prev = torch.where(keep[:, 0, 0], err, prev)
        if not active.any():
            break
    return F0, F1


def merge_coordinates(coords: list[torch.Tensor], weights: torch.Tensor, how: str, density: float,
                      majority_sign_method: str) -> torch.Tensor:
    """The merged R x R coordinates from the per-task ``coords`` (module docstring, step 5)."""
    stack = torch.stack(coords)
    if how == "ties":
        return ties_merge(coords, weights, float(density), majority_sign_method)
    a = weights.to(stack.dtype).reshape(-1, 1, 1) * stack
    if how == "sum":
        return a.sum(0)
    sign = torch.sign(a.sum(0))  # sign_elect
    return torch.where(torch.sign(a) == sign, a, torch.zeros_like(a)).sum(0)


def flat_nonzero(s: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Singular values ``s`` (descending) with the non-zero ones (``> max(shape) eps s_1``) replaced by their mean and
    the others set to 0."""
    if s.numel() == 0 or not s[0] > 0:
        return s
    keep = s > max(shape) * torch.finfo(s.dtype).eps * s[0]
    return torch.where(keep, s[keep].mean(), torch.zeros_like(s))


@merge_method(
    "tucker",
    pretty_name="CtM Tucker-2 merge (Compress-then-Merge: Tucker-2 of the core matrices, TIES on the coordinates)",
    reference=(
        "He et al., Compress-then-Merge, ICML 2026; code github.com/ZhengbaoHe/compress-then-merge "
        "(task_merger.py get_low_rank_components_in_core_space, merge_space='low_rank_core')"
    ),
    rank_option="svd_rank",
    options={
        "beta": 0.25,
        "tucker_merge": "ties",
        "density": 0.25,
        "majority_sign_method": "total",
        "isotropize": False,
        "tucker_n_iter_max": 1000,
        "tucker_tol": 1e-6,
    },
    choices={"tucker_merge": TUCKER_MERGES, "majority_sign_method": SIGN_METHODS},
    validate=_validate,
    batched=True,
)
@single_threaded()  # small (T r)-sized work: batched eigh of 48 x 48 matrices ran 10x slower on 2 busy threads
def tucker_merge(
    groups: list[list[LoraFactors]],
    weights: torch.Tensor,
    *,
    rank: int,
    beta: float = 0.25,
    tucker_merge: str = "ties",
    density: float = 0.25,
    majority_sign_method: str = "total",
    isotropize: bool = False,
    tucker_n_iter_max: int = 1000,
    tucker_tol: float = 1e-6,
) -> list[LoraFactors]:
    """CtM's Tucker-2 merge of a batch of modules (equal shapes and ranks; ``weights`` (N, T)); output rank
    ``<= min(rank, out, in, sum_t r_t)``. The core spaces are per module, the Tucker fit (:func:`hooi`) batched."""
    with threaded():  # the (out + in)-sized QRs and products of the core spaces: worth the caller's threads
        spaces = [core_space(g) for g in groups]  # (out, k1), (in, k2), T x (k1, k2)
    G = torch.stack([torch.stack(cores) for _, _, cores in spaces]).double()  # (N, T, k1, k2)
    norms = G.norm(dim=(2, 3))  # (N, T)
    R = min(rank, G.shape[2], G.shape[3])
    scaled = G * torch.stack([rescale_slices(n, float(beta)) for n in norms])[:, :, None, None]
    F0, F1 = hooi(scaled, R, n_iter_max=tucker_n_iter_max, tol=float(tucker_tol))
    # tensorly's sign convention (svd_flip of each unfolding's singular vectors, i.e. of the lifted U0 and U1 on the
    # full tensor): the largest-magnitude entry of each column of U0 = U_B F0 and of U1 = V_A F1 positive. TIES with
    # majority_sign_method="frequency" is not equivariant to flipping a basis vector where a vote ties.
    for n, (U_B, V_A, _) in enumerate(spaces):
        F0[n] = svd_flip(U_B.double() @ F0[n], F0[n])[1]
        F1[n] = svd_flip(V_A.double() @ F1[n], F1[n])[1]
    C = F0[:, None].mT @ G @ F1[:, None]  # (N, T, R, R): C_t = U0^T X_t U1 of the raw updates
    out = []
    for n, (factors, (U_B, V_A, _)) in enumerate(zip(groups, spaces)):
        if not bool(norms[n].max() > 0):  # every update is zero
            out.append(zero_update(factors))
            continue
        merged = merge_coordinates(list(C[n]), weights[n].double(), tucker_merge, density, majority_sign_method)
        P, s, Qh = torch.linalg.svd(merged)
        if not (s.numel() and s[0] > 0):
            out.append(zero_update(factors))
            continue
        if isotropize:
            s = flat_nonzero(s, factors[0].shape)
        dtype = U_B.dtype
        U, V = U_B @ (F0[n] @ P).to(dtype), V_A @ (F1[n] @ Qh.T).to(dtype)
        U, V = svd_flip(U, V)
        out.append(balanced(U, s.to(dtype), V))
    return out
