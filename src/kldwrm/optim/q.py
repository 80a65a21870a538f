"""Q-KLD-WRM (Prop. 4.2, eqs. 28-30, with the variable step size of section 4.4)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .._validation import check_choice, check_nonnegative
from ..curvature.capture import widen
from ..distributed import zeros_full
from .base import CurvatureOptimizer

Q_SOLVES = ("exact", "augmented")


class QKLDWRM(CurvatureOptimizer):
    """Quadratic KLD-WRM.

    Minimises eq. 28, ``g_kᵀs + ½ sᵀB_k s + λ_k Σ_i κ(i) ρ^{k-i} D̃_KL(θ_i, θ_k + s)``,
    through Prop. 4.2 with variable ``λ_k = 1/lr_k`` (F̄ is the damped ``Ā⊗Γ̄ + γI``)::

        s_k = -(1/λ_k) [F̄_k + B_k/λ_k]^{-1} ĝ_k,          ĝ_0 = g_0,
        ĝ_{k+1} = g_{k+1} + (λ_{k+1}/λ_k) ρ [ĝ_k - g_k + λ_k F̄_k s_k],

    with ``s_k`` the step actually taken (after clipping), since the wake is anchored at
    the iterates actually visited. ``B_k`` follows eq. 20: the fresh (undamped) estimate
    on refresh steps, the undamped EA ``F̄_q`` in between, where the system is
    ``(1 + 1/λ) F̄_q + γI``, solved in the existing eigenbasis with no new decomposition.
    On refresh steps ``Ā⊗Γ̄ + γI + (1/λ) A⊗Γ`` is solved with ``q_solve``: ``"exact"``
    (CG in the eigenbasis, relative residual <= 1e-6) or ``"augmented"`` (the released
    code's ``(Ā + A/λ)⊗(Γ̄ + Γ/λ) + γI``).

    With ``rank`` (truncated factors, no complete eigenbasis) every step takes the
    parameter-coordinate path of the refresh steps: one low-rank solve per block, quadratic
    in the width (the wake between refreshes needs no product, see
    :meth:`_wake_from_direction`). On refresh steps the fresh factors are truncated in the
    averages' kept bases, and the system is solved in closed form but for an ``r × r`` core
    (:func:`~kldwrm.curvature.kronecker.lowrank.refresh_solve`).

    State per tensor: ``wake`` = ``ĝ_k - g_k + λ_k F̄_k s_k`` and ``prev_lr`` = ``1/λ_k``,
    from which ``ĝ_{k+1}`` follows exactly; this is one vector fewer than storing ``ĝ``
    and ``g_{k-1}`` separately. ``wake`` is kept in the eigenbasis of the current ``F̄``
    (:meth:`~kldwrm.curvature.CurvatureEngine.to_eigenbasis`), where ``F̄`` is diagonal:
    between refreshes a step then costs what a K-FAC step costs (one rotation of ``g`` in,
    one of the direction out), and ``F̄_k s_k`` is an elementwise product instead of a
    second pair of rotations. On refresh steps the wake is rotated back to parameter
    coordinates before the re-decomposition and into the new basis after the step.

    Args:
        block_clip: per-tensor RMS clip of the preconditioned direction (paper: 2.0).
        q_solve: ``"exact"`` or ``"augmented"``.
        model_curvature: scale of ``B_k`` in the quadratic model; ``0`` gives exactly
            SO-KLD-WRM (``B ≡ 0``, Prop. 4.2 → Prop. 4.1).
        Other arguments: see :class:`~kldwrm.optim.base.CurvatureOptimizer`; defaults are
        the paper's Q settings (ρ = 0.5, DESIGN section 4).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.01,
        rho: float = 0.5,
        *,
        block_clip: float | None = 2.0,
        q_solve: str = "exact",
        model_curvature: float = 1.0,
        **kwargs: Any,
    ) -> None:
        self.q_solve = check_choice("q_solve", q_solve, Q_SOLVES)
        self.model_curvature = check_nonnegative("model_curvature", model_curvature)
        if q_solve == "augmented" and kwargs.get("damping_split") == "pi":
            raise ValueError("damping_split='pi' needs q_solve='exact' (the augmented system "
                             "of the released code has its own damping)")
        super().__init__(model, lr=lr, rho=rho, block_clip=block_clip, **kwargs)
        # (g, ĝ, x) of the current step: in parameter coordinates with x = None (refresh
        # steps, and every step with a rank), or in the eigenbasis of F̄ with x the
        # direction there
        self._step_vectors: tuple[list[Tensor], list[Tensor], list[Tensor] | None] | None \
            = None

    def _ghat(self, g, wake):
        """``ĝ_k = g_k + ρ (λ_k/λ_{k-1}) · wake`` (eq. 30 with variable λ), in ``g``'s basis;
        ``ĝ = g`` for a tensor without a wake yet (the first step, or a tensor that has
        not been trained before: unfrozen, or added with its group)."""
        if all(w is None for w in wake):  # the first step: ĝ_0 = g_0
            return list(g)
        if any(w is None for w in wake):
            wake = [torch.zeros_like(gi) if w is None else w
                    for w, gi in zip(wake, g, strict=True)]
        coef = [self.rho * float(self.state[p]["prev_lr"]) / self._lr(i)  # ρ λ_k / λ_{k-1}
                if "prev_lr" in self.state[p] else 0.0
                for i, p in enumerate(self._params)]
        if not self._in_eigenbasis():  # rank: one pass per tensor (off the paper's path)
            return [gi.add(w, alpha=c) for gi, w, c in zip(g, wake, coef, strict=True)]
        out = list(torch._foreach_mul(wake, coef))  # two passes: the paper steps' rounding
        torch._foreach_add_(out, g)
        return out

    def _wake(self) -> list[Tensor | None]:
        return [self.state[p].get("wake") for p in self._params]

    def _system(self, refresh: bool):
        """Scales of ``F̄ + B/λ`` for each group (DESIGN section 3, eq. 20)."""
        b = self.model_curvature
        if refresh:
            return self._scales(f_of_lr=lambda lr: b * lr)
        return self._scales(e_of_lr=lambda lr: 1.0 + b * lr)

    def _map_wake(self, change_basis) -> None:
        """Re-express the stored wake with ``engine.to/from_eigenbasis`` (a tensor without
        one counts as zero in its block and stays without)."""
        wake = self._wake()
        if all(w is None for w in wake):
            return
        full = [zeros_full(p, widen(p.detach()).dtype) if w is None else w
                for w, p in zip(wake, self._params, strict=True)]
        for p, w, new in zip(self._params, wake, change_basis(full), strict=True):
            if w is not None:
                self.state[p]["wake"] = new

    def _in_eigenbasis(self) -> bool:
        """Whether the wake is kept in the eigenbasis of ``F̄``: unless some block keeps a
        truncated basis (``rank``), where parameter coordinates are used throughout."""
        return self.engine.diagonalizable()

    def _before_fold(self):
        """The basis is about to change: bring the wake back to parameter coordinates."""
        if self._in_eigenbasis():
            self._map_wake(self.engine.from_eigenbasis)

    def _abandon_step(self) -> None:
        self._step_vectors = None
        super()._abandon_step()

    def _direction(self, g, refresh):
        if refresh or not self._in_eigenbasis():
            # F_k is not diagonal in the basis of F̄ (and with a rank there is no complete
            # basis): parameter coordinates
            ghat = self._ghat(g, self._wake())
            d = self.engine.solve(ghat, self._system(refresh), self.q_solve)
            self._step_vectors = (g, ghat, None)
            return d, ghat
        # between refreshes: everything in the eigenbasis of F̄, where the system is diagonal
        g_t = self.engine.to_eigenbasis(g)
        ghat_t = self._ghat(g_t, self._wake())
        x_t = torch._foreach_div(ghat_t, self.engine.eigenvalues(self._system(refresh)))
        self._step_vectors = (g_t, ghat_t, x_t)
        return self.engine.from_eigenbasis(x_t), None

    def _kl_terms(self, d, u):
        _, ghat, x = self._step_vectors
        if x is not None:  # dᵀĝ, with both in the (orthonormal) eigenbasis
            return x, ghat
        return d, u

    def _after_step(self, g, steps, refresh):
        """``wake = ĝ_k - g_k + λ_k (F̄_k + γI) s_k``, stored in the eigenbasis of ``F̄_k``."""
        lrs = [self._lr(i) for i in range(len(self._params))]
        g_b, ghat_b, x_t = self._step_vectors  # in the basis they were computed in
        self._step_vectors = None
        if x_t is None and not refresh and steps is self._clipped \
                and self.engine.damping_split == "tikhonov":
            wake = self._wake_from_direction(g_b, ghat_b, steps, lrs)
        else:
            if x_t is None:
                fs = self.engine.matvec(steps, self._scales())
            else:  # F̄ + γI is diagonal in the eigenbasis
                fs = torch._foreach_mul(self._steps_in_eigenbasis(steps, x_t),
                                        self.engine.eigenvalues(self._scales()))
            torch._foreach_mul_(fs, [1.0 / lr for lr in lrs])
            wake = list(torch._foreach_sub(ghat_b, g_b))
            torch._foreach_add_(wake, fs)
        if x_t is None and self._in_eigenbasis():
            wake = self.engine.to_eigenbasis(wake)  # into the new basis
        for p, w, lr in zip(self._params, wake, lrs, strict=True):
            st = self.state[p]
            st["wake"] = w
            st["prev_lr"] = lr

    def _wake_from_direction(self, g, ghat, steps, lrs):
        """The wake between refreshes without a product: ``d`` solved ``(e F̄ + γI) d = ĝ``
        with ``e = 1 + b/λ``, so ``(F̄ + γI) d = ĝ/e + γ (1 − 1/e) d`` and, with
        ``s = factor · d`` tensor by tensor, ``wake = ĝ − g + λ (F̄ + γI) s =
        (1 + λ·factor/e) ĝ + λγ(1 − 1/e) s − g``, one combination of ``ĝ``, ``s`` and
        ``g`` (three passes over the parameters). A block whose tensors were scaled by
        different factors (the block clip) takes the product."""
        f = self._step_factors
        scales = self._system(False)

        def shortcut(skip: set[int]) -> list[Tensor | None]:
            # reuses ĝ's storage (it is not needed after the step)
            wake: list[Tensor | None] = []
            for i, (gi, hi, si) in enumerate(zip(g, ghat, steps, strict=True)):
                if i in skip:
                    wake.append(None)
                    continue
                e, _, damping = scales[self._group_of[i]]
                a = 1.0 + f[i] / (e * lrs[i])
                w = hi.mul(a) if hi is gi else hi.mul_(a)
                wake.append(w.add_(si, alpha=damping * (1.0 - 1.0 / e) / lrs[i]).sub_(gi))
            return wake

        def exact(blocks):
            fs = self.engine.matvec(steps, self._scales(), blocks=blocks)
            return {i: ghat[i] - g[i] + fs[i] / lrs[i]
                    for bi in blocks for i in self.engine.slots[bi]}

        return self._mixed_blocks_from(shortcut, exact)

    def _steps_in_eigenbasis(self, steps, x_t):
        """``s_k`` in the eigenbasis: ``factor · x_t`` where the step is the clipped direction.

        A block whose tensors were scaled alike (the usual case) needs no rotation; a block
        whose weight and bias were clipped differently, or a step that a subclass changed
        afterwards (QE's inner solve), is rotated.
        """
        if steps is not self._clipped:
            return self.engine.to_eigenbasis(steps)
        return self._mixed_blocks_from(
            lambda _skip: list(torch._foreach_mul(x_t, self._step_factors)),
            lambda blocks: self.engine.to_eigenbasis(steps, blocks=blocks))

    def _mixed_blocks_from(self, shortcut, exact):
        """``shortcut(skip)`` with the tensors of each block whose tensors took different
        step factors (the block clip scaled weight and bias differently) replaced by
        ``exact(blocks)``, which computes those blocks without the shortcut. ``exact`` runs
        first, so the shortcut may reuse its inputs' storage; it may leave the positions in
        ``skip`` (those blocks' tensors) empty."""
        f = self._step_factors
        mixed = [bi for bi, slot in enumerate(self.engine.slots) if len({f[i] for i in slot}) > 1]
        full = exact(mixed) if mixed else {}
        skip = {i for bi in mixed for i in self.engine.slots[bi]}
        out = shortcut(skip)
        for i in skip:
            out[i] = full[i]
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version = int(state_dict.get("kldwrm", {}).get("version", 1))
        super().load_state_dict(state_dict)
        if version < 2 and self._in_eigenbasis():  # kldwrm 0.1: parameter coordinates
            self._map_wake(self.engine.to_eigenbasis)
