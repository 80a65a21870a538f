"""Fixtures of the step-rule tests."""

from __future__ import annotations

import pytest
import torch.nn.functional as F


@pytest.fixture(scope="module")
def small_mnist(mnist):
    """256 MNIST training images pooled to 7x7 (49 pixels, float64) and their labels."""
    x = F.avg_pool2d(mnist.x_train[:256].double(), 4).flatten(1)
    return x, mnist.y_train[:256]
