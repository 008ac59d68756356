"""KnOTS (Stoica et al., ICLR 2025): align the task updates in a shared SVD basis, then merge there with TIES.

Per module, with task updates ``X_t = s_t B_t A_t`` (out x in) and weights ``w_t``:

1. Joint SVD of the updates concatenated along the input dim, ``[X_1 .. X_T] = U S [V_1 .. V_T]`` (float64),
   dropping singular values ``<= 1e-5`` (absolute, as the official code). ``U`` (out x K) is the shared basis and
   ``S V_t`` (K x in, written ``M_t``) is task t in that basis.
2. TIES on the ``M_t``, exactly PEFT's ``ties`` (``peft.utils.merge_utils``): keep the top ``density`` fraction of
   each ``M_t`` by magnitude; elect each entry's sign from the pruned, unweighted tensors (``"total"``: sign of the
   sum, ``"frequency"``: sign of the count, ties -> +); multiply task t by ``w_t``; disjoint mean (sum of the
   sign-agreeing entries over their count).
3. ``dW = U M_merged``; truncated to rank ``R`` through the SVD of the K x in ``M_merged`` (``U`` is orthonormal, so
   this is the SVD of dW), returned balanced (scaling 1). Output rank ``min(R, K)``, ``K <= sum_t r_t``.

In LoRA form, step 1 never forms an out x in matrix: ``[B_1 .. B_T] = Q R`` (reduced QR) and
``A_t^T = Q_t R_t`` give ``[X_1 .. X_T] = Q [R_1' .. R_T'] blockdiag(Q_t^T)`` with ``R_t' = s_t R[:, t] R_t^T``
and ``blockdiag(Q_t^T)`` orthonormal rows, so the SVD of the small ``[R_1' .. R_T'] = W S Z^T`` (at most
S x S, S = sum r_t) gives ``U = Q W`` and ``M_t = S V_t = W^T R[:, t] s_t A_t`` (K x in).

Official code: ``gstoica27/KnOTS`` (``task_merger.py`` ``SVDMerger``, ``masking_ops.py`` ``ties_masking`` and
``masked_merge``, configs ``*_knots_ties.py``: ``concat_across_output=True``, ``merging_type="mean"``,
``sign_resolve_mode="sum_of_values"``). Deviations:

- Top-k granularity: the official code ranks magnitudes over each task's whole flattened model (all layers at
  once, ``topK`` in percent); here per module and task (K x in entries), the granularity of PEFT's ``ties``.
- Sign election and counting follow PEFT's ``ties``: a zero sum elects +, and the disjoint mean counts the
  sign-agreeing kept entries. The official code resolves a zero sum by the majority sign and counts non-zero
  weighted entries; top-k there keeps ties at the threshold (``kthvalue``), PEFT keeps exactly
  ``int(density * numel)``. These differ only on exact ties (and for ``w_t = 0``, which the official code never
  uses).
- Weights: the official ``masked_merge`` multiplies every task by ``weights[0]`` (one global coefficient alpha)
  before the disjoint mean; here task t is multiplied by its own ``w_t``, as PEFT's ``ties`` does. Uniform
  ``w_t = alpha`` gives the official result.
- ``density`` defaults to 1.0 (no pruning: the official Llama-3-8B config ``topK=100``; its ViT configs use
  ``topK=20``, i.e. ``density=0.2``). PEFT's ``ties`` has no default. ``density=1`` still elects signs and takes
  the disjoint mean.
- Output rank: the official merge is not rank-limited (rank <= sum r_t); here it is truncated to ``svd_rank``
  (default: the largest adapter rank). Pass ``svd_rank=sum r_t`` for the untruncated result.
- Not offered: ``merging_type`` ``"sum"`` / ``"max"``, DARE pruning, ``concat_across_output=False``.
- Singular vector signs follow sklearn's ``svd_flip`` convention (largest-magnitude entry of each U column
  positive); the official code keeps whatever ``torch.linalg.svd`` returns. This only matters where the sign vote
  ties exactly (``"frequency"`` with pruning), where TIES is not invariant to flipping a singular pair.
- The decomposition uses the scaled updates ``s_t B_t A_t`` in the LoRA factors' (out x in) orientation (also for
  Embedding and ``fan_in_fan_out`` layers); the 1e-5 threshold applies to those.
"""

from __future__ import annotations

from collections.abc import Mapping
from numbers import Real
from typing import Any

import torch
from peft.utils.merge_utils import calculate_majority_sign_mask, disjoint_merge, magnitude_based_pruning

from ..errors import MergeInputError
from ._linalg import balanced, svd_flip, zero_update
from .registry import LoraFactors, merge_method

SIGN_METHODS = ("total", "frequency")
SV_THRESHOLD = 1e-5  # official KnOTS: keep singular values s > 1e-5 of the concatenated updates


def _validate(opts: Mapping[str, Any]) -> None:  # majority_sign_method: checked by the registry (choices)
    d = opts["density"]
    if isinstance(d, bool) or not isinstance(d, Real) or not 0.0 < float(d) <= 1.0:
        raise MergeInputError(
            f"density must be a number in (0, 1] (the fraction of each task's entries TIES keeps), got {d!r}."
        )


def knots_basis(factors: list[LoraFactors]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """``(U, S, [M_1 .. M_T])`` of ``[X_1 .. X_T] = U S [V_1 .. V_T]``, ``M_t = diag(S) V_t`` (K x in).

    Singular values ``<= 1e-5`` are dropped (K of them kept). Each singular pair's sign is fixed so that the
    largest-magnitude entry of its U column is positive (TIES is not sign-equivariant where the sign vote ties, as
    with ``majority_sign_method="frequency"`` and pruning, so the result must not depend on the SVD routine's
    signs). ``U`` and the ``M_t`` are in the factors' dtype, the small SVD in float64.
    """
    Bs = torch.cat([f.B for f in factors], dim=1)
    Q, R = torch.linalg.qr(Bs)  # (out, k1), (k1, S)
    blocks, start = [], 0
    for f in factors:
        _, R_t = torch.linalg.qr(f.A.T)  # A_t^T = Q_t R_t
        blocks.append(f.scaling * (R[:, start : start + f.rank] @ R_t.T))
        start += f.rank
    W, S, _ = torch.linalg.svd(torch.cat(blocks, dim=1).double(), full_matrices=False)
    keep = S > SV_THRESHOLD
    W, S = W[:, keep].to(Bs.dtype), S[keep].to(Bs.dtype)
    U, W = svd_flip(Q @ W, W)
    coords, start = [], 0
    for f in factors:
        coords.append((W.T @ R[:, start : start + f.rank]) @ (f.scaling * f.A))
        start += f.rank
    return U, S, coords


def ties_merge(tasks: list[torch.Tensor], weights: torch.Tensor, density: float, majority_sign_method: str):
    """PEFT's ``ties`` (prune by magnitude, elect sign, weight, disjoint mean), without its density >= 1 warning."""
    if density < 1:
        tasks = [magnitude_based_pruning(t, density) for t in tasks]
    stack = torch.stack(tasks)
    mask = calculate_majority_sign_mask(stack, method=majority_sign_method)
    return disjoint_merge(stack * weights.reshape(-1, 1, 1), mask)


def ties_lift(factors: list[LoraFactors], left: torch.Tensor, coords: list[torch.Tensor], right: torch.Tensor | None,
              weights: torch.Tensor, rank: int, density: float, majority_sign_method: str) -> LoraFactors:
    """TIES in a basis, shared by ``knots`` and ``core_ties``: merge the tasks' coordinates ``coords`` (T matrices
    k1 x k2) with :func:`ties_merge` to ``M``, lift ``dW = left M right^T`` (``right=None``: the coordinates are
    already rows of the input space) and truncate to ``rank`` through the SVD of the small ``M`` (``left`` and
    ``right`` have orthonormal columns, so this is the SVD of dW). All-zero merges give a rank-1 zero update."""
    if left.shape[1] == 0:  # every singular value below the threshold: nothing to merge
        return zero_update(factors)
    merged = ties_merge(coords, weights, float(density), majority_sign_method)
    P, s, Qh = torch.linalg.svd(merged, full_matrices=False)
    if s.numel() == 0 or not s[0] > 0:  # every update is zero
        return zero_update(factors)
    k = min(rank, s.numel())
    return balanced(left @ P[:, :k], s[:k], Qh[:k].T if right is None else right @ Qh[:k].T)


TIES_OPTIONS: dict = {
    "rank_option": "svd_rank",
    "options": {"density": 1.0, "majority_sign_method": "total"},
    "choices": {"majority_sign_method": SIGN_METHODS},
    "validate": _validate,
}
"""The registration options shared by the TIES-style merges (``knots``, ``core_ties``)."""


REFERENCE = ("Stoica et al., Model merging with SVD to tie the KnOTS, ICLR 2025; code github.com/gstoica27/KnOTS "
             "(task_merger.py SVDMerger, masking_ops.py)")


@merge_method("knots", pretty_name="KnOTS (TIES in the joint SVD basis)", reference=REFERENCE, **TIES_OPTIONS)
def knots_merge(factors: list[LoraFactors], weights: torch.Tensor, *, rank: int, density: float = 1.0,
                majority_sign_method: str = "total") -> LoraFactors:
    """KnOTS-TIES of one module's adapters; output rank ``<= min(rank, sum_t r_t)`` (see the module docstring)."""
    U, _, coords = knots_basis(factors)  # coords: K x in
    return ties_lift(factors, U, coords, None, weights, rank, density, majority_sign_method)
