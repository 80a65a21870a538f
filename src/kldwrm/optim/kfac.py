"""EA-KFAC: K-FAC with exponentially averaged Kronecker factors (eqs. 10-13, 19-20)."""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import CurvatureOptimizer


class KFAC(CurvatureOptimizer):
    """EA-KFAC, the baseline: ``s_k = -lr · (Ā_k ⊗ Γ̄_k + γI)^{-1} (g_k + wd·θ_k)``.

    By Prop. 3.1 this is the minimiser of the wake of quadratic models (eqs. 15-17) when
    the step size is constant. See :class:`~kldwrm.optim.base.CurvatureOptimizer` for the
    arguments; defaults are the paper's K-FAC settings (DESIGN section 4).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.01,
        rho: float = 0.95,
        damping: float = 1e-2,
        weight_decay: float = 1e-3,
        kl_clip: float | None = 0.1,
        update_freq: int = 30,
        fisher: str = "mc",
        likelihood: str = "categorical",
        **kwargs: Any,
    ) -> None:
        super().__init__(
            model,
            lr=lr,
            rho=rho,
            damping=damping,
            weight_decay=weight_decay,
            kl_clip=kl_clip,
            update_freq=update_freq,
            fisher=fisher,
            likelihood=likelihood,
            **kwargs,
        )

    def _direction(self, g, refresh):
        return self.engine.solve(g, self._scales()), g
