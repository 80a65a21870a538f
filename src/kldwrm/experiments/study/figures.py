"""Figures 1 (test loss) and 2 (test accuracy) of a data set's runs, as PNG files.

Each figure has one panel per test-set view with the mean ± SD band of every solver
(:func:`.runs.mean_sd_curve`), and a dashed line at the level the "time to" table is about
(98% accuracy by default). A regression has no accuracy: Figure 1 only. matplotlib is
imported inside the functions, so importing this module (and the report) does not need it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .runs import VIEW_LABEL, Level, Runs, display_name, mean_sd_curve, report_views

__all__ = ["FIGURES", "make_figures"]

#: the figures: metric → (scale, y label, file name after the prefix, title)
FIGURES: dict[str, tuple[float, str, str, str]] = {
    "loss": (1.0, "test loss", "figure1_test_loss.png", "Figure 1"),
    "acc": (100.0, "test accuracy (%)", "figure2_test_accuracy.png", "Figure 2"),
}
_ACC_98 = Level("acc", ">=", 0.98)


def make_figures(
    solvers: Mapping[str, Runs],
    out_dir: Path,
    prefix: str,
    *,
    metrics: tuple[str, ...] = ("loss", "acc"),
    guide: Level | None = _ACC_98,
) -> list[Path]:
    """The figures of ``metrics`` (:data:`FIGURES`: 1, test loss; 2, test accuracy): mean ±
    SD band per solver, one panel per test-set view, PNG; the figure of ``guide``'s metric
    gets a dashed line at its level."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    views = report_views([solvers])
    paths = []
    for what in (m for m in FIGURES if m in metrics):  # Figure 1 first
        scale, ylabel, fname, title = FIGURES[what]
        at = scale * guide.value if guide is not None and guide.metric == what else None
        fig = Figure(figsize=(6.4 * len(views), 4.4), dpi=110)
        FigureCanvasAgg(fig)
        for i, view in enumerate(views):
            ax = fig.add_subplot(1, len(views), i + 1)
            _plot_panel(ax, solvers, f"{view}_{what}", scale, ylabel, at)
            ax.set_title(f"{title}: {VIEW_LABEL[view]} test inputs, mean ± SD over seeds",
                         fontsize=10)
        fig.tight_layout()
        path = out_dir / f"{prefix}{fname}"
        fig.savefig(path)
        paths.append(path)
    return paths


def _plot_panel(ax: Any, solvers: Mapping[str, Runs], key: str, scale: float,
                ylabel: str, guide: float | None) -> None:
    """One panel: the mean curve and SD band of ``scale * key`` for every solver, and a
    dashed line at ``guide`` (already scaled) unless ``None``."""
    from matplotlib.ticker import MaxNLocator

    curves = {solver: mean_sd_curve(runs, key, scale) for solver, runs in solvers.items()}
    means = [m[np.isfinite(m)] for _, m, _ in curves.values()]
    lows = [float(m.min()) for m in means if m.size]
    # a loss spans orders of magnitude over training (and is positive): log axis, the SD
    # band cut at half the smallest mean
    log = key.endswith("_loss") and bool(lows) and min(lows) > 0
    floor = 0.5 * min(lows) if log else -np.inf
    for solver, (ep, mean, sd) in curves.items():
        label = f"{display_name(solver)} (n={len(solvers[solver])})"
        (line,) = ax.plot(ep, mean, marker="o" if len(ep) < 12 else None, ms=3, label=label)
        ax.fill_between(ep, np.maximum(mean - sd, floor), mean + sd, color=line.get_color(),
                        alpha=0.2, lw=0)
    if log:
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel + (" (log scale)" if log else ""))
    if key.endswith("_acc"):
        lo = min(lows, default=90.0)
        ax.set_ylim(max(lo - 1.0, 90.0 if lo > 91 else 0.0), 100.0)
    if guide is not None:
        ax.axhline(guide, color="grey", lw=0.8, ls="--")
    ax.grid(alpha=0.3)
    ax.legend()
