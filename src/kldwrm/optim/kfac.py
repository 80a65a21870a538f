"""EA-KFAC: K-FAC with exponentially averaged Kronecker factors (eqs. 10-13, 19-20)."""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import CurvatureOptimizer


class KFAC(CurvatureOptimizer):
    """EA-KFAC, the baseline: ``s_k = -lr · (Ā_k ⊗ Γ̄_k + γI)^{-1} (g_k + wd·θ_k)``.

    By Prop. 3.1 this is the minimiser of the wake of quadratic models (eqs. 15-17) when
    the step size is constant. Arguments: see
    :class:`~kldwrm.optim.base.CurvatureOptimizer`; the defaults are the paper's K-FAC
    settings (lr 0.01, ρ = 0.95, γ = 1e-2, weight decay 1e-3, kl_clip 0.1, N_u = 30).
    """

    def __init__(self, model: nn.Module, lr: float = 0.01, rho: float = 0.95,
                 **kwargs: Any) -> None:
        super().__init__(model, lr=lr, rho=rho, **kwargs)

    def _direction(self, g, refresh):
        return self.engine.solve(g, self._scales()), g
