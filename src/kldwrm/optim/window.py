"""QE-KLD-WRM's wake term: the exact symmetric KL of the current network to a window of
stored iterates (eq. 31; eq. 35 for regression), on the recorded forward calls of the
step's batch.

:class:`Window` holds the stored iterates' outputs on one call, :class:`KLGradient`
backpropagates the window's SKL through the user's model (checkpointed segments
included), :func:`wake_weights` gives the window's weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..curvature.capture import select_output
from ..divergence import categorical_skl_of_log_probs, gaussian_skl_per_row


@dataclass
class Call:
    """One recorded forward call of the user's model, and whether the user's backward has
    reached its output yet."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    backpropagated: bool = False


class Window:
    """The stored iterates' outputs on one recorded call, ready for the window's SKL.

    ``Σ_j w_j SKL(θ_{k-j}, θ)`` averaged over every example (each leading position of a
    ``(..., C)`` output, DESIGN section 1) is one broadcast expression over the stacked
    window (the per-example formulas of :mod:`kldwrm.divergence`), so the stored side
    (log-probabilities, or gaussian means) is computed once per step and each inner step
    adds only the current network's log-softmax.
    """

    def __init__(self, stored: Tensor, weights: Sequence[float], likelihood: str) -> None:
        w = len(weights)
        stored = stored.reshape(w, -1, 1) if stored.dim() == 2 else stored.reshape(
            w, -1, stored.shape[-1])
        self.likelihood = likelihood
        self.weights = stored.new_tensor(weights)
        self.stored = torch.log_softmax(stored, dim=-1) if likelihood == "categorical" else stored

    def skl(self, current: Tensor) -> Tensor:
        """``Σ_j w_j SKL(θ_{k-j}, current)``, each SKL averaged over the examples (eqs. 2, 4;
        for unit-variance gaussians ``½‖h_j − h‖²``, eqs. 33-34)."""
        current = current.reshape(1, -1, 1) if current.dim() == 1 else current.reshape(
            1, -1, current.shape[-1])
        if self.likelihood == "categorical":
            per = categorical_skl_of_log_probs(self.stored, torch.log_softmax(current, dim=-1))
        else:
            per = gaussian_skl_per_row(self.stored, current)
        return per.mean(dim=1) @ self.weights


def as_logits(out: Any) -> Tensor:
    if not isinstance(out, Tensor):
        raise TypeError(
            "QEKLDWRM needs the logits (or means) as a tensor: the model returned "
            f"{type(out).__name__}; pass output=... (an index, a key or a callable)"
        )
    return out


class KLGradient(nn.Module):
    """The window's SKL on the recorded calls, backpropagated inside the forward pass.

    Called through ``functional_call`` with ``θ_k + s`` as the wrapped network's
    parameters, so the backward pass (and any checkpointed segment it recomputes) runs
    while they are in place; the gradients land in the leaves passed for them.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def total(self, calls: Sequence[Call], targets: Sequence[Window],
              call_w: Sequence[float], output: Any) -> Tensor:
        """The calls' window SKL terms, weighted by their shares of the examples."""
        return sum(window.skl(as_logits(select_output(self.net(*c.args, **c.kwargs), output)))
                   * w for c, window, w in zip(calls, targets, call_w, strict=True))

    def forward(self, calls: Sequence[Call], targets: Sequence[Window],
                call_w: Sequence[float], output: Any) -> None:
        self.total(calls, targets, call_w, output).backward()


def wake_weights(rho: float, window: int) -> list[float]:
    """The window weights ``w_j``, ``j = 0`` the current iterate, ``j = W-1`` the oldest.

    ``w_j = (1-ρ) ρ^j`` for ``j < W-1`` and ``w_{W-1} = ρ^{W-1}``: the released code's
    nested average. They sum to 1, the oldest stored iterate absorbing the tail of the wake
    as ``κ(0)`` does in eq. 18.
    """
    w = [(1.0 - rho) * rho**j for j in range(window - 1)]
    w.append(rho ** (window - 1))
    return w
