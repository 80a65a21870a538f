"""Dense (research-mode) Fisher against explicit per-example autograd loops (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kldwrm import KFAC


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _flat_grad(out, params):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(out, params,
                                                                 retain_graph=True)])


def _explicit_fisher(model, x, metric):
    """(1/N) Σ_n J_nᵀ Λ_n J_n with J_n built row by row from autograd."""
    params = list(model.parameters())
    total = 0
    for n in range(len(x)):
        h = model(x[n : n + 1])[0]
        J = torch.stack([_flat_grad(h[c], params) for c in range(len(h))])
        total = total + J.T @ metric(h.detach(), n) @ J
    return total / len(x)


def _fresh(opt):
    return opt.engine.blocks[0].F_bar  # first refresh: F̄ = F_0


@pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
def test_exact_fisher(likelihood):
    model = _model()
    x = torch.randn(6, 4, dtype=torch.float64)
    if likelihood == "categorical":
        y = torch.randint(0, 3, (6,))

        def metric(h, n):
            p = torch.softmax(h, 0)
            return torch.diag(p) - torch.outer(p, p)

        loss_fn = F.cross_entropy
    else:
        y = torch.randn(6, 3, dtype=torch.float64)

        def metric(h, n):
            return torch.eye(3, dtype=torch.float64)

        def loss_fn(out, t):
            return 0.5 * (out - t).square().sum(1).mean()

    expected = _explicit_fisher(model, x, metric)
    opt = KFAC(model, curvature="dense", fisher="exact", likelihood=likelihood)
    opt.zero_grad()
    loss_fn(model(x), y).backward()
    opt.step()
    torch.testing.assert_close(_fresh(opt), expected, rtol=1e-12, atol=1e-14)


def test_empirical_fisher_is_the_mean_outer_product_of_per_example_gradients():
    model = _model()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    params = list(model.parameters())
    gs = [_flat_grad(F.cross_entropy(model(x[n : n + 1]), y[n : n + 1]), params)
          for n in range(6)]
    expected = sum(torch.outer(g, g) for g in gs) / 6
    opt = KFAC(model, curvature="dense", fisher="empirical")
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    torch.testing.assert_close(_fresh(opt), expected, rtol=1e-12, atol=1e-14)


def test_per_layer_scope_is_the_block_diagonal_of_the_model_fisher():
    model = _model()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    full = KFAC(model, curvature="dense", fisher="exact")
    layer = KFAC(model, curvature="dense", fisher="exact", dense_scope="layer")
    full.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad for p in model.parameters()]
    f_full = full.engine.fresh_estimates(grads)[0]["F"]
    f_layer = [e["F"] for e in layer.engine.fresh_estimates(grads)]
    assert [b.name for b in layer.engine.blocks] == ["0", "2"]
    torch.testing.assert_close(f_layer[0], f_full[:25, :25], rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(f_layer[1], f_full[25:, 25:], rtol=1e-13, atol=1e-15)
