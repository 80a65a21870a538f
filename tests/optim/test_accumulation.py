"""Gradient accumulation: a step on micro-batches equals the step on their concatenation.

The usual accumulation loop weights each micro-batch's mean loss by its share of the
step's examples (``n_i / N``; ``1/K`` for equal sizes), so the accumulated gradient is that
of the mean loss over all ``N`` examples. The curvature must then see the same batch:
the empirical Fisher's per-example gradients are the recorded output gradients times
``N``, not times the micro-batch's ``n_i``. Checked in float64 for every optimizer and
block type (Kronecker for Linear and Conv2d, diagonal for LayerNorm), over refresh steps
and the steps between them, and for the dense curvature.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kldwrm import make_optimizer

SOLVERS = ("kfac", "so", "q", "qe")


def _model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 8),
        nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 4),
    ).double()


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(30, 1, 6, 6, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, 4, (30,), generator=gen)


def _train(solver: str, splits: tuple[int, ...], steps: int = 5, **kw) -> nn.Module:
    model = _model()
    opt = make_optimizer(solver, model, fisher="empirical", update_freq=2, **kw)
    for k in range(steps):
        x, y = _batch(k)
        opt.zero_grad()
        start = 0
        for n in splits:  # each micro-batch's mean loss weighted by n / N
            xs, ys = x[start:start + n], y[start:start + n]
            (F.cross_entropy(model(xs), ys) * (n / x.shape[0])).backward()
            start += n
        opt.step()
    return model


@pytest.mark.parametrize("solver", SOLVERS)
def test_accumulated_micro_batches_give_the_full_batch_step(solver):
    kw = {"window": 2, "inner_steps": 2} if solver == "qe" else {}
    full = _train(solver, (30,), **kw)
    for splits in ((15, 15), (7, 23), (10, 10, 10)):
        acc = _train(solver, splits, **kw)
        for (name, p), q in zip(full.named_parameters(), acc.parameters(), strict=True):
            torch.testing.assert_close(q, p, rtol=0, atol=1e-12, msg=f"{splits} {name}")


def test_accumulation_with_the_dense_curvature():
    full = _train("q", (30,), steps=3, curvature="dense")
    acc = _train("q", (12, 18), steps=3, curvature="dense")
    for p, q in zip(full.parameters(), acc.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-12)

