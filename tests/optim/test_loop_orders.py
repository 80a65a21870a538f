"""Training-loop orders users write: the step depends only on the batches it is taken on.

* ``loss = ...; opt.zero_grad(); loss.backward(); opt.step()`` (forward before
  ``zero_grad``) must give the same steps as the ordinary order;
* a batch backpropagated and then abandoned with ``zero_grad()`` without ``step()`` (what
  a ``GradScaler`` does when it finds inf, or a loop that discards a batch) must leave no
  trace: not in the gradient, not in the curvature statistics or QE's recorded batch, not
  in the generator that samples the Monte-Carlo labels.

Checked in float64 over refresh steps and the steps between them, for every optimizer and
both Fisher estimates.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kldwrm import make_optimizer

SOLVERS = ("kfac", "so", "q", "qe")


def _model() -> nn.Module:
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 3)).double()


def _batch(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(k)
    return torch.randn(24, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (24,),
                                                                                 generator=gen)


def _train(solver: str, fisher: str, order: str, steps: int = 5) -> list[torch.Tensor]:
    model = _model()
    kw = {"window": 2, "inner_steps": 2} if solver == "qe" else {}
    opt = make_optimizer(solver, model, fisher=fisher, update_freq=2, seed=0, **kw)
    for k in range(steps):
        x, y = _batch(k)
        if order == "ordinary":
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
        elif order == "forward-first":
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
        else:  # "abandoned": a batch backpropagated, then dropped with zero_grad()
            opt.zero_grad()
            junk_x, junk_y = _batch(1000 + k)
            F.cross_entropy(model(junk_x), junk_y).backward()
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("fisher", ["mc", "empirical"])
@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("order", ["forward-first", "abandoned"])
def test_loop_order_does_not_change_the_steps(solver, fisher, order):
    expected = _train(solver, fisher, "ordinary")
    got = _train(solver, fisher, order)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-13)
