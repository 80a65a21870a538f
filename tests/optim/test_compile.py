"""``torch.compile``: an optimizer built on a compiled model trains it as on the plain one.

The capture hooks come and go with the refresh steps (eq. 20), so dynamo recompiles around
them; the steps must still equal the eager ones. ``aot_eager`` traces the same graphs as
the default backend without needing a C++ compiler.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kldwrm import make_optimizer


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.LayerNorm(16), nn.Linear(16, 3))


@pytest.mark.parametrize("solver", ["kfac", "q"])
def test_compiled_model_trains_like_the_eager_one(solver):
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    final = []
    for compiled in (False, True):
        model = _model()
        net = torch.compile(model, backend="aot_eager") if compiled else model
        opt = make_optimizer(solver, net, update_freq=2, seed=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # dynamo's notes on the hooks it cannot trace
            for _ in range(5):
                opt.zero_grad()
                F.cross_entropy(net(x), y).backward()
                opt.step()
        assert opt.engine.blocks[0].A_bar is not None  # the curvature was captured
        final.append([p.detach().clone() for p in model.parameters()])
    for eager, comp in zip(*final, strict=True):
        torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-6)
