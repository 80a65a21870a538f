"""π-split damping and Levenberg-Marquardt adaptive damping, against dense float64 references.

π-split: every system a rule solves with a Kronecker block is ``e Ā⊗Γ̄ + f A⊗Γ + D_γ`` with
``D_γ = (Ā + π√γ I)⊗(Γ̄ + √γ/π I) − Ā⊗Γ̄`` (Martens & Grosse 2015, section 6.3), checked
here against ``torch.kron`` of the stored factors. Levenberg-Marquardt: the reduction ratio
is recomputed from an independent evaluation of the loss, autograd's gradient and the dense
Kronecker curvature, and the damping follows M&G's rule (section 6.5).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kldwrm import KFAC, QEKLDWRM, QKLDWRM, SOKLDWRM
from kldwrm.optim import Preconditioner
from kldwrm.optim.damping import LevenbergMarquardt

DAMPING, WD = 1e-2, 1e-3


def _kron_mlp() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(49, 12), nn.Tanh(), nn.Linear(12, 10)).double()


def _pi_terms(b, gamma: float) -> tuple[float, float]:
    """``(π√γ, √γ/π)`` from the block's factors, computed here from their traces."""
    pi = math.sqrt((torch.trace(b.A_bar) / b.A_bar.shape[0])
                   / (torch.trace(b.G_bar) / b.G_bar.shape[0]))
    return float(pi) * math.sqrt(gamma), math.sqrt(gamma) / float(pi)


def _dense_split(b, gamma: float, e: float = 1.0, f: float = 0.0) -> torch.Tensor:
    """``e Ā⊗Γ̄ + f A⊗Γ + (Ā + aI)⊗(Γ̄ + bI) − Ā⊗Γ̄`` in column-major ``vec`` order."""
    a, c = _pi_terms(b, gamma)
    eye_a = torch.eye(b.A_bar.shape[0], dtype=torch.float64)
    eye_g = torch.eye(b.G_bar.shape[0], dtype=torch.float64)
    M = (e - 1.0) * torch.kron(b.A_bar, b.G_bar) + torch.kron(b.A_bar + a * eye_a,
                                                              b.G_bar + c * eye_g)
    if f:
        M = M + f * torch.kron(b.A_fresh, b.G_fresh)
    return M


def _vec(W: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.cat([W, bias[:, None]], 1).T.reshape(-1)


def _unvec(v: torch.Tensor, out: int) -> torch.Tensor:
    return v.reshape(-1, out).T


def test_pi_split_block_algebra_against_dense(small_mnist):
    """solve, matvec and the eigenvalues of every (e, f, γ) a rule uses."""
    x, y = small_mnist
    model = _kron_mlp()
    opt = KFAC(model, damping=DAMPING, damping_split="pi", kl_clip=None)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    b = opt.engine.blocks[1]
    b.factors.A_fresh, b.factors.G_fresh = b.A_bar * 0.5 + 0.01, b.G_bar * 2.0  # any SPD pair
    torch.manual_seed(3)
    V = [torch.randn(10, 12, dtype=torch.float64), torch.randn(10, dtype=torch.float64)]
    v = _vec(*V)
    for e, f, gamma in [(1.0, 0.0, DAMPING), (1.7, 0.0, 0.3), (1.0, 2.0, DAMPING)]:
        M = _dense_split(b, gamma, e, f)
        got = b.matvec(V, gamma, e, f)
        torch.testing.assert_close(_vec(*got), M @ v, rtol=1e-12, atol=1e-14)
        sol = b.solve(V, gamma, e, f)
        rel = torch.linalg.vector_norm(M @ _vec(*sol) - v) / torch.linalg.vector_norm(v)
        assert rel <= (1e-12 if f == 0.0 else 1e-6), (e, f, rel)
        if f == 0.0:
            ev = torch.linalg.eigvalsh(M)
            mine = torch.sort(torch.cat([t.reshape(-1) for t in b.eigenvalues(e, gamma)]))[0]
            torch.testing.assert_close(mine, ev, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", [KFAC, SOKLDWRM])
def test_pi_split_steps_against_dense(small_mnist, cls):
    """K-FAC's and SO's steps are ``-lr [(Ā + aI)⊗(Γ̄ + bI)]⁻¹ u`` per Kronecker block."""
    x, y = small_mnist
    model = _kron_mlp()
    opt = cls(model, lr=0.1, damping=DAMPING, damping_split="pi", kl_clip=None,
              update_freq=2)
    prev_g = None
    for k in range(4):
        opt.zero_grad()
        F.cross_entropy(model(x[40 * k: 40 * k + 120]), y[40 * k: 40 * k + 120]).backward()
        g = [p.grad + WD * p.detach() for p in model.parameters()]
        u = g if cls is KFAC or prev_g is None else [
            gi - opt.rho * pg for gi, pg in zip(g, prev_g, strict=True)]
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        for li, b in zip((0, 2), opt.engine.blocks, strict=True):
            expected = -0.1 * torch.linalg.solve(_dense_split(b, DAMPING),
                                                 _vec(u[li], u[li + 1]))
            W, bias = (p.detach() - q for p, q in zip(
                model[li].parameters(), before[li:li + 2], strict=True))
            torch.testing.assert_close(_vec(W, bias), expected, rtol=1e-9, atol=1e-13)
        prev_g = g


def test_pi_split_q_wake_follows_eq30(small_mnist):
    """Q's stored wake is ĝ − g + λ (Ā⊗Γ̄ + D_γ) s, refresh and in-between steps."""
    x, y = small_mnist
    model = _kron_mlp()
    params = list(model.parameters())
    opt = QKLDWRM(model, lr=0.1, update_freq=3, damping_split="pi", kl_clip=None,
                  block_clip=None)
    for k in range(6):
        opt.zero_grad()
        F.cross_entropy(model(x[32 * k: 32 * k + 96]), y[32 * k: 32 * k + 96]).backward()
        g = [p.grad + WD * p.detach() for p in params]
        if k == 0:
            ghat = g
        else:
            wake = opt.engine.from_eigenbasis([opt.state[p]["wake"] for p in params])
            ghat = [gi + opt.rho * wi for gi, wi in zip(g, wake, strict=True)]
        before = [p.detach().clone() for p in params]
        opt.step()
        s = [p.detach() - q for p, q in zip(params, before, strict=True)]
        got = opt.engine.from_eigenbasis([opt.state[p]["wake"] for p in params])
        for li, b in zip((0, 2), opt.engine.blocks, strict=True):
            fs = _unvec(_dense_split(b, opt.param_groups[0]["damping"])
                        @ _vec(s[li], s[li + 1]), s[li].shape[0])
            expected = [ghat[li] - g[li] + fs[:, :-1] / 0.1,
                        ghat[li + 1] - g[li + 1] + fs[:, -1] / 0.1]
            for a, e in zip(got[li:li + 2], expected, strict=True):
                torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12)


def test_pi_split_off_is_bit_identical(small_mnist):
    x, y = small_mnist
    runs = []
    for kw in ({}, {"damping_split": "tikhonov"}):
        model = _kron_mlp()
        opt = QKLDWRM(model, lr=0.1, update_freq=2, **kw)
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        runs.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert torch.equal(*runs)


@pytest.mark.parametrize("kwargs,match", [
    ({"damping_split": "even"}, "damping_split"),
    ({"damping_split": "pi", "rank": 4}, "damping_split"),
    ({"damping_split": "pi", "curvature": "adaptive"}, "damping_split"),
    ({"adaptive_damping": 0}, "adaptive_damping"),
    ({"adaptive_damping": 2.5}, "adaptive_damping"),
    ({"adaptive_damping": True}, "adaptive_damping"),
])
def test_bad_damping_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KFAC(_kron_mlp(), **kwargs)


def test_bad_damping_arguments_of_q_and_qe():
    with pytest.raises(ValueError, match="damping_split"):
        QKLDWRM(_kron_mlp(), damping_split="pi", q_solve="augmented")
    with pytest.raises(ValueError, match="damping_split"):
        QEKLDWRM(_kron_mlp(), damping_split="pi")


@pytest.mark.parametrize("kwargs,match", [
    ({"every": 0}, "adaptive_damping.every"),
    ({"decay": 1.0}, "adaptive_damping.decay"),
    ({"min_damping": 0.0}, "adaptive_damping.min_damping"),
    ({"min_damping": 1.0, "max_damping": 0.1}, "min_damping must be <= max_damping"),
    ({"low": 0.8, "high": 0.7}, "low < high"),
])
def test_bad_levenberg_marquardt_constants(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LevenbergMarquardt(**kwargs)


def test_levenberg_marquardt_rule():
    """M&G section 6.5 with ω = (19/20)^T: up by 1/ω below ¼, down by ω above ¾."""
    lm = LevenbergMarquardt(every=5, min_damping=1e-4, max_damping=1.0)
    omega = 0.95**5
    assert lm.adjust(0.1, 0.9) == pytest.approx(0.1 * omega, rel=1e-15)
    assert lm.adjust(0.1, 0.1) == pytest.approx(0.1 / omega, rel=1e-15)
    assert lm.adjust(0.1, -3.0) == pytest.approx(0.1 / omega, rel=1e-15)
    assert lm.adjust(0.1, 0.5) == 0.1
    assert lm.adjust(0.1, math.nan) == 0.1
    assert lm.adjust(1e-4, 0.9) == 1e-4 and lm.adjust(0.99, 0.0) == 1.0


def _closure(opt, model, x, y):
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        if torch.is_grad_enabled():
            loss.backward()
        return loss
    return closure


@pytest.mark.parametrize("cls", [KFAC, QKLDWRM])
def test_reduction_ratio_against_an_independent_evaluation(small_mnist, cls):
    """ρ = [h(θ+s) − h(θ)] / [gᵀs + ½ sᵀ(Ā⊗Γ̄ + ηI)s], h = loss + (η/2)‖θ‖², every step."""
    x, y = small_mnist
    model = _kron_mlp()
    opt = cls(model, lr=0.3, damping=DAMPING, adaptive_damping=1, kl_clip=None,
              update_freq=2)
    seen = set()
    for k in range(5):
        xb, yb = x[40 * k: 40 * k + 120], y[40 * k: 40 * k + 120]
        twin = copy.deepcopy(model)
        loss0 = F.cross_entropy(twin(xb), yb)
        grads = torch.autograd.grad(loss0, list(twin.parameters()))
        theta = [p.detach().clone() for p in twin.parameters()]
        gamma = opt.param_groups[0]["damping"]
        opt.step(_closure(opt, model, xb, yb))
        s = [p.detach() - t for p, t in zip(model.parameters(), theta, strict=True)]
        with torch.no_grad():
            loss1 = F.cross_entropy(model(xb), yb)
        sq = sum(float((t + si).square().sum() - t.square().sum())
                 for t, si in zip(theta, s, strict=True))
        actual = float(loss1 - loss0) + 0.5 * WD * sq
        predicted = sum(float(((gr + WD * t) * si).sum())
                        for gr, t, si in zip(grads, theta, s, strict=True))
        predicted += 0.5 * WD * sum(float(si.square().sum()) for si in s)
        for li, b in zip((0, 2), opt.engine.blocks, strict=True):
            v = _vec(s[li], s[li + 1])
            predicted += 0.5 * float(v @ (torch.kron(b.A_bar, b.G_bar) @ v))
        ratio = actual / predicted
        assert opt.last_reduction_ratio == pytest.approx(ratio, rel=1e-9)
        expected = LevenbergMarquardt(every=1).adjust(gamma, ratio)
        assert opt.param_groups[0]["damping"] == pytest.approx(expected, rel=1e-15)
        seen.add(opt.param_groups[0]["damping"] > gamma)
    assert seen == {True, False}  # the damping went both ways at lr 0.3


def test_adaptive_damping_interval_resume_and_preconditioner(small_mnist):
    """Adjusted every T steps only; the damping is in state_dict, so a resumed run is
    bit-exact; preconditioner mode measures the step AdamW took."""
    x, y = small_mnist
    model = _kron_mlp()
    opt = KFAC(model, lr=0.3, adaptive_damping=LevenbergMarquardt(every=3), kl_clip=None)
    history = []
    for k in range(7):
        if k == 4:
            saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
        opt.step(_closure(opt, model, x, y))
        history.append(opt.param_groups[0]["damping"])
    assert history[0] == history[1] == DAMPING and history[2] != DAMPING
    assert history[3] == history[4] == history[2] and history[5] != history[4]
    model2 = _kron_mlp()
    model2.load_state_dict(saved[0])
    opt2 = KFAC(model2, lr=0.3, adaptive_damping=LevenbergMarquardt(every=3), kl_clip=None)
    opt2.load_state_dict(saved[1])
    for _ in range(3):
        opt2.step(_closure(opt2, model2, x, y))
    assert opt2.param_groups[0]["damping"] == history[-1]
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters(),
                                                 strict=True))
    pc_model = _kron_mlp()
    pc = Preconditioner(pc_model, torch.optim.AdamW(pc_model.parameters(), lr=1e-3),
                        "q", adaptive_damping=1)
    pc.step(_closure(pc, pc_model, x, y))
    assert math.isfinite(pc.rule.last_reduction_ratio)


def test_adaptive_damping_errors_leave_everything_untouched(small_mnist):
    x, y = small_mnist
    model = _kron_mlp()
    opt = KFAC(model, adaptive_damping=1)
    before = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="step\\(closure\\)"):
        opt.step()
    assert opt.steps_taken == 0 and not opt.state
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))

    def eager():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="is_grad_enabled"):
        opt.step(eager)
