"""Activation checkpointing: a recomputed forward pass neither double-counts examples nor
shifts statistics. Every rule's steps and curvature on a checkpointed model equal those of
the same model without checkpointing (float64, refresh steps included), for
``torch.utils.checkpoint.checkpoint`` (reentrant or not), ``checkpoint_sequential`` and a
module that checkpoints its own forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

import kldwrm

pytestmark = pytest.mark.usefixtures("float64")

RULES = {
    "kfac": {},
    "so": {},
    "q": {},
    "qe": dict(window=2, inner_steps=2, inner_lr=0.05),
}


class _Middle(nn.Module):
    """Linear + LayerNorm + conv-free middle, optionally checkpointing its own forward."""

    def __init__(self, checkpoint_self: bool | None = None) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.checkpoint_self = checkpoint_self

    def _body(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(torch.tanh(self.lin(h)))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.checkpoint_self is None:
            return self._body(h)
        return checkpoint(self._body, h, use_reentrant=self.checkpoint_self)


class _Net(nn.Module):
    """conv → middle → (linear, tanh) ×2 → head; ``mode`` says how the middle is run."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.conv = nn.Conv1d(2, 2, 3, padding=1)
        self.inp = nn.Linear(10, 8)
        self.middle = _Middle({"self": False, "self-reentrant": True}.get(mode))
        self.seq = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(self.conv(x).flatten(1)))
        if self.mode in ("reentrant", "non-reentrant"):
            h = checkpoint(self.middle, h, use_reentrant=self.mode == "reentrant")
        else:
            h = self.middle(h)
        if self.mode.startswith("sequential"):
            h = checkpoint_sequential(self.seq, 2, h, use_reentrant=self.mode.endswith("re"))
        else:
            h = self.seq(h)
        return self.head(h)


MODES = ["non-reentrant", "reentrant", "sequential", "sequential-re", "self", "self-reentrant"]


def _train(mode: str, rule: str, fisher: str, micro: int = 1, steps: int = 5):
    torch.manual_seed(0)
    net = _Net(mode)
    opt = kldwrm.make_optimizer(rule, net, lr=0.1, update_freq=2, fisher=fisher, seed=3,
                                **RULES[rule])
    g = torch.Generator().manual_seed(4)
    for _ in range(steps):
        x = torch.randn(12, 2, 5, generator=g)
        y = torch.randint(0, 3, (12,), generator=g)
        opt.zero_grad()
        for xs, ys in zip(x.chunk(micro), y.chunk(micro), strict=True):
            (F.cross_entropy(net(xs), ys) / micro).backward()
        opt.step()
    return net, opt


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    with torch.no_grad():
        return max(float((p - q).abs().max())
                   for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("fisher", ["mc", "empirical"])
@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("mode", ["non-reentrant", "reentrant"])
def test_checkpointed_steps_and_curvature_equal_the_plain_model(mode, rule, fisher):
    plain, opt_plain = _train("plain", rule, fisher)
    net, opt = _train(mode, rule, fisher)
    torch.manual_seed(0)
    start = _Net("plain")
    assert _max_diff(plain, start) > 1e-2  # the runs moved
    assert _max_diff(net, plain) <= 1e-12
    for b, c in zip(opt.engine.blocks, opt_plain.engine.blocks, strict=True):
        for key, t in c.state_dict().items():
            torch.testing.assert_close(b.state_dict()[key], t, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("mode", ["sequential", "sequential-re", "self", "self-reentrant"])
@pytest.mark.parametrize("rule", ["kfac", "q"])
def test_checkpoint_sequential_and_self_checkpointing_modules(mode, rule):
    for fisher in ("mc", "empirical"):
        plain, _ = _train("plain", rule, fisher)
        net, _ = _train(mode, rule, fisher)
        assert _max_diff(net, plain) <= 1e-12


@pytest.mark.parametrize("mode", ["non-reentrant", "reentrant"])
def test_checkpointing_with_gradient_accumulation(mode):
    """Three micro-batches per step: each recomputation is matched to its own call."""
    for fisher in ("mc", "empirical"):
        plain, _ = _train("plain", "q", fisher, micro=3)
        net, _ = _train(mode, "q", fisher, micro=3)
        assert _max_diff(net, plain) <= 1e-12


def test_reentrant_mc_leaves_the_parameters_gradients_alone():
    """The sampled-label backward through a reentrant checkpoint is a plain backward; the
    gradients it accumulates are taken away again, so ``.grad`` holds the user's alone."""
    torch.manual_seed(0)
    net = _Net("reentrant")
    plain = _Net("plain")
    plain.load_state_dict(net.state_dict())
    opt = kldwrm.KFAC(net, update_freq=1, fisher="mc")  # armed for the next forward pass
    x, y = torch.randn(6, 2, 5), torch.randint(0, 3, (6,))
    F.cross_entropy(net(x), y).backward()
    F.cross_entropy(plain(x), y).backward()
    assert opt.engine.capture.deltas  # the labels were sampled
    for p, q in zip(net.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)
