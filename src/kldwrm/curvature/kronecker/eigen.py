"""Eigenvalue-corrected curvature: second moments of the gradient in a block's eigenbasis.

K-FAC's operator ``Ā⊗Γ̄`` has the eigenbasis ``QΓ ⊗ QA`` and the eigenvalues
``dΓ dAᵀ``; within that basis the product of the factors' eigenvalues is only an
approximation of the Fisher's diagonal. Two corrections keep the basis (refreshed with the
factors, every ``update_freq`` steps) and replace the eigenvalues by a measured diagonal
``S`` (an ``out × in`` grid laid out like the weight matrix ``V``)::

    F̄ ≈ (QΓ ⊗ QA) diag(vec S̄^p) (QΓ ⊗ QA)ᵀ

* ``"ekfac"`` (George et al. 2018, "Fast approximate natural gradient descent in a
  Kronecker-factored eigenbasis"): on refresh steps, the second moment of the per-example
  gradients ``δ āᵀ`` in the new basis, ``S = (1/N) Σ_rows (QΓᵀδ)² ((QAᵀā)²)ᵀ`` (every
  counted row an example, the normalisation of ``A``), averaged over refreshes with ρ like
  the factors (eqs. 12-13). Under independence of ``ā`` and ``δ`` it equals ``dΓ dAᵀ``.
* ``"adaptive"``: every step, the running second moment of the block's gradient ``G`` in
  the current basis, ``S̄ ← β S̄ + (1-β)(QΓᵀ G QA)²`` with Adam's bias correction
  ``S̄/(1-βᵗ)``; the basis is still refreshed every ``update_freq`` steps and ``S̄`` is
  carried across a refresh unchanged (as SOAP does, Vyas et al. 2024).

``power`` p turns the measured diagonal into the metric: ``p = 1`` is the Fisher (natural
gradient); ``p = ½`` is the metric of Adam and SOAP (the damping then plays Adam's ``ε``).
The fresh estimate ``F_k`` that Q's refresh system ``e·F̄ + f·F_k + γI`` needs is diagonal in
the same basis: this refresh's ``S`` (``"ekfac"``) or this step's squared rotated gradient
(``"adaptive"``), to the same power. So every system of the step rules stays diagonal in
the eigenbasis.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: curvature options whose eigenvalues are measured (see the module docstring)
CORRECTED = ("ekfac", "adaptive")


class EigenMoments:
    """The measured diagonal ``S̄`` of one block in its eigenbasis (and ``S`` of this step)."""

    #: tensors that :meth:`state_dict` saves
    KEYS = ("S_bar", "moment_count")

    def __init__(self, mode: str, beta: float, power: float) -> None:
        if mode not in CORRECTED:
            raise ValueError(f"mode must be one of {', '.join(CORRECTED)}, got {mode!r}")
        self.mode = mode
        self.beta = beta
        self.power = power
        #: running average (adaptive: not bias-corrected) of the second moments
        self.S_bar: Tensor | None = None
        #: this refresh's (ekfac) or this step's (adaptive) second moments
        self.S_fresh: Tensor | None = None
        #: observations folded in (adaptive: the ``t`` of the bias correction)
        self.moment_count: Tensor | None = None
        #: ``S̄^p`` (bias-corrected), computed once per update of ``S̄``
        self._metric_bar: Tensor | None = None

    @property
    def ready(self) -> bool:
        return self.S_bar is not None

    def _count(self) -> int:
        return 0 if self.moment_count is None else int(self.moment_count)

    def fold(self, S: Tensor, rho: float) -> None:
        """``"ekfac"``: EA of a refresh's per-example moments (first one seeds it)."""
        self.S_fresh = S
        if self.S_bar is None:
            self.S_bar = S.clone()
        else:
            self.S_bar = self.S_bar.mul(rho).add_(S, alpha=1.0 - rho)
        self.moment_count = torch.tensor(self._count() + 1)
        self._metric_bar = None

    def assign(self, S_bar: Tensor, S: Tensor | None) -> None:
        """``"ekfac"``: take an average kept elsewhere (a diagonal block's ``F̄``, already
        the per-example moments in its basis) instead of averaging a copy of it."""
        self.S_bar, self.S_fresh = S_bar, S
        self._metric_bar = None

    def observe(self, G: Tensor) -> None:
        """``"adaptive"``: one step's gradient ``G`` in the eigenbasis."""
        sq = G.square()
        self.S_fresh = sq
        if self.S_bar is None:
            self.S_bar = sq.mul(1.0 - self.beta)
        else:
            self.S_bar.mul_(self.beta).add_(sq, alpha=1.0 - self.beta)
        self.moment_count = torch.tensor(self._count() + 1)
        self._metric_bar = None

    def average(self) -> Tensor:
        """``S̄``, bias-corrected in ``"adaptive"`` mode."""
        if self.mode == "adaptive":
            return self.S_bar / (1.0 - self.beta ** self._count())
        return self.S_bar

    def _metric(self, S: Tensor) -> Tensor:
        if self.power == 1.0:
            return S
        return S.clamp_min(0.0).pow(self.power)

    def diag(self, ea_scale: float, fresh_scale: float, damping: float) -> Tensor:
        """``e·S̄^p + f·S^p + γ``: the eigenvalues of ``e·F̄ + f·F_k + γI``."""
        if self._metric_bar is None:
            self._metric_bar = self._metric(self.average())
        out = self._metric_bar.mul(ea_scale).add_(damping)
        if fresh_scale != 0.0:  # no fresh estimate (no data this refresh): the average
            fresh = self.average() if self.S_fresh is None else self.S_fresh
            out.add_(self._metric(fresh), alpha=fresh_scale)
        return out

    def drop_fresh(self) -> None:
        if self.mode == "ekfac":
            self.S_fresh = None

    def state_dict(self) -> dict[str, Tensor]:
        return {k: getattr(self, k) for k in self.KEYS if getattr(self, k) is not None}

    def load_state_dict(self, state: dict[str, Tensor], device: torch.device) -> None:
        self.S_bar = state["S_bar"].to(device) if "S_bar" in state else None
        count = state.get("moment_count")
        self.moment_count = None if count is None else count.cpu()
        self.S_fresh = None
        self._metric_bar = None


def example_moments(rows_A: Tensor, rows_G: Tensor, QA: Tensor, QG: Tensor,
                    n: float) -> Tensor:
    """``(1/n) Σ_r (QΓᵀ δ_r)² ((QAᵀ ā_r)²)ᵀ`` for rows ``ā_r`` (``R × in``) and ``δ_r``
    (``R × out``) of the same examples: the per-example gradients' second moments in the
    eigenbasis, ``out × in`` (George et al. 2018, eq. 9), in two products."""
    a = (rows_A @ QA).square_()
    d = (rows_G @ QG).square_()
    return (d.T @ a).div_(n)
