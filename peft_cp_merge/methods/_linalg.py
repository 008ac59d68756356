"""Small linear-algebra helpers shared by the methods (all in factored form)."""

from __future__ import annotations

import torch

from .registry import LoraFactors


def stacked(factors: list[LoraFactors], weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(As, Bs)``, in that order: ``[c_1 A_1; ...; c_T A_T]`` (sum r x in) and ``[B_1 ... B_T]`` (out x sum r),
    ``c_t = s_t (* w_t)``.

    ``Bs @ As`` is ``sum_t c_t B_t A_t``: PEFT's ``cat`` update.
    """
    Bs = torch.cat([f.B for f in factors], dim=1)
    coef = [f.scaling * (1.0 if weights is None else weights[t]) for t, f in enumerate(factors)]
    As = torch.cat([c * f.A for c, f in zip(coef, factors)], dim=0)
    return As, Bs


def balanced(U: torch.Tensor, g: torch.Tensor, V: torch.Tensor) -> LoraFactors:
    """LoRA factors of ``U diag(g) V^T`` with the magnitude split evenly between B and A.

    ``B' = U diag(sign(g) sqrt|g|)``, ``A' = diag(sqrt|g|) V^T`` (U: out x R, V: in x R), scaling 1.
    """
    root = g.abs().sqrt()
    return LoraFactors(A=root[:, None] * V.T, B=U * (torch.sign(g) * root)[None, :], scaling=1.0)


def svd_flip(U: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """sklearn's ``svd_flip`` sign convention: flip each column of ``U`` (and the same columns of ``others``) so its
    largest-magnitude entry is positive, so results never depend on the SVD routine's signs."""
    if U.shape[1] == 0:
        return (U, *others)
    flip = torch.sign(U.gather(0, U.abs().argmax(0, keepdim=True)))[0]
    flip = torch.where(flip == 0, torch.ones_like(flip), flip)
    return (U * flip, *(o * flip for o in others))


def zero_update(factors: list[LoraFactors]) -> LoraFactors:
    """Rank-1 zero factors of the modules' shape: the merge when every update is zero."""
    out, inn = factors[0].shape
    return LoraFactors(factors[0].A.new_zeros(1, inn), factors[0].B.new_zeros(out, 1), 1.0)
