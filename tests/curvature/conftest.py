"""Fixtures of the curvature tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture()
def float64():
    """Run the test with float64 as the default dtype (comparisons at tight tolerances)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
