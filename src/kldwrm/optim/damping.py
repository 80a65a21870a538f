"""Levenberg-Marquardt adaptive damping (Martens & Grosse 2015, section 6.5; kfac-jax's).

Every ``every`` steps (their ``T_1``, default 5) the optimizer compares the decrease of the
objective ``h(θ) = L(θ) + (η/2)‖θ‖²`` (``η`` the group's ``weight_decay``) that the step
``s`` actually achieved on the step's batch with the decrease its quadratic model predicted::

    ρ = [h(θ + s) − h(θ)] / [M(s) − M(0)],     M(s) − M(0) = gᵀs + ½ sᵀ (F̄ + ηI) s,

with ``g`` the gradient of ``h`` (weight decay included) and ``F̄`` the averaged curvature
without damping (the engine's ``Ā⊗Γ̄``, diagonal and dense blocks as they are). Then, with
``ω = decay^every`` (M&G's ``ω_1 = (19/20)^{T_1}``)::

    ρ > 3/4:  γ ← max(ω γ, γ_min)          (the model is good: trust it more)
    ρ < 1/4:  γ ← min(γ / ω, γ_max)        (the model is poor: damp more)

applied to every group's ``damping`` (a param-group key, saved in ``state_dict``). A
prediction that is not a decrease (``M(s) ≥ M(0)``, possible with momentum or Q's wake) or
a non-finite loss leaves ``γ`` alone. The quadratic model is a model of the loss only where
``F̄`` is (an estimate of) the Fisher: ``curvature="kron"`` or ``"ekfac"`` with
``eigen_power=1``; with Adam's square-root metric it is not, and the adaptation should stay
off.

``h(θ + s)`` needs one more forward pass on the same batch: the ``closure`` passed to
``step`` is called again after the update, under ``torch.no_grad()``, so it must skip
``backward()`` there::

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        if torch.is_grad_enabled():
            loss.backward()
        return loss

Under ``torch.distributed`` the loss change is averaged over ranks, so every rank takes the
same ``γ``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .._validation import check_int_at_least, check_positive
from ..distributed import all_reduce_mean_, is_distributed


@dataclass(frozen=True)
class LevenbergMarquardt:
    """The adaptation's constants (module docstring); ``adaptive_damping=5`` is
    ``LevenbergMarquardt(every=5)``."""

    every: int = 5
    decay: float = 0.95
    min_damping: float = 1e-8
    max_damping: float = 1e2
    low: float = 0.25
    high: float = 0.75

    def __post_init__(self) -> None:
        check_int_at_least("adaptive_damping.every", self.every, 1)
        if not 0.0 < self.decay < 1.0:
            raise ValueError(f"adaptive_damping.decay must be in (0, 1), got {self.decay!r}")
        check_positive("adaptive_damping.min_damping", self.min_damping)
        check_positive("adaptive_damping.max_damping", self.max_damping)
        if self.min_damping > self.max_damping:
            raise ValueError(
                "adaptive_damping.min_damping must be <= max_damping, got "
                f"{self.min_damping!r} > {self.max_damping!r}")
        if not 0.0 < self.low < self.high < 1.0:
            raise ValueError(
                "adaptive_damping needs 0 < low < high < 1, got "
                f"low={self.low!r}, high={self.high!r}")

    @property
    def omega(self) -> float:
        """``ω = decay^every``: the factor of one adjustment."""
        return self.decay ** self.every

    def adjust(self, damping: float, ratio: float) -> float:
        """The new ``γ`` for reduction ratio ``ratio`` (unchanged for a ``nan`` ratio)."""
        if ratio > self.high:
            return max(damping * self.omega, self.min_damping)
        if ratio < self.low:
            return min(damping / self.omega, self.max_damping)
        return damping


def as_schedule(value: LevenbergMarquardt | int | None) -> LevenbergMarquardt | None:
    """``adaptive_damping``'s value: ``None`` (off), an interval, or the constants."""
    if value is None or isinstance(value, LevenbergMarquardt):
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            "adaptive_damping must be None, an interval >= 1 (steps) or a "
            f"LevenbergMarquardt, got {value!r}")
    return LevenbergMarquardt(every=value)


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    return float(sum(torch.dot(x.reshape(-1).double(), y.reshape(-1).double())
                     for x, y in zip(a, b, strict=True)))


def reduction_ratio(change: float, g: Sequence[Tensor], steps: Sequence[Tensor],
                    curvature_steps: Sequence[Tensor], decays: Sequence[float],
                    theta: Sequence[Tensor]) -> float:
    """``ρ`` of the module docstring; ``nan`` when the model predicts no decrease.

    ``change``: ``L(θ + s) − L(θ)`` (the loss alone); ``curvature_steps``: ``F̄ s``;
    ``decays``: ``η`` per tensor; ``theta``: ``θ + s`` (the parameters after the step), so
    the L2 change ``η(θ·s + ½‖s‖²)`` is ``η((θ + s)·s − ½‖s‖²)``.
    """
    squares = [_dot([s], [s]) for s in steps]
    l2 = sum(eta * (_dot([t], [s]) - 0.5 * sq)
             for eta, t, s, sq in zip(decays, theta, steps, squares, strict=True) if eta)
    predicted = (_dot(g, steps) + 0.5 * _dot(steps, curvature_steps)
                 + 0.5 * sum(eta * sq for eta, sq in zip(decays, squares, strict=True)))
    actual = change + l2
    if not (predicted < 0.0 and math.isfinite(actual)):
        return math.nan
    return actual / predicted


def loss_change(closure: Callable[[], Tensor], before: Tensor) -> float:
    """``L(θ + s) − L(θ)`` on the step's batch (averaged over ranks): ``closure`` called
    again, under ``torch.no_grad()``."""
    try:
        with torch.no_grad():
            after = closure()
    except RuntimeError as err:
        if "does not require grad" not in str(err):
            raise
        raise RuntimeError(
            "adaptive_damping calls the step's closure again under torch.no_grad() to "
            "measure the loss after the step: guard its backward() with "
            "`if torch.is_grad_enabled():`") from err
    change = (after.detach().double() - before.detach().double()).reshape(1)
    if is_distributed():
        all_reduce_mean_([change])
    return float(change)
