"""The claims against K-FAC recomputed by hand from the fixture, and their tables."""

from __future__ import annotations

import math
import shutil
import statistics
from fractions import Fraction
from itertools import combinations

import pytest

from kldwrm.experiments.study import stats
from kldwrm.experiments.study.claims import claims, claims_conventions, claims_section
from kldwrm.experiments.study.report import write_report
from kldwrm.experiments.study.runs import collect_runs

from .. import regression_fixture as reg
from ..report_fixture import read_csv, write_runs

# epoch 3, normalised view: K-FAC seeds 0-2 and QE seeds 0-1 (accuracy in points)
KFAC_ACC, QE_ACC = [98.00, 98.05, 98.50], [97.50, 99.00]
KFAC_LOSS, QE_LOSS = [0.25, 0.20, 0.30], [0.28, 0.18]


@pytest.fixture()
def runs_root(tmp_path):
    return write_runs(tmp_path)


def _brute_permutation_p(a, b) -> float:
    """Exact two-sided permutation p over every split, in exact arithmetic."""
    pooled = [Fraction(str(v)) for v in (*a, *b)]

    def abs_diff(idx_b):
        xb = [pooled[i] for i in idx_b]
        xa = [v for i, v in enumerate(pooled) if i not in idx_b]
        return abs(sum(xb) / len(xb) - sum(xa) / len(xa))

    observed = abs_diff(tuple(range(len(a), len(pooled))))
    splits = list(combinations(range(len(pooled)), len(b)))
    return sum(abs_diff(s) >= observed for s in splits) / len(splits)


def test_claims_by_hand(runs_root):
    acc, loss = claims(collect_runs(runs_root)["mnist"])
    assert (acc.solver_a, acc.solver_b, acc.metric, loss.metric) == ("kfac", "qe", "acc", "loss")
    # epoch 3 by default; kfac seed3 stopped at epoch 2 and is left out
    assert (acc.epoch, acc.n_a, acc.n_b) == (3, 3, 2)
    for row, a, b in ((acc, KFAC_ACC, QE_ACC), (loss, KFAC_LOSS, QE_LOSS)):
        c = row.comparison
        va, vb = statistics.variance(a), statistics.variance(b)
        assert c.diff == pytest.approx(statistics.fmean(b) - statistics.fmean(a))
        assert c.welch.t == pytest.approx(c.diff / math.sqrt(va / 3 + vb / 2))
        assert c.welch.df == pytest.approx((va / 3 + vb / 2) ** 2
                                           / ((va / 3) ** 2 / 2 + (vb / 2) ** 2 / 1))
        assert c.permutation.exact and c.permutation.relabelings == 10  # C(5, 2)
        assert c.permutation.p == pytest.approx(_brute_permutation_p(a, b))
        assert c.f.ratio == pytest.approx(vb / va) and (c.f.df1, c.f.df2) == (1, 2)
        assert c.bootstrap.low < c.diff < c.bootstrap.high
        assert c == stats.compare(a, b, seed=0)
    # by hand: every one of the 10 splits has |Δ acc| ≥ 0.067, and 7 of them |Δ loss| ≥ 0.02
    assert acc.comparison.permutation.p == pytest.approx(1.0)
    assert loss.comparison.permutation.p == pytest.approx(0.7)
    at2 = claims(collect_runs(runs_root)["mnist"], epoch=2)[0]
    assert (at2.epoch, at2.n_a, at2.n_b) == (2, 4, 2)


def test_claims_in_report_and_csv(runs_root):
    text = write_report(runs_root)
    raw_tables, claims_text = text.split("### Claims: each solver against K-FAC")
    assert "### Raw test inputs" in raw_tables and "| Pair (B vs A) |" not in raw_tables
    assert "uncorrected for multiple comparisons" in claims_text
    assert "Δ = mean(B) − mean(A)" in claims_text and "s²_B/s²_A" in claims_text
    assert "percentile" in claims_text and "seed 0" in claims_text
    normalised, raw = claims_text.split("#### Claims — raw test inputs")
    for part, loss_digits in ((normalised, "-0.020"), (raw, "-0.040")):
        assert "| QE vs K-FAC | acc (points) | 3 | 2 | +0.07 | " in part
        assert f"| QE vs K-FAC | loss | 3 | 2 | {loss_digits} | " in part
    assert "| 1.000 |" in normalised and "| 0.700 |" in normalised  # permutation p
    rows = read_csv(runs_root / "report" / "mnist_claims.csv")
    got = {(r["view"], r["metric"]): r for r in rows}
    assert sorted(got) == [("normalised", "acc"), ("normalised", "loss"), ("raw", "acc"),
                           ("raw", "loss")]
    assert float(got["normalised", "acc"]["mean_a"]) == pytest.approx(statistics.fmean(KFAC_ACC))
    assert float(got["normalised", "acc"]["diff"]) == pytest.approx(98.25 - 294.55 / 3)
    assert float(got["normalised", "loss"]["perm_p"]) == pytest.approx(0.7)
    # the raw view is the normalised one with accuracy 1 point lower and loss doubled:
    # differences shift/scale accordingly, every p-value and variance ratio stays
    for metric, scale in (("acc", 1.0), ("loss", 2.0)):
        n, r = got["normalised", metric], got["raw", metric]
        for key in ("diff", "ci_low", "ci_high"):
            assert float(r[key]) == pytest.approx(scale * float(n[key]), rel=1e-6)
        for key in ("welch_p", "perm_p", "f_p", "bf_p", "var_ratio"):
            assert float(r[key]) == pytest.approx(float(n[key]), rel=1e-6)


def test_claims_with_fewer_than_two_runs_and_without_kfac(runs_root, tmp_path_factory):
    (runs_root / "mnist" / "qe" / "seed1" / "metrics.csv").unlink()
    text = write_report(runs_root)
    assert "| QE vs K-FAC | acc (points) | 3 | 1 |" + " — |" * 7 in text
    assert "fewer than 2 runs in a group" in text
    rows = read_csv(runs_root / "report" / "mnist_claims.csv")
    assert all(math.isnan(float(r["welch_p"])) for r in rows) and len(rows) == 4
    shutil.rmtree(runs_root / "mnist" / "kfac")
    text = write_report(runs_root)
    assert "No K-FAC runs: nothing to compare against." in text
    assert read_csv(runs_root / "report" / "mnist_claims.csv") == []
    kfac_only = tmp_path_factory.mktemp("kfac_only")
    shutil.copytree(runs_root / "mnist" / "qe", kfac_only / "mnist" / "kfac")
    assert "Only K-FAC runs: nothing to compare." in write_report(kfac_only)
    assert read_csv(kfac_only / "report" / "mnist_claims.csv") == []
    one_each = tmp_path_factory.mktemp("one_each")
    for solver in ("kfac", "qe"):
        shutil.copytree(runs_root / "mnist" / "qe" / "seed0",
                        one_each / "mnist" / solver / "seed0")
    text = write_report(one_each)
    assert "One run per solver: the tests need at least 2 seeds per solver" in text
    assert "| Pair" not in text and read_csv(one_each / "report" / "mnist_claims.csv") == []


def test_claims_with_a_non_finite_value():
    def run(acc, loss):
        return [dict(epoch=1, test_acc=acc, test_loss=loss)]

    solvers = {"kfac": {"seed0": run(0.97, math.nan), "seed1": run(0.98, 0.2)},
               "so": {"seed0": run(0.975, 0.25), "seed1": run(0.985, 0.22)}}
    acc, loss = claims(solvers)
    assert acc.comparison is not None and acc.comparison.n_a == 2
    assert loss.comparison is None and loss.reason == "non-finite values"


def test_regression_claims_are_on_the_loss_only():
    solvers = reg.solvers()
    (row,) = claims(solvers, metrics=("loss",))
    # epoch 3: K-FAC 0.015, 0.025, 0.012; QE 0.011, 0.0205 (seed2 stopped at epoch 2)
    a, b = [0.015, 0.025, 0.012], [0.011, 0.0205]
    assert (row.metric, row.epoch, row.n_a, row.n_b) == ("loss", 3, 3, 2)
    assert row.comparison == stats.compare(a, b, seed=0)
    assert row.comparison.diff == pytest.approx(statistics.fmean(b) - statistics.fmean(a))
    assert [r.metric for r in claims(solvers)] == ["acc", "loss"]  # the default: both
    assert claims(solvers)[0].reason == "non-finite values"
    text, records = claims_section("sincos", ["test"], solvers, 3, ("loss",))
    assert [r["metric"] for r in records] == ["loss"] and "acc (points)" not in text
    assert "| QE vs K-FAC | loss | 3 | 2 | " in text
    assert "Δ loss < 0 favours B" in text and "accuracy" not in text
    assert "accuracy in percentage points" in claims_conventions()
