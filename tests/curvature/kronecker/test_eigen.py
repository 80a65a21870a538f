"""Measured eigenvalues (``curvature="ekfac"``/``"adaptive"``) against dense float64
constructions: per-example gradients computed one example at a time, the Fisher built as a
dense matrix in K-FAC's eigenbasis, and ``torch.optim.Adam`` for the diagonal blocks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kldwrm.curvature.diagonal import DiagonalBlock
from kldwrm.curvature.layer import KroneckerBlock
from kldwrm.optim import KFAC, QKLDWRM, SOKLDWRM

pytestmark = pytest.mark.usefixtures("float64")


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4)).double()


def _batch(k: int = 0, n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + k)
    return (torch.randn(n, 5, generator=g, dtype=torch.float64),
            torch.randint(0, 4, (n,), generator=g))


def _step(opt, model, k: int = 0) -> None:
    x, y = _batch(k)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def _per_example_grads(model: nn.Module, layer: nn.Linear, x, y) -> torch.Tensor:
    """``[W | b]`` gradient of each example's own loss, ``(n, out, in + 1)``."""
    out = []
    for xi, yi in zip(x, y, strict=True):
        model.zero_grad()
        F.cross_entropy(model(xi[None]), yi[None]).backward()
        out.append(torch.cat([layer.weight.grad, layer.bias.grad[:, None]], dim=1))
    return torch.stack(out)


def test_ekfac_moments_are_the_per_example_second_moments_in_the_eigenbasis():
    model = _mlp()
    ref = copy.deepcopy(model)
    opt = KFAC(model, lr=0.1, curvature="ekfac", fisher="empirical", kl_clip=None)
    x, y = _batch()
    _step(opt, model)
    for i, block in enumerate(b for b in opt.engine.blocks if isinstance(b, KroneckerBlock)):
        layer = ref[2 * i]
        G = _per_example_grads(ref, layer, x, y)
        f = block.factors
        rotated = f.evecs_G.T @ G @ f.evecs_A
        expected = rotated.square().mean(0)
        torch.testing.assert_close(block.moments.S_bar, expected, rtol=1e-10, atol=1e-14)


def test_ekfac_step_is_the_dense_solve_with_the_measured_diagonal():
    model = _mlp()
    start = [p.detach().clone() for p in model.parameters()]
    opt = KFAC(model, lr=0.1, damping=0.05, weight_decay=0.0, curvature="ekfac",
               fisher="empirical", kl_clip=None)
    _step(opt, model)
    for i, block in enumerate(b for b in opt.engine.blocks if isinstance(b, KroneckerBlock)):
        f = block.factors
        W, b = model[2 * i].weight.grad, model[2 * i].bias.grad
        g = torch.cat([W, b[:, None]], dim=1)
        Q = torch.kron(f.evecs_G, f.evecs_A)  # row-major vec of (out, in + 1)
        Fisher = Q @ torch.diag(block.moments.S_bar.reshape(-1)) @ Q.T
        d = torch.linalg.solve(Fisher + 0.05 * torch.eye(len(Q), dtype=Q.dtype),
                               g.reshape(-1)).reshape(g.shape)
        new = torch.cat([model[2 * i].weight, model[2 * i].bias[:, None]], dim=1)
        old = torch.cat([start[2 * i], start[2 * i + 1][:, None]], dim=1)
        torch.testing.assert_close(new - old, -0.1 * d, rtol=1e-9, atol=1e-13)


def test_ekfac_of_independent_rows_equals_kfac():
    """One example (every factor of rank one): the per-example moment is the product of
    the factors' eigenvalues, so EKFAC's step is K-FAC's."""
    a, b = _mlp(), _mlp()
    opts = [KFAC(a, lr=0.1, curvature="ekfac", fisher="empirical"),
            KFAC(b, lr=0.1, fisher="empirical")]
    x, y = _batch(n=1)
    for m, opt in zip((a, b), opts, strict=True):
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-8, atol=1e-12)


class _Tokens(nn.Module):
    """Only diagonal blocks: an embedding and a LayerNorm, read out as 6-class logits."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.emb = nn.Embedding(9, 6)
        self.norm = nn.LayerNorm(6)

    def forward(self, idx):
        return self.norm(self.emb(idx))


def test_adaptive_diagonal_blocks_are_adam_without_first_moment():
    model = _Tokens().double()
    ref = copy.deepcopy(model)
    opt = KFAC(model, lr=0.01, damping=1e-6, weight_decay=0.0, kl_clip=None,
               curvature="adaptive", eigen_beta=0.9, eigen_power=0.5)
    adam = torch.optim.Adam(ref.parameters(), lr=0.01, betas=(0.0, 0.9), eps=1e-6)
    assert all(isinstance(b, DiagonalBlock) for b in opt.engine.blocks)
    g = torch.Generator().manual_seed(3)
    for _ in range(7):
        idx, y = torch.randint(0, 9, (10,), generator=g), torch.randint(0, 6, (10,), generator=g)
        for m, o in ((model, opt), (ref, adam)):
            o.zero_grad()
            F.cross_entropy(m(idx), y).backward()
            o.step()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_adaptive_moments_are_the_running_average_of_rotated_gradients():
    model = _mlp()
    opt = SOKLDWRM(model, lr=0.05, weight_decay=0.0, curvature="adaptive", eigen_beta=0.8,
                   update_freq=100)
    block = opt.engine.blocks[0]
    expected = None
    for k in range(4):
        _step(opt, model, k)
        f = block.factors
        g = torch.cat([model[0].weight.grad, model[0].bias.grad[:, None]], dim=1)
        sq = (f.evecs_G.T @ g @ f.evecs_A).square()
        expected = 0.2 * sq if expected is None else 0.8 * expected + 0.2 * sq
    torch.testing.assert_close(block.moments.S_bar, expected, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(block.moments.average(), expected / (1 - 0.8**4))


@pytest.mark.parametrize("cls", [KFAC, SOKLDWRM, QKLDWRM])
@pytest.mark.parametrize("curvature", ["ekfac", "adaptive"])
def test_resume_is_bit_exact(cls, curvature):
    a = _mlp()
    opt = cls(a, lr=0.05, curvature=curvature, update_freq=2, momentum=0.5, eigen_power=0.5,
              seed=4)
    for k in range(3):
        _step(opt, a, k)
    b = copy.deepcopy(a)
    opt_b = cls(b, lr=0.05, curvature=curvature, update_freq=2, momentum=0.5,
                eigen_power=0.5, seed=9)
    opt_b.load_state_dict(copy.deepcopy(opt.state_dict()))
    for k in range(3, 7):
        _step(opt, a, k)
        _step(opt_b, b, k)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_q_without_model_curvature_is_so_with_measured_eigenvalues():
    a, b = _mlp(), _mlp()
    q = QKLDWRM(a, lr=0.05, rho=0.4, curvature="adaptive", model_curvature=0.0,
                block_clip=None, update_freq=3, seed=1)
    so = SOKLDWRM(b, lr=0.05, rho=0.4, curvature="adaptive", update_freq=3, seed=1)
    for k in range(7):
        _step(q, a, k)
        _step(so, b, k)
    for p, r in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, r, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kw, name", [
    (dict(eigen_beta=1.0), "eigen_beta"),
    (dict(eigen_beta=-0.1), "eigen_beta"),
    (dict(eigen_power=0.0), "eigen_power"),
    (dict(eigen_power=1.5), "eigen_power"),
    (dict(curvature="ekfac", rank=3), "rank"),
    (dict(curvature="soap"), "curvature"),
])
def test_bad_values_name_the_argument(kw, name):
    with pytest.raises(ValueError, match=name):
        KFAC(_mlp(), **kw)
