"""Eigendecomposition fallback and the preconditioned CG used by ``q_solve="exact"``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kldwrm.curvature import CurvatureError, sym_eig
from kldwrm.curvature.linalg import conjugate_gradient


def _spd(n, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    return (a @ a.T / n + 0.1 * torch.eye(n, dtype=torch.float64)).to(dtype)


def test_float32_failure_retries_in_float64(monkeypatch):
    real = torch.linalg.eigh
    calls = []

    def flaky(m):
        calls.append(m.dtype)
        if m.dtype == torch.float32:
            raise torch.linalg.LinAlgError("did not converge")
        return real(m)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    mat = _spd(6)
    evals, evecs = sym_eig(mat)
    assert calls == [torch.float32, torch.float64]
    assert evals.dtype == evecs.dtype == torch.float32
    torch.testing.assert_close(evecs @ torch.diag(evals) @ evecs.T, mat, rtol=1e-5, atol=1e-5)


def test_silent_non_finite_float32_result_retries_in_float64(monkeypatch):
    real = torch.linalg.eigh
    calls = []

    def silent(m):  # LAPACK returning NaN without an error, as MKL's float32 eigh did
        calls.append(m.dtype)
        evals, evecs = real(m)
        if m.dtype == torch.float32:
            evals = evals.clone()
            evals[0] = float("nan")
        return evals, evecs

    monkeypatch.setattr(torch.linalg, "eigh", silent)
    mat = _spd(6)
    evals, evecs = sym_eig(mat)
    assert calls == [torch.float32, torch.float64]
    torch.testing.assert_close(evecs @ torch.diag(evals) @ evecs.T, mat, rtol=1e-5, atol=1e-5)


def test_the_factor_on_which_mkl_returned_nan_decomposes():
    """The 30×30 activation factor (three zero rows: dead ReLU units) of the paper CNN's
    last layer at step 2430 of SO, seed 3, as released; MKL's float32 ``eigh`` returned NaN
    eigenpairs for it on the development machine. The result must reconstruct it."""
    mat = torch.load(Path(__file__).parent / "data" / "dead_relu_factor.pt", weights_only=True)
    assert mat.shape == (30, 30) and (mat.abs().sum(1) == 0).sum() == 3
    evals, evecs = sym_eig(mat)
    assert torch.isfinite(evals).all() and torch.isfinite(evecs).all()
    sym = 0.5 * (mat + mat.T)
    rebuilt = (evecs.double() * evals.double()) @ evecs.double().T
    scale = torch.linalg.matrix_norm(sym.double())
    assert torch.linalg.matrix_norm(rebuilt - sym.double()) / scale < 1e-6


def test_failure_in_float64_too_raises_a_clear_error(monkeypatch):
    def broken(m):
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    with pytest.raises(CurvatureError, match=r"A of fc.*even in float64"):
        sym_eig(_spd(4), "A of fc")


def test_eigenvalues_are_clamped_and_threads_restored():
    torch.set_num_threads(2)
    v = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)  # eigenvalues 0 and 2
    evals, _ = sym_eig(v)
    assert (evals >= 0).all() and torch.get_num_threads() == 2


def test_conjugate_gradient_reaches_its_tolerance():
    n = 30
    M = _spd(n, torch.float64, seed=1)
    rhs = torch.randn(n, 1, dtype=torch.float64)
    x, rel, it = conjugate_gradient(lambda v: M @ v, rhs, 1.0 / torch.diagonal(M)[:, None],
                                    rtol=1e-10)
    assert rel <= 1e-10 and it <= n + 5
    torch.testing.assert_close(x, torch.linalg.solve(M, rhs), rtol=1e-8, atol=1e-10)
