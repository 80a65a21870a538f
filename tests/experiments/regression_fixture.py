"""Hand-written metrics files of a regression data set (no accuracy, no raw view) that the
report tests recompute by hand (not a test module).

The data set is named ``sincos`` (the regression task of ``kldwrm reproduce --task
regression``), whose noise floor is a test MSE of 0.1² = 0.01: a run is "near the floor"
at a test MSE ≤ 0.02.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from kldwrm.experiments.study.runs import Runs
from kldwrm.experiments.training.train import METRIC_FIELDS

DATASET = "sincos"
FLOOR = 0.01
# (epoch, test_loss = test MSE, wall_time_s) per run.
RUNS = {
    ("kfac", "seed0"): [(1, 0.050, 5.0), (2, 0.019, 10.0), (3, 0.015, 15.0)],
    ("kfac", "seed1"): [(1, 0.080, 6.0), (2, 0.030, 12.0), (3, 0.025, 18.0)],  # never ≤ 0.02
    ("kfac", "seed2"): [(1, 0.020, 4.0), (2, 0.018, 8.0), (3, 0.012, 12.0)],  # = 0.02 counts
    ("qe", "seed0"): [(1, 0.040, 20.0), (2, 0.016, 40.0), (3, 0.011, 60.0)],
    ("qe", "seed1"): [(1, 0.030, 20.0), (2, 0.021, 40.0), (3, 0.0205, 60.0)],  # just above
    ("qe", "seed2"): [(1, 0.060, 21.0), (2, 0.025, 41.0)],  # incomplete
}
STEP_MS = {"kfac": 2.0, "qe": 8.0}


def _row(solver: str, epoch: int, loss: float, wall: float) -> dict[str, float]:
    nan = math.nan
    return dict(epoch=epoch, train_loss=2 * loss, train_acc=nan, test_loss=loss, test_acc=nan,
                raw_test_loss=nan, raw_test_acc=nan, wall_time_s=wall,
                mean_step_ms=STEP_MS[solver])


def solvers() -> dict[str, Runs]:
    """:data:`RUNS` in memory, as :func:`~kldwrm.experiments.study.runs.collect_runs` reads them."""
    out: dict[str, Runs] = {}
    for (solver, seed), rows in RUNS.items():
        out.setdefault(solver, {})[seed] = [_row(solver, *r) for r in rows]
    return out


def write_runs(root: Path, dataset: str = DATASET) -> Path:
    """:data:`RUNS` as ``root/<dataset>/<solver>/<seed>/metrics.csv``. Returns ``root``."""
    for (solver, seed), rows in RUNS.items():
        d = root / dataset / solver / seed
        d.mkdir(parents=True)
        with open(d / "metrics.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=METRIC_FIELDS)
            w.writeheader()
            w.writerows(_row(solver, *r) for r in rows)
    return root
