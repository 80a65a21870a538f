"""Shared fixtures: real MNIST (from ../shared/data/mnist) and a plain training loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kldwrm.experiments.data.datasets import iterate_batches, load_dataset


@pytest.fixture(scope="session")
def mnist():
    """MNIST, normalised with the paper's constants, read from the local IDX files."""
    return load_dataset("mnist", download=False)


def train_epoch(model: nn.Module, opt: torch.optim.Optimizer, data, *, batch_size: int = 512,
                seed: int = 0) -> float:
    """One epoch of the ordinary loop; returns the test accuracy afterwards."""
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for x, y in iterate_batches(data.x_train, data.y_train, batch_size, generator=gen):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return accuracy(model, data.x_test, data.y_test)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    out = torch.cat([model(xb) for xb in x.split(2000)])
    model.train()
    return float((out.argmax(1) == y).double().mean())


@pytest.fixture()
def float64():
    """Run the test with float64 as the default dtype (comparisons at tight tolerances)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
