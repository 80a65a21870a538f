"""Diagonal curvature blocks: every trainable tensor that is not in a Kronecker block."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..distributed import zeros_full
from .blocks import Block
from .capture import widen
from .kronecker import EigenMoments, ea_update


class DiagonalBlock(Block):
    """Diagonal block for any other tensor (BatchNorm, LayerNorm, embeddings, ...).

    The fresh estimate is ``N·ḡ²`` with ``ḡ`` the batch-mean gradient (of the sampled-label
    loss for ``fisher="mc"``, of the training loss for ``"empirical"``): for zero-mean
    per-example scores ``E[N ḡ²] = diag(F)``, so it estimates the Fisher diagonal without
    per-example gradients. With measured eigenvalues (:mod:`.eigen`; the standard basis is
    this block's eigenbasis) the metric is that estimate to the ``power`` (``"ekfac"``) or
    the running second moment of the step's gradient (``"adaptive"``: Adam's).
    """

    kind = "diagonal"

    def __init__(self, param: nn.Parameter, name: str) -> None:
        super().__init__([param], name)
        self.F_bar: Tensor | None = None
        self.F_fresh: Tensor | None = None
        self.moments: EigenMoments | None = None

    def fresh(self, capture, grads):
        p = self.params[0]
        if capture.fisher == "mc":
            est = capture.diag_sq.get(p)
            return None if est is None else {"F": est}
        if grads[0] is None:
            return None
        return {"F": widen(grads[0]).square() * capture.num_examples()}

    def distributed_fresh(self, capture, grads):
        """The estimate ``N·ḡ²`` of the concatenated batch (``N`` the global batch size).

        ``"empirical"``: ``ḡ`` is the gradient DDP already averaged over ranks, so the
        ranks' ``N_r·ḡ²`` are summed (``seen`` counts the ranks that had a gradient).
        ``"mc"``: each rank's mean sampled-label gradient ``ḡ_r`` is averaged with weight
        ``N_r`` and squared afterwards (:meth:`finish_distributed`), not the ranks' squares
        averaged.
        """
        p = self.params[0]
        if capture.fisher != "mc":
            est = self.fresh(capture, grads)
            seen = torch.ones(1, dtype=torch.float32, device=p.device)
            if est is None:
                est, seen = {"F": self._zeros()}, seen.zero_()
            return {"F": est["F"], "seen": seen}, {"F": None, "seen": None}
        g = capture.diag_grad.get(p)
        if g is None:
            return self.empty_statistics()
        n = float(capture.num_examples())
        return {"gbar": g / n}, {"gbar": n}

    def _zeros(self) -> Tensor:
        p = self.params[0]
        return zeros_full(p, torch.promote_types(p.dtype, torch.float32))

    def empty_statistics(self):
        return {"gbar": self._zeros()}, {"gbar": 0.0}

    def finish_distributed(self, stats, totals):
        if "gbar" in stats:
            if totals["gbar"] == 0:
                return None
            return {"F": stats["gbar"].square() * totals["gbar"]}
        if float(stats["seen"].sum()) == 0:
            return None
        return {"F": stats["F"]}

    def fold(self, fresh: dict[str, Tensor], rho: float) -> None:
        self.F_fresh = fresh["F"]
        self.F_bar = ea_update(self.F_bar, fresh["F"], rho)
        if self._shares_average():
            self.moments.assign(self.F_bar, fresh["F"])
        self.initialized = True

    def _shares_average(self) -> bool:
        """``"ekfac"``: ``N·ḡ²`` is already this basis's per-example moment, so the moments
        are ``F̄`` itself (no second copy, nothing more saved)."""
        return self.moments is not None and self.moments.mode == "ekfac"

    def observe(self, vecs) -> None:
        """``"adaptive"``: fold this step's gradient into the running second moment."""
        self.moments.observe(vecs[0])

    def drop_fresh(self) -> None:
        self.F_fresh = None
        if self.moments is not None:
            self.moments.drop_fresh()

    def keep_average(self) -> None:
        self.F_fresh = self.F_bar
        if self.moments is not None:
            self.moments.drop_fresh()

    def _diag(self, damping: float, e: float, f: float) -> Tensor:
        if self.moments is not None:
            return self.moments.diag(e, f, damping)
        d = self.F_bar * e + damping
        if f != 0.0:
            d = d + f * self.F_fresh
        return d

    def solve(self, vecs, damping, ea_scale=1.0, fresh_scale=0.0, method="exact"):
        self._check_ready()
        return [vecs[0] / self._diag(damping, ea_scale, fresh_scale)]

    def matvec(self, vecs, damping, ea_scale=1.0, fresh_scale=0.0):
        return [vecs[0] * self._diag(damping, ea_scale, fresh_scale)]

    # the standard basis is the eigenbasis of a diagonal matrix (copies: the engine's
    # results are the caller's own, see CurvatureEngine._map_blocks)
    def to_eigenbasis(self, vecs):
        return [vecs[0].clone()]

    def from_eigenbasis(self, coords):
        return [coords[0].clone()]

    def eigenvalues(self, ea_scale, damping):
        self._check_ready()
        return [self._diag(damping, ea_scale, 0.0)]

    def state_dict(self) -> dict[str, Tensor]:
        out = {} if self.F_bar is None else {"F_bar": self.F_bar}
        if self.moments is not None and not self._shares_average():
            out.update(self.moments.state_dict())
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if self.moments is not None:
            self.moments.load_state_dict(state, self.params[0].device)
        self.F_bar = state.get("F_bar")
        if self.F_bar is not None:
            self.F_bar = self.F_bar.to(self.params[0].device)
        self.initialized = self.F_bar is not None
        self.F_fresh = None
        if self._shares_average() and self.F_bar is not None:
            self.moments.assign(self.F_bar, None)
