"""The clipped step (DESIGN section 3) against its formulas, computed here independently:
``ν = min(1, √(κ / |Σ_i lr_i² d_iᵀu_i|))``, ``c_i = min(1, β / RMS(d_i))`` and
``s_i = −lr_i·ν·c_i·d_i`` (a left-out tensor has ``lr_i = 0``), and for a direction
whose squared norm overflows float32 (the block clip still scales it to RMS β)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kldwrm.optim import QKLDWRM


def _opt(**kw) -> tuple[QKLDWRM, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    return QKLDWRM(model, lr=0.1, **kw), list(model.parameters())


@pytest.mark.parametrize("left", [(), (3,)])
def test_clipped_step_equals_its_formulas(left):
    opt, params = _opt(kl_clip=1e-3, block_clip=0.5)
    gen = torch.Generator().manual_seed(1)
    d = [torch.randn(p.shape, generator=gen) * (i + 1) for i, p in enumerate(params)]
    u = [torch.randn(p.shape, generator=gen) for p in params]
    opt._left = {i: {} for i in left}
    opt._step_vectors = (None, u, None)  # Q's KL terms: the direction and ĝ
    own = [di.clone() for di in d]  # the rule's own direction: scaled in place
    steps = opt._clipped_step(own, u)
    assert all(si is oi for si, oi in zip(steps, own, strict=True))
    lrs = [0.0 if i in left else opt._lr(i) for i in range(len(params))]
    vdotu = sum(lr * lr * float((di.double() * ui.double()).sum())
                for lr, di, ui in zip(lrs, d, u, strict=True))
    nu = min(1.0, math.sqrt(1e-3 / abs(vdotu)))
    assert opt.last_kl_scale == pytest.approx(nu, rel=1e-6)
    assert nu < 1.0  # the KL clip binds
    for lr, di, si in zip(lrs, d, steps, strict=True):
        rms = float(di.double().pow(2).mean().sqrt())
        c = min(1.0, 0.5 / rms)
        torch.testing.assert_close(si.double(), -lr * nu * c * di.double(), rtol=1e-6, atol=0)
    assert any(min(1.0, 0.5 / float(di.double().pow(2).mean().sqrt())) < 1.0 for di in d)


def test_block_clip_of_a_direction_whose_squared_norm_overflows_float32():
    opt, params = _opt(kl_clip=None, block_clip=2.0)
    d = [torch.full(p.shape, 1e25) for p in params]  # ‖d‖² = numel·1e50 > float32's max
    assert not math.isfinite(float(torch.dot(d[0].reshape(-1), d[0].reshape(-1))))
    steps = opt._clipped_step([di.clone() for di in d], d)
    for i, s in enumerate(steps):  # RMS(s) = lr·2 exactly (every entry equal)
        torch.testing.assert_close(s, torch.full_like(s, -opt._lr(i) * 2.0), rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", ["kfac", "so", "q", "q-rank"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_the_kl_clip_is_the_finite_check_between_refreshes(name, bad, monkeypatch):
    """Between refreshes no separate pass checks the gradients (``all_finite`` is not
    called); a non-finite one is still found, by the KL clip's dot products, and the step is
    skipped with the parameters and the optimizer state as they were."""
    import copy
    import warnings

    import torch.nn.functional as F

    import kldwrm
    import kldwrm.optim.base as base

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    rule, kw = (name, {}) if name != "q-rank" else ("q", {"rank": 3})
    opt = kldwrm.make_optimizer(rule, model, lr=0.05, update_freq=4, **kw)
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen))
               for _ in range(3)]
    calls = []
    monkeypatch.setattr(base, "all_finite", lambda ts: calls.append(1) or True)
    for x, y in batches[:2]:  # a refresh, then an ordinary step
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert len(calls) == 1  # the refresh's check only
    monkeypatch.undo()
    params = copy.deepcopy(model.state_dict())
    state = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    F.cross_entropy(model(batches[2][0]), batches[2][1]).backward()
    model[2].weight.grad[1, 2] = bad
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    assert [w.filename for w in caught] == [__file__]  # points at the caller's step()
    assert opt.skipped_steps == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k])
    after = opt.state_dict()
    after["kldwrm"]["skipped_steps"] -= 1
    torch.testing.assert_close(after, state, rtol=0, atol=0)
