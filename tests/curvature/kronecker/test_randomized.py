"""Randomized truncated eigendecomposition (Halko–Martinsson–Tropp + Rayleigh–Ritz).

Matrices are built with a known spectrum, ``M = U diag(λ) Uᵀ`` with ``U`` the orthogonal
factor of a seeded Gaussian, so the reference eigenpairs need no decomposition. Subspaces
are compared with ``sin θ_max = ‖P_true − P_est‖₂ = ‖(I − U Uᵀ) V‖₂`` (equal dimensions),
which ignores signs and rotations within the subspace. All tolerances below were set from
measurements over 5-10 seeds (quoted in each test) with a margin of at least 3x over the
worst seed; the tests themselves use one fixed seed each and are deterministic.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from kldwrm.curvature.kronecker.randomized import discarded_trace_mean, randomized_eigh
from kldwrm.curvature.linalg import CurvatureError, single_thread

N, RANK = 300, 20
EPS64 = torch.finfo(torch.float64).eps


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Reference LAPACK calls (QR, SVD, eigh of 300 × 300) on one thread: on a busy 2-core
    machine multi-threaded LAPACK takes seconds for them (see ``linalg.single_thread``)."""
    with single_thread(0):
        yield


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _known(lam: Tensor, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``(U diag(λ) Uᵀ, U)`` in float64, with ``U`` a seeded random orthogonal matrix."""
    n = lam.numel()
    U = torch.linalg.qr(torch.randn(n, n, generator=_gen(seed), dtype=torch.float64)).Q
    M = (U * lam) @ U.T
    return 0.5 * (M + M.T), U


def _sin_max(U: Tensor, V: Tensor) -> float:
    """Sine of the largest principal angle between the column spans of ``U`` and ``V``."""
    U, V = U.double(), V.double()
    return float(torch.linalg.matrix_norm(V - U @ (U.T @ V), ord=2))


@pytest.fixture(scope="module")
def fast() -> tuple[Tensor, Tensor, Tensor]:
    lam = 0.7 ** torch.arange(N, dtype=torch.float64)
    M, U = _known(lam)
    return M, U, lam


@pytest.fixture(scope="module")
def slow() -> tuple[Tensor, Tensor, Tensor]:
    lam = 1.0 / (1.0 + torch.arange(N, dtype=torch.float64))
    M, U = _known(lam, seed=1)
    return M, U, lam


def test_fast_decay_recovers_top_pairs(fast):
    # λ_i = 0.7^i: with ℓ = 30 and q = 2 the error per mode is ~ (λ_31/λ_20)^{2·3} = 0.7^66 ≈ 6e-11.
    # Measured over seeds 0-4: max relative eigenvalue error 2.1e-11 .. 1.2e-10, sin θ_max
    # 4.7e-6 .. 1.2e-5; this seed 2.6e-11 and 5.4e-6. Tolerances 1e-8 and 1e-4.
    M, U, lam = fast
    evals, evecs = randomized_eigh(M, RANK, generator=_gen(0))
    assert evals.shape == (RANK,) and evecs.shape == (N, RANK)
    assert evals.dtype == evecs.dtype == torch.float64
    assert bool((evals[:-1] >= evals[1:]).all()), "eigenvalues must be descending"
    rel = ((evals - lam[:RANK]).abs() / lam[:RANK]).max()
    assert rel < 1e-8
    assert _sin_max(U[:, :RANK], evecs) < 1e-4
    # orthonormal columns to working precision (measured 2.6e-15)
    torch.testing.assert_close(evecs.T @ evecs, torch.eye(RANK, dtype=torch.float64),
                               rtol=0, atol=100 * EPS64)
    # each column is an eigenvector, sign-free: |⟨v_i, u_i⟩| ≈ 1 (gaps λ_i/λ_{i+1} = 1/0.7);
    # 1 − |cos| ≈ sin²/2 ≤ 1e-10 for the angles above
    overlap = (evecs * U[:, :RANK]).sum(0).abs()
    torch.testing.assert_close(overlap, torch.ones_like(overlap), rtol=0, atol=1e-8)


def test_slow_decay_interlacing_and_power_iterations_help(slow):
    # λ_i = 1/(i+1): gaps are small, the subspace itself is not resolved, but the Ritz values
    # obey deterministic bounds and converge with q. Measured (seed 0), q = 0..4: total
    # eigenvalue error Σ(λ_i − θ_i) 0.223, 0.0286, 0.0074, 0.0026, 0.0011; spectral error of
    # the rank-20 approximation over the optimum λ_21: 2.24, 1.069, 1.011, 1.0024, 1.0005.
    M, _, lam = slow
    rank_err, sum_err = [], []
    for q in range(5):
        evals, evecs = randomized_eigh(M, RANK, power_iters=q, generator=_gen(0))
        # Cauchy interlacing θ_i ≤ λ_i, up to rounding of ‖M‖ = 1 (measured overshoot ≤ 0)
        assert bool((evals <= lam[:RANK] + N * EPS64).all())
        assert bool((evals >= 0).all())
        sum_err.append(float((lam[:RANK] - evals).sum()))
        approx = (evecs * evals) @ evecs.T
        rank_err.append(float(torch.linalg.matrix_norm(M - approx, ord=2)) / float(lam[RANK]))
    # Eckart–Young: no rank-20 matrix beats λ_21 (up to rounding)
    assert min(rank_err) >= 1 - 1e-10
    # more power iterations never hurt (strictly decreasing for this seed, ratios ≤ 0.4)
    assert all(b <= a for a, b in zip(sum_err[:-1], sum_err[1:], strict=True))
    assert all(b <= a for a, b in zip(rank_err[:-1], rank_err[1:], strict=True))
    # ‖M − VΘVᵀ‖ ≤ λ_21 + 2‖(I − QQᵀ)M‖ with HMT Cor. 10.10 for the expectation of the last
    # term (s = q+1 products): the bound is 55.8 for q = 0 against 2.24 measured, 4.9 for
    # q = 4 against 1.0005 (an expectation bound, so checked on one draw with that margin)
    k, p = RANK, 10
    factor = 1 + math.sqrt(k / (p - 1)) + math.e * math.sqrt(k + p) / p * math.sqrt(N - k)
    for q, err in enumerate(rank_err):
        assert err <= 1 + 2 * factor ** (1 / (q + 1))


def test_exact_fallback_matches_eigh():
    # ℓ = 20 + 10 ≥ n = 25: one full decomposition, no sketch; pairs equal eigh's to rounding
    # (measured 2.2e-16 on the values, 1.1e-15 on |⟨v_i, u_i⟩| − 1; gaps λ_i/λ_{i+1} = 1.25)
    M, _ = _known(0.8 ** torch.arange(25, dtype=torch.float64), seed=5)
    evals, evecs = randomized_eigh(M, RANK)
    ref_vals, ref_vecs = torch.linalg.eigh(M)
    ref_vals, ref_vecs = ref_vals.flip(0)[:RANK], ref_vecs.flip(1)[:, :RANK]
    torch.testing.assert_close(evals, ref_vals, rtol=0, atol=1e-13)
    overlap = (evecs * ref_vecs).sum(0).abs()
    torch.testing.assert_close(overlap, torch.ones_like(overlap), rtol=0, atol=1e-12)
    # rank ≥ n: all n pairs
    evals, evecs = randomized_eigh(M, 40)
    assert evals.shape == (25,) and evecs.shape == (25, 25)


def test_no_cubic_step(fast, monkeypatch):
    # the only eigendecomposition is the ℓ × ℓ Rayleigh–Ritz one; QRs are of n × ℓ blocks
    M, _, _ = fast
    eigh, qr = torch.linalg.eigh, torch.linalg.qr
    shapes: list[tuple[str, tuple[int, ...]]] = []
    monkeypatch.setattr(torch.linalg, "eigh",
                        lambda a: shapes.append(("eigh", tuple(a.shape))) or eigh(a))
    monkeypatch.setattr(torch.linalg, "qr",
                        lambda a, mode: shapes.append(("qr", tuple(a.shape))) or qr(a, mode))
    randomized_eigh(M, RANK, oversample=10, power_iters=2, generator=_gen(0))
    assert shapes == [("qr", (N, 30))] * 3 + [("eigh", (30, 30))]


def test_warm_start_with_no_power_iteration():
    # K-FAC's refresh: M1 = 0.95·M0 + 0.05·(sample covariance of 64 draws from N(0, M0)),
    # λ_i = 0.9^i (slow enough that the cold start needs its power iterations). Warm start:
    # init = the basis computed for M0, power_iters = 0 (2 products with M1). Measured over
    # seeds 0-9, sin θ_max against the true top-20 of M1: old basis 0.056 .. 0.14, warm 0.017
    # .. 0.067, cold q = 2 (4 products) 0.029 .. 0.11, cold q = 0 (2 products, same cost as
    # warm) 0.34 .. 0.66; warm/cold2 0.36 .. 1.95, warm/cold0 0.028 .. 0.13. Seed 0:
    # warm 0.0338, cold2 0.0339, cold0 0.503; max relative eigenvalue error warm 2.3e-4,
    # cold2 5.1e-4, cold0 4.4e-2.
    n = N
    lam = 0.9 ** torch.arange(n, dtype=torch.float64)
    M0, U = _known(lam)
    X = (U * lam.sqrt()) @ torch.randn(n, 64, generator=_gen(100), dtype=torch.float64)
    M1 = 0.95 * M0 + 0.05 * (X @ X.T / 64)
    true_vals, true_vecs = torch.linalg.eigh(M1)
    true_vals, true_vecs = true_vals.flip(0)[:RANK], true_vecs.flip(1)[:, :RANK]

    _, old = randomized_eigh(M0, RANK, generator=_gen(0))
    warm_vals, warm = randomized_eigh(M1, RANK, power_iters=0, init=old, generator=_gen(10))
    cold_vals, cold = randomized_eigh(M1, RANK, power_iters=2, generator=_gen(10))
    same_cost_vals, same_cost = randomized_eigh(M1, RANK, power_iters=0, generator=_gen(10))

    s_warm, s_cold, s_same = (_sin_max(true_vecs, v) for v in (warm, cold, same_cost))
    assert s_warm < 3 * s_cold  # nearly as good as twice the products from scratch
    assert s_warm < 0.25 * s_same  # far better than a cold start of the same cost
    assert s_warm < 0.5 * _sin_max(true_vecs, old)  # and better than reusing the old basis
    rel = float(((true_vals - warm_vals) / true_vals).max())
    assert rel < 3 * float(((true_vals - cold_vals) / true_vals).max())
    assert rel < 1e-3


def test_init_columns_and_validation(fast):
    M, U, lam = fast
    # the exact top-20 basis as init: one product keeps it, so q = 0 is already accurate
    # (measured 4.7e-16 relative eigenvalue error, sin θ_max 2.2e-16)
    evals, evecs = randomized_eigh(M, RANK, power_iters=0, init=U[:, :RANK], generator=_gen(0))
    assert float(((evals - lam[:RANK]).abs() / lam[:RANK]).max()) < 1e-12
    assert _sin_max(U[:, :RANK], evecs) < 1e-12
    # a wider init is truncated to `rank` columns, a float32 one is cast
    evals, _ = randomized_eigh(M, RANK, power_iters=0, init=U[:, :50].float(), generator=_gen(0))
    assert evals.dtype == torch.float64
    with pytest.raises(ValueError, match="init"):
        randomized_eigh(M, RANK, init=U[:10])
    with pytest.raises(ValueError, match="non-finite"):
        randomized_eigh(M, RANK, init=torch.full((N, 3), float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError, match="rank"):
        randomized_eigh(M, 0)
    with pytest.raises(ValueError, match="square"):
        randomized_eigh(M[:, :10], 5)
    with pytest.raises(TypeError, match="float32 or float64"):
        randomized_eigh(M.half(), 5)
    # a NaN factor fails loudly, on both paths (LAPACK alone returns NaN here, no error)
    bad = M.clone()
    bad[3, 4] = bad[4, 3] = float("nan")
    with pytest.raises(CurvatureError, match="A of fc1 has non-finite"):
        randomized_eigh(bad, RANK, generator=_gen(0), name="A of fc1")
    with pytest.raises(CurvatureError, match="non-finite"):
        randomized_eigh(bad[:25, :25], RANK)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rank_deficient_and_zero_matrices(dtype):
    # rank 5 with 95 exact zero eigenvalues; rank 20 asked, sketch of 30 columns. The 15
    # extra Ritz values must be ~0 (measured 1.7e-16 in float64, 8.5e-8 in float32, for
    # ‖M‖ = 5), the columns orthonormal and finite.
    eps = torch.finfo(dtype).eps
    lam = torch.zeros(100, dtype=torch.float64)
    lam[:5] = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    M, U = _known(lam, seed=3)
    evals, evecs = randomized_eigh(M.to(dtype), RANK, generator=_gen(0))
    assert evals.dtype == evecs.dtype == dtype
    assert bool(torch.isfinite(evals).all() and torch.isfinite(evecs).all())
    assert bool((evals >= 0).all())
    torch.testing.assert_close(evals[:5].double(), lam[:5], rtol=0, atol=1e3 * eps * 5)
    assert float(evals[5:].max()) <= 1e3 * eps * 5
    assert _sin_max(U[:, :5], evecs[:, :5]) < 1e3 * eps * 5  # measured 2e-15 / 5e-7
    torch.testing.assert_close(evecs.T @ evecs, torch.eye(RANK, dtype=dtype),
                               rtol=0, atol=100 * eps)
    for n in (100, 25):  # randomized path and exact fallback
        zero = torch.zeros(n, n, dtype=dtype)
        evals, evecs = randomized_eigh(zero, RANK, generator=_gen(0))
        assert bool((evals == 0).all()) and bool(torch.isfinite(evecs).all())
        assert float(discarded_trace_mean(zero, evals)) == 0.0


def test_float32(fast):
    # float32 works in float32 end to end. Rounding is ~eps32·‖M‖ ≈ 1e-7 in absolute terms
    # (λ_1 = 1): measured over seeds 0-4 max |θ_i − λ_i| 2.5e-7 .. 4.8e-7, sin θ_max of the
    # top 10 (gaps ≥ 3e-2·0.7^9) 1.3e-6 .. 8e-6, of all 20 1.6e-5 .. 2e-4 (λ_20 − λ_21 =
    # 3.4e-4 is not far above the rounding), orthonormality 1.4e-6.
    M, U, lam = fast
    evals, evecs = randomized_eigh(M.float(), RANK, generator=_gen(0))
    assert evals.dtype == evecs.dtype == torch.float32
    assert float((evals.double() - lam[:RANK]).abs().max()) < 1e-5
    assert _sin_max(U[:, :10], evecs[:, :10]) < 1e-4
    assert _sin_max(U[:, :RANK], evecs) < 2e-3
    torch.testing.assert_close(evecs.T @ evecs, torch.eye(RANK), rtol=0, atol=1e-5)


def test_discarded_trace_mean(fast):
    # exact kept values: the mean of the 280 others. trace − Σ kept cancels ~3 digits
    # (3.33 − 3.33 + 2.7e-3); measured relative error 4e-13, tolerance 1e-9.
    M, _, lam = fast
    mean = discarded_trace_mean(M, lam[:RANK])
    assert mean.shape == () and mean.dtype == torch.float64
    torch.testing.assert_close(mean, lam[RANK:].mean(), rtol=1e-9, atol=0)
    # Ritz values (≤ λ) can only raise it, and all kept means nothing is left
    evals, _ = randomized_eigh(M, RANK, power_iters=0, generator=_gen(0))
    assert float(discarded_trace_mean(M, evals)) >= float(mean)
    assert float(discarded_trace_mean(M, lam)) == 0.0
    # never negative, even when the kept values overshoot the trace by rounding
    assert float(discarded_trace_mean(M, lam[:RANK] + 1e-3)) == 0.0


def test_reproducible_with_seeded_generator(fast):
    M, U, _ = fast
    a = randomized_eigh(M, RANK, generator=_gen(7))
    b = randomized_eigh(M, RANK, generator=_gen(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = randomized_eigh(M, RANK, power_iters=0, init=U[:, :5], generator=_gen(7))
    d = randomized_eigh(M, RANK, power_iters=0, init=U[:, :5], generator=_gen(7))
    assert torch.equal(c[0], d[0]) and torch.equal(c[1], d[1])
    other = randomized_eigh(M, RANK, generator=_gen(8))
    assert not torch.equal(a[1], other[1])
