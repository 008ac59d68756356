"""Merge methods compared, the lambda search on validation data, and exact-match evaluation.

Every merge goes through ``PeftModel.add_weighted_adapter`` with weights ``lambda / T`` for each of the T adapters;
lambda comes from one shared grid, chosen by mean exact match on the validation split.

Merges are expensive on a CPU (PEFT's ``*_svd`` types build every dense update and run a full SVD per module; ties
and magnitude pruning add a top-k over every update), so each configuration is merged once, at ``lambda = 1``, and
evaluated at another lambda by multiplying the merged adapter's LoRA ``scaling`` by lambda. That equals a real
merge at ``lambda / T`` when the method is linear in a common scale of the weights (all methods here except
``cp_variant="authors"``, which ignores the weights). This is checked, not assumed: :func:`classify` compares, on
the first seed, a real merge at the largest grid value with lambda x the lambda = 1 merge, over every module.
``linear`` methods use the scaling (validation and test), ``ignored`` ones are evaluated once, and any other method
gets a real merge per lambda.

PEFT's ``*_svd`` merges at output ranks r and 2r share everything but the truncation, so the 2r merge is made once
and the rank-r adapter is its first r singular triplets (:func:`slice_adapter`); on the first seed this is checked
against a real ``svd_rank=r`` merge of ``svd``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from peft_cp_merge.demo.evaluate import encode, exact_match
from peft_cp_merge.demo.tasks import Example

logger = logging.getLogger("benchmarks.quality")

PEFT_SVD_METHODS = ("svd", "ties_svd", "dare_ties_svd", "magnitude_prune_svd")
PEFT_SLOW = ("ties_svd", "dare_ties_svd", "magnitude_prune_svd")  # dense top-k merges: 30-60 s each
MATRIX_OURS = ("tsv", "knots", "iso_c", "iso_cts", "core_ties", "core_tsv_iso", "dc_merge", "star", "lora_lego")
OURS = MATRIX_OURS  # kept name: the matrix merges of this package (those not registered in a checkout are skipped)
TENSOR_TYPES = ("cp", "tucker")  # tensor merges: grouped apart from the matrix merges in every table
CP_VARIANTS = ("weighted", "authors", "authors_v1", "sign_elect", "ties", "balanced", "isotropic", "split", "spread",
               "orth", "orth_iso", "keep", "cts")
CP_OPTIONS = {"ties": {"cp_density": 0.5}}  # the other variants' options keep their defaults (cp.py)
EXTRA_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {  # method name -> (combination_type, options)
    "cp/orth_iso+beta": ("cp", {"cp_variant": "orth_iso", "cp_beta": 0.25}),
    "cp/keep+cover": ("cp", {"cp_variant": "keep", "cp_keep": "cover"}),
    "tucker/sum": ("tucker", {"tucker_merge": "sum"}),
    "tucker/iso": ("tucker", {"isotropize": True}),
    "dc_merge/linear": ("dc_merge", {"smoothing": "linear"}),
}
"""Further configurations of registered methods, each with its own lambda search (the registry defaults are the
plain method names)."""
CP_HYPOTHESES = {  # written down before the first measurement (peft_cp_merge/methods/cp.py has the formulas)
    "weighted": "the least-squares CP reconstruction of the weighted sum (the seeds' merge)",
    "weighted+tasks": "CP needs more components than an SVD merge: R = T r / 2 from the tasks' own SVDs",
    "authors": "the authors' later code: rank 4, random init (seed 42), unscaled updates, every weight 1",
    "authors_v1": "the authors' first code: task factor dropped, uncontrolled scale (expected to fail)",
    "sign_elect": "opposing task loadings cancel a component: keep only the sign-agreeing loadings",
    "ties": "small loadings are interference: per task keep the top half of components, elect, disjoint mean",
    "balanced": "least squares favours strong tasks: fit on norm-balanced tasks, restore the norms",
    "isotropic": "weak components carry weak tasks: flatten the component magnitudes (as Iso-C)",
    "split": "averaging dilutes task-specific directions by T: specific components (one task >= 50% of the "
             "loading energy) at full weight, shared ones averaged",
    "spread": "the soft split: scale each component by T / its loading's participation number",
    "orth": "CP components overlap and double-count shared directions: polar-orthogonalise U and V, refit "
            "magnitudes to the weighted sum (as TSV whitens)",
    "orth_iso": "orth plus a flat spectrum after the fit (isotropic merges win every table so far)",
    "orth_iso+beta": "orth_iso on CtM's balanced task slices (beta 0.25): strong tasks no longer own the fit",
    "keep": "fit K = sum r_t components, keep the R with the most loading energy, then orth_iso",
    "keep+cover": "fit K = sum r_t components, keep R that cover every task's loadings, then orth_iso",
    "cts": "CP analogue of Iso-CTS: shared CP components plus each task's strongest directions outside them, "
           "polar, flat spectrum",
    "tucker": "CtM: Tucker-2 of the core matrices at [R, R], TIES on the per-task R x R coordinates (beta 0.25)",
    "tucker/sum": "CtM's Tucker-2 with task arithmetic on the coordinates instead of TIES",
    "tucker/iso": "CtM's Tucker-2 with TIES and a flat spectrum of the merged core",
}
LINEAR_TOL = 1e-3


@dataclass
class MergeSpec:
    """One merge configuration: ``add_weighted_adapter(..., combination_type=combination_type, **kwargs)``."""

    label: str
    method: str
    combination_type: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    out_rank: int | None = None
    family: str = "peft"  # "peft" or "ours"
    rank_key: str | None = None  # the kwarg that sets the output rank
    fixed_weight: float | None = None  # every adapter's weight is this, no lambda search (the authors' protocol)

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "method": self.method, "combination_type": self.combination_type,
                "kwargs": self.kwargs, "out_rank": self.out_rank, "family": self.family,
                "fixed_weight": self.fixed_weight, "tensor": self.is_tensor}

    @property
    def is_cp(self) -> bool:
        return self.combination_type == "cp"

    @property
    def is_tensor(self) -> bool:
        """A tensor merge (CP or Tucker): grouped apart from the matrix merges; "best matrix merge" excludes it."""
        return self.combination_type in TENSOR_TYPES

    @property
    def group(self) -> tuple:
        """Configurations that differ only in the output rank share a group (and a lambda)."""
        rest = sorted((k, str(v)) for k, v in self.kwargs.items() if k != self.rank_key)
        return (self.combination_type, tuple(rest))


def group_specs(specs: Sequence[MergeSpec]) -> list[list[MergeSpec]]:
    """Specs grouped by :attr:`MergeSpec.group`, in order, each group sorted by output rank."""
    groups: dict[tuple, list[MergeSpec]] = {}
    for s in specs:
        groups.setdefault(s.group, []).append(s)
    return [sorted(g, key=lambda s: s.out_rank or 0) for g in groups.values()]


def build_specs(rank: int, n_adapters: int, density: float, ranks: Sequence[int],
                methods: Sequence[str] | None = None) -> tuple[list[MergeSpec], list[dict[str, str]]]:
    """The merge configurations, and the methods skipped (with why). ``methods`` filters by method name
    (``cp/weighted`` style names for the CP variants, ``cp`` for all of them; ``tucker/sum`` style names for the
    other configurations of ``EXTRA_CONFIGS``).

    Output rank is an axis: every method runs at every rank in ``ranks`` it allows (the benchmark passes r, 2r and
    sum r_t = T r by default): PEFT's svd types (the lower ranks are the leading triplets of the highest-rank merge,
    so one dense merge per type), every matrix merge of this package that is registered, every CP variant and
    ``tucker`` (with the extra configurations of ``EXTRA_CONFIGS``). Exceptions: PEFT ``linear`` has rank r and
    ``cat`` rank T r (one row each); ``cp/authors`` runs as the authors ran it (rank 4, random init, seed 42, every
    weight 1.0, no lambda search); ``cp/weighted+tasks`` at T r / 2.
    """
    from peft_cp_merge import list_merge_methods
    from peft_cp_merge.methods import get_merge_method

    registered = set(list_merge_methods(peft_only=True))
    ranks = list(dict.fromkeys(ranks))
    specs: list[MergeSpec] = [
        MergeSpec(f"linear R={rank}", "linear", "linear", {}, rank),
        MergeSpec(f"cat R={n_adapters * rank}", "cat", "cat", {}, n_adapters * rank),
    ]
    for ct in PEFT_SVD_METHODS:
        for R in ranks:
            kw = {"svd_rank": R, "svd_full_matrices": False}
            if ct != "svd":
                kw["density"] = density
            specs.append(MergeSpec(f"{ct} R={R}", ct, ct, kw, R, "peft", "svd_rank"))
    skipped = []
    configs: list[tuple[str, str, dict[str, Any]]] = [(n, n, {}) for n in MATRIX_OURS]
    configs += [(n, ct, kw) for n, (ct, kw) in EXTRA_CONFIGS.items() if ct != "cp"]
    configs.insert(len(MATRIX_OURS), ("tucker", "tucker", {}))
    for name, ct, extra in configs:
        if ct not in registered:
            if name == ct:
                logger.warning("merge method %r is not registered with add_weighted_adapter in this checkout; "
                               "skipping it (registered: %s)", name, sorted(registered))
                skipped.append({"method": name, "reason": "not registered with add_weighted_adapter"})
            continue
        m = get_merge_method(ct)
        for R in ranks:
            kw: dict[str, Any] = {m.rank_option: R, **extra}
            if "density" in m.options and ct not in ("tucker", "dc_merge"):  # their own defaults are their papers'
                kw["density"] = density
            specs.append(MergeSpec(f"{name} R={R}", name, ct, kw, R, "ours", m.rank_option))
    if "cp" in registered:
        available = set(get_merge_method("cp").choices.get("cp_variant", CP_VARIANTS))
        cp_configs = [(f"cp/{v}", {"cp_variant": v, **CP_OPTIONS.get(v, {})}) for v in CP_VARIANTS if v in available]
        cp_configs += [(n, kw) for n, (ct, kw) in EXTRA_CONFIGS.items() if ct == "cp" and kw["cp_variant"] in available
                       and all(k in get_merge_method("cp").options for k in kw)]
        for name, base_kw in cp_configs:
            for R in ranks:
                kw = {"cp_rank": R, **base_kw}
                fixed = None
                if name == "cp/authors":  # as the authors' code ran it (ALGORITHMS.md section 2)
                    if R != ranks[0]:
                        continue
                    R, fixed = 4, 1.0
                    kw.update(cp_rank=R, cp_init="random", cp_random_state=42)
                elif name == "cp/authors_v1":
                    kw.update(cp_init="random", cp_random_state=42)
                specs.append(MergeSpec(f"{name} R={R}", name, "cp", kw, R, "ours", "cp_rank", fixed))
        half = max(1, n_adapters * rank // 2)
        specs.append(MergeSpec(f"cp/weighted+tasks R={half}", "cp/weighted+tasks", "cp",
                               {"cp_rank": half, "cp_variant": "weighted", "cp_init": "tasks"}, half, "ours",
                               "cp_rank"))
    else:
        skipped.append({"method": "cp", "reason": "not registered with add_weighted_adapter"})
    if methods:
        wanted = set(methods)
        specs = [s for s in specs if s.method in wanted or s.combination_type == "cp" and "cp" in wanted]
    return specs, skipped


# --- merging ------------------------------------------------------------------------------------------------------

def lora_layers(pm, adapter: str) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in pm.modules() if isinstance(m, LoraLayer) and adapter in m.scaling]


def merge(pm, spec: MergeSpec, adapters: Sequence[str], lam: float, name: str, seed: int) -> float:
    """Real merge with weights ``lam / T`` into adapter ``name`` (replaced if present); returns seconds."""
    if name in pm.peft_config:
        pm.delete_adapter(name)
    weights = [lam / len(adapters)] * len(adapters)
    torch.manual_seed(seed)  # the random parts (DARE's drop mask) depend on the seed
    t0 = time.perf_counter()
    pm.add_weighted_adapter(list(adapters), weights, name, combination_type=spec.combination_type, **spec.kwargs)
    return time.perf_counter() - t0


class Scaled:
    """Context manager: multiply adapter ``name``'s LoRA scaling by ``factor`` in every layer, restore on exit."""

    def __init__(self, pm, name: str, factor: float):
        self.layers, self.name, self.factor = lora_layers(pm, name), name, factor

    def __enter__(self):
        self.saved = [layer.scaling[self.name] for layer in self.layers]
        for layer, s in zip(self.layers, self.saved):
            layer.scaling[self.name] = s * self.factor
        return self

    def __exit__(self, *exc):
        for layer, s in zip(self.layers, self.saved):
            layer.scaling[self.name] = s


def slice_adapter(pm, src: str, dest: str, rank: int) -> float:
    """Adapter ``dest`` = the first ``rank`` components of the SVD-based merge ``src`` (PEFT's ``*_svd`` merges store
    ``B = U_R S_R``, ``A = V_R^T`` with singular values in descending order, so this is exactly the merge at
    ``svd_rank=rank``: the same weighted update, truncated to fewer singular triplets). Returns seconds."""
    from peft import LoraConfig

    t0 = time.perf_counter()
    cfg = pm.peft_config[src]
    pm.add_adapter(dest, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=cfg.target_modules,
                                    task_type=cfg.task_type))
    with torch.no_grad():
        for layer in lora_layers(pm, src):
            layer.lora_A[dest].weight.copy_(layer.lora_A[src].weight[:rank])
            layer.lora_B[dest].weight.copy_(layer.lora_B[src].weight[:, :rank])
            layer.scaling[dest] = layer.scaling[src]
    return time.perf_counter() - t0


def rel_diff(pm, a: str, b: str, factor: float = 1.0) -> float:
    """``||delta_b - factor delta_a|| / ||factor delta_a||`` over all LoRA modules (dense deltas, float64)."""
    da, db = _deltas(pm, a), _deltas(pm, b)
    num = sum(float((y - factor * x).norm() ** 2) for x, y in zip(da, db))
    den = sum(float((factor * x).norm() ** 2) for x in da)
    return math.sqrt(num / max(den, 1e-300))


def _deltas(pm, name: str) -> list[torch.Tensor]:
    out = []
    for layer in lora_layers(pm, name):
        A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
        out.append((B.double() @ A.double()) * float(layer.scaling[name]))
    return out


def classify(pm, spec: MergeSpec, adapters: Sequence[str], base_name: str, lam: float, seed: int) -> dict:
    """Compare a real merge at ``lam`` with ``lam`` x the merge ``base_name`` (made at lambda = 1), module by module.
    Returns ``{"mode": linear|ignored|nonlinear, "rel_err": ..., "rel_diff_to_lambda1": ...}``."""
    probe = "__probe__"
    merge(pm, spec, adapters, lam, probe, seed)
    rel_err, rel_same = rel_diff(pm, base_name, probe, lam), rel_diff(pm, base_name, probe, 1.0)
    pm.delete_adapter(probe)
    mode = "linear" if rel_err < LINEAR_TOL else "ignored" if rel_same < LINEAR_TOL else "nonlinear"
    if mode != "linear":
        logger.warning("%s: the merge is not linear in the weights' scale (rel. err %.2e at lambda=%g; %s); %s",
                       spec.label, rel_err, lam, mode,
                       "the weights have no effect, evaluated once" if mode == "ignored"
                       else "searching lambda with a real merge per grid value")
    return {"mode": mode, "rel_err": rel_err, "rel_diff_to_lambda1": rel_same, "checked_at_lambda": lam}


# --- evaluation ---------------------------------------------------------------------------------------------------

def evaluate_hits(pm, tok, adapter: str | None, data: dict[str, list[Example]],
                  batch_size: int = 32) -> dict[str, list[bool]]:
    """Per task, whether each prompt is answered exactly, with ``adapter`` active (``None``: the base model)."""
    out = {}
    for task, examples in data.items():
        if adapter is None:
            with pm.disable_adapter():
                out[task] = exact_match(pm, tok, examples, batch_size=batch_size)
        else:
            pm.set_adapter(adapter)
            out[task] = exact_match(pm, tok, examples, batch_size=batch_size)
    return out


def accuracies(hits: dict[str, list[bool]]) -> dict[str, float]:
    return {t: sum(h) / len(h) for t, h in hits.items()}


def evaluate(pm, tok, adapter: str | None, data: dict[str, list[Example]], batch_size: int = 32) -> dict[str, float]:
    """Exact match per task with ``adapter`` active (``None``: the base model, adapters disabled)."""
    return accuracies(evaluate_hits(pm, tok, adapter, data, batch_size))


def pack_hits(hits: dict[str, list[bool]]) -> dict[str, str]:
    """Hits as compact strings of 0/1 per task (for the JSON record)."""
    return {t: "".join("1" if h else "0" for h in hs) for t, hs in hits.items()}


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def search_lambda(score: Callable[[float], dict[str, float]], grid: Sequence[float],
                  patience: int | None = 2) -> tuple[float, dict]:
    """Walk the ascending ``grid``, scoring ``score(lam)`` (per-task validation accuracy); the best mean wins (the
    smaller lambda on ties). With ``patience``, stop after that many consecutive grid values below the best so far
    (accuracy falls off on both sides of its peak; the same rule for every method); a tie with the best is not
    below it and breaks the run (a plateau, e.g. 0 at the grid's low end, does not stop the walk). Returns
    ``(best, {lam: {"per_task": ..., "mean": ...}})``; the curve holds only the values scored."""
    curve: dict[float, dict] = {}
    best, worse = None, 0
    for lam in sorted(grid):
        per_task = score(lam)
        curve[lam] = {"per_task": per_task, "mean": mean(per_task.values())}
        if best is None or curve[lam]["mean"] > curve[best]["mean"]:
            best, worse = lam, 0
        elif curve[lam]["mean"] < curve[best]["mean"]:
            worse += 1
            if patience and worse >= patience:
                break
        else:  # a tie is not below the best: it breaks the run (a merge that scores 0 at the grid's low end, where
            worse = 0  # its updates are too weak to change an answer, keeps walking up)
    return best, curve


@torch.no_grad()
def generate_agreement(pm, tok, adapter: str, examples: Sequence[Example]) -> dict[str, Any]:
    """Teacher-forced exact match (batched, as the benchmark scores) vs real greedy ``generate`` (one prompt at a
    time, no padding), with ``adapter`` active."""
    device = next(pm.parameters()).device
    agree, hits, bad = 0, 0, []
    pm.set_adapter(adapter)
    verdicts = exact_match(pm, tok, list(examples))
    for e, v in zip(examples, verdicts):
        p, c = encode(tok, e.prompt, e.completion)
        out = pm.generate(input_ids=torch.tensor([p], device=device),
                          attention_mask=torch.ones(1, len(p), dtype=torch.long, device=device),
                          max_new_tokens=len(c), do_sample=False, pad_token_id=tok.pad_token_id)
        g = out[0, len(p):].tolist() == c
        agree += g == v
        hits += v
        if g != v:
            bad.append({"prompt": e.prompt, "completion": e.completion, "teacher_forced": v, "generate": g})
    return {"adapter": adapter, "checked": len(examples), "agree": agree, "hits": hits, "disagreements": bad}
