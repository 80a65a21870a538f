"""Full-history reference solvers: the paper's step *definitions*, solved densely.

Every function here takes the recorded sequences of a run (gradients ``g_k``, Fisher matrices
``F_k``, model curvatures ``B_k``, ``λ_k = 1/lr_k``, ``ρ``) and, at each step ``k``, builds the
*whole* quadratic objective of the paper over every past iterate ``θ_0, ..., θ_k`` and minimises
it with a dense float64 solve (``torch.linalg.solve``). Nothing here uses the tractable
recursions of Propositions 3.1, 4.1 and 4.2; these functions exist to prove that the recursions
implemented in :mod:`kldwrm.optim` are right (see ``docs/theory.md``).

Notation (paper, sections 2-4). ``κ(0) = 1`` and ``κ(i) = 1 - ρ`` for ``i > 0``. The wake of a
step ``k`` is anchored at the past iterates through the partial sums

    S_i^(k) = Σ_{j=i}^{k-1} s_j        (S_k^(k) = 0),

so that ``θ_k + s - θ_i = s + S_i^(k)``. By default ``s_j`` are the solver's own previous
minimisers; when ``taken`` is given they are the steps actually taken by the run (after
clipping), i.e. the wake is anchored at the iterates actually visited (eq. 21 with the visited
``θ_i``).

Input conventions.

* ``grads``: ``K`` flat vectors ``g_k`` of shape ``(n,)`` (gradient of the whole objective at
  ``θ_k``, weight decay included).
* ``fishers``: ``K`` matrices of shape ``(n, n)``: the Fisher used in the wake, *already damped*
  (``F_k + γI``) and *already following eq. 20* for infrequent updates (on non-refresh steps the
  caller passes the current EA matrix). Since the weights ``κ(i) ρ^{k-i}`` sum to one, the EA of
  damped matrices is the damped EA.
* ``curvatures``: ``K`` matrices ``B_k`` of shape ``(n, n)``, used as given.
* ``lam``: a positive float (constant ``λ``) or a sequence of ``K`` positive floats (see each
  function for what a sequence means).
* ``taken``: optional sequence of ``K`` (or ``K - 1``; the last one never matters) flat steps.

Every solver returns a :class:`WakeSolution` holding the minimisers ``s_k`` and the linear term
of each step's quadratic (its gradient at ``s = 0``, the "effective gradient"), from which a
caller can compute K-FAC's KL clip factor with :func:`kl_clip_factor`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "WakeSolution",
    "flatten",
    "unflatten",
    "kappa",
    "exponential_average",
    "woqm_lambdas",
    "woqm",
    "fisher_woqm",
    "so_kldwrm",
    "q_kldwrm",
    "kl_clip_factor",
]

_DTYPE = torch.float64


@dataclass(frozen=True)
class WakeSolution:
    """Result of a reference solver.

    Attributes:
        steps: the minimisers ``s_k`` of the step-``k`` objectives, float64 tensors ``(n,)``.
        linear_terms: the gradient at ``s = 0`` of each step-``k`` objective (constants dropped,
            the objective is ``ℓ_k^T s + ½ s^T H_k s``), so ``s_k = -H_k^{-1} ℓ_k``. For Q-KLD-WRM
            this is ``ĝ_k`` of Prop. 4.2, for SO-KLD-WRM it is ``g_k - ρ (λ_k/λ_{k-1}) g_{k-1}``
            (Prop. 4.1) when the wake is anchored at the minimisers, for WoQM with constant
            ``λ`` it is ``g_k`` (Prop. 3.1).
    """

    steps: list[Tensor]
    linear_terms: list[Tensor]


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


def flatten(tensors: Iterable[Tensor]) -> Tensor:
    """Concatenate tensors (e.g. per-parameter gradients) into one flat vector.

    The order is the iteration order of ``tensors`` (use ``model.parameters()`` order to match
    the dense curvature code). Raises ValueError when ``tensors`` is empty.
    """
    parts = [t.reshape(-1) for t in tensors]
    if not parts:
        raise ValueError("tensors: expected at least one tensor")
    return torch.cat(parts)


def unflatten(vector: Tensor, like: Sequence[Tensor | torch.Size | Sequence[int]]) -> list[Tensor]:
    """Split a flat vector back into tensors shaped like ``like`` (tensors or shapes).

    Inverse of :func:`flatten`. Raises ValueError when ``vector`` is not 1-D or its length does
    not equal the total number of elements described by ``like``.
    """
    if vector.dim() != 1:
        raise ValueError(f"vector: expected a 1-D tensor, got shape {tuple(vector.shape)}")
    shapes = [t.shape if isinstance(t, Tensor) else torch.Size(t) for t in like]
    total = sum(math.prod(s) for s in shapes)
    if total != vector.numel():
        raise ValueError(
            f"vector: has {vector.numel()} elements but like describes {total} elements"
        )
    out: list[Tensor] = []
    offset = 0
    for shape in shapes:
        size = math.prod(shape)
        out.append(vector[offset : offset + size].reshape(shape))
        offset += size
    return out


def kappa(i: int, rho: float) -> float:
    """``κ(i)`` of eq. 17: ``1`` for ``i = 0`` and ``1 - ρ`` for ``i > 0``."""
    if i < 0:
        raise ValueError(f"i: expected a non-negative index, got {i}")
    return 1.0 if i == 0 else 1.0 - rho


def exponential_average(matrices: Sequence[Tensor], rho: float) -> list[Tensor]:
    """The EA of eqs. 12/18, computed literally: ``B̄_k = Σ_{i=0}^k κ(i) ρ^{k-i} B_i``.

    Returns the list ``[B̄_0, ..., B̄_{K-1}]`` in float64 (one dense sum per ``k``, no
    recursion). Works for vectors as well as matrices.
    """
    _check_rho(rho)
    mats = [torch.as_tensor(m).to(_DTYPE) for m in matrices]
    if not mats:
        raise ValueError("matrices: expected at least one entry")
    out = []
    for k in range(len(mats)):
        acc = torch.zeros_like(mats[0])
        for i in range(k + 1):
            acc = acc + kappa(i, rho) * rho ** (k - i) * mats[i]
        out.append(acc)
    return out


def woqm_lambdas(lam: float, num_steps: int, rho: float) -> list[float]:
    """The per-model weights of eq. 16: ``λ_0 = λ``, ``λ_i = (1 - ρ) λ`` for ``i > 0``."""
    _check_rho(rho)
    _check_positive_scalar(lam, "lam")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps: expected >= 1, got {num_steps}")
    return [kappa(i, rho) * float(lam) for i in range(num_steps)]


def kl_clip_factor(step: Tensor, linear_term: Tensor, lr: float, kl_clip: float) -> float:
    """K-FAC's KL clip factor (DESIGN section 3) for an unclipped step ``s = -lr · d``.

    ``ν = min(1, sqrt(kl_clip / (lr² |d·u|)))`` with ``u`` the preconditioned vector (the
    linear term returned by the solvers) and ``d = -s / lr``; ``ν = 1`` when ``d·u = 0``.
    """
    _check_positive_scalar(lr, "lr")
    _check_positive_scalar(kl_clip, "kl_clip")
    d = -step.to(_DTYPE) / lr
    dot = abs(float(torch.dot(d, linear_term.to(_DTYPE))))
    if dot == 0.0:
        return 1.0
    return min(1.0, math.sqrt(kl_clip / (lr * lr * dot)))


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def _check_rho(rho: float) -> None:
    if isinstance(rho, bool) or not isinstance(rho, numbers.Real) or not (0.0 <= float(rho) < 1.0):
        raise ValueError(f"rho: expected a float in [0, 1), got {rho!r}")


def _check_positive_scalar(value: float, name: str) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(float(value))
        or value <= 0
    ):
        raise ValueError(f"{name}: expected a finite positive float, got {value!r}")


def _lams(lam: float | Sequence[float], num_steps: int) -> list[float]:
    """Expand ``lam`` (scalar or sequence of ``num_steps`` values) into a list of floats."""
    if isinstance(lam, numbers.Real) and not isinstance(lam, bool):
        _check_positive_scalar(lam, "lam")
        return [float(lam)] * num_steps
    if isinstance(lam, Tensor):
        lam = lam.reshape(-1).tolist()
    try:
        values = [float(v) for v in lam]
    except TypeError as exc:
        raise ValueError(f"lam: expected a float or a sequence of floats, got {lam!r}") from exc
    if len(values) != num_steps:
        raise ValueError(f"lam: expected {num_steps} values (one per step), got {len(values)}")
    for v in values:
        _check_positive_scalar(v, "lam")
    return values


def _vectors(seq: Sequence[Tensor], name: str, n: int | None = None) -> list[Tensor]:
    if isinstance(seq, Tensor):
        if seq.dim() != 2:
            raise ValueError(f"{name}: a tensor must have shape (K, n), got {tuple(seq.shape)}")
        seq = list(seq.unbind(0))
    out = []
    for k, v in enumerate(seq):
        v = torch.as_tensor(v).to(_DTYPE)
        if v.dim() != 1:
            raise ValueError(f"{name}: entry {k} must be a flat vector, got shape {tuple(v.shape)}")
        if n is None:
            n = v.shape[0]
        if v.shape[0] != n:
            raise ValueError(f"{name}: entry {k} has length {v.shape[0]}, expected {n}")
        if not torch.isfinite(v).all():
            raise ValueError(f"{name}: entry {k} is not finite")
        out.append(v)
    if not out:
        raise ValueError(f"{name}: expected at least one entry")
    return out


def _matrices(seq: Sequence[Tensor], name: str, n: int, num_steps: int) -> list[Tensor]:
    if isinstance(seq, Tensor):
        if seq.dim() != 3:
            raise ValueError(f"{name}: a tensor must have shape (K, n, n), got {tuple(seq.shape)}")
        seq = list(seq.unbind(0))
    out = []
    for k, m in enumerate(seq):
        m = torch.as_tensor(m).to(_DTYPE)
        if m.shape != (n, n):
            raise ValueError(f"{name}: entry {k} has shape {tuple(m.shape)}, expected ({n}, {n})")
        if not torch.isfinite(m).all():
            raise ValueError(f"{name}: entry {k} is not finite")
        out.append(m)
    if len(out) != num_steps:
        raise ValueError(f"{name}: expected {num_steps} entries (one per step), got {len(out)}")
    return out


def _taken(taken: Sequence[Tensor] | None, n: int, num_steps: int) -> list[Tensor] | None:
    if taken is None:
        return None
    vecs = _vectors(taken, "taken", n) if len(taken) > 0 else []
    if len(vecs) not in (num_steps, num_steps - 1):
        raise ValueError(f"taken: expected {num_steps} or {num_steps - 1} steps, got {len(vecs)}")
    return vecs


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
