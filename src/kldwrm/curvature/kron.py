"""The Kronecker factor pair ``Ā ⊗ Γ̄`` of one block: averaging, decomposition and algebra.

A :class:`KroneckerFactors` knows nothing about layers: it receives fresh factors ``A``
(input side, ``in × in``) and ``Γ`` (output side, ``out × out``) on refresh steps, keeps
their exponential averages (eqs. 12-13), their eigendecompositions, and applies the
systems of DESIGN section 3 to weight-shaped matrices ``V`` of shape ``(out, in)``. With
column-major ``vec``, ``(A ⊗ Γ) vec(V) = vec(Γ V A)``; so with ``Ā = QA dA QAᵀ`` and
``Γ̄ = QΓ dΓ QΓᵀ``::

    (e Ā⊗Γ̄ + γI)^{-1} vec(V) = vec(QΓ [(QΓᵀ V QA) / (e·dΓ dAᵀ + γ)] QAᵀ)      (eq. 19)

Factors and decompositions live in a floating dtype of at least float32 (``dtype``),
whatever the dtype of the activations that produced them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .linalg import CurvatureError, conjugate_gradient, sym_eig

#: relative residual that ``q_solve="exact"`` guarantees on refresh steps (DESIGN section 3)
EXACT_SOLVE_RTOL = 1e-6


def ea_update(old: Tensor | None, new: Tensor, rho: float) -> Tensor:
    """Eq. 12/13 update; the first estimate seeds the average (F̄_0 = F_0)."""
    if old is None:
        return new.clone()
    return old.mul(rho).add_(new, alpha=1.0 - rho)


class KroneckerFactors:
    """``Ā ⊗ Γ̄`` with its eigendecomposition, and the fresh ``A ⊗ Γ`` of a refresh step."""

    #: tensors that :meth:`state_dict` saves
    KEYS = ("A_bar", "G_bar", "evals_A", "evecs_A", "evals_G", "evecs_G")

    def __init__(self, name: str) -> None:
        self.name = name
        self.A_bar: Tensor | None = None
        self.G_bar: Tensor | None = None
        self.A_fresh: Tensor | None = None
        self.G_fresh: Tensor | None = None
        self.evals_A: Tensor | None = None
        self.evecs_A: Tensor | None = None
        self.evals_G: Tensor | None = None
        self.evecs_G: Tensor | None = None
        #: relative residual of the last ``q_solve="exact"`` solve (for tests)
        self.last_residual = 0.0
        # values derived from the current decomposition (see :meth:`cached`)
        self._cache: dict[Any, Any] = {}

    @property
    def initialized(self) -> bool:
        return self.A_bar is not None

    # -- refresh ----------------------------------------------------------------------
    def fold(self, A: Tensor, G: Tensor, rho: float) -> None:
        """EA update of both factors (first call: ``F̄ = F``) and re-decomposition."""
        self.A_fresh, self.G_fresh = A, G
        self.A_bar = ea_update(self.A_bar, A, rho)
        self.G_bar = ea_update(self.G_bar, G, rho)
        self.evals_A, self.evecs_A = sym_eig(self.A_bar, f"A of {self.name}")
        self.evals_G, self.evecs_G = sym_eig(self.G_bar, f"Gamma of {self.name}")
        self._cache = {}

    def drop_fresh(self) -> None:
        self.A_fresh = self.G_fresh = None
        self._cache.pop("augmented", None)

    def keep_average(self) -> None:
        """No data on this refresh: the averages stand in for the fresh factors."""
        self.A_fresh, self.G_fresh = self.A_bar, self.G_bar

    def cached(self, key: Any, make: Callable[[], Any]) -> Any:
        """``make()`` computed once per decomposition (a few keys at most are kept)."""
        if key not in self._cache:
            if len(self._cache) >= 8:  # e.g. a schedule changing the scale every step
                self._cache = {k: v for k, v in self._cache.items() if k == "augmented"}
            self._cache[key] = make()
        return self._cache[key]

    # -- the eigenbasis ----------------------------------------------------------------
    def eig_grid(self, ea_scale: float, damping: float) -> Tensor:
        """``e·dΓ dAᵀ + γ``: the eigenvalues of ``e Ā⊗Γ̄ + γI`` laid out like ``V``."""
        return torch.outer(self.evals_G, self.evals_A).mul_(ea_scale).add_(damping)

    def rotate(self, V: Tensor) -> Tensor:
        """``QΓᵀ V QA``: ``V`` in the eigenbasis of ``Ā⊗Γ̄``."""
        return self.evecs_G.T @ V @ self.evecs_A

    def unrotate(self, X: Tensor) -> Tensor:
        """``QΓ X QAᵀ``, the inverse of :meth:`rotate`."""
        return self.evecs_G @ X @ self.evecs_A.T

    # -- solves and products ---------------------------------------------------------------
    def solve(
        self, V: Tensor, damping: float, ea_scale: float, fresh_scale: float, method: str
    ) -> Tensor:
        """``(e Ā⊗Γ̄ + f A⊗Γ + γI)^{-1} vec(V)`` as a matrix."""
        if fresh_scale == 0.0:
            D = self.cached(("grid", float(ea_scale), float(damping)),
                            lambda: self.eig_grid(ea_scale, damping))
            return self.unrotate(self.rotate(V) / D)
        if self.A_fresh is None:
            raise RuntimeError(f"fresh factors of {self.name!r} are only kept on refresh steps")
        if method == "augmented":
            return self._solve_augmented(V, damping, ea_scale, fresh_scale)
        return self._solve_cg(V, damping, ea_scale, fresh_scale)

    def _solve_augmented(self, V: Tensor, damping: float, e: float, f: float) -> Tensor:
        """The released code's ``(eĀ + fA) ⊗ (Γ̄ + fΓ) + γI`` (not the exact Kronecker sum)."""
        aug = self._cache.get("augmented")
        if aug is None or aug[0] != f:
            dA, QA = sym_eig(e * self.A_bar + f * self.A_fresh, f"augmented A of {self.name}")
            dG, QG = sym_eig(self.G_bar + f * self.G_fresh, f"augmented Gamma of {self.name}")
            aug = self._cache["augmented"] = (f, dA, QA, dG, QG)
        _, dA, QA, dG, QG = aug
        Vt = QG.T @ V @ QA
        return QG @ (Vt / (torch.outer(dG, dA) + damping)) @ QA.T

    def _solve_cg(self, V: Tensor, damping: float, e: float, f: float) -> Tensor:
        """Exact solve of ``e Ā⊗Γ̄ + f A⊗Γ + γI`` by CG in the eigenbasis of ``Ā, Γ̄``.

        In that basis the first term is diagonal, ``A⊗Γ`` becomes ``Â⊗Γ̂`` with
        ``Â = QAᵀ A QA``; the Jacobi preconditioner uses the exact diagonal
        ``e·dΓ dAᵀ + f·diag(Γ̂) diag(Â)ᵀ + γ``. Runs in float64 so that the residual bound
        of DESIGN section 3 (1e-6) is reachable from float32 factors.
        """
        dt = V.dtype
        QA, QG = self.evecs_A.double(), self.evecs_G.double()
        Ah = QA.T @ self.A_fresh.double() @ QA
        Gh = QG.T @ self.G_fresh.double() @ QG
        D = torch.outer(self.evals_G.double(), self.evals_A.double()) * e + damping
        # the right-hand side and the way back need only the input's precision (the result is
        # returned in it): the operator, where the 1e-6 residual is certified, is float64
        Vt = self.rotate(V).double()

        def op(X: Tensor) -> Tensor:
            return D * X + f * (Gh @ X @ Ah)

        precond = 1.0 / (D + f * torch.outer(torch.diagonal(Gh), torch.diagonal(Ah)))
        X, rel, _ = conjugate_gradient(op, Vt, precond, rtol=EXACT_SOLVE_RTOL * 0.5)
        self.last_residual = rel
        if rel > EXACT_SOLVE_RTOL:
            raise CurvatureError(
                f"q_solve='exact' did not reach relative residual {EXACT_SOLVE_RTOL:g} for "
                f"{self.name!r} (got {rel:.2e}); use q_solve='augmented' or more damping"
            )
        return self.unrotate(X.to(dt))

    def matvec(self, V: Tensor, damping: float, ea_scale: float, fresh_scale: float) -> Tensor:
        """``(e Ā⊗Γ̄ + f A⊗Γ + γI) vec(V)`` as a matrix."""
        if ea_scale == 0.0:  # fresh term only (QE's B_k on refresh steps)
            out = V * damping
        else:
            # straight from the factors, (Ā⊗Γ̄) vec(V) = vec(Γ̄ V Ā): two products, half of
            # the round trip through the eigenbasis
            out = torch.addmm(V, self.G_bar @ V, self.A_bar, beta=damping, alpha=ea_scale)
        if fresh_scale != 0.0:
            out = out + fresh_scale * (self.G_fresh @ V @ self.A_fresh)
        return out

    # -- persistence --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        return {k: getattr(self, k) for k in self.KEYS if getattr(self, k) is not None}

    def load_state_dict(self, state: dict[str, Tensor], device: torch.device) -> None:
        for k in self.KEYS:
            setattr(self, k, state[k].to(device) if k in state else None)
        self._cache = {}
        self.drop_fresh()
