"""Registry of merge methods.

A merge method is a pure function over one module's LoRA factors::

    fn(factors: list[LoraFactors], weights: torch.Tensor, *, rank: int, **options) -> LoraFactors

``factors[t]`` holds task ``t``'s ``A_t`` (r_t x in), ``B_t`` (out x r_t) and ``scaling_t``, so the task update is
``X_t = scaling_t * B_t @ A_t`` (out x in, in the orientation of the LoRA factors). ``weights`` is a float tensor of
length T. The function returns factors ``(A', B')`` of the merged update ``B' @ A'`` with ``scaling == 1``. It
never forms an out x in matrix.

Methods are registered with :func:`merge_method` (one file per method, as mergekit does). Both front ends, the
PEFT glue (``add_weighted_adapter``) and the adapter-file engine (``merge_adapters``), call methods through
:meth:`MergeMethod.merge_batch`, which owns the rank rule (default, limit, padding: :meth:`MergeMethod.resolve_rank`),
validates the input, computes in float32 (float64 when the factors are float64) on the factors' device, and casts
the result back to the factors' dtype; neither front end repeats any of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import MergeInputError, UnknownMergeMethodError, UnknownMergeOptionError


@dataclass
class LoraFactors:
    """One module's LoRA factors: the update is ``scaling * B @ A`` with ``A`` (r x in) and ``B`` (out x r)."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float = 1.0

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """Shape (out, in) of the update this adapter makes."""
        return (self.B.shape[0], self.A.shape[1])

    def delta(self) -> torch.Tensor:
        """Dense ``scaling * B @ A``. For tests and small references only: merge code never calls it."""
        return self.scaling * (self.B @ self.A)


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method.

    Attributes:
        name: the ``combination_type`` / ``method`` string users pass.
        fn: the pure function (see the module docstring).
        pretty_name: human-readable name for model cards and tables.
        reference: the paper(s) or code the method follows.
        rank_option: the ``add_weighted_adapter`` keyword that sets the output rank (``cp_rank`` or ``svd_rank``).
        options: option name -> default, exactly as users pass them (``cp_init``, ``density``, ...).
        choices: option name -> its allowed values, for the options that take one of a fixed set (``cp_variant``);
            :meth:`resolve_options` refuses other values, and ``peft-cp-merge methods`` lists them.
        peft_combination_type: whether ``add_weighted_adapter(combination_type=name)`` is routed here. ``svd`` is
            not: PEFT already has it, and the registry's ``svd`` only serves the adapter-file engine.
        validate: optional ``validate(options) -> None`` that raises a clear ``ValueError`` for bad option values.
        batched: ``fn`` takes a batch of modules with equal shapes and ranks, ``fn(groups, weights (N, T), ...)``
            and returns one ``LoraFactors`` per module; :meth:`merge_batch` then runs them in one call.
    """

    name: str
    fn: Callable[..., LoraFactors]
    pretty_name: str
    reference: str
    rank_option: str = "svd_rank"
    options: Mapping[str, Any] = field(default_factory=dict)
    choices: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    peft_combination_type: bool = True
    validate: Callable[[Mapping[str, Any]], None] | None = None
    batched: bool = False

    def resolve_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults updated with ``options``; unknown names and bad values raise with the list of valid ones."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            valid = ", ".join(sorted(self.options)) or "(none)"
            raise UnknownMergeOptionError(
                f"Unknown option(s) {unknown} for merge method {self.name!r}. Valid options: {valid}."
            )
        resolved = {**self.options, **options}
        for key, allowed in self.choices.items():
            if resolved[key] not in allowed:
                raise MergeInputError(f"{key}={resolved[key]!r} is not supported; use one of {list(allowed)}.")
        if self.validate is not None:
            self.validate(resolved)
        return resolved

    def __call__(
        self,
        factors: Sequence[LoraFactors],
        weights: Sequence[float] | torch.Tensor,
        *,
        rank: int | None = None,
        where: str = "",
        **options: Any,
    ) -> LoraFactors:
        """Merge one module: validate, upcast, run the method, cast back to the input dtype.

        The result has the method's own rank (at most ``rank``; not padded). ``where`` names the module in error
        messages.
        """
        return self.merge_batch([factors], [weights], rank=rank, where=[where], pad=False, **options)[0]

    def resolve_rank(
        self, rank: Any, modules: Iterable[tuple[Sequence[int], int, int]] | None = None, *, option: str | None = None
    ) -> int | None:
        """The one rank rule of both front ends: ``rank`` checked, with its default and its limit.

        ``modules`` yields ``(source ranks, out, in)`` per module of the merge. ``rank=None`` means the default, the
        largest source rank. A rank must be a positive integer no larger than ``max(limit, default)``, where
        ``limit = max`` over modules of ``min(sum_t r_t, out, in)``: no merged update has a higher rank, so a larger
        one could only add all-zero components and is refused before anything is allocated. Without ``modules``
        (not known yet, e.g. before the adapter files are read) only the type is checked and ``None`` stays
        ``None``. ``option`` names the rank in errors (default: :attr:`rank_option`).
        """
        option = option or self.rank_option
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise MergeInputError(f"`{option}` must be a positive integer, got {rank!r}; e.g. {option}=8.")
        if modules is None:
            return rank
        modules = list(modules)
        default = max(max(ranks) for ranks, _, _ in modules)
        if rank is None:
            return default
        allowed = max(max(min(sum(ranks), out, inp) for ranks, out, inp in modules), default)
        if rank > allowed:
            raise MergeInputError(
                f"`{option}`={rank} is larger than any merged layer can use: a layer's merged update has rank at "
                f"most min(sum of the adapters' ranks, out, in), at most {allowed} here, so the extra components "
                f"would be all zero. Pass {option} <= {allowed} (default: the largest adapter rank, {default})."
            )
        return rank

    def merge_batch(
        self,
        groups: Sequence[Sequence[LoraFactors]],
        weights: Sequence[Sequence[float] | torch.Tensor],
        *,
        rank: int | None = None,
        where: Sequence[str] | None = None,
        pad: bool = True,
        all_modules: Iterable[tuple[Sequence[int], int, int]] | None = None,
        **options: Any,
    ) -> list[LoraFactors]:
        """Merge several modules at once (``groups[n]`` are module n's factors, ``weights[n]`` its weights).

        This is what both front ends call. ``rank`` follows :meth:`resolve_rank` over ``all_modules`` (default: the
        ``(ranks, out, in)`` of ``groups``; the file engine, which streams modules in chunks, passes the whole
        merge's), and with ``pad`` every result has exactly ``rank`` components (zero-padded), ready for a LoRA layer
        of rank ``rank``. Without ``pad`` (the math-level :meth:`__call__`) each result keeps the method's own rank
        and only the type of ``rank`` is checked. Batched methods get one call per run of modules with equal shapes
        and ranks; others one call per module. Each result is cast back to its factors' dtype.
        """
        resolved = self.resolve_options(options)
        where = list(where) if where is not None else [""] * len(groups)
        for g, w, at in zip(groups, weights, where):
            check_factors(g, w, where=at)
        shapes = all_modules if all_modules is not None else [([f.rank for f in g], *g[0].shape) for g in groups]
        if pad:
            rank = self.resolve_rank(rank, shapes)
        else:
            rank = self.resolve_rank(rank) or max(f.rank for g in groups for f in g)
        prepared = [_upcast(g, w) for g, w in zip(groups, weights)]
        out: list[LoraFactors | None] = [None] * len(groups)
        if self.batched:
            buckets: dict[tuple, list[int]] = {}
            for n, (g, _) in enumerate(prepared):
                key = (g[0].A.device, g[0].A.dtype, g[0].shape, tuple(f.rank for f in g))
                buckets.setdefault(key, []).append(n)
            for idx in buckets.values():
                res = self.fn(
                    [prepared[n][0] for n in idx], torch.stack([prepared[n][1] for n in idx]), rank=rank, **resolved
                )
                for n, f in zip(idx, res):
                    out[n] = f
        else:
            for n, (g, w) in enumerate(prepared):
                out[n] = self.fn(g, w, rank=rank, **resolved)
        results = [LoraFactors(f.A.to(g[0].A.dtype).contiguous(), f.B.to(g[0].A.dtype).contiguous(), 1.0)
                   for f, g in zip(out, groups)]
        return [_pad_rank(f, rank) for f in results] if pad else results


def _largest(x: torch.Tensor) -> float:
    """``max |x|`` in one pass (0 for an empty tensor); NaN when ``x`` has a NaN (max reductions propagate it)."""
    return float(torch.linalg.vector_norm(x, ord=math.inf)) if x.numel() else 0.0


def _upcast(factors: Sequence[LoraFactors], weights) -> tuple[list[LoraFactors], torch.Tensor]:
    """Factors in float32 (float64 if given float64) on the first factor's device, weights as a tensor there."""
    dtype = torch.float64 if factors[0].A.dtype == torch.float64 else torch.float32
    device = factors[0].A.device
    up = [LoraFactors(f.A.to(device, dtype), f.B.to(device, dtype), float(f.scaling)) for f in factors]
    return up, torch.as_tensor(weights, dtype=dtype).to(device).reshape(-1)


_REGISTRY: dict[str, MergeMethod] = {}


def merge_method(
    name: str,
    *,
    pretty_name: str,
    reference: str,
    rank_option: str = "svd_rank",
    options: Mapping[str, Any] | None = None,
    choices: Mapping[str, Sequence[Any]] | None = None,
    peft_combination_type: bool = True,
    validate: Callable[[Mapping[str, Any]], None] | None = None,
    batched: bool = False,
) -> Callable[[Callable[..., LoraFactors]], Callable[..., LoraFactors]]:
    """Decorator registering ``fn`` as merge method ``name`` (see :class:`MergeMethod` for the fields)."""
    options = dict(options or {})
    choices = {k: tuple(v) for k, v in (choices or {}).items()}
    for key, allowed in choices.items():
        if key not in options or options[key] not in allowed:
            raise ValueError(f"Merge method {name!r}: choices for {key!r} need an option {key!r} whose default is "
                             f"one of {list(allowed)}.")

    def decorator(fn: Callable[..., LoraFactors]) -> Callable[..., LoraFactors]:
        if name in _REGISTRY:
            raise ValueError(f"Merge method {name!r} is already registered.")
        _REGISTRY[name] = MergeMethod(
            name=name,
            fn=fn,
            pretty_name=pretty_name,
            reference=reference,
            rank_option=rank_option,
            options=options,
            choices=choices,
            peft_combination_type=peft_combination_type,
            validate=validate,
            batched=batched,
        )
        return fn

    return decorator


def get_merge_method(name: str) -> MergeMethod:
    """The registered method ``name``; raises :class:`UnknownMergeMethodError` listing the valid names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMergeMethodError(
            f"Unknown merge method {name!r}. Available: {', '.join(list_merge_methods())}."
        ) from None


def list_merge_methods(*, peft_only: bool = False) -> list[str]:
    """Names of registered methods (only those routed through ``add_weighted_adapter`` with ``peft_only``)."""
    return sorted(n for n, m in _REGISTRY.items() if m.peft_combination_type or not peft_only)


def _pad_rank(f: LoraFactors, rank: int) -> LoraFactors:
    """Zero-pad (never truncate) factors to ``rank`` components."""
    extra = rank - f.rank
    if extra <= 0:
        return f
    A = torch.cat([f.A, f.A.new_zeros(extra, f.A.shape[1])], dim=0)
    B = torch.cat([f.B, f.B.new_zeros(f.B.shape[0], extra)], dim=1)
    return LoraFactors(A, B, f.scaling)


def check_weights(weights: Sequence[float] | torch.Tensor, n: int, *, name: str = "weights") -> list[float]:
    """Weights as floats; raises :class:`MergeInputError` for non-numbers, a wrong length or a non-finite value
    (``name`` is how the message calls the argument)."""
    try:
        values = [float(w) for w in torch.as_tensor(weights, dtype=torch.float64).reshape(-1).tolist()]
    except (TypeError, ValueError, RuntimeError):  # ["a"], {...}, ragged lists
        raise MergeInputError(f"{name} must be a list of {n} numbers, one per adapter, got {weights!r}.") from None
    if len(values) != n:
        raise MergeInputError(
            f"Got {len(values)} weights for {n} adapters: pass exactly one weight per adapter, in the same order."
        )
    bad = [i for i, w in enumerate(values) if not math.isfinite(w)]
    if bad:
        raise MergeInputError(
            f"Weights must be finite numbers; weights at positions {bad} are {[values[i] for i in bad]}."
        )
    return values


def check_factors(factors: Sequence[LoraFactors], weights: Sequence[float] | torch.Tensor, where: str = "") -> None:
    """Shape, finiteness and weight checks shared by all methods. ``where`` names the module in messages."""
    at = f" in module {where!r}" if where else ""
    if not factors:
        raise MergeInputError(f"No adapter factors to merge{at}.")
    values = check_weights(weights, len(factors))
    shape = factors[0].shape
    for t, f in enumerate(factors):
        if not (isinstance(f.A, torch.Tensor) and isinstance(f.B, torch.Tensor)):
            raise MergeInputError(f"Adapter {t}{at}: LoRA factors must be torch tensors, got {type(f.A).__name__} "
                                  f"and {type(f.B).__name__}.")
        if not (f.A.is_floating_point() and f.B.is_floating_point()):
            raise MergeInputError(
                f"Adapter {t}{at} has {f.A.dtype}/{f.B.dtype} LoRA factors; only floating-point factors can be "
                "merged. Dequantize or convert the adapter to float32/bfloat16/float16 first."
            )
        if f.A.ndim != 2 or f.B.ndim != 2 or f.A.shape[0] != f.B.shape[1]:
            raise MergeInputError(
                f"Adapter {t}{at} has inconsistent LoRA factors A {tuple(f.A.shape)} and B {tuple(f.B.shape)}: "
                "expected A (r, in) and B (out, r)."
            )
        if f.A.shape[0] < 1:
            raise MergeInputError(f"Adapter {t}{at} has rank-0 LoRA factors (A {tuple(f.A.shape)}); an adapter "
                                  "needs rank >= 1. Remove it from the merge.")
        if f.shape != shape:
            raise MergeInputError(
                f"Adapters have incompatible shapes{at}: adapter 0 updates a {shape} weight, adapter {t} a "
                f"{f.shape} weight. Only adapters trained on the same base model can be merged."
            )
        largest_a, largest_b = _largest(f.A), _largest(f.B)  # one pass per factor: finite check and size
        if not (math.isfinite(largest_a) and math.isfinite(largest_b) and math.isfinite(f.scaling)):
            raise MergeInputError(
                f"Adapter {t}{at} has non-finite (NaN/inf) LoRA weights or scaling; retrain or repair that adapter."
            )
        # The methods square the stacked factors B_t and w_t s_t A_t (Gram matrices, SVDs): entries beyond 1e15
        # (1e150 for float64 factors) overflow the float32 (float64) computation and can corrupt the result
        # without an error. A trained adapter's entries are of order 1.
        limit = 1e150 if f.A.dtype == torch.float64 else 1e15
        largest = max(largest_b, largest_a * abs(f.scaling * values[t]))
        if largest > limit:
            raise MergeInputError(
                f"Adapter {t}{at} has LoRA factor entries up to {largest:.3g} (A times its weight and scaling); "
                f"beyond {limit:.0e} the merge's products overflow {'float64' if limit > 1e100 else 'float32'} "
                "(a trained adapter's entries are of order 1). Rescale or repair the adapter, or use smaller weights."
            )
