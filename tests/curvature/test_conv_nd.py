"""KFC blocks of ``nn.Conv1d`` and ``nn.Conv3d`` (and any padding mode), against explicit
patches cut out of the padded input one output position at a time (float64)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kldwrm import KFAC, QKLDWRM, SOKLDWRM
from kldwrm.curvature import KroneckerBlock
from kldwrm.optim.qe import QEKLDWRM

from .helpers import one_refresh, record, train_losses

pytestmark = pytest.mark.usefixtures("float64")


def _explicit_factors(conv, a, d):
    """A from patches of the padded input at every output position, Γ from δ's rows."""
    n, c = a.shape[:2]
    dims = a.dim() - 2
    pad = conv._reversed_padding_repeated_twice
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = F.pad(a, pad, mode=mode)
    out_shape = d.shape[2:]
    rows = []
    for pos in itertools.product(*(range(o) for o in out_shape)):
        index = [slice(None), slice(None)]
        for i in range(dims):
            start = pos[i] * conv.stride[i]
            stop = start + conv.dilation[i] * (conv.kernel_size[i] - 1) + 1
            index.append(slice(start, stop, conv.dilation[i]))
        rows.append(xp[tuple(index)].reshape(n, -1))
    patches = torch.stack(rows, dim=1).reshape(n * len(rows), -1)
    if conv.bias is not None:
        patches = torch.cat([patches, torch.ones(patches.shape[0], 1)], dim=1)
    dr = d.movedim(1, -1).reshape(-1, d.shape[1])
    return patches.T @ patches / n, dr.T @ dr / dr.shape[0]


CONVS = [
    ("conv1d", lambda: nn.Conv1d(2, 3, 3, stride=2, padding=1, dilation=2), (5, 2, 11)),
    ("conv1d-same-reflect", lambda: nn.Conv1d(2, 3, 4, padding="same", padding_mode="reflect"),
     (4, 2, 9)),
    ("conv2d-circular", lambda: nn.Conv2d(2, 3, (3, 2), padding=(1, 2), padding_mode="circular"),
     (3, 2, 5, 6)),
    ("conv3d", lambda: nn.Conv3d(2, 3, (2, 3, 2), stride=(1, 2, 1), padding=(1, 0, 1),
                                 bias=False), (3, 2, 4, 5, 3)),
    ("conv3d-replicate", lambda: nn.Conv3d(1, 2, 2, padding=1, padding_mode="replicate"),
     (2, 1, 3, 3, 3)),
]


@pytest.mark.parametrize(("name", "make", "shape"), CONVS, ids=[c[0] for c in CONVS])
def test_conv_nd_factors_equal_explicit_patches(name, make, shape):
    torch.manual_seed(0)
    conv = make()
    x = torch.randn(*shape)
    with torch.no_grad():
        features = conv(x).flatten(1).shape[1]
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(features, 4))
    y = torch.randint(0, 4, (shape[0],))
    ins, grads = record(model, [conv], x, y)
    a, d = ins[conv], grads[conv]
    A, G = _explicit_factors(conv, a, d)
    block = next(b for b in one_refresh(model, x, y).engine.blocks if b.module is conv)
    assert isinstance(block, KroneckerBlock)
    torch.testing.assert_close(block.A_bar, A, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(block.G_bar, G, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("conv_cls,dims", [(nn.Conv1d, 1), (nn.Conv3d, 3)])
def test_pointwise_conv_on_one_position_gives_the_linear_block(conv_cls, dims):
    torch.manual_seed(1)
    lin = nn.Sequential(nn.Linear(4, 3))
    conv = nn.Sequential(conv_cls(4, 3, 1), nn.Flatten())
    with torch.no_grad():
        conv[0].weight.copy_(lin[0].weight.reshape(3, 4, *([1] * dims)))
        conv[0].bias.copy_(lin[0].bias)
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    bl = next(b for b in one_refresh(lin, x, y).engine.blocks if b.module is lin[0])
    bc = next(b for b in one_refresh(conv, x.reshape(10, 4, *([1] * dims)), y).engine.blocks
              if b.module is conv[0])
    torch.testing.assert_close(bc.A_bar, bl.A_bar, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(bc.G_bar, bl.G_bar, rtol=1e-13, atol=1e-15)


def test_grouped_convolutions_get_diagonal_blocks():
    model = nn.Sequential(nn.Conv1d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(8, 2))
    kinds = {b.name: b.kind for b in KFAC(model).engine.blocks}
    assert kinds["0.weight"] == "diagonal" and kinds["2"] == "kronecker"


@pytest.mark.parametrize("cls", [KFAC, SOKLDWRM, QKLDWRM, QEKLDWRM])
def test_conv1d_model_trains(cls):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv1d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool1d(2),
                          nn.Conv1d(6, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6, 3))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 1, 16, generator=g)
    y = (x[:, 0, :8].mean(1) > x[:, 0, 8:].mean(1)).long() + (x[:, 0].std(1) > 1).long()
    kw = dict(window=2, inner_steps=2, inner_lr=0.02) if cls is QEKLDWRM else {}
    opt = cls(model, lr=0.05, update_freq=3, **kw)
    assert [b.kind for b in opt.engine.blocks] == ["kronecker"] * 3
    losses = train_losses(model, opt, x, y, 15)
    assert all(map(math.isfinite, losses)) and losses[-1] < 0.8 * losses[0], losses
