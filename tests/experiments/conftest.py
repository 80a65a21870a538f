"""Shared fixtures of the experiment tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def _mnist_dir() -> Path | None:
    """The real MNIST files: ../shared/data/mnist from the cwd (the repo root) or the repo."""
    repo = Path(__file__).resolve().parents[2]
    for d in (
        Path.cwd().parent / "shared" / "data" / "mnist",
        repo.parent / "shared" / "data" / "mnist",
    ):
        if (d / "train-images-idx3-ubyte.gz").is_file():
            return d
    return None


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """Directory with the canonical MNIST .gz files (skips the test when absent)."""
    d = _mnist_dir()
    if d is None:
        pytest.skip("real MNIST files not found at ../shared/data/mnist")
    return d


@pytest.fixture(scope="session")
def mnist(mnist_dir: Path):
    """The real MNIST data set, parsed once per session."""
    from kldwrm.experiments.data.datasets import load_dataset

    return load_dataset("mnist", mnist_dir, download=False)


@pytest.fixture(scope="package", autouse=True)
def _one_thread():
    """One torch thread: the models are tiny, and on a shared 2-core machine more threads
    only add OpenMP contention (the previous setting is restored after this package's tests)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
