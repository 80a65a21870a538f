"""Capture hooks: installed only on refresh steps, and the "mc" pass disturbs nothing."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kldwrm import KFAC, QKLDWRM


def _bn_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 6 * 6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3),
    )


def _n_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_exist_only_on_refresh_steps():
    model = _bn_model()
    opt = KFAC(model, update_freq=3)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    seen = []
    for _ in range(7):
        seen.append(_n_hooks(model) > 0)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert seen == [True, False, False, True, False, False, True]


@pytest.mark.parametrize("opt_cls", [KFAC, QKLDWRM])
def test_mc_pass_leaves_batchnorm_statistics_as_sgd_would(opt_cls):
    model = _bn_model()
    twin = copy.deepcopy(model)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    opt = opt_cls(model, fisher="mc", update_freq=1)
    sgd = torch.optim.SGD(twin.parameters(), lr=0.1)
    for m, o in ((model, opt), (twin, sgd)):
        o.zero_grad()
        F.cross_entropy(m(x), y).backward()
        o.step()
    for (name, b1), (_, b2) in zip(model.named_buffers(), twin.named_buffers(), strict=True):
        assert torch.equal(b1, b2), name


def test_no_grad_forward_passes_are_not_captured():
    model = _bn_model()
    opt = KFAC(model, update_freq=1, fisher="empirical")
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with torch.no_grad():  # e.g. an evaluation between backward and step
        model(torch.randn(50, 1, 8, 8))
    assert opt.engine.capture.examples == [8]
    opt.step()


def test_step_without_forward_on_refresh_step_raises_clearly():
    model = _bn_model()
    opt = KFAC(model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(RuntimeError, match="forward pass"):
        opt.step()
