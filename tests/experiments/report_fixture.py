"""The hand-written metrics files that the report tests recompute by hand (not a test module).

Each test module makes its own ``runs_root`` fixture with :func:`write_runs`.
"""

from __future__ import annotations

import csv
from pathlib import Path

from kldwrm.experiments.training.train import METRIC_FIELDS

# (epoch, test_acc, test_loss, wall_time_s) per run; train columns are filler.
RUNS = {
    ("kfac", "seed0"): [(1, 0.9700, 0.40, 10.0), (2, 0.9800, 0.30, 20.0), (3, 0.9800, 0.25, 30.0)],
    ("kfac", "seed1"): [(1, 0.9500, 0.45, 11.0), (2, 0.9790, 0.28, 21.0), (3, 0.9805, 0.20, 31.0)],
    ("kfac", "seed2"): [(1, 0.9810, 0.35, 9.0), (2, 0.9820, 0.32, 19.0), (3, 0.9850, 0.30, 29.0)],
    ("kfac", "seed3"): [(1, 0.9600, 0.50, 12.0), (2, 0.9700, 0.40, 22.0)],  # incomplete
    ("qe", "seed0"): [(1, 0.9600, 0.42, 25.0), (2, 0.9750, 0.30, 50.0), (3, 0.9750, 0.28, 75.0)],
    ("qe", "seed1"): [(1, 0.9700, 0.38, 25.0), (2, 0.9850, 0.22, 50.0), (3, 0.9900, 0.18, 75.0)],
}
STEP_MS = {"kfac": 10.0, "qe": 40.0}


def write_runs(root: Path) -> Path:
    """:data:`RUNS` as ``root/mnist/<solver>/<seed>/metrics.csv``; the raw view has accuracy
    1 point lower and loss doubled. Returns ``root``."""
    for (solver, seed), rows in RUNS.items():
        d = root / "mnist" / solver / seed
        d.mkdir(parents=True)
        step = 20.0 if seed == "seed3" else STEP_MS[solver]
        with open(d / "metrics.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=METRIC_FIELDS)
            w.writeheader()
            for epoch, acc, loss, wall in rows:
                w.writerow(dict(epoch=epoch, train_loss=0.5, train_acc=0.9, test_loss=loss,
                                test_acc=acc, raw_test_loss=2 * loss, raw_test_acc=acc - 0.01,
                                wall_time_s=wall, mean_step_ms=step))
    return root


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))
