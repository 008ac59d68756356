"""TSV-Merge (Task Singular Vectors, Gargiulo et al., CVPR 2025) in LoRA-factored form.

Per module, with task updates ``X_t = s_t B_t A_t`` (out x in) and weights ``w_t``:

1. SVD of each task, ``X_t = U_t S_t V_t^T``, from the factors: ``B_t = Q_b R_b``, ``A_t^T = Q_a R_a`` (reduced QR),
   ``s_t R_b R_a^T = u S_t vh`` (r_t x r_t), ``U_t = Q_b u``, ``V_t = Q_a vh^T``. Exact, never out x in.
2. Keep the ``n_t`` leading triplets of each task (see below) and concatenate
   ``U^ = [U_1 .. U_T]`` (out x M), ``V^ = [V_1 .. V_T]`` (in x M), ``S^_w = blockdiag(w_1 S_1, .., w_T S_T)``.
3. Orthogonalise by the polar factor (the closest matrix with orthonormal columns): ``U^ = P Sigma Q^T`` ->
   ``U_perp = P Q^T``, likewise ``V_perp``. Computed as ``U^ = Q R`` (reduced QR, out x M) and the SVD of the
   M x M ``R``, so no out x out matrix appears.
4. ``dW = U_perp S^_w V_perp^T``, returned as rank-M LoRA factors balanced between B and A (scaling 1).

Choices, matched to the official code (``AntoAndGar/task_singular_vectors``, ``compute_and_sum_svd_mem_reduction``),
with every deviation named:

- Components per task. Official: ``k = int(min(out, in) / T)`` for every task, the first k singular triplets of
  the dense SVD, placed in block t of zero-initialised U^, S^, V^ (no special first block). Here ``n_t =
  min(rank(X_t), k)`` with ``k = max(1, min(R, out, in) // T)``, ``R`` the requested ``svd_rank``: TSV's own rule
  with the rank budget ``min(R, out, in)`` instead of ``min(out, in)`` (identical to the official k when
  ``svd_rank >= min(out, in)``). Deviation: the official code also keeps triplets with zero singular value when
  ``r_t < k``; for a LoRA those singular vectors are arbitrary null-space directions that change the polar factor
  of the others, so only the numerically non-zero ones (``S > max(out, in) * eps * S_max``) are kept.
- If ``T > min(R, out, in)`` (one triplet per task is already over budget), the ``min(R, out, in)`` triplets with
  the largest ``|w_t| S_ti`` are kept. The output rank is ``M = sum_t n_t <= min(R, out, in)`` (zero-padded to R by
  the registry's ``merge_batch``).
- Weights. Official: tasks are merged unweighted and the merged update is scaled by one global coefficient alpha
  chosen on validation data. Here ``w_t`` multiplies task t's block of S^ (the orthogonalisation does not depend on
  the weights), so uniform ``w_t = alpha`` reproduces the official result; negative weights subtract.
- Rank-deficient U^ or V^ (two tasks sharing a direction exactly): the polar factor is not unique; the official
  SVD picks an arbitrary completion, here the partial isometry (directions with singular value ``<= M * eps *
  max`` of R dropped) is used.
- Scope: the official code applies TSV to every 2-D weight (except ``text_projection``) and averages the other
  parameters; here it applies to each LoRA module, on the scaled update ``s_t B_t A_t`` in the LoRA factors'
  (out x in) orientation (also for Embedding and ``fan_in_fan_out`` layers).
"""

from __future__ import annotations

import torch

from ._linalg import balanced, zero_update
from .registry import LoraFactors, merge_method


def task_svd(f: LoraFactors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U, S, V)`` of ``f.scaling * f.B @ f.A`` from its factors, numerically zero triplets dropped.

    ``U`` (out x n), ``S`` (n,) descending, ``V`` (in x n), ``n <= r``; cost O((out + in) r^2).
    """
    Q_b, R_b = torch.linalg.qr(f.B)
    Q_a, R_a = torch.linalg.qr(f.A.T)
    u, s, vh = torch.linalg.svd(f.scaling * (R_b @ R_a.T), full_matrices=False)
    tol = max(f.shape) * torch.finfo(s.dtype).eps * (s[0] if s.numel() else 0.0)
    n = int((s > tol).sum()) if s.numel() and s[0] > 0 else 0
    return Q_b @ u[:, :n], s[:n], Q_a @ vh[:n].T


def polar(M: torch.Tensor) -> torch.Tensor:
    """Orthogonal polar factor ``P Q^T`` of ``M = P Sigma Q^T`` (n x m, n >= m), via QR and an m x m SVD.

    Directions with ``Sigma <= max(n, m) * eps * Sigma_max`` are dropped (partial isometry, the pseudo-inverse
    polar factor ``M (M^T M)^{+1/2}``).
    """
    Q, R = torch.linalg.qr(M)
    p, sig, qh = torch.linalg.svd(R)
    keep = sig > max(M.shape) * torch.finfo(sig.dtype).eps * sig[0]
    return Q @ (p[:, keep] @ qh[keep])


@merge_method(
    "tsv",
    pretty_name="TSV-Merge (Task Singular Vectors)",
    reference=(
        "Gargiulo et al., Task Singular Vectors: Reducing Task Interference in Model Merging, CVPR 2025; "
        "code github.com/AntoAndGar/task_singular_vectors (compute_and_sum_svd_mem_reduction)"
    ),
    rank_option="svd_rank",
)
def tsv_merge(factors: list[LoraFactors], weights: torch.Tensor, *, rank: int) -> LoraFactors:
    """TSV-Merge of one module's adapters; output rank ``<= min(rank, out, in)`` (see the module docstring)."""
    out, inn = factors[0].shape
    T = len(factors)
    budget = min(rank, out, inn)
    k = max(1, budget // T)
    parts = [task_svd(f) for f in factors]
    cand = [(t, i) for t, (_, s, _) in enumerate(parts) for i in range(min(k, s.numel()))]
    if len(cand) > budget:
        strength = torch.stack([weights[t].abs() * parts[t][1][i] for t, i in cand])
        chosen = set(torch.argsort(strength, descending=True, stable=True)[:budget].tolist())
        cand = [c for j, c in enumerate(cand) if j in chosen]
    if not cand:  # every update is zero
        return zero_update(factors)
    U_hat = torch.stack([parts[t][0][:, i] for t, i in cand], dim=1)
    V_hat = torch.stack([parts[t][2][:, i] for t, i in cand], dim=1)
    S_w = torch.stack([weights[t] * parts[t][1][i] for t, i in cand])
    return balanced(polar(U_hat), S_w, polar(V_hat))
