"""Table 1 statistics, time to 98% and figure curves recomputed by hand from the fixture."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from kldwrm.experiments.data.datasets import sincos_regression
from kldwrm.experiments.study.runs import (
    ACC_TARGET,
    PAPER_EPOCH,
    PAPER_RUNS,
    PAPER_TABLE1,
    TABLE1_COUNTS,
    Level,
    collect_runs,
    display_name,
    is_regression,
    mean_sd_curve,
    measures,
    noise_floor,
    paper_summary,
    report_views,
    summarize,
    time_to,
    time_to_98,
    timing_device,
)

from .. import regression_fixture as reg
from ..report_fixture import RUNS, write_runs


@pytest.fixture()
def runs_root(tmp_path):
    return write_runs(tmp_path)


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


def _ran_on(runs_root, solver, seed, **saved):
    (runs_root / "mnist" / solver / seed / "config.json").write_text(json.dumps(saved))


def test_seconds_of_runs_on_other_hardware_are_left_out_but_their_epochs_count(runs_root):
    _ran_on(runs_root, "kfac", "seed0", device="cuda")  # an old record: no history
    _ran_on(runs_root, "kfac", "seed2", device="cpu", devices=["cuda", "cpu"])  # resumed
    _ran_on(runs_root, "kfac", "seed1", device="cpu", devices=["cpu"])
    kfac, qe = time_to_98(collect_runs(runs_root)["mnist"])
    # reached 98%: seed0 epoch 2, seed1 epoch 3 (31 s), seed2 epoch 1; only seed1 and the
    # incomplete seed3 (no config: the default device, the CPU) are timed
    assert (kfac.reached, kfac.runs, kfac.median_epochs, kfac.timed) == (3, 4, 2, 2)
    assert kfac.median_seconds == 31.0
    assert kfac.mean_step_ms == pytest.approx((3 * 10.0 + 2 * 20.0) / 5)
    assert (qe.timed, qe.median_seconds) == (2, 50.0)
    runs = collect_runs(runs_root)["mnist"]["kfac"]
    assert all(math.isnan(r["wall_time_s"]) for r in runs["seed0"] + runs["seed2"])
    assert runs["seed0"][1]["test_acc"] == 0.98  # the rest of the row is kept


def test_the_timing_device_is_the_cpu_where_any_run_stayed_there(runs_root):
    assert timing_device([("cuda",), ("cpu",), ("cuda",)]) == "cpu"
    assert timing_device([("cuda",), ("cuda", "cpu"), ("mps",), ("cuda",)]) == "cuda"
    assert timing_device([("cuda", "cpu")]) is None
    for seed in ("seed0", "seed1", "seed2", "seed3"):
        _ran_on(runs_root, "kfac", seed, device="cuda:0")
    for seed in ("seed0", "seed1"):
        _ran_on(runs_root, "qe", seed, device="cuda", devices=["cuda"])
    kfac, qe = time_to_98(collect_runs(runs_root)["mnist"])  # a study wholly on a GPU
    assert (kfac.timed, kfac.median_seconds, qe.timed) == (4, 20.0, 2)
    kfac, qe = time_to_98(collect_runs(runs_root, timed_on="cpu")["mnist"])
    assert (kfac.timed, qe.timed) == (0, 0) and math.isnan(kfac.median_seconds)
    assert kfac.reached == 3 and math.isnan(kfac.mean_step_ms)


def test_figure_curves_mean_and_band(runs_root):
    kfac = collect_runs(runs_root)["mnist"]["kfac"]
    ep, mean, sd = mean_sd_curve(kfac, "test_loss")
    assert ep.tolist() == [1, 2, 3]
    assert mean.tolist() == pytest.approx([0.425, 0.325, 0.25])
    assert sd[0] == pytest.approx(statistics.stdev([0.40, 0.45, 0.35, 0.50]))
    assert sd[2] == pytest.approx(0.05)
    ep, mean, _ = mean_sd_curve(kfac, "test_acc", 100.0)
    assert mean[2] == pytest.approx((98.00 + 98.05 + 98.50) / 3)


def test_paper_values_complete():
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


def test_paper_summary_is_the_paper_row():
    qe = paper_summary("qe")
    assert (qe.solver, qe.runs, qe.epoch, qe.incomplete) == ("qe", PAPER_RUNS, PAPER_EPOCH, [])
    assert qe.counts == dict(
        n_acc_ge_98=8, n_acc_gt_98=7, n_acc_ge_98_5=2, n_loss_le_0_25=9, n_loss_le_0_2=0
    )
    assert (qe.acc_mean, qe.acc_sd, qe.loss_mean, qe.loss_sd) == (98.01, 0.64, 0.23, 0.02)
    assert paper_summary("sgd") is None


def test_views_and_display_names(runs_root):
    solvers = collect_runs(runs_root)["mnist"]
    assert report_views([solvers]) == ["test", "raw_test"]
    no_raw = {"kfac": {"seed0": [dict(epoch=1, test_acc=0.9, test_loss=0.3)]}}
    assert report_views([no_raw]) == ["test"] and report_views([]) == ["test"]
    assert report_views([no_raw, solvers]) == ["test", "raw_test"]
    assert [display_name(s) for s in ("kfac", "qe", "sgd", "mine")] == [
        "K-FAC", "QE", "SGD", "mine"]


# --------------------------------------------------------------------------- levels, measures


def test_levels_compare_with_a_tolerance():
    assert Level("acc", ">=", 0.98).holds(0.98) and Level("acc", ">=", 0.98).holds(0.98 - 1e-10)
    assert not Level("acc", ">", 0.98).holds(0.98) and Level("acc", ">", 0.98).holds(0.9801)
    assert Level("loss", "<=", 0.02).holds(2 * 0.01) and not Level("loss", "<=", 0.02).holds(0.0201)
    assert not any(Level("loss", op, 0.1).holds(math.nan) for op in (">=", ">", "<="))


def test_measures_of_classification_and_regression(runs_root):
    mnist = collect_runs(runs_root)["mnist"]
    assert not is_regression(mnist) and is_regression(reg.solvers())
    m = measures("mnist", [mnist])
    assert (m.regression, m.metrics, m.counts, m.target) == (
        False, ("acc", "loss"), TABLE1_COUNTS, Level("acc", ">=", 0.98))
    fashion = measures("fashion-mnist", [mnist])
    assert fashion.target == Level("acc", ">=", 0.85)
    # Table 1's MNIST levels mean nothing elsewhere: one count, at the data set's target
    assert fashion.counts == {"n_acc_ge_85": fashion.target}
    assert ACC_TARGET == {"mnist": 0.98, "fashion-mnist": 0.85}
    assert measures("other", [mnist]).target.value == 0.98
    assert measures("other", [mnist]).counts == {"n_acc_ge_98": Level("acc", ">=", 0.98)}
    # a regression is decided from the data: no finite accuracy anywhere, whatever the name
    r = measures(reg.DATASET, [reg.solvers()])
    assert (r.regression, r.metrics, r.noise_floor) == (True, ("loss",), pytest.approx(0.01))
    assert r.counts == {"n_mse_le_2x_floor": r.target}
    assert r.target == Level("loss", "<=", pytest.approx(0.02))
    assert measures(reg.DATASET, [mnist]).regression is False
    unknown = measures("mydata", [reg.solvers()])
    assert (unknown.regression, unknown.counts, unknown.target) == (True, {}, None)
    assert measures(reg.DATASET, [reg.solvers(), mnist]).regression is False  # one has acc


def test_noise_floor_comes_from_the_data_module():
    assert noise_floor("sincos") == sincos_regression().noise_floor == pytest.approx(0.1**2)
    assert noise_floor("regression") == pytest.approx(0.01)
    assert noise_floor("mnist") is None and noise_floor("fashion-mnist") is None
    assert noise_floor("nosuch") is None


def test_regression_counts_and_time_by_hand():
    solvers = reg.solvers()
    r = measures(reg.DATASET, [solvers])
    kfac, qe = summarize(solvers, view="test", counts=r.counts)
    # epoch 3: K-FAC 0.015, 0.025, 0.012 (two ≤ 0.02); QE 0.011, 0.0205 (one), seed2 stopped
    assert kfac.counts == {"n_mse_le_2x_floor": 2} and qe.counts == {"n_mse_le_2x_floor": 1}
    assert qe.incomplete == ["seed2"] and math.isnan(kfac.acc_mean) and math.isnan(kfac.acc_sd)
    assert kfac.loss_mean == pytest.approx(statistics.fmean([0.015, 0.025, 0.012]))
    assert qe.loss_sd == pytest.approx(statistics.stdev([0.011, 0.0205]))
    tk, tq = time_to(solvers, r.target)
    # first epoch ≤ 0.02: K-FAC seed0 epoch 2 (10 s), seed2 epoch 1 (4 s); QE seed0 epoch 2
    assert (tk.reached, tk.runs, tk.median_epochs, tk.median_seconds) == (2, 3, 1.5, 7.0)
    assert (tq.reached, tq.runs, tq.median_epochs, tq.median_seconds) == (1, 3, 2.0, 40.0)
    assert (tk.mean_step_ms, tq.mean_step_ms) == (2.0, 8.0)


def test_time_to_98_is_time_to_an_accuracy_level(runs_root):
    solvers = collect_runs(runs_root)["mnist"]
    assert time_to_98(solvers) == time_to(solvers, Level("acc", ">=", 0.98))
    assert time_to_98(solvers, 0.88) == time_to(solvers, Level("acc", ">=", 0.88))
    assert [t.reached for t in time_to_98(solvers, 0.88)] == [4, 2]
