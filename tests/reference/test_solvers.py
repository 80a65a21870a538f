"""The full-history reference solvers (``kldwrm.reference.solvers``) against the paper's
propositions (all float64).

The closed forms / recursions below are written independently of ``kldwrm.reference`` (EA by
recursion, ĝ by recursion), and the stationarity checks differentiate the literal objectives
with autograd, so the assembly code in ``_solve_wake`` is checked against both.
"""

from __future__ import annotations

import math

import pytest
import torch

from kldwrm.reference import (
    WakeSolution,
    fisher_woqm,
    kl_clip_factor,
    q_kldwrm,
    so_kldwrm,
    woqm,
    woqm_lambdas,
)

from .helpers import DT, RHO, TOL, K, N, _ea_recursive, _rel

# --------------------------------------------------------------------------------------------
# helpers: the propositions, written independently
# --------------------------------------------------------------------------------------------


def _q_recursion(grads, fishers, curvatures, lams, rho, clip=None):
    """Prop. 4.2 with variable λ (DESIGN section 3); ``clip(k, s, ĝ)`` -> factor for the taken
    step. Returns (unclipped steps, ĝ's, taken steps)."""
    fbar = _ea_recursive(fishers, rho)
    steps, ghats, taken = [], [], []
    ghat = grads[0].clone()
    for k in range(len(grads)):
        lam = lams[k]
        if k > 0:
            prev = lams[k - 1]
            ghat = grads[k] + (lam / prev) * rho * (
                ghats[-1] - grads[k - 1] + prev * fbar[k - 1] @ taken[-1]
            )
        s = -(1.0 / lam) * torch.linalg.solve(fbar[k] + curvatures[k] / lam, ghat)
        nu = 1.0 if clip is None else clip(k, s, ghat)
        steps.append(s)
        ghats.append(ghat)
        taken.append(nu * s)
    return steps, ghats, taken


def _kappa(i: int, rho: float) -> float:
    return 1.0 if i == 0 else 1.0 - rho


def _literal_objective(kind, k, s, grads, fishers, curvatures, lams, rho, anchors):
    """The step-k objective of eq. 15 / 22 / 26 / 28, as a literal sum (autograd-friendly)."""
    total = torch.zeros((), dtype=DT)
    for i in range(k + 1):
        x = s + sum((anchors[j] for j in range(i, k)), torch.zeros(N, dtype=DT))
        if kind == "woqm":  # eq. 15 with eq. 14 and eq. 16
            lam_i = lams[0] * _kappa(i, rho)
            total = total + rho ** (k - i) * (grads[i] @ x + 0.5 * lam_i * x @ curvatures[i] @ x)
        else:
            wake = 0.5 * x @ fishers[i] @ x  # eq. 21
            total = total + lams[k] * _kappa(i, rho) * rho ** (k - i) * wake
            if kind == "fisher_woqm":  # eq. 22
                total = total + rho ** (k - i) * grads[i] @ s
    if kind in ("so", "q"):
        total = total + grads[k] @ s
    if kind == "q":
        total = total + 0.5 * s @ curvatures[k] @ s
    return total


# --------------------------------------------------------------------------------------------
# propositions
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["b_same", "b_other"])
def test_woqm_equals_prop_3_1(run, which):
    lam = 3.0
    curv = run[which]
    sol = woqm(run["grads"], curv, lam, RHO)
    assert isinstance(sol, WakeSolution) and len(sol.steps) == K == len(sol.linear_terms)
    bbar = _ea_recursive(curv, RHO)
    for k in range(K):
        closed = -(1.0 / lam) * torch.linalg.solve(bbar[k], run["grads"][k])  # eq. 19
        assert _rel(sol.steps[k], closed) <= TOL, k
        assert _rel(sol.linear_terms[k], run["grads"][k]) <= TOL, k
        assert sol.steps[k].dtype == torch.float64


def test_woqm_per_model_lambdas(run):
    """A sequence gives the λ_i of eq. 14 verbatim; the induction still yields -H_k^{-1} g_k."""
    curv = run["b_other"]
    scalar = woqm(run["grads"], curv, 3.0, RHO)
    listed = woqm(run["grads"], curv, woqm_lambdas(3.0, K, RHO), RHO)
    for a, b in zip(scalar.steps, listed.steps, strict=True):
        assert _rel(a, b) <= TOL
    model_lams = [1.0 + 0.1 * i for i in range(K)]
    sol = woqm(run["grads"], curv, model_lams, RHO)
    for k in range(K):
        h = sum(RHO ** (k - i) * model_lams[i] * curv[i] for i in range(k + 1))
        assert _rel(sol.steps[k], -torch.linalg.solve(h, run["grads"][k])) <= TOL


def test_so_equals_prop_4_1_variable_lambda(run):
    grads, lams = run["grads"], run["lams"]
    sol = so_kldwrm(grads, run["fishers"], lams, RHO)
    fbar = _ea_recursive(run["fishers"], RHO)
    for k in range(K):
        u = grads[k] - (RHO * lams[k] / lams[k - 1] * grads[k - 1] if k > 0 else 0.0)
        closed = -(1.0 / lams[k]) * torch.linalg.solve(fbar[k], u)
        assert _rel(sol.steps[k], closed) <= TOL, k
        assert _rel(sol.linear_terms[k], u) <= TOL, k


@pytest.mark.parametrize("which", ["b_same", "b_other"])
def test_q_equals_prop_4_2_variable_lambda(run, which):
    args = (run["grads"], run["fishers"], run[which], run["lams"], RHO)
    sol = q_kldwrm(*args)
    steps, ghats, _ = _q_recursion(*args)
    for k in range(K):
        assert _rel(sol.steps[k], steps[k]) <= TOL, k
        assert _rel(sol.linear_terms[k], ghats[k]) <= TOL, k


def test_q_with_zero_curvature_equals_so(run):
    zeros = [torch.zeros(N, N, dtype=DT) for _ in range(K)]
    q = q_kldwrm(run["grads"], run["fishers"], zeros, run["lams"], RHO)
    so = so_kldwrm(run["grads"], run["fishers"], run["lams"], RHO)
    for a, b in zip(q.steps, so.steps, strict=True):
        assert _rel(a, b) <= TOL
    for a, b in zip(q.linear_terms, so.linear_terms, strict=True):
        assert _rel(a, b) <= TOL


def test_fisher_woqm_equals_woqm_with_b_equal_f(run):
    fw = fisher_woqm(run["grads"], run["fishers"], 3.0, RHO)
    wq = woqm(run["grads"], run["fishers"], 3.0, RHO)
    for a, b in zip(fw.steps, wq.steps, strict=True):
        assert _rel(a, b) <= TOL
    for a, b in zip(fw.linear_terms, wq.linear_terms, strict=True):
        assert _rel(a, b) <= TOL


def test_fisher_woqm_variable_lambda_breaks_prop_3_1(run):
    """With λ_k varying, eq. 22's effective gradient is g_{k+1} + ρ(1 - λ_{k+1}/λ_k) G_k."""
    grads, lams = run["grads"], run["lams"]
    sol = fisher_woqm(grads, run["fishers"], lams, RHO)
    momentum = grads[0].clone()
    for k in range(1, K):
        expected = grads[k] + RHO * (1 - lams[k] / lams[k - 1]) * momentum
        assert _rel(sol.linear_terms[k], expected) <= TOL, k
        momentum = grads[k] + RHO * momentum
    changed = [k for k in range(1, K) if lams[k] != lams[k - 1]]
    assert changed and all(_rel(sol.linear_terms[k], grads[k]) > 1e-3 for k in changed)


@pytest.mark.parametrize("which", ["b_same", "zero"])
def test_q_taken_steps_follow_the_recursion(run, which):
    """Clipped steps: the wake anchored at the visited iterates reproduces the recursion fed
    the taken steps (for B ≡ 0 too, i.e. SO anchored at the taken steps)."""
    curv = run["b_same"] if which == "b_same" else [torch.zeros(N, N, dtype=DT) for _ in range(K)]
    lams = run["lams"]
    kl_clip = 1e-3
    factors: list[float] = []

    def clip(k, s, ghat):
        lr = 1.0 / lams[k]
        d = -s / lr
        dot = abs(float(d @ ghat))
        nu = min(1.0, math.sqrt(kl_clip / (lr**2 * dot)))  # DESIGN section 3
        assert nu == pytest.approx(kl_clip_factor(s, ghat, lr, kl_clip), rel=1e-12)
        nu = nu * (0.5 if k % 3 == 0 else 1.0)  # plus a block-clip-like extra shrink
        factors.append(nu)
        return nu

    args = (run["grads"], run["fishers"], curv, lams, RHO)
    steps, ghats, taken = _q_recursion(*args, clip=clip)
    assert sum(f < 1.0 for f in factors) >= K // 2  # the clip is really active
    sol = q_kldwrm(*args, taken=taken)
    for k in range(K):
        assert _rel(sol.linear_terms[k], ghats[k]) <= TOL, k
        assert _rel(sol.steps[k], steps[k]) <= TOL, k
    # the last taken step never matters: K - 1 entries give the same answer
    short = q_kldwrm(*args, taken=taken[:-1])
    for a, b in zip(short.steps, sol.steps, strict=True):
        assert torch.equal(a, b)
    if which == "zero":
        so = so_kldwrm(run["grads"], run["fishers"], lams, RHO, taken=taken)
        for a, b in zip(so.linear_terms, sol.linear_terms, strict=True):
            assert _rel(a, b) <= TOL


@pytest.mark.parametrize("kind", ["woqm", "fisher_woqm", "so", "q", "q_taken"])
def test_returned_steps_zero_the_literal_gradient(run, kind):
    grads, fishers, curv = run["grads"], run["fishers"], run["b_other"]
    lams = [3.0] * K if kind == "woqm" else run["lams"]
    taken = None
    if kind == "woqm":
        sol = woqm(grads, curv, 3.0, RHO)
    elif kind == "fisher_woqm":
        sol = fisher_woqm(grads, fishers, lams, RHO)
    elif kind == "so":
        sol = so_kldwrm(grads, fishers, lams, RHO)
    else:
        taken = None
        if kind == "q_taken":
            gen = torch.Generator().manual_seed(7)
            taken = [0.1 * torch.randn(N, generator=gen, dtype=DT) for _ in range(K)]
        sol = q_kldwrm(grads, fishers, curv, lams, RHO, taken=taken)
    anchors = taken if taken is not None else sol.steps
    base = "q" if kind == "q_taken" else kind
    for k in range(K):
        s = sol.steps[k].clone().requires_grad_(True)
        obj = _literal_objective(base, k, s, grads, fishers, curv, lams, RHO, anchors)
        (grad,) = torch.autograd.grad(obj, s)
        assert float(grad.norm()) <= 1e-10 * (1.0 + float(grads[k].norm())), (kind, k)
        # and the returned linear term is the gradient at s = 0
        z = torch.zeros(N, dtype=DT, requires_grad=True)
        obj0 = _literal_objective(base, k, z, grads, fishers, curv, lams, RHO, anchors)
        (grad0,) = torch.autograd.grad(obj0, z)
        assert _rel(sol.linear_terms[k], grad0) <= TOL, (kind, k)


# --------------------------------------------------------------------------------------------
# helpers and validation
# --------------------------------------------------------------------------------------------



def test_validation(run):
    g, f, b = run["grads"], run["fishers"], run["b_same"]
    with pytest.raises(ValueError, match="rho"):
        so_kldwrm(g, f, 1.0, 1.0)
    with pytest.raises(ValueError, match="rho"):
        woqm(g, b, 1.0, -0.1)
    with pytest.raises(ValueError, match="lam"):
        so_kldwrm(g, f, 0.0, RHO)
    with pytest.raises(ValueError, match="lam"):
        q_kldwrm(g, f, b, [1.0] * (K - 1), RHO)
    with pytest.raises(ValueError, match="lam"):
        fisher_woqm(g, f, [1.0] * (K - 1) + [-1.0], RHO)
    with pytest.raises(ValueError, match="lam"):
        woqm(g, b, float("nan"), RHO)
    with pytest.raises(ValueError, match="fishers"):
        so_kldwrm(g, f[:-1], 1.0, RHO)
    with pytest.raises(ValueError, match="curvatures"):
        q_kldwrm(g, f, [torch.eye(N + 1)] * K, 1.0, RHO)
    with pytest.raises(ValueError, match="grads"):
        so_kldwrm(g[:-1] + [torch.randn(N + 1)], f, 1.0, RHO)
    with pytest.raises(ValueError, match="grads"):
        so_kldwrm([], [], 1.0, RHO)
    with pytest.raises(ValueError, match="grads"):
        so_kldwrm([x.reshape(3, 4) for x in g], f, 1.0, RHO)
    with pytest.raises(ValueError, match="taken"):
        q_kldwrm(g, f, b, 1.0, RHO, taken=g[:-2])
    with pytest.raises(ValueError, match="taken"):
        q_kldwrm(g, f, b, 1.0, RHO, taken=[torch.randn(N + 1)] * K)


def test_accepts_stacked_tensors_and_float32(run):
    g = torch.stack(run["grads"]).float()
    f = torch.stack(run["fishers"]).float()
    sol = so_kldwrm(g, f, 2.0, RHO)
    ref = so_kldwrm([x.float() for x in run["grads"]], list(f), 2.0, RHO)
    assert all(s.dtype == torch.float64 for s in sol.steps)
    assert all(torch.equal(a, b) for a, b in zip(sol.steps, ref.steps, strict=True))
