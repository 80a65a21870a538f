"""Small dense linear algebra used by the curvature blocks."""

from __future__ import annotations

import logging

import torch
from torch import Tensor

logger = logging.getLogger(__name__)


class CurvatureError(RuntimeError):
    """Raised when a curvature matrix cannot be decomposed (e.g. it contains NaN)."""


def sym_eig(mat: Tensor, name: str = "factor") -> tuple[Tensor, Tensor]:
    """Eigendecomposition of a symmetric PSD matrix, eigenvalues clamped at 0.

    Tries the matrix's own dtype first and retries in float64 when LAPACK fails to
    converge (it happens for badly conditioned float32 factors); the result is cast back
    to the input dtype. Raises :class:`CurvatureError` if the float64 retry fails too.
    """
    sym = 0.5 * (mat + mat.transpose(-1, -2))
    try:
        evals, evecs = torch.linalg.eigh(sym)
    except RuntimeError as first:  # torch raises _LinAlgError (a RuntimeError subclass)
        logger.warning("eigh of %s failed in %s (%s); retrying in float64", name, sym.dtype, first)
        try:
            evals, evecs = torch.linalg.eigh(sym.double())
        except RuntimeError as second:
            finite = bool(torch.isfinite(sym).all())
            raise CurvatureError(
                f"could not eigendecompose the curvature {name} of shape {tuple(sym.shape)} "
                f"even in float64 (finite entries: {finite}): {second}"
            ) from second
        evals, evecs = evals.to(mat.dtype), evecs.to(mat.dtype)
    return evals.clamp_min(0.0), evecs


def conjugate_gradient(
    matvec,
    rhs: Tensor,
    precond: Tensor,
    *,
    rtol: float = 1e-6,
    max_iter: int = 200,
) -> tuple[Tensor, float, int]:
    """Preconditioned CG for an SPD operator on matrix-shaped vectors.

    ``precond`` is the elementwise inverse diagonal preconditioner. Returns the solution,
    the final relative residual ``||rhs - A x|| / ||rhs||`` and the iteration count.
    """
    x = precond * rhs
    r = rhs - matvec(x)
    rhs_norm = torch.linalg.vector_norm(rhs)
    if rhs_norm == 0:
        return torch.zeros_like(rhs), 0.0, 0
    z = precond * r
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
        z = precond * r
        rz_new = torch.sum(r * z)
        p = z + (rz_new / rz) * p
        rz = rz_new
    return x, rel, it
