"""What the reference tests share: the sizes of the synthetic run, and the EA and eq. 20
written independently of ``kldwrm.reference`` (by recursion)."""

from __future__ import annotations

import torch

N = 12  # parameters
K = 30  # steps
NU = 4  # refresh period of eq. 20
RHO = 0.6
GAMMA = 1e-2
TOL = 1e-10

DT = torch.float64


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _spd(gen: torch.Generator, n: int = N, lo: float = 0.5, hi: float = 3.0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT))
    eig = lo + (hi - lo) * torch.rand(n, generator=gen, dtype=DT)
    return (q * eig) @ q.T


def _ea_recursive(mats: list[torch.Tensor], rho: float) -> list[torch.Tensor]:
    """EA of eq. 12/18 by its recursion, seeded with the first matrix (DESIGN section 3)."""
    out = [mats[0].clone()]
    for m in mats[1:]:
        out.append(rho * out[-1] + (1 - rho) * m)
    return out


def _eq20(fresh: list[torch.Tensor], rho: float, nu: int) -> list[torch.Tensor]:
    """B_k of eq. 20: the fresh estimate on refresh steps, the current EA B̄_q in between."""
    mats: list[torch.Tensor] = []
    ea: torch.Tensor | None = None
    for k, f in enumerate(fresh):
        if k % nu == 0:
            mats.append(f)
            ea = f.clone() if ea is None else rho * ea + (1 - rho) * f
        else:
            assert ea is not None
            mats.append(ea.clone())
    return mats

