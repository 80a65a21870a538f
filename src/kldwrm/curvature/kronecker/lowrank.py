"""Algebra of truncated Kronecker factors (``rank=r``): kept eigenpairs plus a constant.

A factor larger than ``r`` is kept as ``U diag(a) Uᵀ + c (I − U Uᵀ)`` (:class:`Spectrum`),
its ``r`` leading eigenpairs from :mod:`~kldwrm.curvature.randomized` and the discarded
spectrum replaced by its mean ``c``. The damped operator ``e Ā_r⊗Γ̄_r + γI`` then has the
kept pairs and the two complements as eigenvectors, so its inverse
(:func:`low_rank_inverse`) costs four products of ``O(out · in · r)``.

Q's refresh system adds the fresh estimate, ``e Ā_r⊗Γ̄_r + f A_r⊗Γ_r + γI``. The fresh
factors are truncated in the *average's* kept basis (:func:`compress`)::

    A_r = U M Uᵀ + c_A (I − U Uᵀ),     M = Uᵀ A U,     c_A = tr((I − U Uᵀ) A) / (n − r),

the closest matrix to ``A`` (Frobenius) of that form, with ``A``'s trace: the dense ``r × r``
core ``M`` takes the part of ``A`` the basis sees, the constant the rest. With both sides
compressed onto the bases of ``Γ̄_r`` and ``Ā_r``, the system leaves each of the four
products of {kept, complement} on the output side with {kept, complement} on the input side
invariant (:func:`refresh_solve`): on complement ⊗ complement it is a scalar, on kept ⊗
complement (and the converse) an ``r × r`` matrix acting from one side, and only the
kept ⊗ kept core, ``e·diag(g) X diag(a) + f·M_Γ X M_A + γX = V_c``, needs an iterative
solve, of ``r × r`` unknowns. So the refresh solve costs four products of ``O(out · in · r)``,
like an ordinary step's, and no decomposition of the fresh factors at all. With ``r`` at
least every factor's size the basis is complete, ``M`` is ``A`` in the eigenbasis of ``Ā``
and the solve is the exact one. See ``docs/theory.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..linalg import CurvatureError, conjugate_gradient

#: relative residual that ``q_solve="exact"`` guarantees on refresh steps (DESIGN section 3)
EXACT_SOLVE_RTOL = 1e-6


@dataclass(frozen=True)
class Spectrum:
    """``U V Uᵀ + tail (I − U Uᵀ)`` with ``U`` orthonormal (``n × r``): ``vals`` either the
    kept eigenvalues (a vector: ``V = diag(vals)``, a factor's own truncation) or an
    ``r × r`` core (another factor's basis, :func:`compress`). ``tail = 0`` and ``U`` square
    when nothing is discarded; ``U = None`` for a diagonal factor, a vector ``vals``."""

    vals: Tensor
    vecs: Tensor | None
    tail: Tensor

    @property
    def full(self) -> bool:
        return self.vecs is None or self.vecs.shape[1] == self.vecs.shape[0]

    def right(self, V: Tensor) -> Tensor:
        """``V · S``: ``tail·V + (V U)(core − tail I) Uᵀ`` (two products of ``O(n² r)``,
        the sum fused into the second); ``V · diag(vals)`` for a diagonal factor."""
        if self.vecs is None:
            return V * self.vals
        VU = V @ self.vecs
        VU = VU.mul_(self.vals - self.tail) if self.vals.dim() == 1 else \
            torch.addmm(VU, VU, self.vals, beta=-float(self.tail))
        if self.full:
            return VU @ self.vecs.T
        return torch.addmm(V, VU, self.vecs.T, beta=float(self.tail))

    def left(self, V: Tensor) -> Tensor:
        """``S · V``: ``tail·V + U (core − tail I)(Uᵀ V)``, like :meth:`right` from the
        other side (a contiguous result: ``right(Vᵀ)ᵀ`` would be a transposed one, which
        the sums that follow read at a stride)."""
        if self.vecs is None:
            return V * self.vals[:, None]
        UV = self.vecs.T @ V
        UV = UV.mul_((self.vals - self.tail)[:, None]) if self.vals.dim() == 1 else \
            torch.addmm(UV, self.vals, UV, beta=-float(self.tail))
        if self.full:
            return self.vecs @ UV
        return torch.addmm(V, self.vecs, UV, beta=float(self.tail))

    def to(self, dtype: torch.dtype) -> Spectrum:
        return Spectrum(self.vals.to(dtype), None if self.vecs is None else self.vecs.to(dtype),
                        self.tail.to(dtype))


def compress(mat: Tensor, basis: Spectrum) -> Spectrum:
    """``mat`` truncated in ``basis``'s kept eigenvectors ``U``: the core ``M = Uᵀ mat U``
    and the complement's mean diagonal ``(tr mat − tr M) / (n − r)`` (0 when ``U`` is
    complete). One product of ``O(n² r)``; a diagonal factor (a vector) is its own."""
    if basis.vecs is None:
        return Spectrum(mat, None, mat.new_zeros(()))
    U = basis.vecs
    core = U.T @ (mat @ U)
    core = (core + core.T) * 0.5
    n, r = U.shape
    # the traces in float64: their difference is the (small) discarded part
    tail = ((mat.diagonal().double().sum() - core.diagonal().double().sum()) / (n - r))\
        .clamp_min(0.0).to(mat.dtype) if n > r else mat.new_zeros(())
    return Spectrum(core, U, tail)


def low_rank_inverse(V: Tensor, G: Spectrum, A: Spectrum, e: float, damping: float) -> Tensor:
    """``(e A ⊗ G + γI)^{-1} vec(V)`` as a matrix, for spectra with kept and tail parts.

    With ``P = UUᵀ`` and ``Q = I − P`` on each side, ``V`` splits into four parts whose
    eigenvalues are ``e·g_i a_j`` (kept × kept), ``e·g_i c_A``, ``e·c_G a_j`` and
    ``e·c_G c_A``; writing ``s = 1/(eigenvalue + γ)`` for each and ``X = U_Gᵀ V U_A``::

        result = s22 V + U_G diag(s12 − s22) U_Gᵀ V + V U_A diag(s21 − s22) U_Aᵀ
                 + U_G [X ∘ (s11 − s12 − s21 + s22)] U_Aᵀ,

    where the terms of a complement that is empty (a factor kept whole) are left out.
    Four products of ``O(out · in · r)``; a diagonal input factor (its basis the identity)
    needs two.
    """
    return low_rank_inverse_columns([V], G, A, e, damping)[0]


def _diagonal_input_inverse(V: Tensor, G: Spectrum, A: Spectrum, e: float,
                            damping: float) -> Tensor:
    """:func:`low_rank_inverse` for a diagonal input factor (``A.vecs = None``)."""
    s11 = 1.0 / (torch.outer(G.vals, A.vals) * e + damping)
    X = G.vecs.T @ V
    if G.full:
        return G.vecs @ (X * s11)
    s21 = 1.0 / (A.vals * (e * G.tail) + damping)
    return torch.addmm(V * s21, G.vecs, X * (s11 - s21))


def low_rank_inverse_columns(parts: Sequence[Tensor], G: Spectrum, A: Spectrum, e: float,
                             damping: float) -> list[Tensor]:
    """:func:`low_rank_inverse` of ``V = [V_1 | V_2 | ...]`` given as its column blocks,
    returned as the result's column blocks of the same widths (a layer's weight and bias
    columns: no concatenation going in, and contiguous results coming out). The input
    side's basis splits by rows alike, ``V U_A = Σ_j V_j U_A[j]``; one block is
    :func:`low_rank_inverse` itself."""
    if A.vecs is None:
        if len(parts) != 1:
            raise ValueError("a diagonal input factor takes one column block")
        return [_diagonal_input_inverse(parts[0], G, A, e, damping)]
    s11 = 1.0 / (torch.outer(G.vals, A.vals) * e + damping)
    s12 = None if A.full else 1.0 / (G.vals * (e * A.tail) + damping)
    s21 = None if G.full else 1.0 / (A.vals * (e * G.tail) + damping)
    s22 = None if A.full or G.full else 1.0 / (e * G.tail * A.tail + damping)
    rows = A.vecs.split([Vj.shape[1] for Vj in parts])
    VA = parts[0] @ rows[0]
    for Vj, Uj in zip(parts[1:], rows[1:], strict=True):
        VA.addmm_(Vj, Uj)
    X = G.vecs.T @ VA
    w = s11
    if s12 is not None:
        w = w - s12[:, None]
    if s21 is not None:
        w = w - s21[None, :]
    if s22 is not None:
        w = w + s22
    right = G.vecs @ (X * w)  # (out, r_A)
    if s21 is not None:
        right.add_(VA * (s21 if s22 is None else s21 - s22)[None, :])
    outs = []
    for Vj, Uj in zip(parts, rows, strict=True):
        # the full-size terms are summed inside the products (addmm), with no temporaries
        out = right @ Uj.T if s22 is None else torch.addmm(Vj, right, Uj.T, beta=float(s22))
        if s12 is not None:
            left = (G.vecs.T @ Vj).mul_((s12 if s22 is None else s12 - s22)[:, None])
            out.addmm_(G.vecs, left)
        outs.append(out)
    return outs


def _times_t(X: Tensor, U: Tensor | None) -> Tensor:
    """``X Uᵀ`` (``U = None``: the identity basis of a diagonal factor)."""
    return X if U is None else X @ U.T


def _side_inverse(sp: Spectrum, fr: Spectrum, other_tail: Tensor,
                  other_fresh_tail: Tensor, e: float, f: float, damping: float) -> Tensor:
    """``(e·c'·diag(vals) + f·c'_f·core + γI)^{-1}``: the system on kept ⊗ (the other
    side's complement), where the other factor acts as its tails ``c'`` and ``c'_f``;
    a vector for a diagonal factor. Inverted in float64 (it is ``r × r``)."""
    diag = sp.vals.double() * (e * float(other_tail)) + damping
    if fr.vals.dim() == 1:
        return (1.0 / (diag + f * float(other_fresh_tail) * fr.vals.double())).to(sp.vals.dtype)
    N = fr.vals.double() * (f * float(other_fresh_tail))
    N.diagonal().add_(diag)
    return torch.linalg.inv(N).to(sp.vals.dtype)


def _core_solve(Vc: Tensor, G: Spectrum, A: Spectrum, Gf: Spectrum, Af: Spectrum,
                e: float, f: float, damping: float, rtol: float) -> tuple[Tensor, float]:
    """``e·diag(g) X diag(a) + f·M_Γ X M_A + γX = V_c`` by CG in float64, Jacobi-
    preconditioned (the first and last terms are diagonal)."""
    grid = torch.outer(G.vals.double(), A.vals.double()).mul_(e).add_(damping)
    MG, MA = Gf.vals.double(), Af.vals.double()

    def op(X: Tensor) -> Tensor:
        GX = MG @ X
        return grid * X + f * (GX * MA if MA.dim() == 1 else GX @ MA)

    dA = MA if MA.dim() == 1 else torch.diagonal(MA)
    precond = 1.0 / (grid + f * torch.outer(torch.diagonal(MG), dA))
    X, rel, _ = conjugate_gradient(op, Vc.double(), precond, rtol=rtol)
    return X.to(Vc.dtype), rel


def refresh_solve(V: Tensor, G: Spectrum, A: Spectrum, Gf: Spectrum, Af: Spectrum,
                  e: float, f: float, damping: float, rtol: float = EXACT_SOLVE_RTOL
                  ) -> tuple[Tensor, float]:
    """``(e Ā_r⊗Γ̄_r + f A_r⊗Γ_r + γI)^{-1} vec(V)``, the fresh factors compressed onto the
    averages' kept bases (:func:`compress`). Returns the solution and the core's relative
    residual (the other three parts are solved in closed form).

    With ``L = U_Γᵀ V``, ``R = V U_A`` and ``V_c = L U_A``, the four invariant parts give::

        X = U_Γ X_c U_Aᵀ + U_Γ N_Γ⁻¹ (L − V_c U_Aᵀ) + (R − U_Γ V_c) N_A⁻¹ U_Aᵀ
            + (V − U_Γ L − R U_Aᵀ + U_Γ V_c U_Aᵀ) / s,

    ``N_Γ = e c_A diag(g) + f c_{A,f} M_Γ + γI``, ``N_A`` likewise, ``s = e c_Γ c_A +
    f c_{Γ,f} c_{A,f} + γ`` and ``X_c`` the core's solution; a complete basis drops the
    terms of its (empty) complement. Collected as ``X = V/s + U_Γ T₁ + T₂ U_Aᵀ``: four
    products of ``O(out · in · r)``.
    """
    UG, UA = G.vecs, A.vecs
    L = UG.T @ V
    Vc = L if UA is None else L @ UA
    K, rel = _core_solve(Vc, G, A, Gf, Af, e, f, damping, rtol)
    T1, out = None, None  # U_Γ's coefficient besides K U_Aᵀ; the V/s + T₂ U_Aᵀ part
    if not A.full:  # kept ⊗ complement
        NG = _side_inverse(G, Gf, A.tail, Af.tail, e, f, damping)
        T1 = NG @ L
        K = K - NG @ Vc
    if not G.full:  # complement ⊗ kept
        NA = _side_inverse(A, Af, G.tail, Gf.tail, e, f, damping)
        if UA is None:  # a diagonal input factor: N_A is diagonal
            K = K - Vc * NA
            out = V * NA
        else:
            if not A.full:  # and complement ⊗ complement
                s = (e * float(G.tail) * float(A.tail)
                     + f * float(Gf.tail) * float(Af.tail) + damping)
                NA = NA - torch.eye(NA.shape[0], dtype=NA.dtype, device=NA.device) / s
                T1 = T1 - L / s
                out = V / s
            K = K - Vc @ NA
            T2 = (V @ UA) @ NA
            out = T2 @ UA.T if out is None else out.addmm_(T2, UA.T)
    KU = _times_t(K, UA)
    T1 = KU if T1 is None else T1.add_(KU)
    return (UG @ T1 if out is None else out.addmm_(UG, T1)), rel


def refresh_operator(G: Spectrum, A: Spectrum, Gf: Spectrum, Af: Spectrum, e: float,
                     f: float, damping: float) -> Callable[[Tensor], Tensor]:
    """``X ↦ e Γ̄_r X Ā_r + f Γ_r X A_r + γ X``: the operator :func:`refresh_solve` inverts."""
    def op(X: Tensor) -> Tensor:
        return (Gf.left(Af.right(X)).mul_(f)
                .add_(G.left(A.right(X)), alpha=e).add_(X, alpha=damping))

    return op


def check_residual(rel: float, name: str, rtol: float = EXACT_SOLVE_RTOL) -> None:
    """Raise when a ``q_solve="exact"`` solve missed its residual."""
    if rel > rtol:
        raise CurvatureError(
            f"q_solve='exact' did not reach relative residual {rtol:g} for {name!r} "
            f"(got {rel:.2e}); use q_solve='augmented' or more damping"
        )
