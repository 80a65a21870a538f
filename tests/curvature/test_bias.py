"""``bias="separate"``: the released code's own bias blocks, against independent computations.

The weight block is K-FAC/KFC without the homogeneous coordinate; the bias block is
``A = [1]``, ``Γ = (1/N) Σ_n s_n s_nᵀ`` with ``s_n`` example n's bias gradient, which
for a convolution is its output gradient summed over positions. Here ``s_n`` comes from
autograd on each example's own loss, one example at a time (float64).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kldwrm import KFAC, QKLDWRM, SOKLDWRM
from kldwrm.curvature import BiasBlock, KroneckerBlock
from kldwrm.optim.qe import QEKLDWRM

from .helpers import one_refresh, record, train_losses

pytestmark = pytest.mark.usefixtures("float64")


def _cnn() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, stride=2), nn.Tanh(), nn.Flatten(),
                         nn.Linear(3 * 3 * 3, 4))


def _one_refresh(model, x, y):
    return one_refresh(model, x, y, bias="separate")


def _blocks(opt, module):
    found = [b for b in opt.engine.blocks if getattr(b, "module", None) is module]
    weight = next(b for b in found if isinstance(b, KroneckerBlock))
    bias = next(b for b in found if isinstance(b, BiasBlock))
    return weight, bias


def _per_example_bias_grads(model, module, x, y):
    """``s_n = ∂ℓ_n/∂b`` for every example, from autograd on each example alone."""
    rows = []
    for n in range(x.shape[0]):
        loss = F.cross_entropy(model(x[n : n + 1]), y[n : n + 1], reduction="sum")
        rows.append(torch.autograd.grad(loss, module.bias)[0])
    return torch.stack(rows)


def _layer_record(model, module, x, y):
    """The layer's input and the per-example output gradients (summed loss)."""
    ins, grads = record(model, [module], x, y)
    return ins[module], grads[module]


def test_linear_separate_bias_factors_equal_independent_computation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(12, 5), torch.randint(0, 3, (12,))
    expected = {}
    for lin in (model[0], model[2]):
        s = _per_example_bias_grads(model, lin, x, y)
        a, d = _layer_record(model, lin, x, y)
        expected[lin] = (a.T @ a / 12, d.T @ d / 12, s.T @ s / 12)
    opt = _one_refresh(model, x, y)
    for lin in (model[0], model[2]):
        wb, bb = _blocks(opt, lin)
        A, G, Gb = expected[lin]
        assert wb.params == [lin.weight] and bb.params == [lin.bias]
        torch.testing.assert_close(wb.A_bar, A, rtol=1e-12, atol=1e-14)  # no [a, 1]
        torch.testing.assert_close(wb.G_bar, G, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(bb.A_bar, torch.ones(1, 1), rtol=0, atol=0)
        torch.testing.assert_close(bb.G_bar, Gb, rtol=1e-12, atol=1e-14)
        # for a linear layer the bias block's Γ is the weight's Γ (δ_n is s_n)
        torch.testing.assert_close(bb.G_bar, wb.G_bar, rtol=1e-12, atol=1e-14)


def test_conv_separate_bias_sums_output_gradients_over_positions_before_the_product():
    torch.manual_seed(1)
    model = _cnn()
    conv = model[0]
    x, y = torch.randn(7, 2, 6, 6), torch.randint(0, 4, (7,))
    s = _per_example_bias_grads(model, conv, x, y)
    a, d = _layer_record(model, conv, x, y)
    opt = _one_refresh(model, x, y)
    wb, bb = _blocks(opt, conv)
    torch.testing.assert_close(bb.G_bar, s.T @ s / 7, rtol=1e-12, atol=1e-14)
    # ... which differs from KFC's position-averaged Γ of the weight block
    dr = d.permute(0, 2, 3, 1).reshape(-1, 3)
    torch.testing.assert_close(wb.G_bar, dr.T @ dr / dr.shape[0], rtol=1e-12, atol=1e-14)
    assert not torch.allclose(bb.G_bar, wb.G_bar)
    patches = F.unfold(a, 3, padding=1, stride=2)  # (N, C·k·k, positions)
    cols = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    torch.testing.assert_close(wb.A_bar, cols.T @ cols / 7, rtol=1e-12, atol=1e-14)


def test_separate_bias_step_is_the_block_diagonal_solve():
    """One K-FAC step with separate bias blocks against a dense block-diagonal solve."""
    torch.manual_seed(2)
    model = _cnn()
    x, y = torch.randn(9, 2, 6, 6), torch.randint(0, 4, (9,))
    before = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    opt = _one_refresh(model, x, y)
    group = opt.param_groups[0]
    for b, slot in zip(opt.engine.blocks, opt.engine.slots, strict=True):
        (i,) = slot  # one tensor per block: the weight or the bias
        p = list(model.parameters())[i]
        g = grads[i] + group["weight_decay"] * before[i]
        V = g.reshape(g.shape[0], -1)  # (out, in) or (out, 1)
        M = torch.kron(b.A_bar, b.G_bar) + group["damping"] * torch.eye(V.numel())
        d = torch.linalg.solve(M, V.T.reshape(-1)).reshape(V.shape[1], -1).T  # column-major
        torch.testing.assert_close(p.detach() - before[i], -group["lr"] * d.reshape(p.shape),
                                   rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize(
    ("cls", "q_solve"),
    [(KFAC, None), (SOKLDWRM, None), (QKLDWRM, "exact"), (QKLDWRM, "augmented"),
     (QEKLDWRM, "exact"), (QEKLDWRM, "augmented")],
)
def test_every_optimizer_trains_with_separate_bias(cls, q_solve):
    torch.manual_seed(3)
    model = _cnn()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 2, 6, 6, generator=g), torch.randint(0, 4, (64,), generator=g)
    kw = {} if q_solve is None else dict(q_solve=q_solve)
    if cls is QEKLDWRM:
        kw.update(window=2, inner_steps=2, inner_lr=0.05)
    opt = cls(model, lr=0.1, update_freq=3, bias="separate", **kw)
    kinds = [b.kind for b in opt.engine.blocks]
    assert kinds == ["kronecker", "kronecker-bias", "kronecker", "kronecker-bias"]
    losses = train_losses(model, opt, x, y, 12)
    assert all(map(math.isfinite, losses))
    assert losses[-1] < 0.8 * losses[0], losses


def test_separate_bias_state_dict_round_trip_is_bit_exact():
    torch.manual_seed(4)
    x, y = torch.randn(32, 2, 6, 6), torch.randint(0, 4, (32,))

    def run(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

    a = _cnn()
    b = _cnn()
    b.load_state_dict(a.state_dict())
    opt_a = QKLDWRM(a, lr=0.05, update_freq=2, bias="separate", seed=1)
    run(a, opt_a, 3)
    opt_b = QKLDWRM(b, lr=0.05, update_freq=2, bias="separate", seed=1)
    b.load_state_dict(a.state_dict())
    opt_b.load_state_dict(opt_a.state_dict())
    run(a, opt_a, 4)
    run(b, opt_b, 4)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_dense_layer_scope_gives_the_bias_its_own_exact_block():
    """``curvature="dense"``: the bias block is the bias rows/columns of the full Fisher."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(10, 3), torch.randint(0, 3, (10,))
    full = KFAC(model, curvature="dense", fisher="exact", update_freq=1, lr=1e-3)
    sep = KFAC(model, curvature="dense", dense_scope="layer", fisher="exact", update_freq=1,
               lr=1e-3, bias="separate")
    assert [b.name for b in sep.engine.blocks] == ["0", "0.bias", "2", "2.bias"]
    for opt in (full, sep):  # one refresh each, on the same parameters and batch
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        est = opt.engine.fresh_estimates([p.grad for p in model.parameters()])
        opt.engine.fold(est, 0.0)
    Fm = full.engine.blocks[0].F_bar
    offsets, i = [], 0
    for p in model.parameters():
        offsets.append((i, i + p.numel()))
        i += p.numel()
    for blk, k in zip(sep.engine.blocks, range(4), strict=True):
        lo, hi = offsets[k]
        torch.testing.assert_close(blk.F_bar, Fm[lo:hi, lo:hi], rtol=1e-10, atol=1e-13)
