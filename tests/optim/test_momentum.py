"""Momentum as a param-group key: ``s_k = μ s_{k-1} + c_k`` (Martens & Grosse 2015, sec. 7).

Checked against the full-history references of :mod:`kldwrm.reference` in dense float64
mode (as ``test_propositions``): ``c_k`` is K-FAC's and SO's closed-form step, and for Q the
minimiser of eq. 28 whose wake is anchored at the steps actually taken (momentum included).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import lr_scheduler

import kldwrm
from kldwrm import KFAC, QKLDWRM, SOKLDWRM, reference

from .test_propositions import _assert_steps_equal, _run, _varying

MU = 0.7


def _with_momentum(minimisers, mu=MU):
    out, prev = [], None
    for r in minimisers:
        prev = r if prev is None else r + mu * prev
        out.append(prev)
    return out


@pytest.mark.parametrize("update_freq", [1, 3])
def test_kfac_momentum_adds_mu_times_the_previous_step(small_mnist, update_freq):
    rec, _ = _run(KFAC, small_mnist, update_freq=update_freq, rho=0.8, kl_clip=None,
                  lr_schedule=lambda k: 1.0, momentum=MU)
    ref = reference.woqm(rec["g"], rec["F"], rec["lam"][0], 0.8)
    _assert_steps_equal(rec["s"], _with_momentum(ref.steps))


def test_so_momentum_keeps_prop_4_1(small_mnist):
    rec, _ = _run(SOKLDWRM, small_mnist, update_freq=3, rho=0.6, kl_clip=None,
                  lr_schedule=_varying, momentum=MU)
    ref = reference.so_kldwrm(rec["g"], rec["F"], rec["lam"], 0.6)
    _assert_steps_equal(rec["s"], _with_momentum(ref.steps))


@pytest.mark.parametrize("update_freq", [1, 3])
def test_q_wake_is_anchored_at_the_steps_taken_with_momentum(small_mnist, update_freq):
    rec, _ = _run(QKLDWRM, small_mnist, update_freq=update_freq, rho=0.6, kl_clip=None,
                  block_clip=None, lr_schedule=_varying, momentum=MU)
    ref = reference.q_kldwrm(rec["g"], rec["F"], rec["B"], rec["lam"], 0.6, taken=rec["s"])
    _assert_steps_equal(rec["s"], _with_momentum(ref.steps))
    # a recursion that ignored the momentum in its wake would not match
    free = reference.q_kldwrm(rec["g"], rec["F"], rec["B"], rec["lam"], 0.6)
    assert float(torch.linalg.vector_norm(free.steps[-1] - ref.steps[-1])) > 1e-6


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _batch(k):
    gen = torch.Generator().manual_seed(k)
    return (torch.randn(16, 6, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (16,), generator=gen))


def _train(model, opt, ks, sched=None):
    for k in ks:
        x, y = _batch(k)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()


@pytest.mark.parametrize("name", ["kfac", "so", "q", "qe"])
def test_one_cycle_lr_cycles_the_momentum_and_resumes_bit_exactly(name):
    kw = dict(window=2, inner_steps=2, inner_lr=0.01) if name == "qe" else {}
    model = _model()
    opt = kldwrm.make_optimizer(name, model, lr=0.05, update_freq=3, **kw)
    sched = lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=20)  # cycle_momentum=True
    _train(model, opt, range(6), sched)
    assert 0.85 <= opt.param_groups[0]["momentum"] < 0.95
    assert all("momentum_buffer" in opt.state[p] for p in model.parameters())
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()),
             copy.deepcopy(sched.state_dict()))
    _train(model, opt, range(6, 12), sched)

    other = _model()
    other.load_state_dict(saved[0])
    again = kldwrm.make_optimizer(name, other, lr=0.05, update_freq=3, **kw)
    again_sched = lr_scheduler.OneCycleLR(again, max_lr=0.05, total_steps=20)
    again.load_state_dict(saved[1])
    again_sched.load_state_dict(saved[2])
    _train(other, again, range(6, 12), again_sched)
    for p, q in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(p, q)


def test_zero_momentum_keeps_no_buffer():
    model = _model()
    opt = KFAC(model)
    _train(model, opt, range(2))
    assert not any("momentum_buffer" in st for st in opt.state.values())


def test_bad_momentum_names_the_argument():
    with pytest.raises(ValueError, match="momentum must be in"):
        KFAC(_model(), momentum=-0.1)
    model = _model()
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['momentum'\]"):
        QKLDWRM(model, params=[{"params": model[0].parameters()},
                               {"params": model[2].parameters(), "momentum": 1.0}])
