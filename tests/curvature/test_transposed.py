"""KFC blocks of ``nn.ConvTranspose1d/2d/3d``, against patches of the output gradient cut
out one input position and one kernel offset at a time, and against dense solves (float64).

Input position ``p`` of a transposed convolution reaches output position
``q = p·s + k·dil − pad`` through kernel offset ``k``; so one example's weight gradient is
``Σ_p x_p u_pᵀ`` with ``u_p[o, k] = δ[o, q]`` (zero outside the output), which the tests
first check against autograd, and KFC's factors are ``A = (1/N) Σ u uᵀ`` and
``Γ = (1/R) Σ x xᵀ`` (Grosse and Martens, 2016, with the roles of input and output swapped).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kldwrm import KFAC, QKLDWRM, SOKLDWRM
from kldwrm.curvature import BiasBlock, TransposedConvBlock, kronecker_supported
from kldwrm.optim.qe import QEKLDWRM

from .helpers import one_refresh, record, train_losses

pytestmark = pytest.mark.usefixtures("float64")


class Sized(nn.Module):
    """A transposed convolution called with ``output_size`` (its output padding then comes
    from the requested size, not from the module)."""

    def __init__(self, layer: nn.Module, size: tuple[int, ...]) -> None:
        super().__init__()
        self.layer, self.size = layer, size

    def forward(self, x):
        return self.layer(x, output_size=self.size)


def _patches(layer, d, in_shape):
    """``u_{n,p}`` for every example and input position, shape ``(N, P, C_out·Πk)``."""
    n, c_out, out_shape = d.shape[0], d.shape[1], d.shape[2:]
    rows = []
    for p in itertools.product(*map(range, in_shape)):
        u = d.new_zeros(n, c_out, *layer.kernel_size)
        for k in itertools.product(*map(range, layer.kernel_size)):
            q = [pi * s + ki * dil - pad for pi, ki, s, dil, pad
                 in zip(p, k, layer.stride, layer.dilation, layer.padding, strict=True)]
            if all(0 <= qi < size for qi, size in zip(q, out_shape, strict=True)):
                u[(slice(None), slice(None), *k)] = d[(slice(None), slice(None), *q)]
        rows.append(u.reshape(n, -1))
    return torch.stack(rows, dim=1)


def _explicit(layer, x, d):
    """Per-example weight gradients ``Σ_p x_p u_pᵀ`` and the KFC factors ``(A, Γ)``."""
    u = _patches(layer, d, x.shape[2:])
    xs = x.flatten(2).transpose(1, 2)  # (N, P, C_in), positions in the order of _patches
    grads = torch.einsum("npc,npj->ncj", xs, u).reshape(x.shape[0], *layer.weight.shape)
    n = x.shape[0]
    U, X = u.reshape(-1, u.shape[-1]), xs.reshape(-1, xs.shape[-1])
    return grads, U.T @ U / n, X.T @ X / X.shape[0]


def _model(layer, x, size=None):
    up = layer if size is None else Sized(layer, size)
    with torch.no_grad():
        features = up(x).flatten(1).shape[1]
    return nn.Sequential(up, nn.Tanh(), nn.Flatten(), nn.Linear(features, 4))


def _block(opt, layer, cls=TransposedConvBlock):
    return next(b for b in opt.engine.blocks if b.module is layer and isinstance(b, cls))


def _per_example_grads(model, layer, x, y):
    """Each example's gradient of its own loss w.r.t. the weight and the bias (autograd)."""
    out = []
    for n in range(x.shape[0]):
        loss = F.cross_entropy(model(x[n : n + 1]), y[n : n + 1], reduction="sum")
        out.append(torch.autograd.grad(loss, [layer.weight, layer.bias]))
    return torch.stack([g for g, _ in out]), torch.stack([b for _, b in out])


LAYERS = [
    ("1d", lambda: nn.ConvTranspose1d(2, 3, 3, stride=2, padding=1, dilation=2,
                                      output_padding=1), (5, 2, 6), None),
    ("2d", lambda: nn.ConvTranspose2d(2, 3, (3, 2), stride=(2, 3), padding=(1, 0),
                                      output_padding=(1, 2)), (3, 2, 4, 3), None),
    ("2d-dilated", lambda: nn.ConvTranspose2d(3, 2, 2, padding=1, dilation=(2, 3)),
     (3, 3, 4, 4), None),
    ("2d-output-size", lambda: nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1),
     (3, 2, 4, 4), (8, 7)),
    ("3d", lambda: nn.ConvTranspose3d(2, 2, (2, 3, 2), stride=(2, 1, 2), padding=(0, 1, 1),
                                      dilation=(1, 2, 1), output_padding=(1, 0, 0)),
     (2, 2, 3, 2, 3), None),
]


@pytest.mark.parametrize(("name", "make", "shape", "size"), LAYERS, ids=[c[0] for c in LAYERS])
def test_factors_equal_explicit_output_gradient_patches(name, make, shape, size):
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(*shape)
    model = _model(layer, x, size)
    y = torch.randint(0, 4, (shape[0],))
    ins, deltas = record(model, [layer], x, y)
    grads, A, G = _explicit(layer, ins[layer], deltas[layer])
    # the derivation: Σ_p x_p u_pᵀ is each example's weight gradient
    torch.testing.assert_close(grads, _per_example_grads(model, layer, x, y)[0],
                               rtol=1e-12, atol=1e-14)
    block = _block(one_refresh(model, x, y), layer)
    torch.testing.assert_close(block.A_bar, A, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(block.G_bar, G, rtol=1e-12, atol=1e-14)


def test_one_example_at_one_position_gives_the_exact_fisher_block():
    """One input position, one example: ``A ⊗ Γ = vec(g) vec(g)ᵀ`` with no approximation."""
    torch.manual_seed(1)
    layer = nn.ConvTranspose2d(3, 2, 3, stride=2, bias=False)
    x, y = torch.randn(1, 3, 1, 1), torch.tensor([2])
    model = _model(layer, x)
    (g,) = torch.autograd.grad(F.cross_entropy(model(x), y), [layer.weight])  # before a step
    g = g.reshape(3, -1).T.reshape(-1)  # column-major vec of W as (C_in, C_out·Πk)
    block = _block(one_refresh(model, x, y), layer)
    torch.testing.assert_close(torch.kron(block.A_bar, block.G_bar), torch.outer(g, g),
                               rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("bias", ["homogeneous", "separate"])
def test_step_equals_dense_damped_kronecker_solve(bias):
    """First step: ``−lr (A⊗Γ + γI)^{-1} vec(g)`` for the weight, the bias's own
    ``−lr (Γ_b + γI)^{-1} g_b`` with ``Γ_b`` the mean outer product of its per-example
    gradients (in either bias mode)."""
    torch.manual_seed(2)
    layer = nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1)
    x, y = torch.randn(6, 2, 3, 3), torch.randint(0, 4, (6,))
    model = _model(layer, x)
    ins, deltas = record(model, [layer], x, y)
    _, A, G = _explicit(layer, ins[layer], deltas[layer])
    s = _per_example_grads(model, layer, x, y)[1]
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    lr, damping = 0.1, 1e-2
    opt = KFAC(model, lr=lr, damping=damping, weight_decay=0.0, kl_clip=None, update_freq=1,
               fisher="empirical", bias=bias)
    assert [b.kind for b in opt.engine.blocks[:2]] == ["kronecker-transposed", "kronecker-bias"]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    gw, gb = layer.weight.grad.clone(), layer.bias.grad.clone()
    opt.step()
    M = torch.kron(A, G) + damping * torch.eye(gw.numel())
    vec = torch.linalg.solve(M, gw.reshape(2, -1).T.reshape(-1))
    expected = -lr * vec.reshape(-1, 2).T.reshape(gw.shape)
    torch.testing.assert_close(layer.weight - w0, expected, rtol=1e-9, atol=1e-13)
    Mb = s.T @ s / len(x) + damping * torch.eye(3)
    torch.testing.assert_close(layer.bias - b0, -lr * torch.linalg.solve(Mb, gb),
                               rtol=1e-9, atol=1e-13)


def test_grouped_and_wide_output_padding_layers_get_diagonal_blocks():
    """Groups: one Kronecker product per group, not represented; ``output_padding ≥ stride``
    (allowed below the dilation): more windows than input positions, ambiguous."""
    grouped = nn.ConvTranspose1d(4, 4, 3, groups=2)
    wide = nn.ConvTranspose1d(4, 2, 2, dilation=3, output_padding=2)
    assert not kronecker_supported(grouped) and not kronecker_supported(wide)
    assert kronecker_supported(nn.ConvTranspose3d(2, 2, 2, stride=2, output_padding=1))
    model = nn.Sequential(grouped, wide, nn.Flatten(), nn.Linear(2 * 11, 2))
    opt = one_refresh(model, torch.randn(3, 4, 4), torch.tensor([0, 1, 1]))
    kinds = {b.name: b.kind for b in opt.engine.blocks}
    assert kinds == {"0.weight": "diagonal", "0.bias": "diagonal", "1.weight": "diagonal",
                     "1.bias": "diagonal", "3": "kronecker"}
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("cls", [KFAC, SOKLDWRM, QKLDWRM, QEKLDWRM])
def test_model_with_a_transposed_convolution_trains(cls):
    torch.manual_seed(3)
    model = nn.Sequential(nn.ConvTranspose2d(2, 4, 3, stride=2, padding=1, output_padding=1),
                          nn.Tanh(), nn.Conv2d(4, 4, 3, stride=2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(16, 3))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, 3, 3, generator=g)
    y = (x[:, 0].mean((1, 2)) > x[:, 1].mean((1, 2))).long() + (x.std((1, 2, 3)) > 1).long()
    kw = dict(window=2, inner_steps=2, inner_lr=0.02) if cls is QEKLDWRM else {}
    opt = cls(model, lr=0.05, update_freq=3, **kw)
    blocks = opt.engine.blocks
    assert [b.kind for b in blocks] == ["kronecker-transposed", "kronecker-bias", "kronecker",
                                        "kronecker"]
    assert isinstance(blocks[1], BiasBlock)
    losses = train_losses(model, opt, x, y, 30)
    assert all(map(math.isfinite, losses)) and losses[-1] < 0.8 * losses[0], losses
