"""Figures 1-2: one PNG per figure, one panel per test-set view."""

from __future__ import annotations

import struct

from kldwrm.experiments.study.figures import make_figures
from kldwrm.experiments.study.runs import collect_runs

from .. import regression_fixture as reg
from ..report_fixture import write_runs


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_one_panel_per_view(tmp_path):
    solvers = collect_runs(write_runs(tmp_path / "runs"))["mnist"]
    out = tmp_path / "out"
    out.mkdir()
    paths = make_figures(solvers, out, "x_")
    assert [p.name for p in paths] == ["x_figure1_test_loss.png", "x_figure2_test_accuracy.png"]
    two = _png_size(paths[0])
    assert two == (round(2 * 6.4 * 110), round(4.4 * 110))  # normalised and raw panels
    no_raw = {s: {seed: [{k: v for k, v in r.items() if not k.startswith("raw_")} for r in rows]
                  for seed, rows in runs.items()} for s, runs in solvers.items()}
    one = _png_size(make_figures(no_raw, out, "y_")[1])
    assert one == (round(6.4 * 110), round(4.4 * 110))


def test_regression_has_figure_1_only(tmp_path):
    paths = make_figures(reg.solvers(), tmp_path, "r_", metrics=("loss",), guide=None)
    assert [p.name for p in paths] == ["r_figure1_test_loss.png"]
    assert _png_size(paths[0]) == (round(6.4 * 110), round(4.4 * 110))  # no raw view
    # the figures come in their order whatever the order of the metrics
    both = make_figures(reg.solvers(), tmp_path, "b_", metrics=("acc", "loss"))
    assert [p.name for p in both] == ["b_figure1_test_loss.png", "b_figure2_test_accuracy.png"]


def test_loss_panels_are_log_scaled_with_the_band_kept_positive(tmp_path):
    from matplotlib.figure import Figure

    from kldwrm.experiments.study.figures import _plot_panel

    solvers = reg.solvers()
    ax = Figure().add_subplot()
    _plot_panel(ax, solvers, "test_loss", 1.0, "test loss", None)
    assert ax.get_yscale() == "log" and "log scale" in ax.get_ylabel()
    smallest = min(float(row["test_loss"]) for runs in solvers.values()
                   for rows in runs.values() for row in rows)
    for band in ax.collections:  # the SD bands: every vertex above 0
        verts = band.get_paths()[0].vertices
        assert verts[:, 1].min() > 0 and verts[:, 1].min() >= 0.5 * smallest * (1 - 1e-12)
    acc = Figure().add_subplot()
    mnist = collect_runs(write_runs(tmp_path / "runs"))["mnist"]
    _plot_panel(acc, mnist, "test_acc", 100.0, "acc", 98.0)
    assert acc.get_yscale() == "linear"
