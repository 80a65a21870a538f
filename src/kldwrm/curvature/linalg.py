"""Small dense linear algebra used by the curvature blocks."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

logger = logging.getLogger(__name__)


#: matrices below this size are decomposed on one thread (see :func:`single_thread`)
SINGLE_THREAD_BELOW = 2048


@contextmanager
def single_thread(n: int) -> Iterator[None]:
    """Run LAPACK on one thread for an ``n × n`` problem smaller than ``SINGLE_THREAD_BELOW``.

    Multi-threaded ``eigh`` on the small matrices of K-FAC is much slower than
    single-threaded, and catastrophically so when the cores are busy: measured on the
    2-core development machine under load, a 30×30 ``eigh`` took 65 ms on 2 threads and
    0.05 ms on 1; a 490×490 one 1.4 s and 0.044 s.
    """
    threads = torch.get_num_threads()
    if n >= SINGLE_THREAD_BELOW or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every entry of every tensor is finite, in one pass and one host sync.

    A NaN or ±inf entry makes a tensor's sum non-finite; the sums are taken in at least
    float32, so only a finite tensor whose entries add up beyond ~3e38 is reported as
    non-finite (a gradient or curvature that large is unusable anyway). Several times
    faster than ``isfinite`` or an infinity norm, which write or reduce more.
    """
    if not tensors:
        return True
    sums = [t.sum(dtype=torch.promote_types(t.dtype, torch.float32)) for t in tensors]
    return bool(torch.isfinite(torch.stack(sums)).all())


class CurvatureError(RuntimeError):
    """Raised when a curvature matrix cannot be decomposed (e.g. it contains NaN)."""


def sym_eig(mat: Tensor, name: str = "factor") -> tuple[Tensor, Tensor]:
    """Eigendecomposition of a symmetric PSD matrix, eigenvalues clamped at 0.

    Tries the matrix's own dtype first and retries in float64 when LAPACK fails to
    converge (it happens for badly conditioned float32 factors) or silently returns
    non-finite values: MKL's float32 ``eigh`` returned NaN eigenpairs for a finite 30×30
    activation factor with three zero rows (dead ReLU units) in a 50-epoch MNIST run,
    and the NaN went into the parameters. The result is cast back to the input dtype.
    Raises :class:`CurvatureError` if the float64 retry fails too.
    """
    sym = 0.5 * (mat + mat.transpose(-1, -2))
    with single_thread(sym.shape[-1]):
        return _eig(sym, mat.dtype, name)


def _eig(sym: Tensor, dtype: torch.dtype, name: str) -> tuple[Tensor, Tensor]:
    try:
        evals, evecs = torch.linalg.eigh(sym)
        problem = None if all_finite([evals, evecs]) else "non-finite eigenpairs"
    except RuntimeError as first:  # torch raises _LinAlgError (a RuntimeError subclass)
        problem = str(first)
    if problem is None:
        return evals.clamp_min(0.0), evecs
    logger.warning("eigh of %s failed in %s (%s); retrying in float64", name, sym.dtype, problem)
    try:
        evals, evecs = torch.linalg.eigh(sym.double())
        if not all_finite([evals, evecs]):
            raise RuntimeError("non-finite eigenpairs")
    except RuntimeError as second:
        finite = bool(torch.isfinite(sym).all())
        raise CurvatureError(
            f"could not eigendecompose the curvature {name} of shape {tuple(sym.shape)} "
            f"even in float64 (finite entries: {finite}): {second}"
        ) from second
    return evals.to(dtype).clamp_min(0.0), evecs.to(dtype)


def conjugate_gradient(
    matvec: Callable[[Tensor], Tensor],
    rhs: Tensor,
    precond: Tensor | Callable[[Tensor], Tensor],
    *,
    rtol: float = 1e-6,
    max_iter: int = 200,
) -> tuple[Tensor, float, int]:
    """Preconditioned CG for an SPD operator on matrix-shaped vectors.

    ``precond`` is the elementwise inverse diagonal preconditioner, or a callable applying
    an SPD approximation of the inverse. Returns the solution, the final relative residual
    ``||rhs - A x|| / ||rhs||`` and the iteration count.
    """
    apply = precond if callable(precond) else (lambda r: precond * r)
    x = apply(rhs)
    r = rhs - matvec(x)
    rhs_norm = torch.linalg.vector_norm(rhs)
    if rhs_norm == 0:
        return torch.zeros_like(rhs), 0.0, 0
    z = apply(r)
    p = z.clone()
    rz = torch.sum(r * z)
    rel = float(torch.linalg.vector_norm(r) / rhs_norm)
    it = 0
    while rel > rtol and it < max_iter:
        ap = matvec(p)
        alpha = rz / torch.sum(p * ap)
        x = x + alpha * p
        r = r - alpha * ap
        rel = float(torch.linalg.vector_norm(r) / rhs_norm)
        it += 1
        if rel <= rtol:
            break
        z = apply(r)
        rz_new = torch.sum(r * z)
        p = z + (rz_new / rz) * p
        rz = rz_new
    return x, rel, it
