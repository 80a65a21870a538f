"""The metrics CSV and the evaluation of the test views
(:mod:`kldwrm.experiments.training.metrics`)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kldwrm.experiments.data.datasets import TensorData
from kldwrm.experiments.training.interrupt import StopFlags
from kldwrm.experiments.training.metrics import (
    METRIC_FIELDS,
    count_correct,
    evaluate,
    evaluate_views,
    read_metrics,
    write_metrics,
)


def _row(epoch: int) -> dict[str, float]:
    row = {k: 1.0 / (3 + epoch + i) for i, k in enumerate(METRIC_FIELDS)}
    row["epoch"] = epoch
    row["train_acc"] = math.nan
    return row


def test_metrics_round_trip_exactly(tmp_path):
    rows = [_row(1), _row(2)]
    path = tmp_path / "metrics.csv"
    write_metrics(path, rows)
    back = read_metrics(path)
    assert [r["epoch"] for r in back] == [1, 2] and isinstance(back[0]["epoch"], int)
    for a, b in zip(rows, back, strict=True):
        assert set(a) == set(b)
        for k in a:
            assert repr(a[k]) == repr(b[k]), k  # every float to the last bit, NaN too
    write_metrics(path, [])
    assert read_metrics(path) == []
    assert path.read_text().strip() == ",".join(METRIC_FIELDS)


def test_count_correct():
    out = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert count_correct(out, torch.tensor([1, 1, 1])) == 2


def test_evaluate_restores_the_mode_and_handles_regression():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.Dropout(0.5))
    x, y = torch.randn(7, 3), torch.randn(7, 2)
    model.train()
    loss, acc = evaluate(model, x, y, "regression", batch_size=3)
    assert model.training and math.isnan(acc)
    with torch.no_grad():
        model.eval()
        expected = nn.functional.mse_loss(model(x), y).item()
    assert loss == pytest.approx(expected, rel=1e-6)


def test_evaluate_views_without_a_raw_view():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    data = TensorData("toy", "classification", x, y, x, y)
    test, raw = evaluate_views(model, data, 4, 0, 1, StopFlags(1))
    assert test == evaluate(model, x, y, "classification", 4)
    assert all(math.isnan(v) for v in raw)
    both = TensorData("toy", "classification", x, y, x, y, x_test_raw=2 * x)
    _, raw = evaluate_views(model, both, 4, 0, 1, StopFlags(1))
    assert raw == evaluate(model, 2 * x, y, "classification", 4)
