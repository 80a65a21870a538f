"""Preconditioner mode: any ``torch.optim`` optimizer applies a KLD-WRM rule's step.

kfac-pytorch's design, with one object to step. :class:`Preconditioner` owns a step rule
(:class:`KFAC`, :class:`SOKLDWRM`, :class:`QKLDWRM` or :class:`QEKLDWRM`, built on the
wrapped optimizer's parameter groups) and a wrapped optimizer. Each :meth:`~Preconditioner.step`

1. runs the first half of the rule's step: the refresh (eq. 20), ``g_k`` and the rule's
   step ``c_k = -lr·ν·c·d_k`` (its preconditioned direction with the KL and block clips);
2. replaces each ``p.grad`` by ``c_k / (-lr)``, the direction the wrapped optimizer's
   ``lr`` turns back into ``c_k`` (a left-out tensor gets ``None``: no step);
3. steps the wrapped optimizer (its momentum, its weight decay, its schedule);
4. reads the step actually taken, ``s_k = θ_{k+1} - θ_k``, from the parameters and gives it
   to the rule's recursion (Q's ``ĝ`` and QE's window are anchored at the iterates actually
   visited, so Q in this mode is still Q, eqs. 28-30, with ``s_k`` whatever the wrapped
   optimizer made of the direction).

The rule's ``λ_k = 1/lr`` is the wrapped group's current ``lr``, read before every step, so
a scheduler on either object drives both. Under ``torch.optim.SGD`` with momentum μ and
constant ``lr`` the steps equal the rule's own with ``momentum=μ`` (SGD's buffer is
``μ b + c/(-lr)``, ``-lr`` times the rule's ``μ s_{k-1} + c_k``); with μ = 0 they equal
the optimizer mode. State: the wrapped optimizer's plus the rule's; with Q or QE, one copy
of the parameters during the step, to measure ``s_k``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ..curvature import unwrap
from ..curvature.capture import widen
from ..distributed import shard_like
from .base import CurvatureOptimizer
from .kfac import KFAC
from .q import QKLDWRM
from .qe import QEKLDWRM
from .so import SOKLDWRM

#: rule name → class, the names of :func:`kldwrm.make_optimizer`
RULES: dict[str, type[CurvatureOptimizer]] = {
    "kfac": KFAC, "so": SOKLDWRM, "q": QKLDWRM, "qe": QEKLDWRM,
}

#: rules whose recursion uses the step taken (the others only ``g_k`` and ``lr``)
_USES_STEP = (QKLDWRM,)


def _rule_class(rule: str | type[CurvatureOptimizer]) -> type[CurvatureOptimizer]:
    if isinstance(rule, type) and issubclass(rule, CurvatureOptimizer):
        return rule
    if rule not in RULES:
        raise ValueError(
            f"rule must be one of {', '.join(RULES)} or a CurvatureOptimizer subclass, "
            f"got {rule!r}")
    return RULES[rule]


def _check_wrapped(model: nn.Module, optimizer: Any, rule_kwargs: dict[str, Any]) -> None:
    """``TypeError``/``ValueError`` naming the bad argument."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be the nn.Module being trained, got {type(model)!r}")
    if not isinstance(optimizer, Optimizer) or isinstance(
            optimizer, (CurvatureOptimizer, Preconditioner)):
        raise TypeError(
            "optimizer must be a torch.optim.Optimizer (SGD, AdamW, ...) to wrap, got "
            f"{type(optimizer).__name__}")
    for key in ("momentum", "params"):
        if key in rule_kwargs:
            raise ValueError(
                f"{key} belongs to the wrapped optimizer in preconditioner mode: set it "
                "there, not as a rule argument")
    own = {id(p) for p in unwrap(model).parameters()}
    for gi, group in enumerate(optimizer.param_groups):
        foreign = [tuple(p.shape) for p in group["params"] if id(p) not in own]
        if foreign:
            raise ValueError(
                f"optimizer: param_groups[{gi}] holds {len(foreign)} tensor(s) that are not "
                f"parameters of the model (shapes {foreign[:3]}); the preconditioner can "
                "only precondition the model's own parameters")


class Preconditioner(Optimizer):
    """A KLD-WRM step rule applied by any ``torch.optim`` optimizer (module docstring).

    Args:
        model: the ``nn.Module`` being trained (its layers give the curvature).
        optimizer: the optimizer to wrap, built on (some of) ``model``'s parameters; its
            ``param_groups``, ``state`` and ``defaults`` are this object's, so schedulers
            (``OneCycleLR(cycle_momentum=True)`` included) and ``GradScaler`` work on
            either.
        rule: ``"kfac"``, ``"so"``, ``"q"``, ``"qe"`` or a
            :class:`~kldwrm.optim.base.CurvatureOptimizer` subclass.
        **rule_kwargs: the rule's arguments (``rho``, ``damping``, ``curvature``,
            ``weight_decay``: L2 added to ``g`` *before* preconditioning, ...), not ``lr``
            (the wrapped optimizer's), ``momentum`` (idem) or ``params`` (its groups).

    ``p.grad`` holds the preconditioned direction after :meth:`step` (as in kfac-pytorch).
    A step with non-finite gradients or curvature is skipped whole: the wrapped optimizer
    is not stepped, parameters and both states are unchanged.
    """

    def __init__(self, model: nn.Module, optimizer: Optimizer,
                 rule: str | type[CurvatureOptimizer] = "kfac", **rule_kwargs: Any) -> None:
        _check_wrapped(model, optimizer, rule_kwargs)
        cls = _rule_class(rule)
        if "lr" in rule_kwargs:
            raise ValueError("lr belongs to the wrapped optimizer in preconditioner mode")
        params = [p for g in optimizer.param_groups for p in g["params"]]
        super().__init__(params, dict(optimizer.defaults))
        self.optimizer = optimizer
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        self.defaults = optimizer.defaults
        groups = [{"params": g["params"], "lr": g["lr"]} for g in optimizer.param_groups]
        self.rule = cls(model, lr=groups[0]["lr"], params=groups, **rule_kwargs)
        self._measure = isinstance(self.rule, _USES_STEP)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer and to the rule (see
        :meth:`CurvatureOptimizer.add_param_group`)."""
        if not hasattr(self, "rule"):  # Optimizer.__init__'s own groups
            super().add_param_group(param_group)
            return
        self.optimizer.add_param_group(param_group)
        group = self.optimizer.param_groups[-1]
        try:
            self.rule.add_param_group({"params": group["params"], "lr": group["lr"]})
        except ValueError:
            self.optimizer.param_groups.pop()
            raise

    def _sync_lr(self) -> None:
        """The rule's ``λ_k = 1/lr``: each wrapped group's current ``lr``."""
        if len(self.param_groups) != len(self.rule.param_groups):
            raise RuntimeError(
                "the wrapped optimizer's param_groups changed behind the preconditioner: add "
                "groups with Preconditioner.add_param_group")
        for gi, (mine, theirs) in enumerate(
                zip(self.rule.param_groups, self.param_groups, strict=True)):
            lr = theirs["lr"]
            lr = float(lr) if isinstance(lr, Tensor) else lr
            if not isinstance(lr, (int, float)) or not lr > 0:
                raise ValueError(
                    f"param_groups[{gi}]['lr'] must be > 0 in preconditioner mode (the "
                    f"rule's step size 1/λ), got {lr!r}")
            mine["lr"] = lr

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Precondition ``p.grad`` with the rule, then step the wrapped optimizer (the
        rule's ``adaptive_damping`` reads the step it took, and needs ``closure``)."""
        rule = self.rule
        adapt = rule._damping_due(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync_lr()
        begun = rule._begin_step()
        if begun is None:
            return loss
        g, refresh = begun
        steps = rule._compute_step(g, refresh)
        if steps is None:  # non-finite gradients, found by the KL clip: skipped
            return loss
        measure = self._measure or adapt
        before = [v.detach().clone() for v in rule._values()] if measure else None
        self._write_directions(steps)
        self.optimizer.step()
        rule._gathered = None  # the wrapped optimizer moved the parameters
        if before is not None:
            steps = [widen(v.detach()) - widen(b)
                     for v, b in zip(rule._values(), before, strict=True)]
        left = set(rule._left)
        rule._end_step(g, steps, refresh)
        if adapt:
            rule._adapt_damping(closure, loss, g, steps, left)
        return loss

    def _write_directions(self, steps: list[Tensor]) -> None:
        """``p.grad = c_k / (-lr)``, in the gradient's dtype; ``None`` for left-out tensors."""
        rule = self.rule
        for i, (p, s) in enumerate(zip(rule._params, steps, strict=True)):
            if i in rule._left:
                p.grad = None
                continue
            d = s.mul(-1.0 / rule._lr(i))
            p.grad = shard_like(d if d.dtype == p.dtype else d.to(p.dtype), p)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients (see :meth:`CurvatureOptimizer.zero_grad` for the curvature
        statistics of an abandoned batch)."""
        self.rule.zero_grad(set_to_none=set_to_none)
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's and the rule's states (bit-exact continuation)."""
        return {"optimizer": self.optimizer.state_dict(), "rule": self.rule.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if set(state_dict) != {"optimizer", "rule"}:
            raise ValueError(
                "state_dict was not saved by a kldwrm Preconditioner (expected the keys "
                f"'optimizer' and 'rule', got {sorted(state_dict)})")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.rule.load_state_dict(state_dict["rule"])
        self.state = self.optimizer.state
        self.param_groups = self.optimizer.param_groups

    @property
    def steps_taken(self) -> int:
        return self.rule.steps_taken

    @property
    def skipped_steps(self) -> int:
        return self.rule.skipped_steps

    def state_bytes(self) -> int:
        """Bytes of the rule's state (the wrapped optimizer's tensors are not counted)."""
        return self.rule.state_bytes()

    def __repr__(self) -> str:
        return (f"Preconditioner(rule={type(self.rule).__name__}, "
                f"optimizer={self.optimizer!r})")
