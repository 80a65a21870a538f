"""SO-KLD-WRM (Prop. 4.1, eq. 27, with the variable step size of section 4.4)."""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import CurvatureOptimizer


class SOKLDWRM(CurvatureOptimizer):
    """Smallest-Order KLD-WRM.

    Minimises eq. 26, ``g_kᵀs + λ_k Σ_i κ(i) ρ^{k-i} D̃_KL(θ_i, θ_k + s)``, through
    Prop. 4.1 with variable ``λ_k = 1/lr_k``::

        s_k = -(1/λ_k) (F̄_k + γI)^{-1} (g_k - ρ (λ_k/λ_{k-1}) g_{k-1}),   g_{-1} = 0.

    It costs what :class:`KFAC` costs plus one stored gradient. Other arguments: see
    :class:`~kldwrm.optim.base.CurvatureOptimizer`; the defaults are the paper's SO settings
    (ρ = 0.33, the rest as K-FAC).
    """

    def __init__(self, model: nn.Module, lr: float = 0.01, rho: float = 0.33,
                 **kwargs: Any) -> None:
        super().__init__(model, lr=lr, rho=rho, **kwargs)

    def _direction(self, g, refresh):
        # with a rank (off the paper's path, whose steps keep their two-pass rounding) the
        # difference is one pass per tensor
        one_pass = not self.engine.diagonalizable()
        u = []
        for i, (p, gi) in enumerate(zip(self._params, g, strict=True)):
            st = self.state[p]
            if "prev_grad" in st:
                c = self.rho * (float(st["prev_lr"]) / self._lr(i))  # ρ λ_k / λ_{k-1}
                u.append(gi.sub(st["prev_grad"], alpha=c) if one_pass
                         else gi - c * st["prev_grad"])
            else:
                u.append(gi)
        return self.engine.solve(u, self._scales()), u

    def _after_step(self, g, steps, refresh):
        for i, (p, gi) in enumerate(zip(self._params, g, strict=True)):
            st = self.state[p]
            st["prev_grad"] = self._kept(i, gi)
            st["prev_lr"] = self._lr(i)
