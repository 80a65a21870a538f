"""The synthetic run of the reference tests: gradients, damped Fishers and curvatures under
eq. 20's refresh schedule, and a λ that changes mid-run (all float64)."""

from __future__ import annotations

import pytest
import torch

from .helpers import DT, GAMMA, NU, RHO, K, N, _eq20, _spd


@pytest.fixture(scope="module")
def run() -> dict:
    gen = torch.Generator().manual_seed(1234)
    grads = [torch.randn(N, generator=gen, dtype=DT) for _ in range(K)]
    fresh_f = [_spd(gen) for _ in range(K)]
    fresh_b = [_spd(gen, lo=0.2, hi=2.0) for _ in range(K)]
    eye = torch.eye(N, dtype=DT)
    # the Fisher of the wake: damped, eq. 20; B for Q: undamped, eq. 20 (DESIGN section 3)
    fishers = _eq20([f + GAMMA * eye for f in fresh_f], RHO, NU)
    b_same = _eq20(fresh_f, RHO, NU)  # B_k := F_k (undamped), as in the paper's experiments
    b_other = _eq20(fresh_b, RHO, NU)  # a B with a different structure
    lams = [2.0 if k < 10 else (5.0 if k < 20 else 1.5) for k in range(K)]  # λ changed mid-run
    return {
        "grads": grads,
        "fishers": fishers,
        "b_same": b_same,
        "b_other": b_other,
        "lams": lams,
    }
