"""Iso-C and Iso-CTS (Marczak et al., ICML 2025): isotropic merging, in LoRA-factored form.

Per module, with task updates ``X_t = s_t B_t A_t`` (out x in), weights ``w_t`` and ``Y_t = w_t X_t``:

**Iso-C** (``iso_c``). Task arithmetic with a flat spectrum:

    sum_t Y_t = U diag(S) V^T  (K non-zero singular values),    dW = mean(S_1 .. S_K) U[:, :k] V[:, :k]^T,

``k = min(R, K)``, ``R`` the requested ``svd_rank``. The SVD comes from the stacked factors
(``_linalg.stacked``, ``svd.truncated_svd``: QR of both, SVD of the small core), never out x in.

**Iso-CTS** (``iso_cts``). Common and task-specific subspaces, then a flat spectrum:

1. Common subspace: the ``k_c`` leading singular triplets ``(U_c, S_c, V_c)`` of ``sum_t Y_t`` (non-zero ones only).
2. Task-specific directions: for each task, the ``n`` leading singular triplets ``(U_t, S_t, V_t)`` of the part of
   ``Y_t`` outside the common subspace, ``Y_t - U_c U_c^T Y_t = (B_t - U_c U_c^T B_t) (w_t s_t A_t)`` (factored:
   only ``B_t`` is projected, then ``tsv.task_svd``).
3. ``U^ = [U_c, U_1 .. U_T]``, ``V^ = [V_c, V_1 .. V_T]``, ``sigma = mean`` of all collected singular values
   ``S_c, S_1 .. S_T``; orthogonalise by the polar factors (``tsv.polar``) and
   ``dW = sigma * polar(U^) polar(V^)^T``.

Budget rule (``iso_cts_budget``), the official rule with the rank budget of a LoRA merge: ``N = min(R, sum_t r_t,
out, in)`` directions in all (the official ``N = min(out, in)``: a dense task vector has full rank), ``f`` =
``common_space_fraction`` (default 0.8, the paper's):

    n   = min(round((N - floor(f N)) / T), N // T)      (Python's round, half to even, as the official code)
    n   = max(n, 1)                          if f < 1 and N > T (one task-specific direction per task, and
                                             at least one common direction, whenever the budget allows)
    k_c = N - T n

``n`` directions per task, ``k_c`` common ones. Without the two clamps this is exactly the official rule (the
task-specific total is rounded to a multiple of T, the common size takes the rest). The official code breaks
(negative ``k_c``) where ``T round(.) > N``, which the ``N // T`` cap prevents, and gives no task-specific direction
at all where ``(N - floor(f N)) / T <= 0.5``, a common case at LoRA ranks (``N = 16``, ``T = 8``: official
``n = 0``, here ``n = 1``, ``k_c = 8``; ``N = T = 8``: ``n = 0`` in both, as one direction each would leave no
common direction). ``f = 1`` gives Iso-C truncated to the top ``N`` directions of the sum (with ``N = sum r_t``
exactly ``iso_c`` at ``svd_rank = sum r_t``); ``f = 0`` leaves the ``N mod T`` remainder as the common space.

Official code: ``danielm1405/iso-merging``, ``src/utils/iso.py`` (``iso_c``, ``iso_cts``; configs
``config/method/iso_c.yaml``, ``iso_cts.yaml``). Deviations:

- Non-zero spectrum only. The official code flattens all ``min(out, in)`` singular values of a dense (full-rank)
  task-vector sum. A sum of LoRAs has rank ``K <= sum_t r_t``; flattening its zero singular values would give the
  null space mass and lower the mean, so only the non-zero ones count: ``S_i > max(out, in) * eps * S_1``
  (the ``matrix_rank`` tolerance, as ``tsv``). For Iso-CTS the task-specific triplets with
  ``S <= max(out, in) * eps * ||B_t||_2 ||w_t s_t A_t||_2`` (numerically zero: the task lies in the common
  subspace, or ``w_t = 0``) are dropped, where the official code would place arbitrary directions with singular
  value 0 (they would change the polar factor and lower the mean); the unused share is not redistributed. So the
  output rank can be below ``N``.
- Output rank. The official result is not rank-limited. Iso-C keeps the ``min(R, K)`` leading directions, each with
  the singular value of the full Iso-C, ``mean(S_1 .. S_K)`` over all K non-zero singular values (not only over
  the kept ones): the truncation keeps the directions the untruncated Iso-C would have, at the same strength. The
  registry default is the largest adapter rank; pass ``svd_rank = sum_t r_t`` for the full Iso-C. Iso-CTS uses
  the budget ``N`` above.
- Merged spectrum of Iso-CTS: as the official code, the mean of the collected singular values (``S_c`` from the
  sum, ``S_t`` from the projected tasks); the task-arithmetic sum is not re-projected onto the new bases.
- Weights. Official: tasks are summed unweighted and the merged update is scaled by one global coefficient alpha
  (chosen on validation data). Here task t enters as ``w_t X_t`` everywhere (in the sum, and as the projected task
  whose singular values are collected), so uniform ``w_t = alpha`` gives alpha times the unweighted merge (the
  official alpha), both methods are linear in a common scale (``merge(lambda w) = lambda merge(w)``, any sign),
  and a negative weight flips its task's task-specific directions (it is subtracted).
- Polar factors of rank-deficient ``U^`` / ``V^`` (task-specific directions shared exactly): the official SVD picks
  an arbitrary completion; here the partial isometry (``tsv.polar``).
- Scope: the official code applies Iso to every 2-D weight (except ``text_projection``) and averages the other
  parameters; here to each LoRA module, on the scaled update ``s_t B_t A_t`` in the LoRA factors' (out x in)
  orientation (also for Embedding and ``fan_in_fan_out`` layers).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Real
from typing import Any

import torch

from ..errors import MergeInputError
from ._linalg import balanced, stacked, zero_update
from .registry import LoraFactors, merge_method
from .svd import truncated_svd
from .tsv import polar, task_svd

_REFERENCE = (
    "Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces, "
    "ICML 2025; code github.com/danielm1405/iso-merging (src/utils/iso.py)"
)


def sum_svd(factors: list[LoraFactors], weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U, S, V)`` of ``sum_t w_t s_t B_t A_t`` from the stacked factors, only ``S > max(out, in) eps S_1`` kept."""
    As, Bs = stacked(factors, weights)
    U, s, V = (x[0] for x in truncated_svd(Bs[None], As[None], As.shape[0]))
    if s.numel() == 0 or not s[0] > 0:
        return U[:, :0], s[:0], V[:, :0]
    keep = int((s > max(factors[0].shape) * torch.finfo(s.dtype).eps * s[0]).sum())
    return U[:, :keep], s[:keep], V[:, :keep]


@merge_method("iso_c", pretty_name="Iso-C (isotropic task arithmetic)", reference=_REFERENCE, rank_option="svd_rank")
def iso_c_merge(factors: list[LoraFactors], weights: torch.Tensor, *, rank: int) -> LoraFactors:
    """Iso-C of one module's adapters; output rank ``min(rank, K)`` (see the module docstring)."""
    U, s, V = sum_svd(factors, weights)
    if s.numel() == 0:  # every update is zero
        return zero_update(factors)
    k = min(rank, s.numel())
    return balanced(U[:, :k], s.mean().expand(k), V[:, :k])


def iso_cts_budget(budget: int, n_tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """``(k_c, n)``: common directions and task-specific directions per task for a budget of ``budget`` directions.

    The official rule with two clamps (see the module docstring): ``n = min(round((N - floor(f N)) / T), N // T)``,
    raised to 1 when ``f < 1`` and ``N > T``; ``k_c = N - T n``.
    """
    f = float(common_space_fraction)
    n = min(round((budget - math.floor(f * budget)) / n_tasks), budget // n_tasks)
    if f < 1 and budget > n_tasks:
        n = max(n, 1)
    return budget - n_tasks * n, n


def _validate_cts(opts: Mapping[str, Any]) -> None:
    f = opts["common_space_fraction"]
    if isinstance(f, bool) or not isinstance(f, Real) or not 0.0 <= float(f) <= 1.0:
        raise MergeInputError(
            f"common_space_fraction must be a number in [0, 1] (the share of the rank budget given to the common "
            f"subspace), got {f!r}."
        )


@merge_method(
    "iso_cts",
    pretty_name="Iso-CTS (isotropic merging in common and task-specific subspaces)",
    reference=_REFERENCE,
    rank_option="svd_rank",
    options={"common_space_fraction": 0.8},
    validate=_validate_cts,
)
def iso_cts_merge(
    factors: list[LoraFactors], weights: torch.Tensor, *, rank: int, common_space_fraction: float = 0.8
) -> LoraFactors:
    """Iso-CTS of one module's adapters; output rank ``<= min(rank, sum_t r_t, out, in)`` (module docstring)."""
    out, inn = factors[0].shape
    T = len(factors)
    budget = min(rank, sum(f.rank for f in factors), out, inn)
    k_c, n = iso_cts_budget(budget, T, common_space_fraction)
    U, s, V = sum_svd(factors, weights)
    U_c, S_c, V_c = U[:, :k_c], s[:k_c], V[:, :k_c]
    Us, Ss, Vs = [U_c], [S_c], [V_c]
    eps = max(out, inn) * torch.finfo(U.dtype).eps
    for f, w in zip(factors, weights):
        if n == 0:
            break
        A_w = (w * f.scaling) * f.A
        B_perp = f.B - U_c @ (U_c.T @ f.B)
        U_t, S_t, V_t = task_svd(LoraFactors(A_w, B_perp, 1.0))
        scale = torch.linalg.matrix_norm(f.B, ord=2) * torch.linalg.matrix_norm(A_w, ord=2)
        m = min(n, int((S_t > eps * scale).sum()))
        Us.append(U_t[:, :m])
        Ss.append(S_t[:m])
        Vs.append(V_t[:, :m])
    S_all = torch.cat(Ss)
    if S_all.numel() == 0:  # every update is zero
        return zero_update(factors)
    U_hat, V_hat = torch.cat(Us, dim=1), torch.cat(Vs, dim=1)
    return balanced(polar(U_hat), S_all.mean().expand(S_all.numel()), polar(V_hat))
