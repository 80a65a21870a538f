"""The four step definitions (WoQM, Fisher-WoQM, SO-KLD-WRM, Q-KLD-WRM) over the whole
history, and the generic dense wake solver they share (see :mod:`kldwrm.reference`)."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .common import (
    _DTYPE,
    WakeSolution,
    _check_rho,
    _lams,
    _matrices,
    _taken,
    _vectors,
    kappa,
    woqm_lambdas,
)

# --------------------------------------------------------------------------------------------
# the generic dense wake solver
# --------------------------------------------------------------------------------------------


def _solve_wake(
    grads: list[Tensor],
    grad_weight: Callable[[int, int], float],
    wake_mats: list[Tensor],
    wake_weight: Callable[[int, int], float],
    local_mats: list[Tensor] | None,
    taken: list[Tensor] | None,
) -> WakeSolution:
    """Minimise, for each k, the literal quadratic

        Φ_k(s) = Σ_{i=0}^k a(k,i) g_i^T (s + S_i) + Σ_{i=0}^k w(k,i) ½ (s + S_i)^T M_i (s + S_i)
                 + ½ s^T B_k s,

    with ``S_i = Σ_{j=i}^{k-1} s_j`` (anchors: own minimisers or ``taken``). Expanding,
    ``∇Φ_k(0) = Σ a(k,i) g_i + Σ w(k,i) M_i S_i`` and ``∇²Φ_k = Σ w(k,i) M_i + B_k``.
    """
    num_steps = len(grads)
    n = grads[0].shape[0]
    steps: list[Tensor] = []
    linear_terms: list[Tensor] = []
    anchors: list[Tensor] = []  # s_j actually used to place θ_j (minimiser or taken step)
    for k in range(num_steps):
        # S_i for i = k, k-1, ..., 0, by summing the anchors literally
        partial = [torch.zeros(n, dtype=_DTYPE, device=grads[0].device)] * (k + 1)
        acc = torch.zeros(n, dtype=_DTYPE, device=grads[0].device)
        for i in range(k - 1, -1, -1):
            acc = acc + anchors[i]
            partial[i] = acc
        linear = torch.zeros(n, dtype=_DTYPE, device=grads[0].device)
        hessian = torch.zeros(n, n, dtype=_DTYPE, device=grads[0].device)
        for i in range(k + 1):
            a = grad_weight(k, i)
            if a != 0.0:
                linear = linear + a * grads[i]
            w = wake_weight(k, i)
            if w != 0.0:
                linear = linear + w * (wake_mats[i] @ partial[i])
                hessian = hessian + w * wake_mats[i]
        if local_mats is not None:
            hessian = hessian + local_mats[k]
        step = -torch.linalg.solve(hessian, linear)
        steps.append(step)
        linear_terms.append(linear)
        if taken is not None and k < len(taken):
            anchors.append(taken[k])
        else:
            anchors.append(step)
    return WakeSolution(steps=steps, linear_terms=linear_terms)


# --------------------------------------------------------------------------------------------
# the four definitions
# --------------------------------------------------------------------------------------------


def woqm(
    grads: Sequence[Tensor],
    curvatures: Sequence[Tensor],
    lam: float | Sequence[float],
    rho: float,
    *,
    taken: Sequence[Tensor] | None = None,
) -> WakeSolution:
    """Wake of Quadratic Models, eqs. 14-17, solved literally.

    At step ``k`` the step is ``s_k = argmin_s Σ_{i=0}^k ρ^{k-i} M_i(s + Σ_{j=i}^{k-1} s_j)``
    (eq. 15) with the local models ``M_i(s) = g_i^T s + (λ_i/2) s^T B_i s`` (eq. 14).

    Args:
        grads: ``g_0, ..., g_{K-1}``, each of shape ``(n,)``.
        curvatures: ``B_0, ..., B_{K-1}``, each ``(n, n)`` (e.g. following eq. 20).
        lam: a float ``λ`` gives the per-model weights of eq. 16 (``λ_0 = λ``,
            ``λ_i = (1-ρ)λ``); a sequence is taken verbatim as the per-model ``λ_i`` of eq. 14
            (a model keeps its weight for the rest of the run). Not ``1/lr_k``: for variable
            step sizes see :func:`fisher_woqm`.
        rho: ``ρ ∈ [0, 1)``.
        taken: steps actually taken (anchors of the wake); default: the minimisers.

    For a scalar ``λ`` and no ``taken``, Prop. 3.1 (eq. 19) says ``s_k = -λ^{-1} B̄_k^{-1} g_k``
    with ``B̄_k = Σ κ(i) ρ^{k-i} B_i`` (eq. 18); for per-model weights the same induction gives
    ``s_k = -[Σ_i ρ^{k-i} λ_i B_i]^{-1} g_k``: the linear term is always ``g_k``, since
    ``ℓ_{k+1} = g_{k+1} + ρ (ℓ_k + H_k s_k)`` and ``H_k s_k = -ℓ_k``.
    """
    g = _vectors(grads, "grads")
    num_steps, n = len(g), g[0].shape[0]
    _check_rho(rho)
    b = _matrices(curvatures, "curvatures", n, num_steps)
    if isinstance(lam, numbers.Real) and not isinstance(lam, bool):
        model_lams = woqm_lambdas(float(lam), num_steps, rho)
    else:
        model_lams = _lams(lam, num_steps)
    t = _taken(taken, n, num_steps)
    rho = float(rho)
    return _solve_wake(
        g,
        lambda k, i: rho ** (k - i),
        b,
        lambda k, i: rho ** (k - i) * model_lams[i],
        None,
        t,
    )


def fisher_woqm(
    grads: Sequence[Tensor],
    fishers: Sequence[Tensor],
    lam: float | Sequence[float],
    rho: float,
    *,
    taken: Sequence[Tensor] | None = None,
) -> WakeSolution:
    """Fisher-WoQM, eq. 22, solved literally.

    At step ``k``:

        s_k = argmin_s [Σ_{i=0}^k ρ^{k-i} g_i]^T s
                       + λ_k Σ_{i=0}^k κ(i) ρ^{k-i} ½ (s + Σ_{j=i}^{k-1} s_j)^T F_i (·),

    i.e. a momentum-gradient linear model plus the wake of approximate SKLs of eq. 21.

    Args:
        grads: ``g_k``, each ``(n,)``.
        fishers: ``F_k`` (damped, eq. 20 applied), each ``(n, n)``.
        lam: ``λ`` (float) or the per-step ``λ_k = 1/lr_k`` (sequence of ``K``), the weight of
            the whole wake at step ``k``.
        rho: ``ρ ∈ [0, 1)``.
        taken: steps actually taken (anchors of the wake); default: the minimisers.

    With constant ``λ`` this is WoQM with ``B_i = F_i`` (eq. 22 equals eq. 15 up to constants),
    hence by Prop. 3.1 ``s_k = -λ^{-1} F̄_k^{-1} g_k``: EA-NG. With variable ``λ_k`` the linear
    term is ``g_{k+1} + ρ (1 - λ_{k+1}/λ_k) Σ_{i≤k} ρ^{k-i} g_i`` instead of ``g_{k+1}``, which
    is why the equivalence with EA-NG needs a constant step size.
    """
    g = _vectors(grads, "grads")
    num_steps, n = len(g), g[0].shape[0]
    _check_rho(rho)
    f = _matrices(fishers, "fishers", n, num_steps)
    lams = _lams(lam, num_steps)
    t = _taken(taken, n, num_steps)
    rho = float(rho)
    return _solve_wake(
        g,
        lambda k, i: rho ** (k - i),
        f,
        lambda k, i: lams[k] * kappa(i, rho) * rho ** (k - i),
        None,
        t,
    )


def so_kldwrm(
    grads: Sequence[Tensor],
    fishers: Sequence[Tensor],
    lam: float | Sequence[float],
    rho: float,
    *,
    taken: Sequence[Tensor] | None = None,
) -> WakeSolution:
    """SO-KLD-WRM, eq. 26 with variable ``λ``, solved literally.

    At step ``k``:

        s_k = argmin_s g_k^T s + λ_k Σ_{i=0}^k κ(i) ρ^{k-i} ½ (s + S_i)^T F_i (s + S_i),
        S_i = Σ_{j=i}^{k-1} s_j.

    Derivation of Prop. 4.1 with variable ``λ`` (what the tests check numerically). Setting
    the gradient to zero gives ``g_k + λ_k F̄_k s + λ_k R_k = 0`` with
    ``F̄_k = Σ κ(i) ρ^{k-i} F_i`` and ``R_k = Σ_{i=0}^k κ(i) ρ^{k-i} F_i S_i`` (``R_0 = 0``).
    Since ``S_i`` gains ``s_k`` for ``i ≤ k`` and ``S_{k+1} = 0``,
    ``R_{k+1} = ρ (R_k + F̄_k s_k)``; at the minimiser ``λ_k F̄_k s_k = -(g_k + λ_k R_k)``, so
    ``R_{k+1} = -ρ g_k / λ_k`` and

        s_k = -(1/λ_k) F̄_k^{-1} (g_k - ρ (λ_k/λ_{k-1}) g_{k-1}),    g_{-1} = 0.

    (With ``taken`` differing from the minimisers this closed form no longer holds; the
    returned linear term is then ``g_k + λ_k R_k`` with ``R_k`` built on the taken steps.)

    Args:
        grads: ``g_k``, each ``(n,)``.
        fishers: ``F_k`` (damped, eq. 20 applied), each ``(n, n)``.
        lam: ``λ`` (float) or per-step ``λ_k = 1/lr_k`` (sequence of ``K``).
        rho: ``ρ ∈ [0, 1)``.
        taken: steps actually taken (anchors of the wake); default: the minimisers.
    """
    return _local_model_wake(grads, fishers, None, lam, rho, taken)


def q_kldwrm(
    grads: Sequence[Tensor],
    fishers: Sequence[Tensor],
    curvatures: Sequence[Tensor],
    lam: float | Sequence[float],
    rho: float,
    *,
    taken: Sequence[Tensor] | None = None,
) -> WakeSolution:
    """Q-KLD-WRM, eq. 28 with variable ``λ``, solved literally.

    At step ``k``:

        s_k = argmin_s g_k^T s + ½ s^T B_k s
                       + λ_k Σ_{i=0}^k κ(i) ρ^{k-i} ½ (s + S_i)^T F_i (s + S_i),
        S_i = Σ_{j=i}^{k-1} s_j   (s_j = taken[j] when ``taken`` is given).

    The returned linear term is the gradient of this objective at ``s = 0``,
    ``ĝ_k = g_k + λ_k Σ κ(i) ρ^{k-i} F_i S_i``, computed from the definition. Prop. 4.2 (with
    variable ``λ``) states ``s_k = -(1/λ_k) [F̄_k + B_k/λ_k]^{-1} ĝ_k`` with ``ĝ_0 = g_0`` and
    ``ĝ_{k+1} = g_{k+1} + (λ_{k+1}/λ_k) ρ [ĝ_k - g_k + λ_k F̄_k s_k]``, ``s_k`` the step taken
    (same induction as :func:`so_kldwrm`: ``ĝ_k = g_k + λ_k R_k``,
    ``R_{k+1} = ρ (R_k + F̄_k s_k)``). ``B ≡ 0`` gives SO-KLD-WRM.

    Args:
        grads: ``g_k``, each ``(n,)``.
        fishers: ``F_k`` (damped, eq. 20 applied), each ``(n, n)``.
        curvatures: ``B_k``, each ``(n, n)``.
        lam: ``λ`` (float) or per-step ``λ_k = 1/lr_k`` (sequence of ``K``).
        rho: ``ρ ∈ [0, 1)``.
        taken: steps actually taken (anchors of the wake); default: the minimisers.
    """
    return _local_model_wake(grads, fishers, curvatures, lam, rho, taken)


def _local_model_wake(
    grads: Sequence[Tensor],
    fishers: Sequence[Tensor],
    curvatures: Sequence[Tensor] | None,
    lam: float | Sequence[float],
    rho: float,
    taken: Sequence[Tensor] | None,
) -> WakeSolution:
    """Eqs. 26/28: local linear (+ quadratic ``B_k``) model and the wake weighted by ``λ_k``."""
    g = _vectors(grads, "grads")
    num_steps, n = len(g), g[0].shape[0]
    _check_rho(rho)
    f = _matrices(fishers, "fishers", n, num_steps)
    b = None if curvatures is None else _matrices(curvatures, "curvatures", n, num_steps)
    lams = _lams(lam, num_steps)
    t = _taken(taken, n, num_steps)
    rho = float(rho)
    return _solve_wake(
        g,
        lambda k, i: 1.0 if i == k else 0.0,
        f,
        lambda k, i: lams[k] * kappa(i, rho) * rho ** (k - i),
        b,
        t,
    )
