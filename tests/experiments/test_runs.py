"""Table 1 statistics, time to 98% and figure curves recomputed by hand from the fixture."""

from __future__ import annotations

import math
import statistics

import pytest

from kldwrm.experiments.runs import (
    PAPER_EPOCH,
    PAPER_RUNS,
    PAPER_TABLE1,
    collect_runs,
    display_name,
    mean_sd_curve,
    paper_summary,
    report_views,
    summarize,
    time_to_98,
)

from .report_fixture import RUNS, write_runs


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
