"""Exact symmetric KL divergence between predictive distributions (eqs. 2, 4, 33, 34).

The paper's SKL is ``D(p, q) = ½ [KL(p‖q) + KL(q‖p)]`` (eq. 2). Between two networks it is
averaged over the inputs of a batch (eq. 4, with the empirical input distribution of the
batch). These functions compute it *exactly* (no Fisher approximation, cf. eq. 21) from the
network outputs, are differentiable in both arguments, and are used by QE-KLD-WRM (eqs. 31 and
35), but have no dependence on the rest of the package.

Shape conventions:

* categorical: logits of shape ``(*batch, C)``; classes on the last dimension, every leading
  dimension is a batch dimension (a ``(C,)`` tensor is a single distribution).
* gaussian: outputs of shape ``(N, *out)``; the first dimension is the batch, all others are
  output coordinates summed in the squared norm (an ``(N,)`` tensor holds ``N`` scalar outputs).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "categorical_skl",
    "categorical_skl_of_log_probs",
    "gaussian_skl",
    "gaussian_skl_per_row",
    "symmetric_kl",
]

_REDUCTIONS = ("mean", "sum", "none")


def _check_pair(a: Tensor, b: Tensor, names: tuple[str, str]) -> None:
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        raise ValueError(f"{names[0]}, {names[1]}: expected torch tensors")
    if a.shape != b.shape:
        raise ValueError(
            f"{names[1]}: shape {tuple(b.shape)} does not match {names[0]} shape {tuple(a.shape)}"
        )
    if a.dim() < 1:
        raise ValueError(f"{names[0]}: expected at least 1 dimension, got a scalar")
    if a.numel() == 0:
        raise ValueError(f"{names[0]}: empty input (shape {tuple(a.shape)})")
    if not (a.is_floating_point() and b.is_floating_point()):
        raise ValueError(f"{names[0]}, {names[1]}: expected floating-point tensors")


def _reduce(per_example: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_example.mean()
    if reduction == "sum":
        return per_example.sum()
    if reduction == "none":
        return per_example
    raise ValueError(f"reduction: expected one of {_REDUCTIONS}, got {reduction!r}")


def categorical_skl_of_log_probs(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Per-example ``½ Σ_c (p_c - q_c)(log p_c - log q_c)`` (eq. 2) from log-probabilities
    over the last dimension; the arguments broadcast (e.g. a stacked window of stored
    networks against the current one), no checks."""
    return 0.5 * ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(dim=-1)


def gaussian_skl_per_row(h1: Tensor, h2: Tensor) -> Tensor:
    """Per-row ``½ ‖h1 - h2‖²`` over the last dimension (eq. 33); the arguments broadcast,
    no checks."""
    return 0.5 * (h1 - h2).square().sum(dim=-1)


def categorical_skl(logits_p: Tensor, logits_q: Tensor, reduction: str = "mean") -> Tensor:
    """Symmetric KL between two softmax (categorical) predictive distributions.

    Per example, ``½ [KL(p‖q) + KL(q‖p)] = ½ Σ_c (p_c - q_c)(log p_c - log q_c)`` (eq. 2), with
    ``p = softmax(logits_p)`` and ``q = softmax(logits_q)`` over the last dimension, computed
    through ``log_softmax`` so that large logits (``±1e3``) stay finite. With the default
    ``reduction="mean"`` the result is the batch average of eq. 4 (a scalar); ``"sum"`` sums
    over the batch and ``"none"`` returns the per-example values, shape ``logits_p.shape[:-1]``.

    Invariant to adding a per-row constant to either argument; zero iff the distributions agree.
    Raises ValueError for mismatched shapes, empty or non-floating inputs, or an unknown
    ``reduction``.
    """
    _check_pair(logits_p, logits_q, ("logits_p", "logits_q"))
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: expected one of {_REDUCTIONS}, got {reduction!r}")
    per_example = categorical_skl_of_log_probs(
        F.log_softmax(logits_p, dim=-1), F.log_softmax(logits_q, dim=-1)
    )
    return _reduce(per_example, reduction)


def gaussian_skl(h1: Tensor, h2: Tensor, reduction: str = "mean") -> Tensor:
    """Symmetric KL between unit-variance gaussians ``N(h1, I)`` and ``N(h2, I)`` (eq. 32).

    Per example it is ``½ ‖h1 - h2‖²`` (eq. 33; both KL directions equal it, so their average
    does too). With the default ``reduction="mean"`` this is eq. 34,
    ``(1/2N) Σ_j ‖h1(x_j) - h2(x_j)‖²``, over the batch (first) dimension; ``"sum"`` sums over
    the batch and ``"none"`` returns the ``N`` per-example values.

    Raises ValueError for mismatched shapes, empty or non-floating inputs, or an unknown
    ``reduction``.
    """
    _check_pair(h1, h2, ("h1", "h2"))
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: expected one of {_REDUCTIONS}, got {reduction!r}")
    per_example = gaussian_skl_per_row(h1.reshape(h1.shape[0], -1), h2.reshape(h2.shape[0], -1))
    return _reduce(per_example, reduction)


def symmetric_kl(
    out1: Tensor, out2: Tensor, likelihood: str = "categorical", reduction: str = "mean"
) -> Tensor:
    """Exact SKL between the predictive distributions given by two network outputs.

    ``likelihood="categorical"``: ``out1``, ``out2`` are logits, see :func:`categorical_skl`.
    ``likelihood="gaussian"``: they are the means of unit-variance gaussians, see
    :func:`gaussian_skl`. Raises ValueError for an unknown ``likelihood`` (or as the called
    function does).
    """
    if likelihood == "categorical":
        return categorical_skl(out1, out2, reduction=reduction)
    if likelihood == "gaussian":
        return gaussian_skl(out1, out2, reduction=reduction)
    raise ValueError(f"likelihood: expected 'categorical' or 'gaussian', got {likelihood!r}")
