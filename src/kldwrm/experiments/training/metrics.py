"""A run's metrics: the per-epoch CSV, the loss of a task, and the evaluation of the test set.

``metrics.csv`` holds one row per finished epoch with the fields :data:`METRIC_FIELDS`;
it is rewritten atomically after every epoch. Every epoch evaluates two views of the test
set (:func:`evaluate_views`): ``test_*`` on the standardised inputs and ``raw_test_*`` on
the inputs on the files' own scale (``NaN`` where a data set has none). With several ranks
each rank evaluates its contiguous share and the sums are all-reduced
(:func:`evaluate_sharded`).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.datasets import TensorData
from .checkpoint import atomic_write
from .interrupt import StopFlags
from .ranks import sum_over_ranks

__all__ = [
    "METRICS_NAME",
    "METRIC_FIELDS",
    "count_correct",
    "evaluate",
    "evaluate_sharded",
    "evaluate_views",
    "loss_fn",
    "read_metrics",
    "write_metrics",
]

METRIC_FIELDS: tuple[str, ...] = (
    "epoch",
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
    "raw_test_loss",
    "raw_test_acc",
    "wall_time_s",
    "mean_step_ms",
)
METRICS_NAME = "metrics.csv"


# ----------------------------------------------------------------------------- the CSV


def write_metrics(path: Path, rows: list[dict[str, float]]) -> None:
    """Write ``rows`` as a metrics CSV, atomically (floats with full precision)."""

    def writer(fh: Any) -> None:
        w = csv.DictWriter(fh, fieldnames=list(METRIC_FIELDS))
        w.writeheader()
        for row in rows:
            w.writerow({k: repr(row[k]) if isinstance(row[k], float) else row[k] for k in row})

    atomic_write(path, writer, text=True)


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, float]]:
    """Rows of a metrics CSV as dicts of floats (``epoch`` as int)."""
    rows = []
    with open(path, newline="") as fh:
        for raw in csv.DictReader(fh):
            row: dict[str, float] = {}
            for k, v in raw.items():
                if k is None:
                    continue
                row[k] = int(v) if k == "epoch" else float(v)
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------- evaluation


def loss_fn(task: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training loss of ``task``: cross-entropy, or for regression the unit-variance
    gaussian negative log-likelihood ``½‖h − y‖²`` (up to a constant) averaged over the
    examples (eq. 32), the likelihood the curvature of ``likelihood="gaussian"`` assumes.
    The test loss of a regression run is the mean squared error (:func:`evaluate`)."""
    return F.cross_entropy if task == "classification" else gaussian_nll


def gaussian_nll(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean_n ½ ‖h_n − y_n‖²`` over the examples (first dimension) of ``output``."""
    return 0.5 * (output - target).square().reshape(output.shape[0], -1).sum(1).mean()


def count_correct(output: torch.Tensor, y: torch.Tensor) -> int:
    """How many rows of ``output`` have their largest logit at the label ``y``."""
    return int((output.argmax(1) == y).sum().item())


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    task: str = "classification",
    batch_size: int = 2000,
) -> tuple[float, float]:
    """Mean loss and accuracy (``NaN`` for regression) of ``model`` in eval mode."""
    was_training = model.training
    model.eval()
    total, correct, n = 0.0, 0, x.shape[0]
    reduce = "sum"
    try:
        for lo in range(0, n, batch_size):
            xb, yb = x[lo : lo + batch_size], y[lo : lo + batch_size]
            out = model(xb)
            if task == "classification":
                total += F.cross_entropy(out, yb, reduction=reduce).item()
                correct += count_correct(out, yb)
            else:
                total += F.mse_loss(out, yb, reduction=reduce).item() / max(1, out[0].numel())
    finally:
        model.train(was_training)
    acc = correct / n if task == "classification" else math.nan
    return total / n, acc


def evaluate_sharded(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    task: str,
    batch_size: int,
    rank: int,
    world: int,
    stop: StopFlags,
) -> tuple[float, float]:
    """:func:`evaluate` over the whole set, each rank on its contiguous share (a stop
    request of any rank travels with the sums and sets ``stop.agreed``)."""
    xs, ys = x.tensor_split(world)[rank], y.tensor_split(world)[rank]
    n = xs.shape[0]
    loss, acc = evaluate(model, xs, ys, task, batch_size) if n else (0.0, 0.0)
    correct = acc * n if task == "classification" and n else 0.0
    total, right, count, asked = sum_over_ranks(
        [loss * n, correct, float(n), float(stop.requested)]
    )
    stop.agreed = stop.agreed or asked > 0
    return total / count, right / count if task == "classification" else math.nan


def evaluate_views(
    model: nn.Module,
    data: TensorData,
    batch_size: int,
    rank: int,
    world: int,
    stop: StopFlags,
) -> tuple[tuple[float, float], tuple[float, float]]:
    """``(loss, acc)`` on the standardised test inputs (``test_*``), then on the raw ones
    (``raw_test_*``; ``NaN`` where the data set has none)."""
    views = []
    for x in (data.x_test, data.x_test_raw):
        if x is None:
            views.append((math.nan, math.nan))
        elif world > 1:
            views.append(evaluate_sharded(
                model, x, data.y_test, data.task, batch_size, rank, world, stop
            ))
        else:
            views.append(evaluate(model, x, data.y_test, data.task, batch_size))
    return views[0], views[1]
