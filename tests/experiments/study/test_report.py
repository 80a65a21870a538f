"""The written report (Table 1, time to 98%, claims, figures) and the protocol comparison,
against numbers recomputed by hand from the fixture of :mod:`.report_fixture`."""

from __future__ import annotations

import math
import shutil
import statistics

import pytest

from kldwrm.experiments.study import claims, figures, report, runs
from kldwrm.experiments.study.report import (
    PAPER_TABLE1,
    TIME_HEAD,
    TIME_NOTE,
    protocol_comparison,
    write_report,
)

from .. import regression_fixture as reg
from ..report_fixture import read_csv, write_runs


@pytest.fixture()
def runs_root(tmp_path):
    return write_runs(tmp_path)


def test_names_split_out_stay_importable_from_report():
    assert sorted(report.__all__) == [
        "ClaimRow", "PAPER_TABLE1", "SolverSummary", "TimeTo98", "VIEWS", "claims",
        "collect_runs", "final_epoch", "make_figures", "mean_sd_curve", "protocol_comparison",
        "summarize", "time_to_98", "write_report"]
    moved = {
        runs: ["PAPER_TABLE1", "PAPER_RUNS", "PAPER_EPOCH", "PAPER_VIEW", "VIEWS", "VIEW_LABEL",
               "DISPLAY", "Runs", "Protocols", "SolverSummary", "TimeTo98", "collect_runs",
               "available_views", "final_epoch", "summarize", "time_to_98", "mean_sd_curve"],
        claims: ["ClaimRow", "claims", "REFERENCE", "CLAIM_METRICS", "CLAIM_SEED", "CLAIM_BOOT",
                 "CLAIM_PERM_EXACT", "CLAIM_PERM_MC", "CLAIM_LABEL", "CLAIM_HEAD",
                 "CLAIM_COLUMNS"],
        figures: ["make_figures"],
    }
    for module, names in moved.items():
        for name in names:
            assert getattr(report, name) is getattr(module, name), name
    for name in ("COUNT_COLUMNS", "CSV_COLUMNS", "TABLE_HEAD", "TIME_COLUMNS", "TIME_NOTE"):
        assert hasattr(report, name), name


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
    table = [r for r in read_csv(out / "mnist_table1.csv") if r["view"] == "normalised"]
    raw_rows = [r for r in read_csv(out / "mnist_table1.csv") if r["view"] == "raw"]
    assert float(raw_rows[0]["loss_mean"]) == pytest.approx(0.5)
    ours = {r["solver"]: r for r in table if r["source"] == "this run"}
    assert float(ours["kfac"]["acc_mean"]) == pytest.approx((98.00 + 98.05 + 98.50) / 3)
    assert float(ours["qe"]["loss_sd"]) == pytest.approx(0.1 / math.sqrt(2))
    paper = {r["solver"]: r for r in raw_rows if r["source"] == "paper"}
    for solver, vals in PAPER_TABLE1.items():
        if solver in paper:
            for k, v in vals.items():
                assert float(paper[solver][k]) == pytest.approx(v)
    times = {r["solver"]: r for r in read_csv(out / "mnist_time_to_98.csv")
             if r["view"] == "normalised"}
    assert float(times["kfac"]["median_seconds"]) == 20.0 and int(times["qe"]["reached"]) == 1


def test_no_paper_for_other_data(tmp_path, runs_root):
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


# --------------------------------------------------------------------------- regression

# epoch 3 of the regression fixture: test MSE per run (K-FAC seeds 0-2, QE seeds 0-1)
REG_KFAC, REG_QE = [0.015, 0.025, 0.012], [0.011, 0.0205]
REG_FILES = ["sincos_claims.csv", "sincos_figure1_test_loss.png", "sincos_table1.csv",
             "sincos_table1.md", "sincos_time_to_2x_noise_floor.csv"]


def _near_floor(losses: list[float]) -> int:
    return sum(v <= 2 * reg.FLOOR + 1e-12 for v in losses)


def _mse_row(label: str, losses: list[float]) -> str:
    """A regression Table 1 row: runs, N MSE≤0.02, mean and SD of the test MSE."""
    return (f"| {label} | {len(losses)} | {_near_floor(losses)} | "
            f"{statistics.fmean(losses):.4f} | {statistics.stdev(losses):.4f} |")


def test_regression_report_shows_no_classification_material(tmp_path):
    root = reg.write_runs(tmp_path / "runs")
    text = write_report(root, paper=True)  # the paper's rows are MNIST classification: never
    out = root / "report"
    assert sorted(p.name for p in out.iterdir()) == REG_FILES  # Figure 1 only
    assert _near_floor(REG_KFAC) == 2 and _near_floor(REG_QE) == 1  # 0.0205 is not ≤ 0.02
    head = "| Solver | Source | Runs | N MSE≤0.02 | μ test MSE | σ test MSE |"
    assert head in text and "| K-FAC | this run (epoch 3) | 3 | 2 | 0.0173 | 0.0068 |" in text
    assert _mse_row("QE | this run (epoch 3)", REG_QE) in text
    assert "Noise floor: test MSE 0.01" in text and "within 2× of it" in text
    body = text.replace(str(tmp_path), "")  # the file list names tmp_path (pytest-98/...)
    for absent in ("acc", "98", "Raw", "raw", "paper", "Paper", "figure2"):
        assert absent not in body, absent
    assert "QE: left out (did not reach epoch 3): seed2." in text
    # time to MSE ≤ 0.02: K-FAC seed0 epoch 2 (10 s), seed2 epoch 1 (4 s), seed1 never;
    # QE seed0 epoch 2 (40 s) only
    assert "Time to test MSE ≤ 0.02, 2× the noise floor (median over the seeds" in text
    assert "| Solver | reached MSE≤0.02 | median epochs to MSE≤0.02 |" in text
    assert "| K-FAC | 3/3 | " not in text and "| K-FAC | 2/3 | 1.5 | 7.0 | 2.0 |" in text
    assert "| QE | 1/3 | 2.0 | 40.0 | 8.0 |" in text
    assert (out / "sincos_table1.md").read_text().strip() == text.strip()


def test_regression_csv_files(tmp_path):
    root = reg.write_runs(tmp_path / "runs")
    write_report(root)
    out = root / "report"
    with open(out / "sincos_table1.csv") as fh:
        assert fh.readline().strip() == ("dataset,view,solver,source,runs,epoch,"
                                         "n_mse_le_2x_floor,loss_mean,loss_sd,noise_floor")
    table = {r["solver"]: r for r in read_csv(out / "sincos_table1.csv")}
    assert {r["view"] for r in table.values()} == {"normalised"}
    for solver, losses in (("kfac", REG_KFAC), ("qe", REG_QE)):
        assert int(table[solver]["n_mse_le_2x_floor"]) == _near_floor(losses)
        assert float(table[solver]["loss_mean"]) == pytest.approx(statistics.fmean(losses))
        assert float(table[solver]["loss_sd"]) == pytest.approx(statistics.stdev(losses))
        assert float(table[solver]["noise_floor"]) == pytest.approx(reg.FLOOR)
    times = {r["solver"]: r for r in read_csv(out / "sincos_time_to_2x_noise_floor.csv")}
    assert (times["kfac"]["reached"], times["kfac"]["median_seconds"]) == ("2", "7.0")
    assert [r["metric"] for r in read_csv(out / "sincos_claims.csv")] == ["loss"]


def test_regression_is_decided_from_the_data(tmp_path):
    unknown = reg.write_runs(tmp_path / "unknown", dataset="mydata")  # no known noise floor
    text = write_report(unknown)
    assert "| Solver | Source | Runs | μ test MSE | σ test MSE |" in text
    assert "no noise floor is known for mydata" in text and "Time to" not in text
    assert sorted(p.name for p in (unknown / "report").iterdir()) == [
        "mydata_claims.csv", "mydata_figure1_test_loss.png", "mydata_table1.csv",
        "mydata_table1.md"]
    named = tmp_path / "named"
    named.mkdir()
    (write_runs(tmp_path / "cls") / "mnist").rename(named / "sincos")
    classified = write_report(named)  # accuracies: classification, whatever the name
    assert "N acc≥98%" in classified and "Noise floor" not in classified


def test_regression_protocol_comparison(tmp_path):
    a, b = reg.write_runs(tmp_path / "a"), reg.write_runs(tmp_path / "b")
    (b / "sincos" / "qe" / "seed1" / "metrics.csv").unlink()
    text = protocol_comparison({"corrected": a, "released": b})
    assert "| Protocol | Solver | Epoch | Runs | N MSE≤0.02 | μ test MSE | σ test MSE |" in text
    assert _mse_row("corrected | QE | 3", REG_QE) in text
    assert "| released | QE | 3 | 1 | 1 | 0.0110 | — |" in text  # seed0 only: no SD
    assert "| corrected | QE vs K-FAC | loss | 3 | 2 |" in text
    assert "acc" not in text and "Raw" not in text and "Noise floor: test MSE 0.01" in text


# --------------------------------------------------------------------------- per-data-set level


def test_time_to_level_per_data_set(tmp_path, runs_root, monkeypatch):
    fm = tmp_path / "fm"
    fm.mkdir()
    (runs_root / "mnist").rename(fm / "fashion-mnist")
    text = write_report(fm)
    out = fm / "report"
    assert not (out / "fashion-mnist_time_to_98.csv").exists()
    # 85%: every run of the fixture reaches it at epoch 1 (K-FAC 10, 11, 9, 12 s; QE 25 s)
    assert "Time to 85% test accuracy (median over the seeds that reached it):" in text
    assert "| Solver | reached 85% | median epochs to 85% | median seconds to 85% |" in text
    assert "| K-FAC | 4/4 | 1.0 | 10.5 | 11.8 |" in text and "| QE | 2/2 | 1.0 | 25.0 |" in text
    assert "Time to 98%" not in text and "to 98%" not in text and text.count("Time to 85%") == 2
    times = {r["solver"]: r for r in read_csv(out / "fashion-mnist_time_to_85.csv")
             if r["view"] == "normalised"}
    assert float(times["kfac"]["median_seconds"]) == 10.5
    # Table 1's MNIST counts give way to one count at the data set's level
    assert "| Runs | N acc≥85% | μ acc (%) |" in text and "N acc≥98%" not in text
    # the level is one constant per data set
    monkeypatch.setitem(runs.ACC_TARGET, "fashion-mnist", 0.975)
    text = write_report(fm)
    assert "Time to 97.5% test accuracy" in text and "| K-FAC | 3/4 |" in text
    assert "| Runs | N acc≥97.5% |" in text
    table = [r for r in read_csv(out / "fashion-mnist_table1.csv") if r["solver"] == "kfac"]
    assert {r["n_acc_ge_97_5"] for r in table if r["view"] == "normalised"} == {"3"}
    assert (out / "fashion-mnist_time_to_97.5.csv").is_file()
    assert TIME_HEAD[1] == "reached 98%"
