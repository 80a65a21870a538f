"""The Kronecker factor pair ``Ā ⊗ Γ̄`` of one block: averaging, decomposition and algebra.

A :class:`KroneckerFactors` knows nothing about layers: it receives fresh factors ``A``
(input side, ``in × in``) and ``Γ`` (output side, ``out × out``) on refresh steps, keeps
their exponential averages (eqs. 12-13), their eigendecompositions, and applies the
systems of DESIGN section 3 to weight-shaped matrices ``V`` of shape ``(out, in)``. With
column-major ``vec``, ``(A ⊗ Γ) vec(V) = vec(Γ V A)``; so with ``Ā = QA dA QAᵀ`` and
``Γ̄ = QΓ dΓ QΓᵀ``::

    (e Ā⊗Γ̄ + γI)^{-1} vec(V) = vec(QΓ [(QΓᵀ V QA) / (e·dΓ dAᵀ + γ)] QAᵀ)      (eq. 19)

An input factor that is diagonal (an embedding's ``A = diag(token counts)/N``) is kept as
its diagonal, a vector, with no eigenvectors (``evecs_A = None``: the basis is the
identity), so a vocabulary of ``n`` tokens costs ``O(n)``, not ``O(n²)``.

Factors and decompositions live in a floating dtype of at least float32 (``dtype``),
whatever the dtype of the activations that produced them.

Low rank (``rank=r``, DESIGN section 1; Puiu, "Randomized K-FACs", 2022): a factor larger
than ``r`` keeps only its ``r`` leading eigenpairs, from a randomized eigensolver warm-started
from the previous refresh's basis (:func:`~kldwrm.curvature.randomized.randomized_eigh`),
and the discarded spectrum is replaced by one constant ``c``, the mean of the discarded
eigenvalues::

    Ā ≈ Ā_r = U diag(a) Uᵀ + c_A (I − U Uᵀ),     c_A = (tr Ā − Σ a) / (n − r),

and likewise ``Γ̄``. ``c`` is the constant closest to the discarded eigenvalues in the
Frobenius norm and keeps the factor's trace; it is computed from the trace alone (``O(n)``).
The operator actually inverted is ``e Ā_r ⊗ Γ̄_r + γI``, whose eigenvectors are the kept
pairs and the two complements, so its inverse (:meth:`KroneckerFactors.solve`) costs four
products of ``O(out · in · r)``, as does the product with it (:meth:`matvec`): the cost is
quadratic in the width. Q's refresh system truncates the fresh factors in the averages' kept
bases and is solved in closed form but for an ``r × r`` core
(:func:`~kldwrm.curvature.kronecker.lowrank.refresh_solve`). See ``docs/theory.md``.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..linalg import conjugate_gradient, sym_eig
from .lowrank import (
    EXACT_SOLVE_RTOL,
    Spectrum,
    check_residual,
    compress,
    low_rank_inverse,
    low_rank_inverse_columns,
    refresh_solve,
)
from .randomized import discarded_trace_mean, randomized_eigh

#: randomized eigensolver settings: oversampling, and power iterations without / with a
#: warm start from the previous refresh's basis
OVERSAMPLE = 10
POWER_ITERS_COLD = 2
POWER_ITERS_WARM = 1


def decomposition_cost(factors: Sequence[Tensor], rank: int | None) -> float:
    """Flops of decomposing ``factors``, up to a constant: ``n³`` per exact factor, ``n²k``
    per randomized one (a diagonal factor, a vector, costs nothing)."""
    cost = 0.0
    for mat in factors:
        if mat.dim() == 2:
            n = mat.shape[0]
            k = n if rank is None else min(rank, n)
            cost += float(n) * n * k
    return cost


def ea_update(old: Tensor | None, new: Tensor, rho: float) -> Tensor:
    """Eq. 12/13 update; the first estimate seeds the average (F̄_0 = F_0)."""
    if old is None:
        return new.clone()
    return old.mul(rho).add_(new, alpha=1.0 - rho)


class KroneckerFactors:
    """``Ā ⊗ Γ̄`` with its eigendecomposition, and the fresh ``A ⊗ Γ`` of a refresh step."""

    #: tensors that :meth:`state_dict` saves
    KEYS = ("A_bar", "G_bar", "evals_A", "evecs_A", "evals_G", "evecs_G", "tail_A", "tail_G",
            "refreshes")

    def __init__(self, name: str, rank: int | None = None, split: bool = False) -> None:
        self.name = name
        #: π-split damping (:meth:`damping_terms`) instead of ``γI``
        self.split = split
        #: kept eigenpairs per factor (``None``: exact decompositions)
        self.rank = rank
        self.tail_A: Tensor | None = None
        self.tail_G: Tensor | None = None
        #: refreshes so far (seeds the randomized sketches, so a resumed run is bit-exact)
        self.refreshes: Tensor | None = None
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
    def fold(self, A: Tensor, G: Tensor, rho: float, decompose: bool = True) -> None:
        """EA update of both factors (first call: ``F̄ = F``) and re-decomposition.

        ``decompose=False`` (another rank decomposes, :meth:`shared` then receives its
        result) leaves zeros of the decomposition's shapes in its place."""
        self.A_fresh, self.G_fresh = A, G
        self.A_bar = ea_update(self.A_bar, A, rho)
        self.G_bar = ea_update(self.G_bar, G, rho)
        count = 0 if self.refreshes is None else int(self.refreshes)
        self.refreshes = torch.tensor(count + 1)
        how = self._decompose if decompose else self._placeholder
        self.evals_A, self.evecs_A, self.tail_A = how(self.A_bar, self.evecs_A, "A")
        self.evals_G, self.evecs_G, self.tail_G = how(self.G_bar, self.evecs_G, "Gamma")
        self._cache = {}

    def _placeholder(self, mat: Tensor, previous: Tensor | None, which: str
                     ) -> tuple[Tensor, Tensor | None, Tensor]:
        """Zeros shaped as :meth:`_decompose`'s result (a diagonal factor is decomposed
        here: it is its own spectrum)."""
        if mat.dim() == 1:
            return self._decompose(mat, previous, which)
        n = mat.shape[0]
        k = n if self.rank is None else min(self.rank, n)
        return mat.new_zeros(k), mat.new_zeros(n, k), mat.new_zeros(())

    #: the decomposition of each factor, as attribute names
    _PARTS = (("evals_A", "evecs_A", "tail_A"), ("evals_G", "evecs_G", "tail_G"))

    def shared(self) -> list[Tensor]:
        """The decomposition's tensors that one rank computes for all (the eigenpairs and
        tail of each matrix factor, not a diagonal factor's)."""
        return [getattr(self, k) for part in self._PARTS if getattr(self, part[1]) is not None
                for k in part]

    def set_shared(self, tensors: Sequence[Tensor]) -> None:
        """Replace :meth:`shared`'s tensors (the owner's result, received)."""
        keys = [k for part in self._PARTS if getattr(self, part[1]) is not None for k in part]
        for k, t in zip(keys, tensors, strict=True):
            setattr(self, k, t)
        self._cache = {}

    def _decompose(self, mat: Tensor, previous: Tensor | None, which: str
                   ) -> tuple[Tensor, Tensor | None, Tensor]:
        """Eigenpairs and tail constant: exact (rank ``None`` or ``≥ n``) or randomized; a
        diagonal factor (a vector) is its own spectrum, with no eigenvectors."""
        label = f"{which} of {self.name}"
        if mat.dim() == 1:
            return mat.clone(), None, mat.new_zeros(())
        n = mat.shape[0]
        if self.rank is None or self.rank >= n:
            vals, vecs = sym_eig(mat, label)
            return vals, vecs, mat.new_zeros(())
        # a CPU generator whatever the device: CPU and CUDA runs draw the same sketches
        gen = torch.Generator()
        gen.manual_seed(zlib.crc32(label.encode()) * 1000 + int(self.refreshes))
        warm = previous is not None and previous.shape == (n, self.rank)
        vals, vecs = randomized_eigh(
            mat, self.rank, oversample=OVERSAMPLE, init=previous if warm else None,
            power_iters=POWER_ITERS_WARM if warm else POWER_ITERS_COLD, generator=gen,
            name=label,
        )
        return vals, vecs, discarded_trace_mean(mat, vals)

    @property
    def exact(self) -> bool:
        """Whether both factors are decomposed whole (the operator is the exact ``Ā⊗Γ̄``)."""
        return (self.evecs_G is not None and _whole(self.evecs_G)
                and (self.evecs_A is None or _whole(self.evecs_A)))

    def spectra(self) -> tuple[Spectrum, Spectrum]:
        """``(Γ̄, Ā)`` as kept eigenpairs plus tail constants."""
        return (Spectrum(self.evals_G, self.evecs_G, self.tail_G),
                Spectrum(self.evals_A, self.evecs_A, self.tail_A))

    #: cached values that depend on the fresh factors, not only on the decomposition
    _FRESH_KEYS = ("augmented", "refresh-operands")

    def drop_fresh(self) -> None:
        self.A_fresh = self.G_fresh = None
        for key in self._FRESH_KEYS:
            self._cache.pop(key, None)

    def keep_average(self) -> None:
        """No data on this refresh: the averages stand in for the fresh factors."""
        self.A_fresh, self.G_fresh = self.A_bar, self.G_bar
        self._cache.pop("refresh-operands", None)

    def cached(self, key: Any, make: Callable[[], Any]) -> Any:
        """``make()`` computed once per decomposition (a few keys at most are kept)."""
        if key not in self._cache:
            if len(self._cache) >= 8:  # e.g. a schedule changing the scale every step
                self._cache = {k: v for k, v in self._cache.items() if k == "augmented"}
            self._cache[key] = make()
        return self._cache[key]

    # -- damping -----------------------------------------------------------------------
    def damping_terms(self, damping: float) -> tuple[float, float]:
        """``(π√γ, √γ/π)``, π-split damping's (Martens & Grosse 2015, section 6.3):
        ``(Ā + π√γ I) ⊗ (Γ̄ + (√γ/π) I)`` with ``π = √((tr Ā / n_A) / (tr Γ̄ / n_Γ))``, so
        the damping term ``D_γ = π√γ I⊗Γ̄ + (√γ/π) Ā⊗I + γI`` replaces ``γI`` in every
        system (``e Ā⊗Γ̄ + f A⊗Γ + D_γ``); ``(0, 0)`` without the split."""
        if not self.split or damping == 0.0:
            return 0.0, 0.0
        pi = self.cached("pi", self._pi)
        root = math.sqrt(damping)
        return pi * root, root / pi

    def _pi(self) -> float:
        tr_a = float(_diagonal(self.A_bar).mean())
        tr_g = float(torch.diagonal(self.G_bar).mean())
        if not (tr_a > 0.0 and tr_g > 0.0 and math.isfinite(tr_a / tr_g)):
            return 1.0  # a factor without signal: split evenly
        return math.sqrt(tr_a / tr_g)

    # -- the eigenbasis ----------------------------------------------------------------
    def eig_grid(self, ea_scale: float, damping: float, dtype: torch.dtype | None = None
                 ) -> Tensor:
        """``e·dΓ dAᵀ + γ``: the eigenvalues of ``e Ā⊗Γ̄ + γI`` laid out like ``V`` (with the
        π-split, ``+ π√γ·dΓ 1ᵀ + (√γ/π)·1 dAᵀ``: those of ``e Ā⊗Γ̄ + D_γ``), in ``dtype``
        (default: the factors')."""
        dG, dA = self.evals_G.to(dtype), self.evals_A.to(dtype)
        grid = torch.outer(dG, dA).mul_(ea_scale).add_(damping)
        a, b = self.damping_terms(damping)
        if a:
            grid.add_(dG[:, None], alpha=a).add_(dA[None, :], alpha=b)
        return grid

    def rotate(self, V: Tensor) -> Tensor:
        """``QΓᵀ V QA``: ``V`` in the eigenbasis of ``Ā⊗Γ̄``."""
        X = self.evecs_G.T @ V
        return X if self.evecs_A is None else X @ self.evecs_A

    def unrotate(self, X: Tensor) -> Tensor:
        """``QΓ X QAᵀ``, the inverse of :meth:`rotate`."""
        X = self.evecs_G @ X
        return X if self.evecs_A is None else X @ self.evecs_A.T

    # -- solves and products ---------------------------------------------------------------
    def solve(
        self, V: Tensor, damping: float, ea_scale: float, fresh_scale: float, method: str
    ) -> Tensor:
        """``(e Ā⊗Γ̄ + f A⊗Γ + γI)^{-1} vec(V)`` as a matrix."""
        if (method == "exact" and fresh_scale != 0.0 and self.A_fresh is not None
                and self.A_fresh is self.A_bar and self.G_fresh is self.G_bar):
            # no data on this refresh (keep_average): the system is (e + f) Ā⊗Γ̄ + γI
            ea_scale, fresh_scale = ea_scale + fresh_scale, 0.0
        if fresh_scale == 0.0:
            if not self.exact:
                return low_rank_inverse(V, *self.spectra(), ea_scale, damping)
            D = self.cached(("grid", float(ea_scale), float(damping)),
                            lambda: self.eig_grid(ea_scale, damping))
            return self.unrotate(self.rotate(V) / D)
        if self.A_fresh is None:
            raise RuntimeError(f"fresh factors of {self.name!r} are only kept on refresh steps")
        if method == "augmented":
            return self._solve_augmented(V, damping, ea_scale, fresh_scale)
        if not self.exact:
            return self._solve_low_rank(V, damping, ea_scale, fresh_scale)
        return self._solve_cg(V, damping, ea_scale, fresh_scale)

    def solve_columns(self, parts: Sequence[Tensor], damping: float, ea_scale: float
                      ) -> list[Tensor]:
        """``(e Ā_r⊗Γ̄_r + γI)^{-1} vec(V)`` for a truncated pair, ``V`` and the result as
        column blocks (:func:`~kldwrm.curvature.kronecker.lowrank.low_rank_inverse_columns`)."""
        if self.exact:
            raise RuntimeError(f"{self.name!r} keeps complete eigenbases: use solve()")
        return low_rank_inverse_columns(parts, *self.spectra(), ea_scale, damping)

    def _solve_augmented(self, V: Tensor, damping: float, e: float, f: float) -> Tensor:
        """The released code's ``(eĀ + fA) ⊗ (Γ̄ + fΓ) + γI`` (not the exact Kronecker sum)."""
        aug = self._cache.get("augmented")
        if aug is None or aug[0] != f:
            A = self._decompose(e * self.A_bar + f * self.A_fresh, self.evecs_A, "augmented A")
            G = self._decompose(self.G_bar + f * self.G_fresh, self.evecs_G, "augmented Gamma")
            aug = self._cache["augmented"] = (f, Spectrum(*G), Spectrum(*A))
        _, G, A = aug
        if G.full and A.full and A.vecs is None:
            Vt = G.vecs.T @ V
            return G.vecs @ (Vt / (torch.outer(G.vals, A.vals) + damping))
        if G.full and A.full:
            Vt = G.vecs.T @ V @ A.vecs
            return G.vecs @ (Vt / (torch.outer(G.vals, A.vals) + damping)) @ A.vecs.T
        return low_rank_inverse(V, G, A, 1.0, damping)

    def _solve_cg(self, V: Tensor, damping: float, e: float, f: float) -> Tensor:
        """Exact solve of ``e Ā⊗Γ̄ + f A⊗Γ + γI`` by CG in the eigenbasis of ``Ā, Γ̄``.

        In that basis the first term is diagonal, ``A⊗Γ`` becomes ``Â⊗Γ̂`` with
        ``Â = QAᵀ A QA``; the Jacobi preconditioner uses the exact diagonal
        ``e·dΓ dAᵀ + f·diag(Γ̂) diag(Â)ᵀ + γ``. Runs in float64 so that the residual bound
        of DESIGN section 3 (1e-6) is reachable from float32 factors.
        """
        dt = V.dtype
        QG = self.evecs_G.double()
        if self.evecs_A is None:  # a diagonal input factor: its basis is the identity
            Ah = self.A_fresh.double()
        else:
            QA = self.evecs_A.double()
            Ah = QA.T @ self.A_fresh.double() @ QA
        Gh = QG.T @ self.G_fresh.double() @ QG
        D = self.eig_grid(e, damping, torch.float64)
        # the right-hand side and the way back need only the input's precision (the result is
        # returned in it): the operator, where the 1e-6 residual is certified, is float64
        Vt = self.rotate(V).double()

        def op(X: Tensor) -> Tensor:
            return D * X + f * _times(Gh @ X, Ah)

        precond = 1.0 / (D + f * torch.outer(torch.diagonal(Gh), _diagonal(Ah)))
        X, rel, _ = conjugate_gradient(op, Vt, precond, rtol=EXACT_SOLVE_RTOL * 0.5)
        self.last_residual = rel
        check_residual(rel, self.name)
        return self.unrotate(X.to(dt))

    def _refresh_operands(self) -> tuple[Spectrum, Spectrum, Spectrum, Spectrum]:
        """``(Γ̄_r, Ā_r, Γ_r, A_r)``, the fresh factors truncated in the averages' kept bases
        (:func:`~kldwrm.curvature.kronecker.lowrank.compress`; once per refresh, one product
        of ``O(n² r)`` per factor, in the factors' dtype)."""
        def make() -> tuple[Spectrum, Spectrum, Spectrum, Spectrum]:
            G, A = self.spectra()
            return G, A, compress(self.G_fresh, G), compress(self.A_fresh, A)

        return self.cached("refresh-operands", make)

    def _solve_low_rank(self, V: Tensor, damping: float, e: float, f: float) -> Tensor:
        """``e Ā_r⊗Γ̄_r + f A_r⊗Γ_r + γI``
        (:func:`~kldwrm.curvature.kronecker.lowrank.refresh_solve`): closed form but for the
        ``r × r`` core, solved to ``EXACT_SOLVE_RTOL``. The core's CG and the ``r × r``
        inverses run in float64, where the residual is certified; the four products of
        ``O(out · in · r)`` that lead to the core and back run in ``V``'s dtype, like the
        rotations of the eigenbasis path (:meth:`_solve_cg`), so a float32 solution carries
        float32 rounding (``tests/curvature/kronecker/test_low_rank.py`` bounds it).
        """
        ops = [sp.to(V.dtype) for sp in self._refresh_operands()]
        X, rel = refresh_solve(V, *ops, e, f, damping)
        self.last_residual = rel
        check_residual(rel, self.name)
        return X

    def matvec(self, V: Tensor, damping: float, ea_scale: float, fresh_scale: float) -> Tensor:
        """``(e Ā⊗Γ̄ + f A⊗Γ + γI) vec(V)`` as a matrix (the truncated factors with a rank)."""
        if not self.exact:
            out = V * damping
            if ea_scale != 0.0:
                G, A = self.spectra()
                out = out.add_(G.left(A.right(V)), alpha=ea_scale)
            if fresh_scale != 0.0:
                G, A = (sp.to(V.dtype) for sp in self._refresh_operands()[2:])
                out = out.add_(G.left(A.right(V)), alpha=fresh_scale)
            return out
        if ea_scale == 0.0:  # fresh term only (QE's B_k on refresh steps)
            out = V * damping
        else:
            # straight from the factors, (Ā⊗Γ̄) vec(V) = vec(Γ̄ V Ā): two products, half of
            # the round trip through the eigenbasis
            out = _times_add(V, self.G_bar @ V, self.A_bar, damping, ea_scale)
        a, b = self.damping_terms(damping)
        if a:  # D_γ's two factor terms: π√γ Γ̄V + (√γ/π) VĀ
            out = out.addmm_(self.G_bar, V, alpha=a).add_(_times(V, self.A_bar), alpha=b)
        if fresh_scale != 0.0:
            out = out + fresh_scale * _times(self.G_fresh @ V, self.A_fresh)
        return out

    # -- persistence --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        return {k: getattr(self, k) for k in self.KEYS if getattr(self, k) is not None}

    def load_state_dict(self, state: dict[str, Tensor], device: torch.device) -> None:
        for k in self.KEYS:
            setattr(self, k, state[k].to(device) if k in state else None)
        if self.evecs_A is not None and self.tail_A is None:  # saved before low rank existed
            self.tail_A = self.evecs_A.new_zeros(())
            self.tail_G = self.evecs_G.new_zeros(())
        if self.refreshes is not None:
            self.refreshes = self.refreshes.cpu()
        self._cache = {}
        self.drop_fresh()


def _times(X: Tensor, A: Tensor) -> Tensor:
    """``X A`` for an input factor ``A``, a matrix or (diagonal) a vector."""
    return X * A if A.dim() == 1 else X @ A


def _times_add(V: Tensor, X: Tensor, A: Tensor, beta: float, alpha: float) -> Tensor:
    """``beta·V + alpha·X A`` (``addmm`` for a matrix ``A``)."""
    if A.dim() == 1:
        return (X * A).mul_(alpha).add_(V, alpha=beta)
    return torch.addmm(V, X, A, beta=beta, alpha=alpha)


def _diagonal(A: Tensor) -> Tensor:
    return A if A.dim() == 1 else torch.diagonal(A)


def _whole(vecs: Tensor) -> bool:
    return vecs.shape[0] == vecs.shape[1]
