"""Exact low-rank SVD merge: PEFT's ``combination_type="svd"`` without the dense matrix.

Per module, the weighted sum of the task updates is a product of the stacked factors (PEFT's ``cat`` update),

    sum_t w_t s_t B_t A_t = [B_1 .. B_T] [c_1 A_1; ..; c_T A_T] = Bs As,   c_t = w_t s_t   (out x S, S x in),

with ``S = sum_t r_t``. Reduced QR of both, ``Bs = Q_B R_B`` and ``As^T = Q_A R_A``, gives the sum as
``Q_B (R_B R_A^T) Q_A^T``; the SVD of the small core ``R_B R_A^T = u s vh`` (at most S x S) lifts to the SVD of the
sum, ``U = Q_B u``, ``V = Q_A vh^T``. The ``rank`` leading triplets are kept and returned balanced
(``B' = U sqrt(s)``, ``A' = sqrt(s) V^T``, scaling 1). Cost O((out + in) S^2), never an out x in matrix.

The update ``B' A'`` equals PEFT's ``svd`` result (``U[:, :r] diag(S[:r]) Vh[:r]`` of the dense weighted sum,
``svd_clamp=None``) up to float rounding; the factors themselves differ from PEFT's by the sign of each singular pair
and by the balancing (PEFT puts all of ``S`` into B). ``peft_combination_type=False``: PEFT keeps its own ``svd``;
this one serves the adapter-file engine, which has no base model to call PEFT with. Deviations from PEFT: the rank
is capped at ``min(out, in, S)`` (beyond that PEFT's extra components are zero; the registry pads back to the rank),
and ConvNd of every dimension is handled through the flattened factors (PEFT's own path mishandles Conv1d/Conv3d,
peft #3769). ``svd_clamp`` / ``svd_full_matrices`` / ``svd_driver`` are not offered.
"""

from __future__ import annotations

import torch

from ._linalg import balanced, stacked, threaded
from .registry import LoraFactors, merge_method


def truncated_svd(Bs: torch.Tensor, As: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``rank`` truncated SVD ``(U, s, V)`` of ``Bs @ As`` for a batch (``Bs`` (N, out, S), ``As`` (N, S, in)).

    ``U`` (N, out, k), ``s`` (N, k) descending, ``V`` (N, in, k) with ``k = min(rank, out, in, S)``; computed from
    reduced QRs of both factors and the SVD of the small core, never forming ``Bs @ As``.
    """
    with threaded():  # the large products, (out + in) S^2 per module; the engine runs the rest single-threaded
        Q_B, R_B = torch.linalg.qr(Bs)  # (N, out, k1), (N, k1, S)
        Q_A, R_A = torch.linalg.qr(As.mT)  # (N, in, k2), (N, k2, S)
    u, s, vh = torch.linalg.svd(R_B @ R_A.mT, full_matrices=False)
    k = min(rank, s.shape[-1])
    return Q_B @ u[..., :k], s[..., :k], Q_A @ vh[..., :k, :].mT


@merge_method(
    "svd",
    pretty_name="Low-rank SVD of the weighted sum (PEFT's svd, factored)",
    reference="PEFT LoraModel.add_weighted_adapter(combination_type='svd'), computed without the dense update",
    rank_option="svd_rank",
    peft_combination_type=False,
    batched=True,
)
def svd_merge(groups: list[list[LoraFactors]], weights: torch.Tensor, *, rank: int) -> list[LoraFactors]:
    """Rank-``rank`` truncated SVD of ``sum_t w_t s_t B_t A_t`` for a batch of modules (``weights`` (N, T))."""
    parts = [stacked(g, weights[n]) for n, g in enumerate(groups)]
    As = torch.stack([a for a, _ in parts])
    Bs = torch.stack([b for _, b in parts])
    U, s, V = truncated_svd(Bs, As, rank)
    return [balanced(U[n], s[n], V[n]) for n in range(len(groups))]
