"""The reference solvers' result type, small helpers (flattening, ``κ``, the exponential
average, the KL clip factor) and the validation of their inputs (see :mod:`kldwrm.reference`)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

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
