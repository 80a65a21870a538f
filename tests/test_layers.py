"""``kldwrm.layers.MultiheadAttention``: ``nn.MultiheadAttention``'s outputs, parameters and
``state_dict``, with projections that get Kronecker blocks, and those blocks equal to the
ones of the same attention written with ``nn.Linear`` projections."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kldwrm import KFAC, QKLDWRM
from kldwrm.layers import MultiheadAttention, swap_attention

E, H, L, N = 8, 2, 5, 3


def _inputs(batch_first: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, L, E, generator=g, dtype=torch.float64)
    return x if batch_first else x.transpose(0, 1).contiguous()


CAUSAL = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)
PAD = torch.zeros(N, L, dtype=torch.bool)
PAD[0, -2:] = True
CALLS = {
    "plain": {},
    "causal": dict(attn_mask=CAUSAL),
    "padding": dict(key_padding_mask=PAD),
    "both, no weights": dict(attn_mask=CAUSAL, key_padding_mask=PAD, need_weights=False),
    "per-head weights": dict(attn_mask=CAUSAL, average_attn_weights=False),
    "float causal hint": dict(attn_mask=torch.zeros(L, L, dtype=torch.float64).masked_fill(
        CAUSAL, -math.inf), is_causal=True),
    "per-head mask": dict(attn_mask=CAUSAL.expand(N * H, L, L)),
}


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("call", list(CALLS))
def test_outputs_equal_torchs(call, batch_first):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(E, H, batch_first=batch_first).double()
    ours = swap_attention(copy.deepcopy(ref))
    assert type(ours) is MultiheadAttention
    assert list(ours.state_dict()) == list(ref.state_dict())
    x = _inputs(batch_first)
    a, wa = ref(x, x, x, **CALLS[call])
    b, wb = ours(x, x, x, **CALLS[call])
    torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    assert (wa is None) == (wb is None)
    if wa is not None:
        torch.testing.assert_close(wb, wa, rtol=1e-12, atol=1e-12)


def test_unbatched_and_cross_attention_equal_torchs():
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(E, H).double()
    ours = swap_attention(copy.deepcopy(ref))
    x = _inputs(False)[:, 0]
    for args in ((x, x, x), (x, x.flip(0), x.flip(0))):  # the second: cross-attention
        a, wa = ref(*args)
        b, wb = ours(*args)
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(wb, wa, rtol=1e-12, atol=1e-12)


class _Block(nn.Module):
    """Causal self-attention (``nn.MultiheadAttention``) and a read-out."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H, batch_first=True)
        self.head = nn.Linear(E, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.attn(x, x, x, attn_mask=CAUSAL, need_weights=False)
        return self.head(torch.tanh(h))


class _LinearBlock(nn.Module):
    """The same attention written with ``nn.Linear`` projections (packed q, k, v): the
    reference whose Kronecker blocks the swapped module's must equal."""

    def __init__(self, block: _Block) -> None:
        super().__init__()
        self.qkv = nn.Linear(E, 3 * E).double()
        self.out = copy.deepcopy(block.attn.out_proj)
        self.head = copy.deepcopy(block.head)
        with torch.no_grad():
            self.qkv.weight.copy_(block.attn.in_proj_weight)
            self.qkv.bias.copy_(block.attn.in_proj_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.reshape(N, L, H, E // H).transpose(1, 2)
                   for t in self.qkv(x).chunk(3, dim=-1))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=~CAUSAL)
        return self.head(torch.tanh(self.out(o.transpose(1, 2).reshape(N, L, E))))


def _pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    ours = swap_attention(_Block().double())
    return ours, _LinearBlock(ours)


def test_projections_get_kronecker_blocks():
    ours, _ = _pair()
    kinds = {name: kind for name, kind, _ in KFAC(ours).engine.describe()}
    assert kinds["attn.in_projection"] == "kronecker"
    assert kinds["attn.out_proj"] == "kronecker"
    plain = _Block()
    kinds = {name: kind for name, kind, _ in KFAC(plain).engine.describe()}
    assert "attn.in_projection" not in kinds and kinds["attn.in_proj_weight"] == "diagonal"


@pytest.mark.parametrize("cls", [KFAC, QKLDWRM])
def test_steps_equal_the_linear_attention(cls):
    """Same curvature blocks, same steps, to rounding (refresh steps included)."""
    ours, ref = _pair()
    opts = [cls(m, lr=0.05, update_freq=2, fisher="empirical") for m in (ours, ref)]
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        x = torch.randn(N, L, E, generator=g, dtype=torch.float64)
        y = torch.randint(0, 4, (N, L), generator=g)
        for m, opt in zip((ours, ref), opts, strict=True):
            opt.zero_grad()
            F.cross_entropy(m(x).reshape(-1, 4), y.reshape(-1)).backward()
            opt.step()
    torch.testing.assert_close(ours.attn.in_proj_weight, ref.qkv.weight, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours.attn.out_proj.weight, ref.out.weight, rtol=1e-10,
                               atol=1e-12)
    moved = (ours.head.weight - _pair()[0].head.weight).abs().max()
    assert moved > 1e-3
