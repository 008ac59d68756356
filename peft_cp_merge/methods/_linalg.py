"""Small linear-algebra helpers shared by the methods (all in factored form)."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

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


# torch's intra-op thread count of the outermost `single_threaded` scope, for `threaded` to restore
_CALLER_THREADS: contextvars.ContextVar[int | None] = contextvars.ContextVar("caller_threads", default=None)


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run the enclosed torch work on one intra-op thread, restoring the caller's count after (also a decorator).

    A merge is mostly small operations ((T r)-sized ALS steps, per-factor checks, copies): each parallel region
    waits for every thread, and when the cores are shared with another process (a laptop, a CI runner) a waiting
    thread can lose a whole scheduler slice. On 2 cores next to a 2-thread torch process this made a 10-adapter
    merge 10-15x slower with 2 threads than with 1 (``benchmarks/README.md``, busy-machine row). The few large
    products that do gain from threads run inside :func:`threaded`. ``torch.set_num_threads`` is process-wide:
    other Python threads running torch inside this scope run single-threaded too.
    """
    n = torch.get_num_threads()
    token = _CALLER_THREADS.set(_CALLER_THREADS.get() or n)  # nested scopes keep the outermost caller's count
    if n != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n != 1:
            torch.set_num_threads(n)
        _CALLER_THREADS.reset(token)


@contextlib.contextmanager
def threaded() -> Iterator[None]:
    """Inside :func:`single_threaded`, the caller's thread count for one large operation (e.g. the (T r)^2 (out + in)
    Gram products of a batch); elsewhere a no-op."""
    n = _CALLER_THREADS.get()
    now = torch.get_num_threads()
    if n is None or n == now:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(now)


def gram(M: torch.Tensor, block: int = 256) -> torch.Tensor:
    """``M @ M^T`` for a batch (N, S, n), on the caller's threads (:func:`threaded`). From ``S >= 2 block`` rows on
    only the block-upper triangle is multiplied (row panels against the columns from their own on) and mirrored:
    10/16 of the product's FLOPs at S = 1024, 35% less time on 2 cores; every entry is the same dot product over n
    as in the full product (float32 Gram of a (8, 1024, 12288) batch: bit-identical on this machine)."""
    N, S, _ = M.shape
    with threaded():
        if S < 2 * block:
            return M @ M.mT
        W = M.new_empty(N, S, S)
        for i in range(0, S, block):
            W[:, i:i + block, i:] = M[:, i:i + block] @ M[:, i:].mT
            W[:, i + block:, i:i + block] = W[:, i:i + block, i + block:].mT
        return W


def top_eigh(M: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest eigenpairs of each symmetric (N, S, S) float64 ``M``, descending: ``(evals (N, k), vecs
    (N, S, k))``. For S >= 512 and k <= S / 8 on the CPU by Lanczos (ARPACK ``eigsh``, ``tol=0``: converged to
    machine precision, 5-8x faster than a full ``eigh`` at S = 1024, whose tridiagonal reduction alone costs what all
    S eigenpairs do); otherwise, or where ARPACK does not converge, ``torch.linalg.eigh``. Eigenvalues agree with
    ``eigh`` to float64 round-off; eigenvectors up to sign (callers fix signs or do not depend on them)."""
    N, S, _ = M.shape
    if S < 512 or k > S // 8 or M.device.type != "cpu":
        evals, vecs = torch.linalg.eigh(M)
        return evals.flip(-1)[:, :k], vecs.flip(-1)[..., :k]
    import numpy as np
    from scipy.sparse.linalg import ArpackError, ArpackNoConvergence, LinearOperator, eigsh

    v0 = np.random.RandomState(0).standard_normal(S)  # generic (a structured start can miss eigenvectors), fixed
    evals, vecs = M.new_empty(N, k), M.new_empty(N, S, k)
    for n in range(N):
        Mn = M[n]

        def matvec(x, Mn=Mn):  # torch's product, on the threads of the enclosing scope (not numpy's BLAS pool)
            return (Mn @ torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64)).reshape(S, -1)).numpy()

        op = LinearOperator((S, S), matvec=matvec, matmat=matvec, dtype=np.float64)
        try:
            e, v = eigsh(op, k=k, which="LA", tol=0, v0=v0)
        except (ArpackError, ArpackNoConvergence):
            e_full, v_full = torch.linalg.eigh(Mn)
            evals[n], vecs[n] = e_full.flip(-1)[:k], v_full.flip(-1)[:, :k]
            continue
        order = np.argsort(e)[::-1].copy()
        evals[n], vecs[n] = torch.from_numpy(e[order]), torch.from_numpy(v[:, order])
    return evals, vecs
