"""``g_k`` is ``p.grad`` itself when there is no weight decay to add (no copy; these tests
train with ``weight_decay=0``): a step
must leave every ``p.grad`` as the backward left it, and no state may keep a reference
that the next backward overwrites. So ``zero_grad(set_to_none=False)`` (the next backward
accumulates into the same tensors in place) trains bit for bit like the default."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kldwrm

pytestmark = pytest.mark.usefixtures("float64")

CONFIGS = {
    "kfac": ("kfac", {}),
    "so": ("so", {}),
    "q": ("q", {}),
    "qe": ("qe", dict(window=2, inner_steps=2, inner_lr=0.05)),
    "so-rank": ("so", dict(rank=3)),
    "q-rank": ("q", dict(rank=3)),
    "kfac-adaptive-momentum": ("kfac", dict(curvature="adaptive", momentum=0.9)),
    "q-adaptive": ("q", dict(curvature="adaptive")),
    "so+adamw": ("so+adamw", {}),
}


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                         nn.Linear(8, 3))


def _train(name: str, kw: dict, set_to_none: bool, check: bool) -> list[torch.Tensor]:
    model = _model()
    opt = kldwrm.make_optimizer(name, model, **{"lr": 0.05, "update_freq": 3,
                                                "fisher": "empirical", "weight_decay": 0.0,
                                                **kw})
    for k in range(8):
        gen = torch.Generator().manual_seed(100 + k)
        x, y = torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)
        opt.zero_grad(set_to_none=set_to_none)
        F.cross_entropy(model(x), y).backward()
        before = [(p.grad, p.grad.clone()) for p in model.parameters()]
        opt.step()
        if check and "+" not in name:  # a pairing hands the wrapped optimizer new p.grad
            for p, (grad, copy) in zip(model.parameters(), before, strict=True):
                assert p.grad is grad and torch.equal(grad, copy)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_a_step_leaves_the_gradients_as_they_were(config):
    name, kw = CONFIGS[config]
    _train(name, kw, set_to_none=True, check=True)


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_gradients_zeroed_in_place_train_like_fresh_ones(config):
    name, kw = CONFIGS[config]
    fresh = _train(name, kw, set_to_none=True, check=False)
    in_place = _train(name, kw, set_to_none=False, check=False)
    for a, b in zip(fresh, in_place, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(fresh[0], _model()[0].weight.detach())  # it trained
