"""Preconditioner mode: a rule's direction applied by a torch optimizer.

Under ``torch.optim.SGD`` the steps equal the optimizer mode's (momentum 0 with a varying
lr; momentum μ against the rule's own ``momentum=μ`` at a constant lr); under AdamW the Q
recursion is checked against the full-history reference (eq. 28) anchored at the steps
AdamW actually took, read from the parameters.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import lr_scheduler

import kldwrm
from kldwrm import KFAC, QKLDWRM, Preconditioner, reference

from .test_propositions import DAMPING, STEPS, WD, _assert_steps_equal, _exact_fisher, _mlp

RULES = ["kfac", "so", "q", "qe"]
QE = dict(window=2, inner_steps=2, inner_lr=0.01)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _batch(k):
    gen = torch.Generator().manual_seed(k)
    return (torch.randn(16, 6, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (16,), generator=gen))


def _train(model, opt, ks, sched=None):
    steps = []
    for k in ks:
        x, y = _batch(k)
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()
        steps.append(torch.cat([(p.detach() - b).reshape(-1)
                                for p, b in zip(model.parameters(), before, strict=True)]))
    return steps


def _rule_kwargs(name):
    return dict(update_freq=3, rho=0.6, **(QE if name == "qe" else {}))


def _schedule(k):
    return 1.0 if k < 4 else (0.5 if k < 7 else 0.8)


@pytest.mark.parametrize("name", RULES)
def test_under_sgd_without_momentum_it_is_the_optimizer_mode(name):
    mine = _model()
    opt = kldwrm.optim.RULES[name](mine, lr=0.05, **_rule_kwargs(name))
    expected = _train(mine, opt, range(10), lr_scheduler.LambdaLR(opt, _schedule))
    wrapped = _model()
    pre = Preconditioner(wrapped, torch.optim.SGD(wrapped.parameters(), lr=0.05), name,
                         **_rule_kwargs(name))
    got = _train(wrapped, pre, range(10), lr_scheduler.LambdaLR(pre, _schedule))
    _assert_steps_equal(got, expected, tol=1e-12)


@pytest.mark.parametrize("name", RULES)
def test_sgd_momentum_is_the_rules_own_momentum(name):
    mine = _model()
    opt = kldwrm.optim.RULES[name](mine, lr=0.05, momentum=0.7, **_rule_kwargs(name))
    expected = _train(mine, opt, range(8))
    wrapped = _model()
    pre = kldwrm.make_optimizer(f"{name}+sgd", wrapped, lr=0.05, momentum=0.7,
                                **_rule_kwargs(name))
    got = _train(wrapped, pre, range(8))
    # Q and QE read the step taken, momentum included: a wake built from the rule's own
    # direction instead would drift from the optimizer mode after the first step
    _assert_steps_equal(got, expected, tol=1e-12)


def test_q_under_adamw_is_eq28_anchored_at_adamws_steps(small_mnist):
    """The rule's step ``c_k = -lr · p.grad`` (after ``step()``) is the eq. 28 minimiser
    whose wake is anchored at the steps AdamW actually took."""
    x, y = small_mnist
    model = _mlp()
    pre = Preconditioner(model, torch.optim.AdamW(model.parameters(), lr=0.01,
                                                  weight_decay=0.0),
                         "q", rho=0.6, damping=DAMPING, weight_decay=WD, update_freq=3,
                         curvature="dense", fisher="exact", kl_clip=None, block_clip=None)
    rec = {"g": [], "F": [], "B": [], "s": [], "c": []}
    F_bar = None
    for k in range(STEPS):
        xb, yb = (x, y) if k % 2 == 0 else (x.flip(0)[:200], y.flip(0)[:200])
        theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        pre.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        rec["g"].append(torch.cat([p.grad.reshape(-1) for p in model.parameters()])
                        + WD * theta)
        if k % 3 == 0:
            fresh = _exact_fisher(model, xb)
            F_bar = fresh if F_bar is None else 0.6 * F_bar + 0.4 * fresh
        F_k = fresh if k % 3 == 0 else F_bar
        pre.step()
        rec["c"].append(-0.01 * torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
        rec["s"].append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - theta)
        rec["F"].append(F_k + DAMPING * torch.eye(len(theta), dtype=torch.float64))
        rec["B"].append(F_k)
    ref = reference.q_kldwrm(rec["g"], rec["F"], rec["B"], 100.0, 0.6, taken=rec["s"])
    _assert_steps_equal(rec["c"], ref.steps)
    # AdamW's steps are not the rule's: the anchoring matters
    assert float(torch.linalg.vector_norm(rec["s"][-1] - rec["c"][-1])) > 1e-3


@pytest.mark.parametrize("name", ["kfac+adamw", "q+sgd", "qe+adam"])
def test_pairings_resume_bit_exactly_under_a_scheduler(name):
    kw = QE if name.startswith("qe") else {}

    def build(model):
        opt = kldwrm.make_optimizer(name, model, lr=0.01, update_freq=3, **kw)
        return opt, lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=20)

    model = _model()
    opt, sched = build(model)
    _train(model, opt, range(5), sched)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), sched.state_dict()))
    _train(model, opt, range(5, 10), sched)
    other = _model()
    other.load_state_dict(saved[0])
    again, again_sched = build(other)
    again.load_state_dict(saved[1])
    again_sched.load_state_dict(saved[2])
    _train(other, again, range(5, 10), again_sched)
    for p, q in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(p, q)
    assert opt.steps_taken == 10


@pytest.mark.parametrize("foreach", [False, True])
def test_a_non_finite_step_leaves_both_states_and_the_parameters(foreach):
    model = _model()
    opt = kldwrm.make_optimizer("q+adamw", model, lr=0.01, update_freq=2, foreach=foreach)
    _train(model, opt, range(3))
    params = copy.deepcopy(model.state_dict())
    state = copy.deepcopy(opt.state_dict())
    x, y = _batch(9)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    model[0].weight.grad[0, 0] = float("nan")
    with pytest.warns(kldwrm.NonFiniteGradientWarning) as caught:
        opt.step()
    assert caught[0].filename == __file__  # the warning points at the caller's step()
    assert opt.skipped_steps == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k])
    after = opt.state_dict()
    for p in state["optimizer"]["state"]:
        for key, v in state["optimizer"]["state"][p].items():
            assert torch.equal(after["optimizer"]["state"][p][key], v)
    assert after["rule"]["kldwrm"]["steps_taken"] == state["rule"]["kldwrm"]["steps_taken"]


def test_the_wrapped_optimizer_must_hold_the_models_parameters():
    model, other = _model(), _model()
    with pytest.raises(ValueError, match=r"optimizer: param_groups\[0\].*not parameters"):
        Preconditioner(model, torch.optim.SGD(other.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        Preconditioner(model, KFAC(model))
    with pytest.raises(ValueError, match="momentum belongs to the wrapped optimizer"):
        Preconditioner(model, torch.optim.SGD(model.parameters(), lr=0.1), momentum=0.9)
    with pytest.raises(ValueError, match="rule must be one of"):
        Preconditioner(model, torch.optim.SGD(model.parameters(), lr=0.1), "adam")
    with pytest.raises(ValueError, match="name must be one of"):
        kldwrm.make_optimizer("kfac+lion", model)


def test_a_zero_lr_names_the_group():
    model = _model()
    opt = Preconditioner(model, torch.optim.SGD(model.parameters(), lr=0.1), "so")
    opt.param_groups[0]["lr"] = 0.0
    x, y = _batch(0)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['lr'\] must be > 0"):
        opt.step()


def test_groups_added_later_reach_both_optimizers():
    model = _model()
    sgd = torch.optim.SGD(model[0].parameters(), lr=0.05)
    opt = Preconditioner(model, sgd, "q", update_freq=2)
    opt.add_param_group({"params": list(model[2].parameters()), "lr": 0.02})
    assert len(sgd.param_groups) == 2 and len(opt.rule.param_groups) == 2
    before = model[2].weight.detach().clone()
    _train(model, opt, range(3))
    assert not torch.equal(model[2].weight, before)
    assert opt.rule.param_groups[1]["lr"] == 0.02
    assert isinstance(opt.rule, QKLDWRM)
