"""The step a rule's direction becomes (DESIGN section 3): ``s = −lr·ν·c·d``, with the KL
clip's ``ν`` over the whole step and each tensor's block-clip factor ``c``, then heavy-ball
momentum. Their reductions are read back in one host synchronisation, and between
refreshes they are the step's finite check (:meth:`Clipping._gradients_finite`).

:class:`Clipping` is a mixin of :class:`~kldwrm.optim.base.CurvatureOptimizer`: it reads
the optimizer's ``kl_clip``, ``block_clip``, learning rates (``_lr``), the tensors a step
leaves out (``_left``) and the rule's :meth:`_kl_terms`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..curvature.linalg import all_finite


def _dots(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """Per-tensor dot products ``aᵢ·bᵢ``: one pass over each pair, no temporaries."""
    return torch.stack([torch.dot(x.reshape(-1), y.reshape(-1))
                        for x, y in zip(a, b, strict=True)])


def _scaled_square_norm(x: Tensor) -> float:
    """``‖x‖²`` for an ``x`` whose squares overflow its dtype: ``m² ‖x/m‖²`` with ``m`` its
    largest magnitude (``inf`` when ``x`` is not finite)."""
    m = float(x.abs().max())
    if not math.isfinite(m):
        return math.inf
    y = (x / m).reshape(-1)
    return m * m * float(torch.dot(y, y))


class Clipping:
    """The clipped step and momentum of :class:`~kldwrm.optim.base.CurvatureOptimizer`."""

    #: whether a step between refreshes may leave its finite check to the KL clip's dot
    #: products (:meth:`_begin_step`); a rule that evaluates the model in its step
    #: (QE's inner solve) checks first
    _finite_from_clip = True

    def _gradients_finite(self) -> bool:
        """Whether the gradients whose check :meth:`_begin_step` left to the KL clip are
        finite (``True`` when they were checked there)."""
        grads = self._unchecked
        return grads is None or all_finite([gr for gr in grads if gr is not None])

    def _abandon_step(self) -> None:
        """A step found non-finite after :meth:`_begin_step` (by the KL clip): skipped as
        :meth:`_skip` skips, its per-step values dropped (nothing else had changed)."""
        self._left = {}
        self._unchecked = None
        self._skip()

    def _clipped_step(self, d: Sequence[Tensor], u: Sequence[Tensor]) -> list[Tensor] | None:
        """``−lr·ν·c_i·d_i`` per tensor (zero for the tensors a step leaves out), kept as
        ``_clipped`` with the factors in ``_step_factors`` (a rule's recursion may
        recognise its own clipped step by identity); ``None`` when the step is skipped
        (non-finite gradients, :meth:`_clip_factors`).

        ``d`` is the rule's own (the engine's products return new tensors), so it is
        scaled in place: ``_clipped`` holds ``d``'s tensors, and a fresh full-size
        allocation per tensor is saved (~2.5% of a rank-128 MLP step)."""
        lrs = [self._lr(i) for i in range(len(d))]
        for i in self._left:  # left-out tensors take no step, nor part in the KL clip
            lrs[i] = 0.0
        nu, cs = self._clip_factors(d, u, lrs)
        if nu is None:
            self._abandon_step()
            return None
        self.last_kl_scale = nu
        #: per-tensor factor of the last step, ``s_i = factor_i · d_i``
        self._step_factors = [-lr * nu * c for lr, c in zip(lrs, cs, strict=True)]
        # one scalar when the factors are alike: no per-tensor scalar-to-tensor conversions
        f = self._step_factors  # (never empty: a model without parameters is refused)
        self._clipped = list(d)
        torch._foreach_mul_(self._clipped, f[0] if len(set(f)) == 1 else f)
        return self._clipped

    def _clip_factors(self, d: Sequence[Tensor], u: Sequence[Tensor], lrs: list[float]
                      ) -> tuple[float | None, list[float]]:
        """The KL clip's ``ν`` and each tensor's block-clip factor ``c_i`` (DESIGN section
        3), their reductions (``vᵀu``, and ``‖d_i‖²`` as a dot product, a third of a norm's
        cost on CPU) read back in one host synchronisation. ``ν = None``: ``vᵀu`` is not
        finite and neither are the gradients whose check was left to it."""
        parts = []
        alike = len(set(lrs)) == 1
        if self.kl_clip is not None:
            dots = _dots(*self._kl_terms(d, u))
            parts.append((dots.sum() if alike else
                          (dots * dots.new_tensor([lr * lr for lr in lrs])).sum()).reshape(1))
        if self.block_clip is not None:
            parts.append(_dots(d, d))
        vals = torch.cat(parts).tolist() if parts else []
        nu = 1.0
        if self.kl_clip is not None:
            vdotu = (lrs[0] * lrs[0] if alike else 1.0) * vals.pop(0)
            if not math.isfinite(vdotu) and not self._gradients_finite():
                return None, []  # the step is skipped
            if vdotu != 0.0:
                nu = min(1.0, math.sqrt(self.kl_clip / abs(vdotu)))
        cs = [1.0] * len(d)
        for i, (sq, di) in enumerate(zip(vals, d, strict=False)):
            if not math.isfinite(sq):  # overflowed: by the largest entry, in Python floats
                sq = _scaled_square_norm(di)
            rms = math.sqrt(sq / di.numel()) if di.numel() else 0.0
            if rms > 0:
                cs[i] = min(1.0, self.block_clip / rms)
        return nu, cs

    def _with_momentum(self, steps: list[Tensor]) -> list[Tensor]:
        """``s_k = μ s_{k-1} + c_k`` per tensor (Martens & Grosse 2015, section 7: the new
        update plus μ times the previous one), with ``c_k`` the rule's clipped step and
        ``μ`` the group's ``momentum``; ``steps`` itself when every group has ``μ = 0``.
        The buffer (``state[p]["momentum_buffer"]``) is the previous step taken, so the
        rules' recursions, which use the step taken, see the momentum."""
        mus = [g.get("momentum", 0.0) for g in self.param_groups]  # (saved before 0.3)
        if not any(mus):
            return steps
        out = list(steps)
        for i, p in enumerate(self._params):
            mu = mus[self._group_of[i]]
            if mu == 0.0 or i in self._left:
                continue
            st = self.state[p]
            buf = st.get("momentum_buffer")
            out[i] = steps[i].clone() if buf is None else steps[i].add(buf, alpha=mu)
            st["momentum_buffer"] = out[i]
        return out
