"""Core-space merging (Panariello et al., NeurIPS 2025): merge the LoRAs in the small joint "core" space, then lift.

Per module, with task updates ``X_t = s_t B_t A_t`` (out x in), ``S = sum_t r_t`` and weights ``w_t``:

1. Reference bases: ``U_B`` (out x k1) = left singular vectors of ``[B_1 .. B_T]`` (out x S), ``V_A`` (in x k2) =
   right singular vectors of ``[s_1 A_1; ..; s_T A_T]`` (S x in); ``k1 = min(out, S)``, ``k2 = min(in, S)``, all of
   them kept (``full_matrices=False``, as the official code), each pair's sign fixed by sklearn's ``svd_flip``
   convention (largest-magnitude entry of each column positive).
2. Cores: ``M_t = U_B^T B_t s_t A_t V_A`` (k1 x k2, i.e. (T r) x (T r) for T rank-r adapters). Every ``X_t`` lies in
   ``span(U_B) x span(V_A)``, so ``X_t = U_B M_t V_A^T`` exactly: the cores lose nothing.
3. Merge the cores (here: TIES), lift ``dW = U_B M V_A^T``.

Factored: ``[B_1 .. B_T] = Q_B R_B`` and ``[s_t A_t]^T = Q_A R_A`` (reduced QR) and the SVDs of the small k x S
factors, ``R_B = u_B Sigma_B Z_B^T`` and ``R_A = u_A Sigma_A Z_A^T``, give ``U_B = Q_B u_B``, ``V_A = Q_A u_A`` and
``M_t = (u_B^T R_B[:, t]) (u_A^T R_A[:, t])^T``; never out x in. Cost O((out + in) S^2 + T S^3).

**core_ties**: TIES on the cores, exactly ``knots.ties_merge`` (PEFT's ``ties``: keep the top ``density`` fraction
of each core by magnitude, elect signs from the pruned unweighted cores (``"total"`` / ``"frequency"``), multiply
task t by ``w_t``, disjoint mean), lifted and truncated to ``svd_rank`` through the SVD of the k1 x k2 merged core
(``U_B``, ``V_A`` are orthonormal, so this is the SVD of dW). Output rank ``min(R, k1, k2)``; the registry default
``R`` is the largest adapter rank, pass ``svd_rank = sum_t r_t`` for the untruncated merge.

Why only TIES is registered. The other merges the paper runs in core space are already here, exactly:

- Task arithmetic in core space is ``sum_t w_t X_t`` (the lift is linear): PEFT's ``cat``/``svd``.
- **TSV in core space equals ``tsv`` at ``svd_rank = sum_t r_t``** (whenever ``T <= min(out, in, sum_t r_t)``),
  so no ``core_tsv`` is registered. ``U_B``, ``V_A`` have orthonormal columns
  and contain every task's column / row space, so the SVD of a core is the lifted task SVD,
  ``M_t = (U_B^T U_t) S_t (V_A^T V_t)^T``, and the polar factor commutes with the isometry,
  ``polar(U_B^T U^) = U_B^T polar(U^)``; core TSV keeps ``int(min(k1, k2) / T) = min(out, in, sum_t r_t) // T``
  triplets per task, ``tsv``'s own rule at that rank (never over budget when ``T <= min(out, in, sum_t r_t)``).
  ``tests/test_iso_core.py`` checks it against a dense core-space TSV, including a module with ``sum_t r_t > out``.
- Likewise Iso-C in core space (isotropize the summed core) equals ``iso_c`` at ``svd_rank = sum_t r_t``: the
  summed core has the singular values of the sum.

Official code: ``apanariello4/core-space-merging``, ``task_merger.py`` (``MatrixPerLayerMerger.get_core_matrices``,
``merge`` with ``merge_space="core"``; TIES in ``merging_functions.py`` ``ties_merging``). Deviations:

- LoRA scaling: the official code builds the bases and cores from the raw ``A_t``, ``B_t`` (one global coefficient
  is applied after the lift); here ``V_A`` and the cores use the scaled ``s_t A_t``, so that ``M_t`` is the core of
  the actual update ``s_t B_t A_t``. For equal scalings (the official setting) the bases are the same.
- Weights: the official code merges unweighted and scales the lifted result by one global coefficient alpha; here
  ``w_t`` multiplies task t's pruned, sign-agreeing core inside the disjoint mean (PEFT's ``ties``, as ``knots``).
  Uniform ``w_t = alpha`` gives the official result; the merge is linear in a common scale of the weights.
- TIES details follow PEFT's ``ties`` (as ``knots``): a zero vote elects +, the disjoint mean counts the
  sign-agreeing kept entries, top-k keeps exactly ``int(density * numel)`` per core. The official ``ties_merging``
  resolves zero votes by the majority sign, counts non-zero entries and keeps threshold ties (``kthvalue``); these
  differ only on exact ties. Top-k is per task and module in both.
- ``density`` defaults to 1.0 (no pruning; PEFT's ``ties`` has no default). The official ``topK`` is searched on
  validation data (``topK=10..100`` percent).
- Output rank: the official merge is not rank-limited (rank <= sum r_t); here it is truncated to ``svd_rank``.
- Singular-vector signs are fixed (``svd_flip``) where the official code keeps ``torch.linalg.svd``'s; TIES is
  sign-equivariant except where a vote ties exactly, so this only makes such ties deterministic. Where the stacks
  have repeated singular values the bases are not unique (in the official code either), and TIES, which is not
  rotation invariant, depends on the choice.
- Not offered: DARE, CART, isotropizing the merged core (``isotropize=True``; see ``iso_c``).
"""

from __future__ import annotations

import torch

from ._linalg import stacked, svd_flip
from .knots import TIES_OPTIONS, ties_lift
from .registry import LoraFactors, merge_method


def core_space(factors: list[LoraFactors]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """``(U_B, V_A, [M_1 .. M_T])``: the reference bases (out x k1, in x k2) and the cores ``U_B^T X_t V_A``."""
    As, Bs = stacked(factors)  # [s_t A_t] (S x in), [B_t] (out x S)
    Q_B, R_B = torch.linalg.qr(Bs)  # (out, k1), (k1, S)
    Q_A, R_A = torch.linalg.qr(As.T)  # (in, k2), (k2, S)
    u_B = torch.linalg.svd(R_B, full_matrices=False)[0]  # (k1, k1)
    u_A = torch.linalg.svd(R_A, full_matrices=False)[0]  # (k2, k2)
    U_B, u_B = svd_flip(Q_B @ u_B, u_B)
    V_A, u_A = svd_flip(Q_A @ u_A, u_A)
    P_B, P_A = u_B.T @ R_B, u_A.T @ R_A  # U_B^T [B_t], V_A^T [s_t A_t]^T
    cores, start = [], 0
    for f in factors:
        cores.append(P_B[:, start : start + f.rank] @ P_A[:, start : start + f.rank].T)
        start += f.rank
    return U_B, V_A, cores


@merge_method(
    "core_ties",
    pretty_name="Core-space TIES (TIES on the LoRA core matrices)",
    reference=(
        "Panariello et al., Accurate and Efficient Low-Rank Model Merging in Core Space, NeurIPS 2025; "
        "code github.com/apanariello4/core-space-merging (task_merger.py, merge_space='core')"
    ),
    **TIES_OPTIONS,
)
def core_ties_merge(factors: list[LoraFactors], weights: torch.Tensor, *, rank: int, density: float = 1.0,
                    majority_sign_method: str = "total") -> LoraFactors:
    """TIES in core space of one module's adapters; output rank ``<= min(rank, out, in, sum_t r_t)``."""
    U_B, V_A, cores = core_space(factors)  # cores: k1 x k2
    return ties_lift(factors, U_B, cores, V_A, weights, rank, density, majority_sign_method)
