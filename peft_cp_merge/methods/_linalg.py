"""Small linear-algebra helpers shared by the methods (all in factored form)."""

from __future__ import annotations

import contextlib
import contextvars
import os
import time
from collections.abc import Iterator
from pathlib import Path

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
# the thread count the outermost scope chose for small work (1 on contended cores, else the caller's)
_SMALL_THREADS: contextvars.ContextVar[int | None] = contextvars.ContextVar("small_threads", default=None)

THREAD_POLICIES = ("auto", "single", "caller")
"""Values of ``$PEFT_CP_MERGE_THREADS``: how :func:`single_threaded` runs a merge's small work."""


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _others_running() -> int | None:
    """Threads of other processes running or runnable right now (Linux: ``/proc/loadavg``'s runnable count minus this
    process's running threads, e.g. torch workers still spinning), or None where that is not available."""
    try:
        total = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
        own = 0
        for stat in Path("/proc/self/task").glob("*/stat"):
            with contextlib.suppress(OSError, IndexError):
                own += stat.read_text().rsplit(")", 1)[1].split()[0] == "R"
        return max(total - own, 0)
    except (OSError, ValueError, IndexError):
        return None


_CONTENDED: dict[int, tuple[float, bool]] = {}  # threads -> (when, answer): cores_contended's 1 s cache


def cores_contended(threads: int) -> bool:
    """Whether ``threads`` intra-op threads would share the cores with other processes now: their running threads
    (the fewest of 3 reads) exceed the cores left after ours. Where that cannot be read (not Linux), whether the
    1-minute load average reaches the core count. Cached for 1 s (PEFT's per-module calls ask once per module)."""
    now = time.monotonic()
    cached = _CONTENDED.get(threads)
    if cached is not None and now - cached[0] < 1.0:
        return cached[1]
    cores = _cores()
    counts = [n for n in (_others_running() for _ in range(3)) if n is not None]
    if counts:
        answer = min(counts) > cores - threads
    else:
        try:
            answer = os.getloadavg()[0] >= cores
        except (AttributeError, OSError):
            answer = True
    _CONTENDED[threads] = (now, answer)
    return answer


def _small_work_threads(n: int) -> int:
    """The intra-op threads for a merge's small work, given the caller's ``n`` (``$PEFT_CP_MERGE_THREADS``)."""
    policy = os.environ.get("PEFT_CP_MERGE_THREADS", "auto").strip().lower() or "auto"
    if policy not in THREAD_POLICIES:
        raise ValueError(f"PEFT_CP_MERGE_THREADS={policy!r}: use one of {', '.join(THREAD_POLICIES)} (auto: one "
                         "thread for small work when other processes use the cores, else torch's thread count).")
    if n == 1 or policy == "caller":
        return n
    if policy == "single":
        return 1
    return 1 if cores_contended(n) else n


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run the enclosed torch work on one intra-op thread when the cores are shared, restoring the caller's count
    after (also a decorator).

    A merge is mostly small operations ((T r)-sized ALS steps, per-factor checks, copies): each parallel region
    waits for every thread, and when the cores are shared with another process (a laptop, a CI runner) a waiting
    thread can lose a whole scheduler slice. On 2 cores next to a 2-thread torch process this made a 10-adapter
    merge 10-15x slower with 2 threads than with 1 (``benchmarks/README.md``, busy-machine row). On idle cores the
    threads do help (the same merge 30% faster with 2), so the outermost scope decides once, on entry, from what
    runs on the machine then (:func:`cores_contended`); nested scopes follow it. ``$PEFT_CP_MERGE_THREADS``:
    ``auto`` (default), ``single`` (always one thread) or ``caller`` (never fewer than the caller's). The few
    large products that gain from threads run inside :func:`threaded` either way. ``torch.set_num_threads`` is
    process-wide: other Python threads running torch inside this scope use the same count.
    """
    n = torch.get_num_threads()
    outer = _CALLER_THREADS.get()
    small = _SMALL_THREADS.get() if outer is not None else _small_work_threads(n)
    token = _CALLER_THREADS.set(outer or n)  # nested scopes keep the outermost caller's count
    token_small = _SMALL_THREADS.set(small)
    if n != small:
        torch.set_num_threads(small)
    try:
        yield
    finally:
        if n != small:
            torch.set_num_threads(n)
        _SMALL_THREADS.reset(token_small)
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
