"""The constructor's argument checks of every curvature optimizer: a ``ValueError`` (or
``TypeError``) naming the first bad argument and its allowed values, before anything is
built."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from .._validation import (
    check_choice,
    check_int_at_least,
    check_nonnegative,
    check_optional_positive,
    check_positive,
    check_unit_interval,
)
from ..curvature import (
    BIAS_MODES,
    CURVATURES,
    DECOMPOSITIONS,
    DENSE_SCOPES,
    EMBEDDINGS,
    FISHER_TYPES,
    LIKELIHOODS,
    WEIGHT_SHARING,
    unwrap,
)
from ..curvature.capture import OutputSelector

#: how the damping γ enters a Kronecker block (``damping_split``)
DAMPING_SPLITS = ("tikhonov", "pi")





def check_arguments(model: Any, *, lr: float, rho: float, damping: float,
                     weight_decay: float, kl_clip: float | None, block_clip: float | None,
                     update_freq: int, fisher: str, likelihood: str, curvature: str,
                     dense_scope: str, bias: str, rank: int | None,
                     output: OutputSelector) -> None:
    """``ValueError``/``TypeError`` naming the first bad constructor argument."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"the first argument must be the nn.Module being trained, got {type(model)!r}"
        )
    check_positive("lr", lr)
    check_unit_interval("rho", rho)
    check_nonnegative("damping", damping)
    check_nonnegative("weight_decay", weight_decay)
    check_optional_positive("kl_clip", kl_clip)
    check_optional_positive("block_clip", block_clip)
    check_int_at_least("update_freq", update_freq, 1)
    check_choice("fisher", fisher, FISHER_TYPES)
    check_choice("likelihood", likelihood, LIKELIHOODS)
    check_choice("curvature", curvature, CURVATURES)
    check_choice("dense_scope", dense_scope, DENSE_SCOPES)
    check_choice("bias", bias, BIAS_MODES)
    if rank is not None:
        check_int_at_least("rank", rank, 1)
    if output is not None and not (callable(output) or isinstance(output, (int, str))):
        raise ValueError(
            f"output must be None, an int, a str or a callable, got {type(output).__name__}"
        )
    if fisher == "exact" and curvature != "dense":
        raise ValueError(
            "fisher='exact' is only available with curvature='dense'; "
            "use fisher='mc' or 'empirical' with Kronecker curvature"
        )
    if rank is not None and curvature in ("ekfac", "adaptive"):
        raise ValueError(
            f"rank needs curvature='kron': curvature={curvature!r} measures the eigenvalues "
            "in a complete eigenbasis"
        )


def optimized(model: nn.Module, params: Iterable[Any] | None) -> list[Any]:
    """The constructor's ``params``; by default every parameter, frozen ones included (as
    torch.optim's ``model.parameters()``): a tensor frozen now and unfrozen later is trained
    from its first gradient."""
    out = list(unwrap(model).parameters() if params is None else params)
    if not out:
        raise ValueError("the model has no parameters to optimize")
    return out


def check_options(momentum: float, eigen_beta: float, eigen_power: float,
                  damping_split: str, curvature: str, rank: int | None, embeddings: str,
                  weight_sharing: str, decompositions: str) -> None:
    """``ValueError`` naming the first bad keyword-only option."""
    check_unit_interval("momentum", momentum)
    _check_eigen(eigen_beta, eigen_power)
    _check_damping_split(damping_split, curvature, rank)
    check_choice("embeddings", embeddings, EMBEDDINGS)
    check_choice("weight_sharing", weight_sharing, WEIGHT_SHARING)
    check_choice("decompositions", decompositions, DECOMPOSITIONS)
    if decompositions == "owned" and curvature in ("ekfac", "adaptive"):
        raise ValueError(
            f"decompositions='owned' needs curvature='kron' or 'dense': with "
            f"curvature={curvature!r} every rank measures moments in every eigenbasis")


def _check_damping_split(damping_split: str, curvature: str, rank: int | None) -> None:
    check_choice("damping_split", damping_split, DAMPING_SPLITS)
    if damping_split == "pi" and (curvature != "kron" or rank is not None):
        raise ValueError(
            "damping_split='pi' splits γ between the two Kronecker factors: it needs "
            f"curvature='kron' without rank (got curvature={curvature!r}, rank={rank!r})")


def _check_eigen(eigen_beta: float, eigen_power: float) -> None:
    check_unit_interval("eigen_beta", eigen_beta)
    if not 0.0 < eigen_power <= 1.0:
        raise ValueError(f"eigen_power must be in (0, 1], got {eigen_power!r}")
