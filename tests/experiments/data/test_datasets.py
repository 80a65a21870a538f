"""Data sets: loading and standardising MNIST-type sets, batching, synthetic data
(the IDX files themselves: tests/experiments/data/test_idx.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from kldwrm.experiments.data.datasets import (
    iterate_batches,
    load_dataset,
    num_batches,
    regression_data,
)


def test_real_mnist_shapes_dtypes_and_values(mnist, mnist_dir):
    assert mnist.x_train.shape == (60000, 1, 28, 28)
    assert mnist.x_test.shape == (10000, 1, 28, 28)
    assert mnist.y_train.shape == (60000,) and mnist.y_test.shape == (10000,)
    assert mnist.x_train.dtype == torch.float32 and mnist.y_train.dtype == torch.int64
    assert mnist.source == Path(os.path.abspath(mnist_dir))
    # normalised with the MNIST constants: the raw training mean is 0.1307 to 4 decimals
    raw_mean = (mnist.x_train * 0.3081 + 0.1307).mean().item()
    assert raw_mean == pytest.approx(0.13066, abs=1e-4)
    assert mnist.x_train.mean().item() == pytest.approx(0.0, abs=2e-3)
    # well-known facts about MNIST: first training label 5, first test label 7
    assert mnist.y_train[:5].tolist() == [5, 0, 4, 1, 9]
    assert mnist.y_test[:3].tolist() == [7, 2, 1]
    assert torch.bincount(mnist.y_train).tolist()[1] == 6742


def test_unnormalised_and_released_quirk(mnist_dir):
    raw = load_dataset("mnist", mnist_dir, normalize=False, download=False)
    assert raw.x_train.min().item() == 0.0 and raw.x_train.max().item() == 1.0
    quirk = load_dataset("mnist", mnist_dir, normalize=True, normalize_test=False, download=False)
    assert torch.equal(quirk.x_test, raw.x_test)  # test set left in [0, 1]
    assert torch.allclose(quirk.x_train[:10], (raw.x_train[:10] - 0.1307) / 0.3081)


def test_subset_keeps_first_images(mnist, mnist_dir):
    sub = load_dataset("mnist", mnist_dir, subset=2000, download=False)
    assert sub.x_train.shape[0] == 2000 and sub.x_test.shape[0] == 10000
    assert torch.equal(sub.x_train, mnist.x_train[:2000])
    assert torch.equal(sub.y_train, mnist.y_train[:2000])


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(),
    reason="Debian's dataset-fashion-mnist is not installed",
)
def test_fashion_mnist_from_debian_package():
    fm = load_dataset("fashion-mnist", download=False, normalize=False)
    assert fm.x_train.shape == (60000, 1, 28, 28) and fm.x_test.shape == (10000, 1, 28, 28)
    assert torch.bincount(fm.y_train).tolist() == [6000] * 10
    assert fm.x_train.mean().item() == pytest.approx(0.2860, abs=1e-4)


def test_iterate_batches_permutation_and_sizes():
    x = torch.arange(10.0).unsqueeze(1)
    y = torch.arange(10)
    g = torch.Generator().manual_seed(3)
    batches = list(iterate_batches(x, y, 4, generator=g))
    assert [b[0].shape[0] for b in batches] == [4, 4, 2] and num_batches(10, 4) == 3
    seen = torch.cat([b[1] for b in batches])
    assert sorted(seen.tolist()) == list(range(10))
    assert torch.equal(torch.cat([b[0] for b in batches]).squeeze(1), seen.float())
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(seen, expected)
    # resuming at batch 1 from the same generator state gives the remaining batches
    rest = list(iterate_batches(x, y, 4, generator=torch.Generator().manual_seed(3), start=1))
    assert torch.equal(torch.cat([b[1] for b in rest]), expected[4:])
    assert [len(b[1]) for b in iterate_batches(x, y, 4, drop_last=True)] == [4, 4]
    assert num_batches(10, 4, drop_last=True) == 2


def test_regression_data_noise_floor():
    d = regression_data(n_train=20000, n_test=20000, noise_std=0.2, seed=1)
    assert d.task == "regression" and d.x_train.shape == (20000, 4)
    assert d.y_train.shape == (20000, 1) and d.noise_floor == pytest.approx(0.04)
    x = d.x_test
    f = torch.sin(3 * x[:, 0]) * torch.cos(2 * x[:, 1]) + 0.5 * x[:, 2] ** 2 - 0.3 * x[:, 3]
    mse = ((d.y_test[:, 0] - f) ** 2).mean().item()
    assert mse == pytest.approx(0.04, rel=0.05)  # the true function sits at the noise floor
    assert torch.equal(regression_data(seed=1).x_train, regression_data(seed=1).x_train)


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="unknown data set"):
        load_dataset("cifar-1000")
