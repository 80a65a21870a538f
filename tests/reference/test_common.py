"""The reference package's shared pieces (``kldwrm.reference.common``): the literal EA of
eq. 20's schedule, flattening, κ and the WOQM λ's, the KL clip factor."""

from __future__ import annotations

import math

import pytest
import torch

from kldwrm.reference import (
    exponential_average,
    flatten,
    kappa,
    kl_clip_factor,
    unflatten,
    woqm_lambdas,
)

from .helpers import NU, RHO, K, _ea_recursive, _rel


def test_eq20_gives_the_factor_ea(run):
    """Eq. 20 makes the wake's EA constant between refreshes and ρ-averaged at refreshes."""
    fbar = exponential_average(run["fishers"], RHO)  # literal sums
    for k in range(1, K):
        if k % NU:
            assert _rel(fbar[k], fbar[k - 1]) < 1e-13
        else:
            expected = RHO * fbar[k - 1] + (1 - RHO) * run["fishers"][k]
            assert _rel(fbar[k], expected) < 1e-13
    for a, b in zip(fbar, _ea_recursive(run["fishers"], RHO), strict=True):
        assert _rel(a, b) < 1e-13


def test_flatten_unflatten_roundtrip():
    tensors = [torch.randn(3, 4), torch.randn(5), torch.randn(2, 1, 3)]
    flat = flatten(tensors)
    assert flat.shape == (12 + 5 + 6,)
    back = unflatten(flat, tensors)
    assert all(torch.equal(a, b) for a, b in zip(tensors, back, strict=True))
    back2 = unflatten(flat, [t.shape for t in tensors])
    assert all(torch.equal(a, b) for a, b in zip(tensors, back2, strict=True))
    with pytest.raises(ValueError, match="vector"):
        unflatten(flat[:-1], tensors)
    with pytest.raises(ValueError, match="tensors"):
        flatten([])


def test_kappa_and_lambdas():
    assert kappa(0, 0.3) == 1.0 and kappa(5, 0.3) == pytest.approx(0.7)
    assert woqm_lambdas(2.0, 3, 0.25) == [2.0, 1.5, 1.5]


def test_kl_clip_factor():
    s, u = torch.tensor([-1.0, 0.0]), torch.tensor([2.0, 3.0])  # lr = 0.5: d = (2, 0), d·u = 4
    assert kl_clip_factor(s, u, 0.5, 0.1) == pytest.approx(math.sqrt(0.1 / (0.25 * 4)))
    assert kl_clip_factor(s, u, 0.5, 10.0) == 1.0
    assert kl_clip_factor(torch.zeros(2), u, 0.5, 0.1) == 1.0

