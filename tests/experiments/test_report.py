"""Report numbers recomputed independently from a hand-written fixture of metrics files."""

from __future__ import annotations

import csv
import math
import shutil
import statistics
from fractions import Fraction
from itertools import combinations
from pathlib import Path

import pytest

from kldwrm.experiments import stats
from kldwrm.experiments.report import (
    PAPER_TABLE1,
    TIME_NOTE,
    claims,
    collect_runs,
    mean_sd_curve,
    protocol_comparison,
    summarize,
    time_to_98,
    write_report,
)
from kldwrm.experiments.train import METRIC_FIELDS

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


@pytest.fixture()
def runs_root(tmp_path: Path) -> Path:
    for (solver, seed), rows in RUNS.items():
        d = tmp_path / "mnist" / solver / seed
        d.mkdir(parents=True)
        step = 20.0 if seed == "seed3" else STEP_MS[solver]
        with open(d / "metrics.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=METRIC_FIELDS)
            w.writeheader()
            for epoch, acc, loss, wall in rows:
                w.writerow(dict(epoch=epoch, train_loss=0.5, train_acc=0.9, test_loss=loss,
                                test_acc=acc, raw_test_loss=2 * loss, raw_test_acc=acc - 0.01,
                                wall_time_s=wall, mean_step_ms=step))
    return tmp_path


def test_table1_by_hand(runs_root):
    found = collect_runs(runs_root)
    assert list(found) == ["mnist"] and list(found["mnist"]) == ["kfac", "qe"]
    kfac, qe = summarize(found["mnist"])
    # final epoch is 3 (the last any run reached); kfac seed3 stopped at 2 → left out
    assert kfac.epoch == 3 and kfac.runs == 3 and kfac.incomplete == ["seed3"]
    # accs 98.00, 98.05, 98.50 %; losses 0.25, 0.20, 0.30
    assert kfac.counts == dict(
        n_acc_ge_98=3, n_acc_gt_98=2, n_acc_ge_98_5=1, n_loss_le_0_25=2, n_loss_le_0_2=1
    )
    assert kfac.acc_mean == pytest.approx((98.00 + 98.05 + 98.50) / 3)
    # deviations -0.18333, -0.13333, +0.31667: sum of squares 0.151667, /2, sqrt
    assert kfac.acc_sd == pytest.approx(math.sqrt(0.15166666666666667 / 2), rel=1e-9)
    assert kfac.acc_sd == pytest.approx(0.27537852736, rel=1e-9)
    assert kfac.loss_mean == pytest.approx(0.25)
    assert kfac.loss_sd == pytest.approx(0.05)  # sqrt((0 + 0.0025 + 0.0025) / 2)
    # qe: 97.50 and 99.00 %, losses 0.28 and 0.18
    assert qe.runs == 2 and qe.incomplete == []
    assert qe.counts == dict(
        n_acc_ge_98=1, n_acc_gt_98=1, n_acc_ge_98_5=1, n_loss_le_0_25=1, n_loss_le_0_2=1
    )
    assert qe.acc_mean == pytest.approx(98.25)
    assert qe.acc_sd == pytest.approx(1.5 / math.sqrt(2))
    assert qe.loss_mean == pytest.approx(0.23) and qe.loss_sd == pytest.approx(0.1 / math.sqrt(2))


def test_table1_matches_statistics_module_and_explicit_epoch(runs_root):
    """Each row against an independent computation with the standard library."""
    for epoch in (2, 3):
        for s in summarize(collect_runs(runs_root)["mnist"], epoch=epoch):
            rows = [r for (solver, _), rs in RUNS.items() if solver == s.solver
                    for r in rs if r[0] == epoch]
            acc = [a for _, a, _, _ in rows]
            loss = [l for _, _, l, _ in rows]
            assert s.runs == len(rows)
            assert s.acc_mean == pytest.approx(100 * statistics.fmean(acc))
            assert s.acc_sd == pytest.approx(100 * statistics.stdev(acc))
            assert s.loss_mean == pytest.approx(statistics.fmean(loss))
            assert s.loss_sd == pytest.approx(statistics.stdev(loss))
            assert s.counts["n_acc_ge_98"] == sum(a >= 0.98 for a in acc)
            assert s.counts["n_loss_le_0_25"] == sum(l <= 0.25 for l in loss)
    kfac2 = summarize(collect_runs(runs_root)["mnist"], epoch=2)[0]
    assert kfac2.runs == 4 and kfac2.counts["n_acc_ge_98"] == 2  # 0.980 and 0.982


def test_time_to_98_by_hand(runs_root):
    kfac, qe = time_to_98(collect_runs(runs_root)["mnist"])
    # kfac first reaches 98%: seed0 epoch 2 (20 s), seed1 epoch 3 (31 s), seed2 epoch 1 (9 s)
    assert (kfac.reached, kfac.runs) == (3, 4)
    assert kfac.median_epochs == 2 and kfac.median_seconds == 20.0
    assert kfac.mean_step_ms == pytest.approx((9 * 10.0 + 2 * 20.0) / 11)
    assert (qe.reached, qe.runs, qe.median_epochs, qe.median_seconds) == (1, 2, 2, 50.0)
    assert qe.mean_step_ms == pytest.approx(40.0)


def test_figure_curves_mean_and_band(runs_root):
    kfac = collect_runs(runs_root)["mnist"]["kfac"]
    ep, mean, sd = mean_sd_curve(kfac, "test_loss")
    assert ep.tolist() == [1, 2, 3]
    assert mean.tolist() == pytest.approx([0.425, 0.325, 0.25])
    assert sd[0] == pytest.approx(statistics.stdev([0.40, 0.45, 0.35, 0.50]))
    assert sd[2] == pytest.approx(0.05)
    ep, mean, _ = mean_sd_curve(kfac, "test_acc", 100.0)
    assert mean[2] == pytest.approx((98.00 + 98.05 + 98.50) / 3)


def test_write_report_files_and_text(runs_root):
    text = write_report(runs_root)
    out = runs_root / "report"
    for name in (
        "mnist_table1.md",
        "mnist_table1.csv",
        "mnist_time_to_98.csv",
        "mnist_claims.csv",
        "mnist_figure1_test_loss.png",
        "mnist_figure2_test_accuracy.png",
    ):
        assert (out / name).is_file(), name
    assert (out / "mnist_figure2_test_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert (
        "| K-FAC | this run (epoch 3) | 3 | 3 | 2 | 1 | 2 | 1 | 98.18 | 0.28 | 0.250 | 0.050 |"
        in text
    )
    assert (
        "| K-FAC | paper (epoch 50) | 10 | 3 | 3 | 1 | 5 | 2 | 96.19 | 3.20 | 0.26 | 0.10 |" in text
    )
    assert "| QE | paper (epoch 50) | 10 | 8 | 7 | 2 | 9 | 0 | 98.01 | 0.64 | 0.23 | 0.02 |" in text
    assert (
        "| QE | this run (epoch 3) | 2 | 1 | 1 | 1 | 1 | 1 | 98.25 | 1.06 | 0.230 | 0.071 |" in text
    )
    assert "| K-FAC | 3/4 | 2.0 | 20.0 | 11.8 |" in text
    assert "sample SD (ddof=1)" in text and "seed3" in text
    # the raw view (accuracy 1 point lower, loss doubled in the fixture), with the paper rows
    normalised, raw = text.split("### Raw test inputs")
    assert "paper" not in normalised.replace("Paper rows", "")
    assert (
        "| K-FAC | this run (epoch 3) | 3 | 0 | 0 | 0 | 0 | 0 | 97.18 | 0.28 | 0.500 | 0.100 |"
        in raw
    )
    assert "| K-FAC | paper (epoch 50) |" in raw and "| K-FAC | 0/4 | — | — | 11.8 |" in raw
    assert (out / "mnist_table1.md").read_text().strip() == text.strip()
    table = [r for r in _read_csv(out / "mnist_table1.csv") if r["view"] == "normalised"]
    raw_rows = [r for r in _read_csv(out / "mnist_table1.csv") if r["view"] == "raw"]
    assert float(raw_rows[0]["loss_mean"]) == pytest.approx(0.5)
    ours = {r["solver"]: r for r in table if r["source"] == "this run"}
    assert float(ours["kfac"]["acc_mean"]) == pytest.approx((98.00 + 98.05 + 98.50) / 3)
    assert float(ours["qe"]["loss_sd"]) == pytest.approx(0.1 / math.sqrt(2))
    paper = {r["solver"]: r for r in raw_rows if r["source"] == "paper"}
    for solver, vals in PAPER_TABLE1.items():
        if solver in paper:
            for k, v in vals.items():
                assert float(paper[solver][k]) == pytest.approx(v)
    times = {r["solver"]: r for r in _read_csv(out / "mnist_time_to_98.csv")
             if r["view"] == "normalised"}
    assert float(times["kfac"]["median_seconds"]) == 20.0 and int(times["qe"]["reached"]) == 1


def _read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_paper_values_complete_and_no_paper_for_other_data(tmp_path, runs_root):
    assert {
        s: [
            v[k]
            for k in (
                "n_acc_ge_98",
                "n_acc_gt_98",
                "n_acc_ge_98_5",
                "n_loss_le_0_25",
                "n_loss_le_0_2",
            )
        ]
        for s, v in PAPER_TABLE1.items()
    } == {
        "kfac": [3, 3, 1, 5, 2],
        "so": [4, 2, 0, 7, 0],
        "q": [5, 4, 0, 4, 0],
        "qe": [8, 7, 2, 9, 0],
    }
    assert [PAPER_TABLE1[s]["acc_mean"] for s in ("kfac", "so", "q", "qe")] == [
        96.19,
        97.60,
        97.69,
        98.01,
    ]
    other = runs_root / "mnist"
    fm = tmp_path / "fm_root" / "fashion-mnist"
    fm.parent.mkdir()
    other.rename(fm)
    text = write_report(fm.parent)
    assert "paper" not in text.split("Files:")[0].replace("Paper rows", "")
    assert (fm.parent / "report" / "fashion-mnist_table1.csv").is_file()


def test_empty_directory_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="no runs"):
        write_report(tmp_path)


# epoch 3, normalised view: K-FAC seeds 0-2 and QE seeds 0-1 (accuracy in points)
KFAC_ACC, QE_ACC = [98.00, 98.05, 98.50], [97.50, 99.00]
KFAC_LOSS, QE_LOSS = [0.25, 0.20, 0.30], [0.28, 0.18]


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
    rows = _read_csv(runs_root / "report" / "mnist_claims.csv")
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
    rows = _read_csv(runs_root / "report" / "mnist_claims.csv")
    assert all(math.isnan(float(r["welch_p"])) for r in rows) and len(rows) == 4
    shutil.rmtree(runs_root / "mnist" / "kfac")
    text = write_report(runs_root)
    assert "No K-FAC runs: nothing to compare against." in text
    assert _read_csv(runs_root / "report" / "mnist_claims.csv") == []
    kfac_only = tmp_path_factory.mktemp("kfac_only")
    shutil.copytree(runs_root / "mnist" / "qe", kfac_only / "mnist" / "kfac")
    assert "Only K-FAC runs: nothing to compare." in write_report(kfac_only)
    assert _read_csv(kfac_only / "report" / "mnist_claims.csv") == []


def test_time_table_caveat(runs_root):
    text = write_report(runs_root)
    table = "| K-FAC | 3/4 | 2.0 | 20.0 | 11.8 |\n| QE | 1/2 | 2.0 | 50.0 | 40.0 |"
    assert table + "\n\n" + TIME_NOTE in text  # the note right under the table
    assert "not a speed benchmark, see docs/benchmarks.md" in TIME_NOTE


def test_protocol_comparison(runs_root, tmp_path_factory):
    released = tmp_path_factory.mktemp("released")
    shutil.copytree(runs_root / "mnist", released / "mnist")
    (released / "mnist" / "qe" / "seed1" / "metrics.csv").unlink()
    text = protocol_comparison({"corrected": runs_root, "released": released})
    assert text.startswith("## Protocol comparison — mnist")
    assert "uncorrected for multiple comparisons" in text
    normalised, raw = text.split("### Raw test inputs")
    kfac = "| K-FAC | 3 | 3 | 3 | 2 | 1 | 2 | 1 | 98.18 | 0.28 | 0.250 | 0.050 |"
    rows = [f"| corrected {kfac}", f"| released {kfac}",
            "| corrected | QE | 3 | 2 | 1 | 1 | 1 | 1 | 1 | 98.25 | 1.06 | 0.230 | 0.071 |",
            # released QE: seed0 only (97.50%, loss 0.28), no SD
            "| released | QE | 3 | 1 | 0 | 0 | 0 | 0 | 0 | 97.50 | — | 0.280 | — |"]
    assert [normalised.index(r) for r in rows] == sorted(normalised.index(r) for r in rows)
    assert "| corrected | QE vs K-FAC | acc (points) | 3 | 2 | +0.07 |" in normalised
    assert "| released | QE vs K-FAC | acc (points) | 3 | 1 |" + " — |" * 7 in normalised
    assert "| paper | K-FAC | 50 | 10 |" in raw and "| paper |" not in normalised
    assert "corrected: K-FAC: left out (did not reach epoch 3): seed3." in normalised
    at2 = protocol_comparison({"corrected": runs_root, "released": released}, 2, paper=False)
    assert "| corrected | K-FAC | 2 | 4 |" in at2 and "| paper |" not in at2
    shutil.rmtree(released / "mnist" / "kfac")
    one_sided = protocol_comparison({"corrected": runs_root, "released": released})
    assert "released: no K-FAC runs." in one_sided and "| corrected | QE vs K-FAC |" in one_sided
    shutil.rmtree(runs_root / "mnist" / "kfac")
    none = protocol_comparison({"corrected": runs_root, "released": released})
    assert "No K-FAC runs: nothing to compare against." in none and "| Pair" not in none
    with pytest.raises(FileNotFoundError, match="empty"):
        protocol_comparison({"corrected": runs_root, "empty": tmp_path_factory.mktemp("e")})


def test_claims_with_a_non_finite_value():
    def run(acc, loss):
        return [dict(epoch=1, test_acc=acc, test_loss=loss)]

    solvers = {"kfac": {"seed0": run(0.97, math.nan), "seed1": run(0.98, 0.2)},
               "so": {"seed0": run(0.975, 0.25), "seed1": run(0.985, 0.22)}}
    acc, loss = claims(solvers)
    assert acc.comparison is not None and acc.comparison.n_a == 2
    assert loss.comparison is None and loss.reason == "non-finite values"
