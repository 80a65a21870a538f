"""The clipped step (DESIGN section 3) against its formulas, computed here independently:
``ν = min(1, √(κ / |Σ_i lr_i² d_iᵀu_i|))``, ``c_i = min(1, β / RMS(d_i))`` and
``s_i = −lr_i·ν·c_i·d_i`` (a left-out tensor has ``lr_i = 0``), and for a direction
whose squared norm overflows float32 (the block clip still scales it to RMS β)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kldwrm.optim import QKLDWRM


def _opt(**kw) -> tuple[QKLDWRM, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    return QKLDWRM(model, lr=0.1, **kw), list(model.parameters())


@pytest.mark.parametrize("left", [(), (3,)])
def test_clipped_step_equals_its_formulas(left):
    opt, params = _opt(kl_clip=1e-3, block_clip=0.5)
    gen = torch.Generator().manual_seed(1)
    d = [torch.randn(p.shape, generator=gen) * (i + 1) for i, p in enumerate(params)]
    u = [torch.randn(p.shape, generator=gen) for p in params]
    opt._left = {i: {} for i in left}
    opt._step_vectors = (None, u, None, d)  # Q's KL terms: the direction and ĝ
    steps = opt._clipped_step(d, u)
    lrs = [0.0 if i in left else opt._lr(i) for i in range(len(params))]
    vdotu = sum(lr * lr * float((di.double() * ui.double()).sum())
                for lr, di, ui in zip(lrs, d, u, strict=True))
    nu = min(1.0, math.sqrt(1e-3 / abs(vdotu)))
    assert opt.last_kl_scale == pytest.approx(nu, rel=1e-6)
    assert nu < 1.0  # the KL clip binds
    for lr, di, si in zip(lrs, d, steps, strict=True):
        rms = float(di.double().pow(2).mean().sqrt())
        c = min(1.0, 0.5 / rms)
        torch.testing.assert_close(si.double(), -lr * nu * c * di.double(), rtol=1e-6, atol=0)
    assert any(min(1.0, 0.5 / float(di.double().pow(2).mean().sqrt())) < 1.0 for di in d)


def test_block_clip_of_a_direction_whose_squared_norm_overflows_float32():
    opt, params = _opt(kl_clip=None, block_clip=2.0)
    d = [torch.full(p.shape, 1e25) for p in params]  # ‖d‖² = numel·1e50 > float32's max
    assert not math.isfinite(float(torch.dot(d[0].reshape(-1), d[0].reshape(-1))))
    steps = opt._clipped_step(d, d)
    for i, s in enumerate(steps):  # RMS(s) = lr·2 exactly (every entry equal)
        torch.testing.assert_close(s, torch.full_like(s, -opt._lr(i) * 2.0), rtol=1e-6, atol=0)
