"""Data sets for the experiments: MNIST, Fashion-MNIST and synthetic regression problems.

:func:`load_dataset` is the one entry point: MNIST-type sets come from their IDX files
(:mod:`kldwrm.experiments.data.idx`: where they are looked for, how they are verified), then are
standardised; the synthetic regression sets are generated from a seed.
:func:`iterate_batches` serves mini-batches of in-memory tensors.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .idx import (
    DATASETS,
    ChecksumError,
    DatasetNotFoundError,
    candidate_dirs,
    canonical_name,
    clear_cache,
    find_dataset_dir,
    load_idx_dataset,
    not_found_message,
    read_idx,
    try_download,
)

__all__ = [
    "DATASETS",
    "DATASET_NAMES",
    "ChecksumError",
    "DatasetNotFoundError",
    "TensorData",
    "candidate_dirs",
    "clear_cache",
    "find_dataset_dir",
    "iterate_batches",
    "load_dataset",
    "load_idx_dataset",
    "num_batches",
    "read_idx",
    "regression_data",
    "sincos_regression",
]

#: Names accepted by :func:`load_dataset` (the IDX data sets plus the synthetic ones).
DATASET_NAMES: tuple[str, ...] = (*DATASETS, "regression", "sincos")


@dataclass(frozen=True)
class TensorData:
    """An in-memory data set.

    Attributes:
        name: data set name.
        task: ``"classification"`` or ``"regression"``.
        x_train, y_train, x_test, y_test: tensors (images ``(N, 1, 28, 28)`` float32,
            labels int64; for regression ``(N, d)`` and ``(N, 1)`` float32).
        num_classes: number of classes (``None`` for regression).
        x_test_raw: the test inputs on the files' own scale (pixels in ``[0, 1]``, not
            standardised), which is what the released notebooks evaluated on; ``None`` when
            a data set has no such second view (regression).
        noise_std: standard deviation of the label noise of a synthetic regression set
            (``None`` otherwise); ``noise_std**2`` is the test-MSE noise floor.
        source: directory the files were read from (``None`` for synthetic data).
    """

    name: str
    task: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int | None = None
    noise_std: float | None = None
    source: Path | None = None
    x_test_raw: torch.Tensor | None = None

    @property
    def noise_floor(self) -> float | None:
        """Expected test mean squared error of the true regression function."""
        return None if self.noise_std is None else self.noise_std**2


# ----------------------------------------------------------------------------- public API


def regression_data(
    n_train: int = 2000,
    n_test: int = 1000,
    dim: int = 4,
    noise_std: float = 0.1,
    seed: int = 0,
) -> TensorData:
    """Synthetic regression set with a known noise floor.

    ``x ~ U[-1, 1]^dim`` and ``y = sin(3 x1) cos(2 x2) + 0.5 x3^2 - 0.3 x4 + noise`` (terms for
    missing coordinates dropped), ``noise ~ N(0, noise_std^2)``. The test MSE of the true
    function is ``noise_std**2`` in expectation (``TensorData.noise_floor``).
    """
    if dim < 1:
        raise ValueError("dim must be >= 1")
    gen = torch.Generator().manual_seed(seed)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.rand(n, dim, generator=gen) * 2 - 1
        f = torch.sin(3 * x[:, 0])
        if dim > 1:
            f = f * torch.cos(2 * x[:, 1])
        if dim > 2:
            f = f + 0.5 * x[:, 2] ** 2
        if dim > 3:
            f = f - 0.3 * x[:, 3]
        y = f + noise_std * torch.randn(n, generator=gen)
        return x, y.unsqueeze(1)

    xtr, ytr = make(n_train)
    xte, yte = make(n_test)
    return TensorData("regression", "regression", xtr, ytr, xte, yte, noise_std=noise_std)


def sincos_regression(
    n_train: int = 4096, n_test: int = 2048, noise_std: float = 0.1, seed: int = 0
) -> TensorData:
    """The regression task of the QE tests (eq. 35): ``x ~ U[-2, 2]²``,
    ``y = sin(2 x1) cos(1.5 x2) + 0.3 x1 + noise``, ``noise ~ N(0, noise_std²)``; the test
    MSE of the true function is ``noise_std²`` in expectation."""
    gen = torch.Generator().manual_seed(seed)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.rand(n, 2, generator=gen) * 4 - 2
        f = torch.sin(2.0 * x[:, :1]) * torch.cos(1.5 * x[:, 1:]) + 0.3 * x[:, :1]
        return x, f + noise_std * torch.randn(n, 1, generator=gen)

    xtr, ytr = make(n_train)
    xte, yte = make(n_test)
    return TensorData("sincos", "regression", xtr, ytr, xte, yte, noise_std=noise_std)


def load_dataset(
    name: str = "mnist",
    data_dir: str | os.PathLike[str] | None = None,
    *,
    normalize: bool = True,
    normalize_test: bool | None = None,
    mean: float | None = None,
    std: float | None = None,
    subset: int | None = None,
    download: bool = True,
) -> TensorData:
    """Load a data set by name ("mnist", "fashion-mnist", "regression" or "sincos").

    Args:
        name: data set name.
        data_dir: directory searched first (see the module docstring for the order).
        normalize: standardise training inputs with ``(x - mean) / std``.
        normalize_test: standardise test inputs too (default: same as ``normalize``).
            ``normalize=True, normalize_test=False`` is the released code's quirk.
        mean, std: normalisation constants (default: MNIST 0.1307 / 0.3081,
            Fashion-MNIST 0.2860 / 0.3530).
        subset: keep only the first ``subset`` training examples (test set untouched).
        download: try the canonical mirrors if the files are not found anywhere.

    Raises:
        DatasetNotFoundError: no searched directory holds the files (message lists them).
        ChecksumError: a file is truncated or corrupted (message names it).
    """
    key = canonical_name(name, DATASET_NAMES)
    if key in ("regression", "sincos"):
        data = regression_data() if key == "regression" else sincos_regression()
        source = None
    else:
        directory, searched = find_dataset_dir(key, data_dir)
        if directory is None:
            note = ""
            if download and os.environ.get("KLDWRM_NO_DOWNLOAD", "") in ("", "0"):
                directory, note = try_download(key, data_dir)
            else:
                note = "download disabled."
            if directory is None:
                raise DatasetNotFoundError(not_found_message(key, searched, note))
        xtr, ytr, xte, yte = load_idx_dataset(key, directory)
        spec = DATASETS[key]
        m = spec.mean if mean is None else mean
        s = spec.std if std is None else std
        if normalize_test is None:
            normalize_test = normalize
        if normalize:
            xtr = (xtr - m) / s
        xte_norm = (xte - m) / s
        data = TensorData(key, "classification", xtr, ytr, xte_norm if normalize_test else xte,
                          yte, num_classes=10, x_test_raw=xte)
        source = directory
    if subset is not None:
        if subset <= 0:
            raise ValueError("subset must be positive")
        data = replace(data, x_train=data.x_train[:subset], y_train=data.y_train[:subset])
    return replace(data, source=source)


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    """Number of batches :func:`iterate_batches` yields for ``n`` examples."""
    return n // batch_size if drop_last else -(-n // batch_size)


def iterate_batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    shuffle: bool = True,
    drop_last: bool = False,
    start: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches of in-memory tensors.

    The permutation is drawn once per call from ``generator`` with ``torch.randperm`` (so
    the data order depends only on the generator state) and batches are gathered with one
    ``index_select`` each. ``start`` skips the first ``start`` batches (used to resume an
    interrupted epoch after redrawing the same permutation).
    """
    if batch_size <= 0:
        raise ValueError("batch_size must be positive")
    n = x.shape[0]
    if y.shape[0] != n:
        raise ValueError("x and y have different lengths")
    perm = torch.randperm(n, generator=generator) if shuffle else None
    for b in range(start, num_batches(n, batch_size, drop_last)):
        lo, hi = b * batch_size, min((b + 1) * batch_size, n)
        if perm is None:
            yield x[lo:hi], y[lo:hi]
        else:
            idx = perm[lo:hi].to(x.device)
            yield x.index_select(0, idx), y.index_select(0, idx)
