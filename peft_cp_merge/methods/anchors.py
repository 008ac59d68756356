"""The 2025-2026 anchors: DC-Merge, STAR, LoRA-LEGO and core-space TSV with an isotropic spectrum, in LoRA form.

Per module, task updates ``X_t = s_t B_t A_t`` (out x in), weights ``w_t``, output rank ``R`` (``svd_rank``). Each
method works on the tasks' own SVDs from their factors (``tsv.task_svd``: QR of B_t and A_t^T, an r x r SVD) or on
the factors themselves, never on an out x in matrix. In every official code the tasks are merged unweighted and one
global coefficient alpha scales the result (chosen on validation); here ``w_t`` enters where each docstring says,
so that uniform ``w_t = alpha`` gives the official merge (for ``lora_lego``: up to k-means' own randomness).

**dc_merge** (DC-Merge, CVPR 2026; ``Tobeginwith/DC-Merge``, ``vision_lora_merge/merging_functions.py`` ``dc_merge``):

1. Per task, its top-r SVD ``X_t = U_t S_t V_t^T`` with the singular values smoothed at a constant sum
   (``smoothing``): ``"flat"`` (official ``avg``): each ``sum(S_t) / r``; ``"linear"``: ``sum(S_t) * d / sum(d)`` with
   ``d = linspace(rho', 1, r)``, ``rho' = min(rho, s_1 / s_r)`` (``rho`` = 5), giving ``X~_t``.
2. Cover space: ``U* = polar([U_1 .. U_T])``, ``V* = polar([V_1 .. V_T])`` (as TSV); ``M_t = U*^T X~_t V*``.
3. Keep the top ``density`` fraction of each ``M_t`` by magnitude (``max(1, int(density * numel))`` entries,
   threshold ties kept; official 0.1%), elect each entry's sign from the sum of the pruned ``M_t``, mean of the
   agreeing entries (zero where the sum is zero), each multiplied by its ``w_t``; then the block-diagonal mask:
   task t keeps only its own ``r_t x r_t`` block (its columns of ``U*`` and ``V*``).
4. ``dW = U* M V*^T``, truncated to ``R`` through its exact SVD from the factors ``U* M`` and ``V*``.

Deviations: the official per-task rank is a constant 16 (the LoRA rank of its experiments); here each task keeps its
non-zero singular triplets (``r_t``), and the blocks follow the tasks' own ranks. With 0.1% of a (T r) x (T r) core
the official rule keeps about r entries per task at its ViT setting (T = 8, r = 16: 16 of 16384), but only 2 at
T = 6, r = 8 (2 of 2304): ``density`` is an option for that reason, its default the official value.
``w_t`` multiplies the pruned, sign-agreeing entries inside the mean (sign elected from the unweighted ones), as
PEFT's ``ties``; the official merge is unweighted, then alpha (grid 0.1 .. 3.0).

**star** (STAR: Spectral Truncation and Rescale, NAACL 2025; ``IBM/STAR``, ``merger/STAR.py``): per task keep the
fewest leading components whose singular values hold ``eta`` percent of the nuclear norm
(``k_t = searchsorted(cumsum(S_t), eta / 100 * sum(S_t)) + 1``, official), rescale them by
``sum(S_t) / sum(S_t[:k_t])`` (the nuclear norm is kept), then ``dW = sum_t w_t X*_t`` (official: the average,
``w_t = 1 / T``), rank ``<= sum_t k_t``, truncated to ``R`` by the exact SVD of the sum (``svd.truncated_svd``).
Deviation: the official SVD of a dense task vector has ``min(out, in)`` singular values; a LoRA update has r_t
non-zero ones, the others are round-off, so only those count (the sums differ by round-off).

**lora_lego** (LoRA-LEGO, ICLR 2025; no official code; CtM's reimplementation ``ZhengbaoHe/compress-then-merge``
``task_merger.py`` ``merge_MSUs``): every rank-1 unit of every task, ``m_i = [a_i; b_i]`` (row i of ``A_t``,
column i of ``B_t``: a "minimal semantic unit"), is a point of dimension in + out; k-means (scikit-learn ``KMeans``,
``n_init=10``) into ``R`` clusters; each centroid is rescaled so its max-norm is the mean max-norm of its cluster's
units; ``A' = [centroid a-parts]``, ``B' = sqrt(N / R) [centroid b-parts]`` (N units). Output rank = number of
clusters ``R`` (at most N = sum_t r_t). Deviations: the unit of task t is ``[sqrt|c_t| a_i; sign(c_t) sqrt|c_t| b_i]``
with ``c_t = w_t s_t``, so the LoRA scaling and the weight count (c_t = 1 is CtM's raw unit) and a common scale of
the weights scales the result; units of tasks with ``w_t = 0`` are left out (N counts the others); k-means is seeded
(``lego_random_state``, CtM's is not). Needs scikit-learn (``pip install peft-cp-merge[library]``).

**core_tsv_iso** (core-space merging's recommended setting, ``--merge_method=tsv --merge_space=core
--isotropize=1``, Panariello et al., NeurIPS 2025, ``apanariello4/core-space-merging``; truncated to R as CtM's
merge-then-compress baselines, ``--low_rank=1``): TSV of the core matrices, truncated to rank R by the SVD of the
merged core, and its non-zero singular values replaced by their mean. TSV in core space is ``tsv`` at
``svd_rank = sum_t r_t`` (``core.py``; tested), so this is ``tsv(rank = sum r_t)``, then the R leading directions
of that merge at a flat spectrum. Its merged core is ``polar(U^) diag(w_t S_t) polar(V^)^T``, whose singular
values are the ``|w_t s_ti|``: the truncation keeps the R strongest weighted task directions, orthogonalised with
all of them. Not the same as ``tsv`` at R (which takes R // T per task and orthogonalises only those) nor ``iso_c`` /
``iso_cts`` at R < sum r_t; at ``R = sum_t r_t`` with equal ranks it equals ``iso_cts`` with
``common_space_fraction=0`` (a test shows it). Deviation: the official isotropize flattens all singular values of
the core, zeros included (when T does not divide min(out, in, sum r_t) the TSV core has a zero spectrum part, which
would get mass); here the non-zero ones only, as ``iso_c``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Real
from typing import Any

import torch

from ..errors import MergeInputError
from ._linalg import balanced, single_threaded, stacked, zero_update
from .registry import LoraFactors, merge_method
from .svd import truncated_svd
from .tsv import polar, task_svd, tsv_merge

SMOOTHINGS = ("flat", "linear")


def _number(opts, key, lo, hi, lo_open=False, what=""):
    x = opts[key]
    ok = not isinstance(x, bool) and isinstance(x, Real) and math.isfinite(float(x))
    ok = ok and (lo < float(x) if lo_open else lo <= float(x)) and float(x) <= hi
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise MergeInputError(f"{key} must be a number in {interval}{what}, got {x!r}.")


def _validate_dc(opts: Mapping[str, Any]) -> None:
    _number(opts, "density", 0.0, 1.0, lo_open=True, what=" (the fraction of each task's core entries kept)")
    _number(opts, "rho", 1.0, math.inf, what=" (the largest ratio of the linear smoothing)")


def _validate_star(opts: Mapping[str, Any]) -> None:
    _number(opts, "eta", 0.0, 100.0, lo_open=True, what=" (the percentage of each task's nuclear norm kept)")


def _validate_lego(opts: Mapping[str, Any]) -> None:
    n = opts["lego_n_init"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise MergeInputError(f"lego_n_init must be a positive integer (k-means restarts), got {n!r}.")


def _flat_truncated(U: torch.Tensor, s: torch.Tensor, V: torch.Tensor, rank: int, shape) -> LoraFactors | None:
    """``U[:, :k] diag(mean s) V[:, :k]^T`` over the ``k <= rank`` leading non-zero singular values (None if none)."""
    if s.numel() == 0 or not s[0] > 0:
        return None
    k = min(rank, int((s > max(shape) * torch.finfo(s.dtype).eps * s[0]).sum()))
    return balanced(U[:, :k], s[:k].mean().expand(k), V[:, :k])


# ---------------------------------------------------------------- DC-Merge


def smooth(S: torch.Tensor, how: str, rho: float) -> torch.Tensor:
    """DC-Merge's smoothing of singular values ``S`` (descending) at a constant sum: flat, or linear from
    ``min(rho, s_1 / s_n)`` down to 1 (normalised)."""
    n = S.numel()
    if how == "flat" or n <= 1:
        return S.sum().expand(n) / max(n, 1)
    ratio = min(float(rho), float(S[0] / S[-1]))
    d = torch.linspace(ratio, 1.0, n, dtype=S.dtype, device=S.device)
    return S.sum() * d / d.sum()


def _polar(M: torch.Tensor) -> torch.Tensor:
    """``tsv.polar`` for any shape: a wide ``M`` (more task directions than the layer's out or in, n > rows) gets
    the polar factor with orthonormal rows, ``polar(M^T)^T``."""
    return polar(M) if M.shape[0] >= M.shape[1] else polar(M.T).T


def _top_fraction(M: torch.Tensor, density: float) -> torch.Tensor:
    """DC-Merge's ``keep_topk_percent``: the entries with ``|M| >=`` the k-th largest magnitude,
    ``k = max(1, int(density n))``."""
    k = max(1, int(density * M.numel()))
    threshold = M.abs().flatten().topk(k).values.min()
    return torch.where(M.abs() >= threshold, M, torch.zeros_like(M))


@merge_method(
    "dc_merge",
    pretty_name="DC-Merge (smoothed task spectra, cover-space TIES, block-diagonal mask)",
    reference="DC-Merge, CVPR 2026; code github.com/Tobeginwith/DC-Merge (vision_lora_merge/merging_functions.py)",
    rank_option="svd_rank",
    options={"smoothing": "flat", "rho": 5.0, "density": 0.001},
    choices={"smoothing": SMOOTHINGS},
    validate=_validate_dc,
)
@single_threaded()  # small per-module work (see _linalg.single_threaded)
def dc_merge(factors: list[LoraFactors], weights: torch.Tensor, *, rank: int, smoothing: str = "flat",
             rho: float = 5.0, density: float = 0.001) -> LoraFactors:
    """DC-Merge of one module's adapters; output rank ``<= min(rank, sum_t r_t)`` (see the module docstring)."""
    parts = [task_svd(f) for f in factors]
    if not any(s.numel() for _, s, _ in parts):  # every update is zero
        return zero_update(factors)
    P = _polar(torch.cat([u for u, _, _ in parts], dim=1))  # out x n
    Q = _polar(torch.cat([v for _, _, v in parts], dim=1))  # in x n
    n = P.shape[1]
    cores, mask, start = [], P.new_zeros(n, n), 0
    for u, s, v in parts:
        M = (P.T @ u) * smooth(s, smoothing, rho) @ (v.T @ Q)  # U*^T X~_t V*
        cores.append(_top_fraction(M, float(density)))
        mask[start : start + s.numel(), start : start + s.numel()] = 1
        start += s.numel()
    stack = torch.stack(cores)
    total = stack.sum(0)
    agree = torch.sign(stack) == torch.sign(total)
    kept = stack * weights.to(stack.dtype).reshape(-1, 1, 1) * agree
    merged = kept.sum(0) / agree.sum(0).clamp_min(1)
    merged = torch.where(total == 0, torch.zeros_like(merged), merged) * mask
    # dW = U* M V*^T, truncated by its exact SVD from the factors (U*, V* have orthonormal rows, not columns, when a
    # layer is narrower than the n task directions, so the SVD of M alone would not be the SVD of dW)
    U, sv, V = (x[0] for x in truncated_svd((P @ merged)[None], Q.T[None], rank))
    if not (sv.numel() and sv[0] > 0):
        return zero_update(factors)
    k = int((sv > max(factors[0].shape) * torch.finfo(sv.dtype).eps * sv[0]).sum())
    return balanced(U[:, :k], sv[:k], V[:, :k])


# ---------------------------------------------------------------- STAR


def star_rank(S: torch.Tensor, eta: float) -> int:
    """STAR's ``k = searchsorted(cumsum(S), eta / 100 * sum(S)) + 1`` (at most ``len(S)``)."""
    target = S.sum() * (float(eta) / 100.0)
    return min(int(torch.searchsorted(torch.cumsum(S, 0), target.reshape(1)).item()) + 1, S.numel())


@merge_method(
    "star",
    pretty_name="STAR (spectral truncation and rescale of each task, then the weighted sum)",
    reference=("Lee et al., STAR: Spectral Truncation and Rescale for Model Merging, NAACL 2025; "
               "code github.com/IBM/STAR (merger/STAR.py)"),
    rank_option="svd_rank",
    options={"eta": 40.0},
    validate=_validate_star,
)
@single_threaded()  # small per-module work (see _linalg.single_threaded)
def star_merge(factors: list[LoraFactors], weights: torch.Tensor, *, rank: int, eta: float = 40.0) -> LoraFactors:
    """STAR of one module's adapters; output rank ``<= min(rank, sum_t k_t)`` (see the module docstring)."""
    kept, kept_w = [], []
    for f, w in zip(factors, weights):
        u, s, v = task_svd(f)
        if s.numel() == 0:
            continue
        k = star_rank(s, eta)
        s_k = s[:k] * (s.sum() / s[:k].sum())  # the nuclear norm kept
        kept.append(LoraFactors(v[:, :k].T.contiguous(), u[:, :k] * s_k, 1.0))
        kept_w.append(w)
    if not kept:
        return zero_update(factors)
    As, Bs = stacked(kept, torch.stack(kept_w))  # [B*_t], [w_t A*_t]: sum_t w_t X*_t
    U, s, V = (x[0] for x in truncated_svd(Bs[None], As[None], rank))
    if not (s.numel() and s[0] > 0):
        return zero_update(factors)
    k = int((s > max(factors[0].shape) * torch.finfo(s.dtype).eps * s[0]).sum())
    return balanced(U[:, :k], s[:k], V[:, :k])


# ---------------------------------------------------------------- LoRA-LEGO


def lego_units(factors: list[LoraFactors], weights: torch.Tensor) -> torch.Tensor:
    """The rank-1 units ``[sqrt|c_t| a_i; sign(c_t) sqrt|c_t| b_i]`` (N x (in + out)), ``c_t = w_t s_t``, of the
    tasks with ``c_t != 0``."""
    units = []
    for f, w in zip(factors, weights):
        c = float(w) * f.scaling
        if c == 0:
            continue
        root = math.sqrt(abs(c))
        units.append(torch.cat([root * f.A, math.copysign(root, c) * f.B.T], dim=1))
    return torch.cat(units) if units else factors[0].A.new_zeros(0, factors[0].A.shape[1] + factors[0].B.shape[0])


@merge_method(
    "lora_lego",
    pretty_name="LoRA-LEGO (k-means of the rank-1 units; output rank = number of clusters)",
    reference=("Zhao et al., Merging LoRAs like Playing LEGO: Pushing the Modularity of LoRA to Extremes Through "
               "Rank-Wise Clustering, ICLR 2025; CtM's reimplementation github.com/ZhengbaoHe/compress-then-merge "
               "(task_merger.py merge_MSUs)"),
    rank_option="svd_rank",
    options={"lego_random_state": 0, "lego_n_init": 10},
    validate=_validate_lego,
)
@single_threaded()  # small per-module work (see _linalg.single_threaded)
def lora_lego_merge(factors: list[LoraFactors], weights: torch.Tensor, *, rank: int, lego_random_state: int | None = 0,
                    lego_n_init: int = 10) -> LoraFactors:
    """LoRA-LEGO of one module's adapters: ``min(rank, N)`` clusters of the N rank-1 units (module docstring)."""
    try:
        from sklearn.cluster import KMeans
        from threadpoolctl import threadpool_limits  # a scikit-learn dependency
    except ImportError:  # pragma: no cover - scikit-learn ships with the [library] extra
        raise MergeInputError("lora_lego needs scikit-learn: pip install 'peft-cp-merge[library]' "
                              "(or pip install scikit-learn).") from None
    units = lego_units(factors, weights)
    if units.shape[0] == 0 or not bool(units.abs().max() > 0):
        return zero_update(factors)
    inn = factors[0].A.shape[1]
    N = units.shape[0]
    R = min(rank, N)
    data = units.double().cpu().numpy()
    with threadpool_limits(1):  # a few dozen points: OpenMP threads cost 10x on 2 busy cores
        km = KMeans(n_clusters=R, n_init=lego_n_init, random_state=lego_random_state).fit(data)
    centers = torch.as_tensor(km.cluster_centers_, dtype=torch.float64)
    labels = torch.as_tensor(km.labels_)
    cpu = units.double().cpu()
    for c in range(R):
        members = cpu[labels == c]
        peak = float(centers[c].abs().max())
        if members.shape[0] and peak > 0:
            centers[c] *= float(members.abs().amax(dim=1).mean()) / peak
    centers = centers.to(units.device, units.dtype)
    return LoraFactors(centers[:, :inn].contiguous(), centers[:, inn:].T.contiguous() * math.sqrt(N / R), 1.0)


# ---------------------------------------------------------------- core-space TSV + isotropic spectrum


@merge_method(
    "core_tsv_iso",
    pretty_name="Core-space TSV + isotropic spectrum (core-space merging's recommended setting), truncated to R",
    reference=(
        "Panariello et al., Accurate and Efficient Low-Rank Model Merging in Core Space, NeurIPS 2025; code "
        "github.com/apanariello4/core-space-merging (--merge_method=tsv --merge_space=core --isotropize=1)"
    ),
    rank_option="svd_rank",
)
@single_threaded()  # small per-module work (see _linalg.single_threaded)
def core_tsv_iso_merge(factors: list[LoraFactors], weights: torch.Tensor, *, rank: int) -> LoraFactors:
    """TSV in core space, truncated to ``rank``, flat non-zero spectrum (see the module docstring)."""
    merged = tsv_merge(factors, weights, rank=sum(f.rank for f in factors))
    U, s, V = (x[0] for x in truncated_svd(merged.B[None], merged.A[None], rank))
    flat = _flat_truncated(U, s, V, rank, factors[0].shape)
    return flat if flat is not None else zero_update(factors)
