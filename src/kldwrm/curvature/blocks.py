"""Curvature blocks: how one layer's (or one tensor's) Fisher block is estimated and inverted.

Every block answers the same questions, so the step rules never look inside:

* :meth:`Block.fresh` turns what :class:`~kldwrm.curvature.capture.Capture` recorded on a
  refresh step into a fresh estimate ``F_k`` (eq. 11 for Kronecker blocks);
* :meth:`Block.fold` folds it into the exponential average ``F̄ ← ρ F̄ + (1-ρ) F_k``
  (eqs. 12-13, seeded with the first estimate) and re-decomposes;
* :meth:`Block.solve` returns ``(e·F̄ + f·F_k + γI)^{-1} u`` and :meth:`Block.matvec`
  returns ``(e·F̄ + f·F_k + γI) v``; ``e`` and ``f`` let the step rules express every
  system of DESIGN section 3 (``f`` is nonzero only on refresh steps, eq. 20).

Vectors are lists of tensors shaped like the block's parameters.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .kronecker import EXACT_SOLVE_RTOL, EigenMoments, KroneckerFactors, example_moments
from .linalg import CurvatureError


class Block(ABC):
    """One diagonal block of the block-diagonal curvature."""

    kind: str = "block"

    def __init__(self, params: Sequence[nn.Parameter], name: str) -> None:
        self.params = list(params)
        self.name = name
        self.initialized = False
        #: index of the optimizer parameter group the block's tensors belong to
        self.group = 0
        #: relative residual of the last iterative solve (``q_solve="exact"``), for tests
        self.last_residual = 0.0

    @abstractmethod
    def fresh(self, capture, grads: Sequence[Tensor | None]) -> dict[str, Tensor] | None:
        """Fresh curvature estimate of this step from the captured statistics; ``None`` when
        the block received no data on this step (its tensors were not used)."""

    @abstractmethod
    def fold(self, fresh: dict[str, Tensor], rho: float) -> None:
        """EA update ``F̄ ← ρF̄ + (1-ρ)F`` (first call: ``F̄ = F``) and re-decomposition."""

    @abstractmethod
    def solve(
        self,
        vecs: Sequence[Tensor],
        damping: float,
        ea_scale: float = 1.0,
        fresh_scale: float = 0.0,
        method: str = "exact",
    ) -> list[Tensor]:
        """``(ea_scale·F̄ + fresh_scale·F + damping·I)^{-1} vecs``."""

    @abstractmethod
    def matvec(
        self,
        vecs: Sequence[Tensor],
        damping: float,
        ea_scale: float = 1.0,
        fresh_scale: float = 0.0,
    ) -> list[Tensor]:
        """``(ea_scale·F̄ + fresh_scale·F + damping·I) vecs``."""

    # -- the eigenbasis of F̄ (used by step rules that keep vectors in it) -----------------
    def to_eigenbasis(self, vecs: Sequence[Tensor]) -> list[Tensor]:
        """Coordinates of ``vecs`` in the orthonormal eigenbasis of ``F̄``, parameter-shaped.

        The basis changes only when :meth:`fold` re-decomposes, so a step rule may keep a
        vector in these coordinates between refreshes; there ``e·F̄ + γI`` is the diagonal
        :meth:`eigenvalues` and a solve is one division. Dot products are preserved.
        """
        raise NotImplementedError(f"{type(self).__name__} has no eigenbasis")

    def from_eigenbasis(self, coords: Sequence[Tensor]) -> list[Tensor]:
        """Inverse of :meth:`to_eigenbasis`."""
        raise NotImplementedError(f"{type(self).__name__} has no eigenbasis")

    def eigenvalues(self, ea_scale: float, damping: float) -> list[Tensor]:
        """The diagonal of ``ea_scale·F̄ + damping·I`` in the eigenbasis, parameter-shaped."""
        raise NotImplementedError(f"{type(self).__name__} has no eigenbasis")

    @abstractmethod
    def state_dict(self) -> dict[str, Tensor]:
        """Tensors needed to continue bit-exactly."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Inverse of :meth:`state_dict`."""

    def drop_fresh(self) -> None:
        """Forget the fresh estimate once the refresh step is over (saves memory)."""
        return None

    @abstractmethod
    def keep_average(self) -> None:
        """A refresh without data for this block: the average stays as it is and stands in
        for the fresh estimate of this step (a block never refreshed stays left out)."""

    # -- data parallelism (kldwrm.distributed) ---------------------------------------------
    def distributed_fresh(
        self, capture, grads: Sequence[Tensor | None]
    ) -> tuple[dict[str, Tensor], dict[str, float | None]]:
        """This rank's statistics for the all-reduce over ranks, and their weights.

        Each statistic ``t_r`` with weight ``w_r`` is combined as ``Σ w_r t_r / Σ w_r``
        (weight ``None``: summed), which must give the statistic of the concatenated
        batch; :meth:`finish_distributed` then turns the combined statistics into the
        fresh estimate. A rank where the block received no data sends zeros with weight 0
        (:meth:`empty_statistics`), so every rank joins the same all-reduce. Default: the
        fresh estimate, a mean over the examples.
        """
        est = self.fresh(capture, grads)
        if est is None:
            return self.empty_statistics()
        n = float(capture.num_examples())
        return est, dict.fromkeys(est, n)

    def empty_statistics(self) -> tuple[dict[str, Tensor], dict[str, float | None]]:
        """Zero statistics of the right shapes, with weight 0 (no data on this rank)."""
        raise NotImplementedError

    def finish_distributed(
        self, stats: dict[str, Tensor], totals: dict[str, float]
    ) -> dict[str, Tensor] | None:
        """Fresh estimate from the combined statistics (``totals``: the summed weights);
        ``None`` when no rank had data for the block (a total weight of 0)."""
        if any(t == 0 for t in totals.values()):
            return None
        return stats

    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    def statistics_numel(self) -> int:
        """Numbers this block all-reduces on a refresh step: its fresh statistics, plus
        one weight per statistic (:meth:`distributed_fresh`)."""
        return self.numel() + 1

    @property
    def exact(self) -> bool:
        """Whether the curvature has a complete eigenbasis (no truncation to a rank)."""
        return True

    def _check_ready(self) -> None:
        if not self.initialized:
            raise RuntimeError(f"curvature block {self.name!r} used before its first refresh")


class FactoredBlock(Block):
    """A block whose curvature is a Kronecker product ``Ā ⊗ Γ̄`` (:class:`KroneckerFactors`).

    Subclasses say which tensors form the matrix ``V`` (:meth:`_to_mat`, :meth:`_from_mat`)
    and how the fresh factors come from the captured statistics (:meth:`fresh`); solves,
    products, the eigenbasis and persistence are shared.
    """

    def __init__(self, module: nn.Module, params: Sequence[nn.Parameter], name: str,
                 rank: int | None = None) -> None:
        super().__init__(params, name)
        self.module = module
        self.factors = KroneckerFactors(name, rank)
        #: dtype of the factors: at least float32, whatever the activations' dtype
        self.dtype = torch.promote_types(module.weight.dtype, torch.float32)
        #: measured eigenvalues (``curvature="ekfac"``/``"adaptive"``, :mod:`.eigen`);
        #: ``None``: K-FAC's ``dΓ dAᵀ``
        self.moments: EigenMoments | None = None
        #: ``"adaptive"``: the tensors observed this step and their rotation (reused by a
        #: solve or rotation of the same tensors, e.g. K-FAC's of the gradient), with the
        #: tensors' version counters
        self._observed: tuple[list[Tensor], list[int], Tensor] | None = None

    # the factor pair, for tests and step rules that inspect it
    A_bar = property(lambda self: self.factors.A_bar)
    G_bar = property(lambda self: self.factors.G_bar)
    A_fresh = property(lambda self: self.factors.A_fresh)
    G_fresh = property(lambda self: self.factors.G_fresh)

    @abstractmethod
    def _to_mat(self, vecs: Sequence[Tensor]) -> Tensor:
        """The block's tensors as the matrix ``V`` of the Kronecker algebra."""

    @abstractmethod
    def _from_mat(self, mat: Tensor) -> list[Tensor]:
        """Inverse of :meth:`_to_mat`."""

    def _columns(self, vecs: Sequence[Tensor]) -> list[Tensor]:
        """``V`` as column blocks (:meth:`_to_mat` without joining them): one by default."""
        return [self._to_mat(vecs)]

    def _from_columns(self, parts: Sequence[Tensor]) -> list[Tensor]:
        """Inverse of :meth:`_columns`."""
        return self._from_mat(parts[0])

    def _has_data(self, capture) -> bool:
        """Whether this step's capture holds both inputs and output gradients of the layer."""
        return bool(capture.inputs.get(self.module)) and bool(capture.deltas.get(self.module))

    def empty_statistics(self):
        d_in, d_out = self._factor_sizes()
        dev = self.module.weight.device

        def z(*shape: int) -> Tensor:  # plain zeros, also for an FSDP-sharded weight
            return torch.zeros(shape, dtype=self.dtype, device=dev)

        return ({"A": z(d_in, d_in), "G": z(d_out, d_out)},
                {"A": 0.0, "G": 0.0})

    def fold(self, fresh: dict[str, Tensor], rho: float, decompose: bool = True) -> None:
        self.factors.fold(fresh["A"], fresh["G"], rho, decompose)
        self._observed = None  # a new basis
        self.initialized = True

    def drop_fresh(self) -> None:
        self.factors.drop_fresh()
        if self.moments is not None:
            self.moments.drop_fresh()

    def keep_average(self) -> None:
        self.factors.keep_average()
        if self.moments is not None:
            self.moments.drop_fresh()

    # -- measured eigenvalues (curvature="ekfac" / "adaptive") -------------------------------
    def example_rows(self, capture) -> tuple[Tensor, Tensor, float] | None:
        """``(rows of ā, rows of δ, N)`` of the same examples, for EKFAC's per-example
        moments; ``None`` where the block cannot pair them (the default)."""
        return None

    def example_moments(self, capture) -> tuple[Tensor, float]:
        """EKFAC's ``S`` of this refresh in the new eigenbasis (:func:`.eigen.example_moments`)
        and its weight across ranks (the examples): K-FAC's ``dΓ dAᵀ`` (its value under
        independence) with weight 1 where rows cannot be paired, zeros with weight 0 where
        this rank has no data."""
        f = self.factors
        if not self._has_data(capture):
            return torch.zeros_like(torch.outer(f.evals_G, f.evals_A)), 0.0
        rows = self.example_rows(capture)
        if rows is None:
            return torch.outer(f.evals_G, f.evals_A).clamp_min_(0.0), 1.0
        return example_moments(rows[0], rows[1], f.evecs_A, f.evecs_G, rows[2]), rows[2]

    def fold_moments(self, S: Tensor, rho: float) -> None:
        self.moments.fold(S, rho)

    def observe(self, vecs: Sequence[Tensor]) -> None:
        """``"adaptive"``: fold this step's gradient, in the eigenbasis, into ``S̄``."""
        rotated = self.factors.rotate(self._to_mat(vecs))
        self.moments.observe(rotated)
        self._observed = (list(vecs), [v._version for v in vecs], rotated)

    def _rotated(self, vecs: Sequence[Tensor]) -> Tensor:
        """``QΓᵀ V QA`` of ``vecs``, reusing :meth:`observe`'s when they are the same tensors,
        unchanged since (their in-place version counters: the gradients may be ``p.grad``
        itself, which ``zero_grad(set_to_none=False)`` and the next backward overwrite)."""
        seen = self._observed
        if seen is not None and len(seen[0]) == len(vecs) and all(
                a is b and a._version == v
                for a, b, v in zip(seen[0], vecs, seen[1], strict=True)):
            return seen[2]
        return self.factors.rotate(self._to_mat(vecs))

    def _factor_sizes(self) -> tuple[int, int]:
        """``(in, out)``: the sizes of ``A`` and ``Γ``."""
        raise NotImplementedError

    def statistics_numel(self) -> int:
        d_in, d_out = self._factor_sizes()
        return d_in * d_in + d_out * d_out + 2

    def _grid(self, ea_scale: float, damping: float) -> tuple[Tensor, list[Tensor]]:
        """``e·dΓ dAᵀ + γ`` as a matrix and as parameter-shaped tensors (cached)."""
        def make() -> tuple[Tensor, list[Tensor]]:
            d = self.factors.eig_grid(ea_scale, damping)
            return d, self._from_mat(d)

        if self.moments is not None:  # measured eigenvalues change without a refresh
            d = self.moments.diag(ea_scale, 0.0, damping)
            return d, self._from_mat(d)
        return self.factors.cached(("grid-tensors", float(ea_scale), float(damping)), make)

    def _check_exact(self) -> None:
        self._check_ready()
        if not self.exact:
            raise RuntimeError(f"block {self.name!r} keeps a truncated eigenbasis (rank)")

    def to_eigenbasis(self, vecs):
        self._check_exact()
        return self._from_mat(self._rotated(vecs))

    def from_eigenbasis(self, coords):
        self._check_exact()
        return self._from_mat(self.factors.unrotate(self._to_mat(coords)))

    def eigenvalues(self, ea_scale, damping):
        self._check_exact()
        return list(self._grid(ea_scale, damping)[1])

    @property
    def exact(self) -> bool:
        return self.factors.exact

    def solve(self, vecs, damping, ea_scale=1.0, fresh_scale=0.0, method="exact"):
        self._check_ready()
        f = self.factors
        if self.moments is not None:  # every system is diagonal in the eigenbasis
            D = self.moments.diag(ea_scale, fresh_scale, damping)
            return self._from_mat(f.unrotate(self._rotated(vecs) / D))
        if fresh_scale == 0.0 and not self.exact:  # truncated factors (rank), eq. 19
            return self._from_columns(f.solve_columns(self._columns(vecs), damping, ea_scale))
        V = self._to_mat(vecs)
        if fresh_scale == 0.0 and self.exact:  # exact in the eigenbasis (eq. 19)
            return self._from_mat(f.unrotate(f.rotate(V) / self._grid(ea_scale, damping)[0]))
        out = self.factors.solve(V, damping, ea_scale, fresh_scale, method)
        self.last_residual = self.factors.last_residual
        return self._from_mat(out)

    def matvec(self, vecs, damping, ea_scale=1.0, fresh_scale=0.0):
        if self.moments is not None:
            f, D = self.factors, self.moments.diag(ea_scale, fresh_scale, damping)
            return self._from_mat(f.unrotate(f.rotate(self._to_mat(vecs)) * D))
        return self._from_mat(self.factors.matvec(self._to_mat(vecs), damping, ea_scale,
                                                  fresh_scale))

    def state_dict(self) -> dict[str, Tensor]:
        out = self.factors.state_dict()
        if self.moments is not None:
            out.update(self.moments.state_dict())
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.factors.load_state_dict(state, self.params[0].device)
        self._observed = None
        if self.moments is not None:
            self.moments.load_state_dict(state, self.params[0].device)
        self.initialized = self.factors.initialized


__all__ = [
    "Block",
    "CurvatureError",
    "EXACT_SOLVE_RTOL",
    "FactoredBlock",
]
