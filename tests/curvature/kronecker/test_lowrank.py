"""``curvature.kronecker.lowrank``: Q's refresh solve on truncated factors, against dense
float64 systems.

The reference is built independently from its definition: each truncated factor as the dense
matrix ``U diag(a) Uᵀ + c (I − UUᵀ)`` (averages) or ``U (Uᵀ F U) Uᵀ + c_F (I − UUᵀ)`` (fresh
estimates compressed onto the average's basis), the operator as the dense Kronecker sum, and
``torch.linalg.solve`` on it.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from kldwrm.curvature.kronecker.lowrank import (
    Spectrum,
    compress,
    low_rank_inverse,
    low_rank_inverse_columns,
    refresh_operator,
    refresh_solve,
)

pytestmark = pytest.mark.usefixtures("float64")


def _spd(n: int, gen: torch.Generator, decay: float = 0.7) -> Tensor:
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen))
    return Q @ torch.diag(decay ** torch.arange(n, dtype=torch.float64)) @ Q.T


def _truncated(mat: Tensor, r: int | None) -> Spectrum:
    """The ``r`` leading eigenpairs of ``mat`` and the mean of the others (exact eigh)."""
    vals, vecs = torch.linalg.eigh(mat)
    vals, vecs = vals.flip(0), vecs.flip(1)
    n = mat.shape[0]
    if r is None or r >= n:
        return Spectrum(vals, vecs, mat.new_zeros(()))
    return Spectrum(vals[:r], vecs[:, :r], vals[r:].mean())


def _dense(vals: Tensor, U: Tensor, tail: Tensor) -> Tensor:
    core = torch.diag(vals) if vals.dim() == 1 else vals
    return U @ core @ U.T + tail * (torch.eye(U.shape[0]) - U @ U.T)


def _dense_compressed(F: Tensor, U: Tensor) -> Tensor:
    n, r = U.shape
    M = U.T @ F @ U
    tail = (torch.trace(F) - torch.trace(M)) / (n - r) if n > r else torch.zeros(())
    return _dense(M, U, tail)


SHAPES = [  # (out, in, rank of Γ, rank of A); None: kept whole
    (12, 9, 4, 3), (12, 9, None, 3), (12, 9, 4, None), (7, 11, 7, 5), (12, 9, None, None),
]


@pytest.mark.parametrize(("n_out", "n_in", "r_g", "r_a"), SHAPES)
@pytest.mark.parametrize(("e", "f", "damping"), [(1.0, 0.05, 1e-3), (1.3, 2.0, 0.1)])
def test_refresh_solve_equals_the_dense_solve(n_out, n_in, r_g, r_a, e, f, damping):
    gen = torch.Generator().manual_seed(n_out * 31 + n_in)
    Gb, Ab, Gf, Af = _spd(n_out, gen), _spd(n_in, gen), _spd(n_out, gen, 0.8), _spd(n_in, gen)
    G, A = _truncated(Gb, r_g), _truncated(Ab, r_a)
    V = torch.randn(n_out, n_in, generator=gen)
    X, rel = refresh_solve(V, G, A, compress(Gf, G), compress(Af, A), e, f, damping, 1e-12)
    Gd, Ad = _dense(G.vals, G.vecs, G.tail), _dense(A.vals, A.vecs, A.tail)
    Gfd, Afd = _dense_compressed(Gf, G.vecs), _dense_compressed(Af, A.vecs)
    M = e * torch.kron(Ad, Gd) + f * torch.kron(Afd, Gfd) + damping * torch.eye(n_out * n_in)
    expected = torch.linalg.solve(M, V.T.reshape(-1)).reshape(n_in, n_out).T
    torch.testing.assert_close(X, expected, rtol=1e-10, atol=1e-12)
    assert rel <= 1e-12
    # the operator it inverts is the same dense one
    op = refresh_operator(G, A, compress(Gf, G), compress(Af, A), e, f, damping)
    torch.testing.assert_close(op(X), V, rtol=1e-10, atol=1e-10)


def test_complete_bases_give_the_exact_kronecker_sum():
    """Ranks at least the factors' sizes: the system is ``e Ā⊗Γ̄ + f A⊗Γ + γI`` itself."""
    gen = torch.Generator().manual_seed(3)
    Gb, Ab, Gf, Af = _spd(8, gen), _spd(6, gen), _spd(8, gen), _spd(6, gen)
    V = torch.randn(8, 6, generator=gen)
    X, _ = refresh_solve(V, _truncated(Gb, None), _truncated(Ab, None),
                         compress(Gf, _truncated(Gb, None)), compress(Af, _truncated(Ab, None)),
                         1.0, 0.4, 1e-2, 1e-13)
    M = torch.kron(Ab, Gb) + 0.4 * torch.kron(Af, Gf) + 1e-2 * torch.eye(48)
    expected = torch.linalg.solve(M, V.T.reshape(-1)).reshape(6, 8).T
    torch.testing.assert_close(X, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("r_g", [3, None])
def test_a_diagonal_input_factor(r_g):
    """An embedding's ``A`` is a vector (its basis the identity): both solves still hold."""
    gen = torch.Generator().manual_seed(5)
    Gb, Gf = _spd(9, gen), _spd(9, gen)
    a, af = torch.rand(7, generator=gen) + 0.1, torch.rand(7, generator=gen) + 0.1
    G, A = _truncated(Gb, r_g), Spectrum(a, None, a.new_zeros(()))
    V = torch.randn(9, 7, generator=gen)
    Gd = _dense(G.vals, G.vecs, G.tail)
    X, _ = refresh_solve(V, G, A, compress(Gf, G), compress(af, A), 1.0, 0.3, 1e-2, 1e-13)
    M = (torch.kron(torch.diag(a), Gd) + 0.3 * torch.kron(torch.diag(af),
                                                            _dense_compressed(Gf, G.vecs))
         + 1e-2 * torch.eye(63))
    expected = torch.linalg.solve(M, V.T.reshape(-1)).reshape(7, 9).T
    torch.testing.assert_close(X, expected, rtol=1e-10, atol=1e-12)
    M0 = 1.2 * torch.kron(torch.diag(a), Gd) + 1e-2 * torch.eye(63)
    expected = torch.linalg.solve(M0, V.T.reshape(-1)).reshape(7, 9).T
    torch.testing.assert_close(low_rank_inverse(V, G, A, 1.2, 1e-2), expected,
                               rtol=1e-10, atol=1e-12)


def test_compression_is_the_closest_matrix_of_its_form_and_keeps_the_trace():
    """``U M Uᵀ + c (I − UUᵀ)`` nearest to ``F`` in Frobenius: ``M = UᵀFU`` and ``c`` the mean
    diagonal of the complement; any other ``(M', c')`` is farther."""
    gen = torch.Generator().manual_seed(7)
    F, basis = _spd(10, gen), _truncated(_spd(10, gen), 4)
    C = compress(F, basis)
    best = _dense(C.vals, C.vecs, C.tail)
    assert float(torch.trace(best)) == pytest.approx(float(torch.trace(F)), rel=1e-12)
    err = float(torch.linalg.matrix_norm(F - best))
    for _ in range(20):
        dM = 1e-3 * torch.randn(4, 4, generator=gen)
        other = _dense(C.vals + dM + dM.T, C.vecs, C.tail + 1e-3 * torch.randn((), generator=gen))
        assert float(torch.linalg.matrix_norm(F - other)) > err


@pytest.mark.parametrize(("n_out", "n_in", "r_g", "r_a"), SHAPES)
@pytest.mark.parametrize("widths", [(1,), (-1, 1), (3, -1, 2)])
def test_the_column_block_inverse_equals_the_dense_solve(n_out, n_in, r_g, r_a, widths):
    """``V`` given as column blocks (a layer's weight and bias columns): the blocks of
    ``(e Ā_r⊗Γ̄_r + γI)^{-1} vec(V)`` from the dense float64 solve, each contiguous."""
    gen = torch.Generator().manual_seed(n_out * 7 + n_in)
    G, A = _truncated(_spd(n_out, gen), r_g), _truncated(_spd(n_in, gen), r_a)
    e, damping = 1.2, 1e-2
    V = torch.randn(n_out, n_in, generator=gen)
    sizes = [n_in - sum(w for w in widths if w > 0) if w < 0 else w for w in widths]
    if len(widths) == 1:
        sizes = [n_in]
    parts = [p.contiguous() for p in V.split(sizes, dim=1)]
    M = e * torch.kron(_dense(A.vals, A.vecs, A.tail), _dense(G.vals, G.vecs, G.tail)) \
        + damping * torch.eye(n_out * n_in)
    expected = torch.linalg.solve(M, V.T.reshape(-1)).reshape(n_in, n_out).T
    out = low_rank_inverse_columns(parts, G, A, e, damping)
    assert [o.shape for o in out] == [p.shape for p in parts]
    assert all(o.is_contiguous() for o in out)
    torch.testing.assert_close(torch.cat(out, dim=1), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(low_rank_inverse(V, G, A, e, damping), expected,
                               rtol=1e-10, atol=1e-12)


def test_a_diagonal_input_factor_takes_one_column_block():
    gen = torch.Generator().manual_seed(5)
    G = _truncated(_spd(6, gen), 3)
    A = Spectrum(torch.rand(4, generator=gen), None, torch.zeros(()))
    with pytest.raises(ValueError, match="one column block"):
        low_rank_inverse_columns([torch.randn(6, 2), torch.randn(6, 2)], G, A, 1.0, 0.1)


@pytest.mark.parametrize("kind", ["kept", "core", "whole", "diagonal"])
def test_spectrum_products_from_both_sides_equal_the_dense_ones(kind):
    """``S·V`` and ``V·S`` for each form a :class:`Spectrum` takes, against the dense ``S``."""
    gen = torch.Generator().manual_seed(5)
    n = 9
    mat = _spd(n, gen)
    if kind == "diagonal":
        vals = torch.rand(n, generator=gen) + 0.5
        S, dense = Spectrum(vals, None, torch.zeros(())), torch.diag(vals)
    elif kind == "core":
        S = compress(_spd(n, gen), _truncated(mat, 4))
        dense = _dense(S.vals, S.vecs, S.tail)
    else:
        S = _truncated(mat, 4 if kind == "kept" else None)
        dense = _dense(S.vals, S.vecs, S.tail)
    V = torch.randn(n, 6, generator=gen)
    torch.testing.assert_close(S.left(V), dense @ V, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(S.right(V.T), V.T @ dense, rtol=1e-12, atol=1e-12)
    assert S.left(V).is_contiguous()
