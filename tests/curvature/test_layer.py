"""Kronecker factors against independent computations (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kldwrm import KFAC
from kldwrm.curvature import KroneckerBlock

from .helpers import one_refresh, record

pytestmark = pytest.mark.usefixtures("float64")




def _block(opt, module) -> KroneckerBlock:
    return next(b for b in opt.engine.blocks if getattr(b, "module", None) is module)


def test_linear_block_is_exact_fisher_for_one_example():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(1, 5), torch.tensor([2])
    # exact empirical Fisher block of each layer for one example: vec(G) vec(G)^T
    loss = F.cross_entropy(model(x), y)
    expected = {}
    for lin in (model[0], model[2]):
        gw, gb = torch.autograd.grad(loss, [lin.weight, lin.bias], retain_graph=True)
        v = torch.cat([gw, gb[:, None]], dim=1).T.reshape(-1)  # column-major vec of [W, b]
        expected[lin] = torch.outer(v, v)
    opt = one_refresh(model, x, y)
    for lin in (model[0], model[2]):
        b = _block(opt, lin)
        torch.testing.assert_close(torch.kron(b.A_bar, b.G_bar), expected[lin], rtol=1e-12,
                                   atol=1e-14)


def test_linear_block_equals_dense_kronecker_from_recorded_statistics():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4, bias=False))
    x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    acts, deltas = record(model, [model[0], model[2]], x, y)
    opt = one_refresh(model, x, y)
    for lin in (model[0], model[2]):
        a = acts[lin]
        if lin.bias is not None:
            a = torch.cat([a, torch.ones(16, 1)], dim=1)
        A = a.T @ a / 16
        G = deltas[lin].T @ deltas[lin] / 16
        b = _block(opt, lin)
        torch.testing.assert_close(torch.kron(b.A_bar, b.G_bar), torch.kron(A, G),
                                   rtol=1e-12, atol=1e-14)


def test_mc_fisher_uses_labels_sampled_from_the_model():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))
    x, y = torch.randn(32, 6), torch.randint(0, 4, (32,))
    with torch.no_grad():
        probs = torch.softmax(model(x).float(), dim=1)
    sampled = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(7)).squeeze(1)
    _, deltas = record(model, [model[0], model[2]], x, sampled)
    opt = one_refresh(model, x, y, fisher="mc", seed=7)
    for lin in (model[0], model[2]):
        G = deltas[lin].T @ deltas[lin] / 32
        torch.testing.assert_close(_block(opt, lin).G_bar, G, rtol=1e-12, atol=1e-14)


def test_1x1_conv_on_1x1_image_gives_the_linear_block():
    torch.manual_seed(3)
    lin = nn.Sequential(nn.Linear(4, 3))
    conv = nn.Sequential(nn.Conv2d(4, 3, 1), nn.Flatten())
    with torch.no_grad():
        conv[0].weight.copy_(lin[0].weight[:, :, None, None])
        conv[0].bias.copy_(lin[0].bias)
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    bl = _block(one_refresh(lin, x, y), lin[0])
    bc = _block(one_refresh(conv, x[:, :, None, None], y), conv[0])
    torch.testing.assert_close(bc.A_bar, bl.A_bar, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(bc.G_bar, bl.G_bar, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("bias", [True, False])
def test_conv_factors_equal_explicit_patch_computation(bias):
    torch.manual_seed(4)
    k, stride, pad, dil = (3, 2), (2, 1), (1, 2), (2, 1)
    conv = nn.Conv2d(2, 3, k, stride=stride, padding=pad, dilation=dil, bias=bias)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten())
    x = torch.randn(5, 2, 7, 6)
    with torch.no_grad():
        out_dim = model(x).shape[1]
    head = nn.Linear(out_dim, 4)
    model = nn.Sequential(model, head)
    y = torch.randint(0, 4, (5,))
    acts, deltas = record(model, [conv], x, y)
    # independent KFC factors: explicit patches by slicing the zero-padded input
    xp = F.pad(acts[conv], (pad[1], pad[1], pad[0], pad[0]))
    d = deltas[conv]  # (N, out, Ho, Wo)
    ho, wo = d.shape[2], d.shape[3]
    rows = []
    for i in range(ho):
        for j in range(wo):
            r0, c0 = i * stride[0], j * stride[1]
            patch = xp[:, :, r0 : r0 + dil[0] * (k[0] - 1) + 1 : dil[0],
                       c0 : c0 + dil[1] * (k[1] - 1) + 1 : dil[1]]
            rows.append(patch.reshape(5, -1))
    a = torch.stack(rows, dim=1).reshape(5 * ho * wo, -1)
    if bias:
        a = torch.cat([a, torch.ones(a.shape[0], 1)], dim=1)
    A = a.T @ a / 5
    dr = d.permute(0, 2, 3, 1).reshape(-1, 3)
    G = dr.T @ dr / (5 * ho * wo)
    b = _block(one_refresh(model, x, y), conv)
    torch.testing.assert_close(b.A_bar, A, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(b.G_bar, G, rtol=1e-12, atol=1e-14)


def test_mc_fisher_gaussian_likelihood_samples_unit_variance_targets():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    x, y = torch.randn(20, 3), torch.randn(20, 2)
    with torch.no_grad():
        h = model(x)
    noise = torch.randn(h.shape, generator=torch.Generator().manual_seed(11))
    outs = {}
    hook = model[2].register_forward_hook(lambda m, i, o: outs.__setitem__("z", o) or None)
    out = model(x)
    hook.remove()
    (delta,) = torch.autograd.grad(0.5 * (out - (h + noise)).square().sum(), [outs["z"]])
    opt = KFAC(model, lr=1e-3, fisher="mc", likelihood="gaussian", seed=11, kl_clip=None)
    opt.zero_grad()
    (0.5 * (model(x) - y).square().sum(1).mean()).backward()
    opt.step()
    torch.testing.assert_close(_block(opt, model[2]).G_bar, delta.T @ delta / 20, rtol=1e-12,
                               atol=1e-14)


def _tied_models():
    torch.manual_seed(0)
    a, b = nn.Linear(6, 6), nn.Linear(6, 6)
    b.weight = a.weight  # two layers, one weight
    linear = nn.Sequential(a, nn.Tanh(), b, nn.Tanh(), nn.Linear(6, 3))
    emb, out = nn.Embedding(3, 6), nn.Linear(6, 3, bias=False)
    out.weight = emb.weight  # tied embedding and output layer
    lm = nn.Sequential(emb, nn.Tanh(), out)
    return linear, lm


def test_a_shared_tensor_is_in_exactly_one_block():
    linear, lm = _tied_models()
    with pytest.warns(UserWarning, match="layer '2' is shared with an earlier layer"):
        opt = KFAC(linear, update_freq=1)
    slots = sorted(i for slot in opt.engine.slots for i in slot)
    assert slots == list(range(len(opt._params)))  # each tensor once
    kinds = {b.name: type(b).__name__ for b in opt.engine.blocks}
    assert kinds == {"0": "KroneckerBlock", "4": "KroneckerBlock", "2.bias": "DiagonalBlock"}
    opt = KFAC(lm, update_freq=1)  # the embedding is diagonal anyway: no warning, no clash
    assert [type(b).__name__ for b in opt.engine.blocks] == ["KroneckerBlock"]
    assert sorted(i for slot in opt.engine.slots for i in slot) == [0]


def test_tied_weights_step_is_the_first_layers_block_applied_to_the_whole_gradient():
    linear, _ = _tied_models()
    linear = linear.double()
    x = torch.randn(32, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (32,))
    with pytest.warns(UserWarning):
        opt = KFAC(linear, update_freq=1, fisher="empirical", kl_clip=None, lr=0.1,
                   weight_decay=0.0)
    w = linear[0].weight
    before = w.detach().clone()
    opt.zero_grad()
    F.cross_entropy(linear(x), y).backward()
    grad = torch.cat([w.grad, linear[0].bias.grad.unsqueeze(1)], dim=1)  # both uses summed
    opt.step()
    block = opt.engine.blocks[0]
    a, g = block.A_bar, block.G_bar
    eye_a, eye_g = torch.eye(a.shape[0], dtype=a.dtype), torch.eye(g.shape[0], dtype=g.dtype)
    fisher = torch.kron(a, g) + opt.param_groups[0]["damping"] * torch.kron(eye_a, eye_g)
    d = torch.linalg.solve(fisher, grad.T.reshape(-1)).reshape(grad.shape[1], -1).T
    torch.testing.assert_close(w.detach(), before - 0.1 * d[:, :-1], rtol=1e-10, atol=1e-12)
