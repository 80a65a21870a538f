"""Exact symmetric KL of predictive distributions (eqs. 2, 4, 33, 34)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Categorical, Normal, kl_divergence

from kldwrm.divergence import categorical_skl, gaussian_skl, symmetric_kl

DT = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logits(*shape: int, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=_gen(seed), dtype=DT)


def test_categorical_matches_torch_distributions():
    lp, lq = _logits(64, 10, seed=1), _logits(64, 10, seed=2)
    p, q = Categorical(logits=lp), Categorical(logits=lq)
    expected = (0.5 * (kl_divergence(p, q) + kl_divergence(q, p))).mean()
    assert torch.allclose(categorical_skl(lp, lq), expected, rtol=1e-12, atol=0)
    per = categorical_skl(lp, lq, reduction="none")
    assert per.shape == (64,)
    assert torch.allclose(per, 0.5 * (kl_divergence(p, q) + kl_divergence(q, p)), rtol=1e-12)
    assert torch.allclose(categorical_skl(lp, lq, reduction="sum"), per.sum(), rtol=1e-12)
    # several batch dimensions: classes last, mean over the rest
    lp3, lq3 = lp.reshape(8, 8, 10), lq.reshape(8, 8, 10)
    assert torch.allclose(categorical_skl(lp3, lq3), expected, rtol=1e-12)


def test_categorical_float32():
    lp, lq = _logits(16, 5, seed=3).float(), _logits(16, 5, seed=4).float()
    out = categorical_skl(lp, lq)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(categorical_skl(lp.double(), lq.double()).item(), rel=1e-5)


def test_categorical_zero_iff_equal_and_shift_invariant():
    lp = _logits(32, 7, seed=5)
    assert categorical_skl(lp, lp).item() == 0.0
    shift = torch.randn(32, 1, generator=_gen(6), dtype=DT) * 50.0
    assert abs(categorical_skl(lp, lp + shift).item()) < 1e-13
    lq = lp.clone()
    lq[3, 2] += 1e-3  # one row differs a little: strictly positive
    assert categorical_skl(lp, lq).item() > 0.0


def test_categorical_symmetric_and_nonnegative():
    for seed in range(5):
        lp, lq = _logits(20, 6, seed=10 + seed), _logits(20, 6, seed=20 + seed, scale=5.0)
        a, b = categorical_skl(lp, lq), categorical_skl(lq, lp)
        assert a.item() == pytest.approx(b.item(), rel=1e-14)
        assert (categorical_skl(lp, lq, reduction="none") >= 0).all()


def test_gaussian_matches_eq33_and_torch_normal():
    h1, h2 = _logits(40, 3, seed=7), _logits(40, 3, seed=8)
    eq34 = ((h1 - h2) ** 2).sum() / (2 * 40)
    assert torch.allclose(gaussian_skl(h1, h2), eq34, rtol=1e-13)
    p, q = Normal(h1, torch.ones_like(h1)), Normal(h2, torch.ones_like(h2))
    skl = 0.5 * (kl_divergence(p, q) + kl_divergence(q, p))  # per coordinate
    assert torch.allclose(gaussian_skl(h1, h2, reduction="none"), skl.sum(dim=1), rtol=1e-12)
    assert torch.allclose(gaussian_skl(h1, h2), skl.sum(dim=1).mean(), rtol=1e-12)
    # (N,) holds N scalar outputs; extra output dimensions are summed
    assert torch.allclose(
        gaussian_skl(h1[:, 0], h2[:, 0]), 0.5 * ((h1[:, 0] - h2[:, 0]) ** 2).mean(), rtol=1e-13
    )
    assert torch.allclose(
        gaussian_skl(h1.reshape(40, 1, 3), h2.reshape(40, 1, 3)), eq34, rtol=1e-13
    )


def test_gaussian_zero_iff_equal_and_symmetric():
    h1, h2 = _logits(10, 4, seed=9), _logits(10, 4, seed=11)
    assert gaussian_skl(h1, h1).item() == 0.0
    assert gaussian_skl(h1, h2).item() > 0.0
    assert gaussian_skl(h1, h2).item() == gaussian_skl(h2, h1).item()


@pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
def test_gradcheck(likelihood):
    a = _logits(5, 4, seed=12).requires_grad_(True)
    b = _logits(5, 4, seed=13).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, y: symmetric_kl(x, y, likelihood), (a, b))
    assert torch.autograd.gradgradcheck(lambda x, y: symmetric_kl(x, y, likelihood), (a, b))


def test_large_logits_are_finite():
    lp = torch.tensor([[1e3, -1e3, 0.0], [-1e3, 1e3, 1e3]], dtype=DT, requires_grad=True)
    lq = torch.tensor([[-1e3, 1e3, 0.0], [1e3, -1e3, 1e3]], dtype=DT)
    out = categorical_skl(lp, lq)
    assert math.isfinite(out.item()) and out.item() > 0
    # row 0: p ≈ e_0, q ≈ e_1: ½ (1·2000 + 1·2000) = 2000;
    # row 1: p ≈ (0, ½, ½), q ≈ (½, 0, ½): ½ (½·2000 + ½·2000) = 1000; batch mean 1500
    assert out.item() == pytest.approx(1500.0, rel=1e-9)
    out.backward()
    assert torch.isfinite(lp.grad).all()
    out32 = categorical_skl(lp.detach().float(), lq.float())
    assert math.isfinite(out32.item())


def test_dispatcher_and_validation():
    a, b = _logits(4, 3, seed=14), _logits(4, 3, seed=15)
    assert symmetric_kl(a, b) == categorical_skl(a, b)
    assert symmetric_kl(a, b, likelihood="gaussian") == gaussian_skl(a, b)
    with pytest.raises(ValueError, match="likelihood"):
        symmetric_kl(a, b, likelihood="poisson")
    with pytest.raises(ValueError, match="shape"):
        symmetric_kl(a, b[:, :2])
    with pytest.raises(ValueError, match="shape"):
        symmetric_kl(a, b[:3], likelihood="gaussian")
    with pytest.raises(ValueError, match="reduction"):
        categorical_skl(a, b, reduction="max")
    with pytest.raises(ValueError, match="empty"):
        gaussian_skl(a[:0], b[:0])
    with pytest.raises(ValueError):
        categorical_skl(torch.tensor(1.0), torch.tensor(2.0))
    with pytest.raises(ValueError, match="floating"):
        categorical_skl(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long))
