"""Table 1, Figures 1-2 and time-to-98% from a directory of runs.

Runs are found as ``<root>/[<dataset>/]<solver>/seed<k>/metrics.csv`` (any depth; the
solver is the name of the directory above ``seed<k>``, the data set the one above that).
For each data set the table uses the test metrics after the last epoch ``E`` that any of
its runs reached; runs that stopped earlier are listed as incomplete and left out. SDs are
sample standard deviations (``ddof=1``), as for the paper's 10 runs. Accuracies are shown
in percent.

Every table and figure comes in two views of the test set (:data:`VIEWS`): inputs
standardised like the training inputs, and the raw inputs the released notebooks evaluated
on. The paper's rows sit beside the raw view, the evaluation its numbers come from.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .train import METRICS_NAME, read_metrics

__all__ = [
    "PAPER_TABLE1",
    "VIEWS",
    "SolverSummary",
    "TimeTo98",
    "collect_runs",
    "make_figures",
    "mean_sd_curve",
    "summarize",
    "time_to_98",
    "write_report",
]

#: Table 1 of the paper (MNIST, test metrics after epoch 50, 10 runs per solver).
PAPER_TABLE1: dict[str, dict[str, float]] = {
    "kfac": dict(
        n_acc_ge_98=3,
        n_acc_gt_98=3,
        n_acc_ge_98_5=1,
        n_loss_le_0_25=5,
        n_loss_le_0_2=2,
        acc_mean=96.19,
        acc_sd=3.2,
        loss_mean=0.26,
        loss_sd=0.10,
    ),
    "so": dict(
        n_acc_ge_98=4,
        n_acc_gt_98=2,
        n_acc_ge_98_5=0,
        n_loss_le_0_25=7,
        n_loss_le_0_2=0,
        acc_mean=97.60,
        acc_sd=0.85,
        loss_mean=0.25,
        loss_sd=0.04,
    ),
    "q": dict(
        n_acc_ge_98=5,
        n_acc_gt_98=4,
        n_acc_ge_98_5=0,
        n_loss_le_0_25=4,
        n_loss_le_0_2=0,
        acc_mean=97.69,
        acc_sd=0.69,
        loss_mean=0.26,
        loss_sd=0.04,
    ),
    "qe": dict(
        n_acc_ge_98=8,
        n_acc_gt_98=7,
        n_acc_ge_98_5=2,
        n_loss_le_0_25=9,
        n_loss_le_0_2=0,
        acc_mean=98.01,
        acc_sd=0.64,
        loss_mean=0.23,
        loss_sd=0.02,
    ),
}
PAPER_RUNS, PAPER_EPOCH = 10, 50

DISPLAY = {"kfac": "K-FAC", "so": "SO", "q": "Q", "qe": "QE", "sgd": "SGD", "adam": "Adam"}
_ORDER = ("sgd", "adam", "kfac", "so", "q", "qe")

COUNT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("n_acc_ge_98", "N acc≥98%"),
    ("n_acc_gt_98", "N acc>98%"),
    ("n_acc_ge_98_5", "N acc≥98.5%"),
    ("n_loss_le_0_25", "N loss≤0.25"),
    ("n_loss_le_0_2", "N loss≤0.2"),
)
#: test-set views: metric-name prefix in ``metrics.csv`` → what the view is
VIEWS: dict[str, str] = {
    "test": "test inputs standardised like the training inputs",
    "raw_test": "raw test inputs (the released notebooks' evaluation)",
}
#: short view names used in file contents
VIEW_LABEL = {"test": "normalised", "raw_test": "raw"}
PAPER_VIEW = "raw_test"

CSV_COLUMNS = (
    "dataset",
    "view",
    "solver",
    "source",
    "runs",
    "epoch",
    *(k for k, _ in COUNT_COLUMNS),
    "acc_mean",
    "acc_sd",
    "loss_mean",
    "loss_sd",
)
_EPS = 1e-9

Runs = dict[str, list[dict[str, float]]]  # seed name -> metrics rows


def _solver_key(name: str) -> tuple[int, str]:
    return (_ORDER.index(name) if name in _ORDER else len(_ORDER), name)


def collect_runs(root: str | os.PathLike[str]) -> dict[str, dict[str, Runs]]:
    """``{dataset: {solver: {seed_dir_name: rows}}}`` for every metrics file under ``root``."""
    root = Path(root).resolve()
    found: dict[str, dict[str, Runs]] = {}
    for path in sorted(root.rglob(METRICS_NAME)):
        if "report" in path.relative_to(root).parts:
            continue
        rows = read_metrics(path)
        if not rows:
            continue
        seed_dir = path.parent
        solver_dir = seed_dir.parent
        dataset = solver_dir.parent.name
        found.setdefault(dataset, {}).setdefault(solver_dir.name, {})[seed_dir.name] = rows
    return {d: dict(sorted(s.items(), key=lambda kv: _solver_key(kv[0]))) for d, s in found.items()}


@dataclass
class SolverSummary:
    """Table 1 row for one solver (accuracies in percent, SDs with ddof=1)."""

    solver: str
    runs: int
    epoch: int
    counts: dict[str, int]
    acc_mean: float
    acc_sd: float
    loss_mean: float
    loss_sd: float
    incomplete: list[str]


def _sd(values: Sequence[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def _row_at(rows: Sequence[Mapping[str, float]], epoch: int) -> Mapping[str, float] | None:
    for r in rows:
        if int(r["epoch"]) == epoch:
            return r
    return None


def _metric(row: Mapping[str, float], view: str, what: str) -> float:
    """``row[f"{view}_{what}"]``; NaN when the file has no such column."""
    return float(row.get(f"{view}_{what}", math.nan))


def available_views(solvers: Mapping[str, Runs]) -> list[str]:
    """The views with a finite test loss in at least one row."""
    rows = [r for runs in solvers.values() for rs in runs.values() for r in rs]
    return [v for v in VIEWS if any(math.isfinite(_metric(r, v, "loss")) for r in rows)]


def summarize(
    solvers: Mapping[str, Runs], epoch: int | None = None, view: str = "test"
) -> list[SolverSummary]:
    """Table 1 statistics of each solver at ``epoch`` (default: the last epoch any run
    reached), on the test-set ``view`` (a key of :data:`VIEWS`)."""
    if epoch is None:
        epoch = max(
            int(r["epoch"]) for runs in solvers.values() for rows in runs.values() for r in rows
        )
    out = []
    for solver, runs in solvers.items():
        accs, losses, incomplete = [], [], []
        for seed, rows in runs.items():
            row = _row_at(rows, epoch)
            if row is None:
                incomplete.append(seed)
                continue
            accs.append(_metric(row, view, "acc"))
            losses.append(_metric(row, view, "loss"))
        a, l = np.asarray(accs, dtype=float), np.asarray(losses, dtype=float)
        counts = {
            "n_acc_ge_98": int(np.sum(a >= 0.98 - _EPS)),
            "n_acc_gt_98": int(np.sum(a > 0.98 + _EPS)),
            "n_acc_ge_98_5": int(np.sum(a >= 0.985 - _EPS)),
            "n_loss_le_0_25": int(np.sum(l <= 0.25 + _EPS)),
            "n_loss_le_0_2": int(np.sum(l <= 0.2 + _EPS)),
        }
        out.append(
            SolverSummary(
                solver=solver,
                runs=len(accs),
                epoch=epoch,
                counts=counts,
                acc_mean=100 * float(a.mean()) if len(a) else math.nan,
                acc_sd=100 * _sd(accs),
                loss_mean=float(l.mean()) if len(l) else math.nan,
                loss_sd=_sd(losses),
                incomplete=incomplete,
            )
        )
    return out


@dataclass
class TimeTo98:
    """Epochs and seconds until test accuracy first reached 98% (medians over the seeds
    that reached it), plus the mean time per step over all epochs of all runs."""

    solver: str
    reached: int
    runs: int
    median_epochs: float
    median_seconds: float
    mean_step_ms: float


def time_to_98(
    solvers: Mapping[str, Runs], threshold: float = 0.98, view: str = "test"
) -> list[TimeTo98]:
    """Per solver: how many runs reached ``threshold`` test accuracy (on ``view``), and how
    fast."""
    out = []
    for solver, runs in solvers.items():
        epochs, seconds, steps = [], [], []
        for rows in runs.values():
            steps += [float(r["mean_step_ms"]) for r in rows]
            for r in rows:
                if _metric(r, view, "acc") >= threshold - _EPS:
                    epochs.append(int(r["epoch"]))
                    seconds.append(float(r["wall_time_s"]))
                    break
        out.append(
            TimeTo98(
                solver=solver,
                reached=len(epochs),
                runs=len(runs),
                median_epochs=float(np.median(epochs)) if epochs else math.nan,
                median_seconds=float(np.median(seconds)) if seconds else math.nan,
                mean_step_ms=float(np.mean(steps)) if steps else math.nan,
            )
        )
    return out


def mean_sd_curve(runs: Runs, key: str, scale: float = 1.0) -> tuple[np.ndarray, ...]:
    """``(epochs, mean, sd)`` of ``scale * key`` over the runs that have each epoch.

    The SD is the sample SD (ddof=1), 0 where only one run has the epoch.
    """
    max_epoch = max(int(r["epoch"]) for rows in runs.values() for r in rows)
    ep, mean, sd = [], [], []
    for e in range(1, max_epoch + 1):
        vals = [scale * float(r.get(key, math.nan)) for rows in runs.values()
                if (r := _row_at(rows, e))]
        if not vals:
            continue
        ep.append(e)
        mean.append(float(np.mean(vals)))
        sd.append(_sd(vals) if len(vals) > 1 else 0.0)
    return np.asarray(ep), np.asarray(mean), np.asarray(sd)


def make_figures(solvers: Mapping[str, Runs], out_dir: Path, prefix: str) -> list[Path]:
    """Figures 1 (test loss) and 2 (test accuracy): mean ± SD band per solver, one panel per
    test-set view, PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    views = available_views(solvers) or ["test"]
    paths = []
    specs = (
        ("loss", 1.0, "test loss", f"{prefix}figure1_test_loss.png", "Figure 1"),
        ("acc", 100.0, "test accuracy (%)", f"{prefix}figure2_test_accuracy.png", "Figure 2"),
    )
    for what, scale, ylabel, fname, title in specs:
        fig = Figure(figsize=(6.4 * len(views), 4.4), dpi=110)
        FigureCanvasAgg(fig)
        for i, view in enumerate(views):
            ax = fig.add_subplot(1, len(views), i + 1)
            _plot_panel(ax, solvers, f"{view}_{what}", scale, ylabel)
            ax.set_title(f"{title}: {VIEW_LABEL[view]} test inputs, mean ± SD over seeds",
                         fontsize=10)
        fig.tight_layout()
        path = out_dir / fname
        fig.savefig(path)
        paths.append(path)
    return paths


def _plot_panel(ax: Any, solvers: Mapping[str, Runs], key: str, scale: float,
                ylabel: str) -> None:
    from matplotlib.ticker import MaxNLocator

    lows = []
    for solver, runs in solvers.items():
        ep, mean, sd = mean_sd_curve(runs, key, scale)
        label = f"{DISPLAY.get(solver, solver)} (n={len(runs)})"
        (line,) = ax.plot(ep, mean, marker="o" if len(ep) < 12 else None, ms=3, label=label)
        ax.fill_between(ep, mean - sd, mean + sd, color=line.get_color(), alpha=0.2, lw=0)
        if len(mean) and np.isfinite(mean).any():
            lows.append(float(np.nanmin(mean)))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    if key.endswith("_acc"):
        lo = min(lows, default=90.0)
        ax.set_ylim(max(lo - 1.0, 90.0 if lo > 91 else 0.0), 100.0)
        ax.axhline(98.0, color="grey", lw=0.8, ls="--")
    ax.grid(alpha=0.3)
    ax.legend()


def _fmt(x: float, digits: int) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table_markdown(summaries: Sequence[SolverSummary], with_paper: bool) -> str:
    head = ["Solver", "Source", "Runs", *(h for _, h in COUNT_COLUMNS),
            "μ acc (%)", "σ acc (%)", "μ loss", "σ loss"]
    lines = [_md_row(head), "|" + "---|" * len(head)]
    for s in summaries:
        name = DISPLAY.get(s.solver, s.solver)
        lines.append(_md_row([
            name, f"this run (epoch {s.epoch})", str(s.runs),
            *(str(s.counts[k]) for k, _ in COUNT_COLUMNS),
            _fmt(s.acc_mean, 2), _fmt(s.acc_sd, 2), _fmt(s.loss_mean, 3), _fmt(s.loss_sd, 3),
        ]))
        if with_paper and s.solver in PAPER_TABLE1:
            p = PAPER_TABLE1[s.solver]
            lines.append(_md_row([
                name, f"paper (epoch {PAPER_EPOCH})", str(PAPER_RUNS),
                *(str(int(p[k])) for k, _ in COUNT_COLUMNS),
                *(f"{p[k]:.2f}" for k in ("acc_mean", "acc_sd", "loss_mean", "loss_sd")),
            ]))
    return "\n".join(lines)


def _table_rows(
    dataset: str, view: str, summaries: Sequence[SolverSummary], with_paper: bool
) -> list[dict[str, Any]]:
    """The rows of the table CSV for one view (``source``: this run or paper)."""
    rows: list[dict[str, Any]] = []
    for s in summaries:
        rows.append({
            "dataset": dataset, "view": VIEW_LABEL[view], "solver": s.solver,
            "source": "this run", "runs": s.runs, "epoch": s.epoch, **s.counts,
            "acc_mean": s.acc_mean, "acc_sd": s.acc_sd,
            "loss_mean": s.loss_mean, "loss_sd": s.loss_sd,
        })
        if with_paper and s.solver in PAPER_TABLE1:
            p = PAPER_TABLE1[s.solver]
            rows.append({
                "dataset": dataset, "view": VIEW_LABEL[view], "solver": s.solver,
                "source": "paper", "runs": PAPER_RUNS, "epoch": PAPER_EPOCH,
                **{k: int(p[k]) for k, _ in COUNT_COLUMNS},
                **{k: p[k] for k in ("acc_mean", "acc_sd", "loss_mean", "loss_sd")},
            })
    return rows


def _write_csv(path: Path, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(columns))
        w.writeheader()
        w.writerows(rows)


TIME_COLUMNS = ("view", "solver", "reached", "runs", "median_epochs", "median_seconds",
                "mean_step_ms")


def _time_markdown(times: Sequence[TimeTo98]) -> str:
    lines = [
        "| Solver | reached 98% | median epochs to 98% | median seconds to 98% | mean step (ms) |",
        "|---|---|---|---|---|",
    ]
    for t in times:
        lines.append(
            f"| {DISPLAY.get(t.solver, t.solver)} | {t.reached}/{t.runs} | "
            f"{_fmt(t.median_epochs, 1)} | {_fmt(t.median_seconds, 1)} | "
            f"{_fmt(t.mean_step_ms, 1)} |"
        )
    return "\n".join(lines)


def _view_section(
    dataset: str, view: str, solvers: Mapping[str, Runs], epoch: int | None, with_paper: bool
) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    """Markdown, table rows and time rows of one test-set view."""
    summaries = summarize(solvers, epoch, view)
    times = time_to_98(solvers, view=view)
    paper_here = with_paper and view == PAPER_VIEW
    notes = [f"Test metrics after epoch {summaries[0].epoch}; SD is the sample SD (ddof=1)."]
    if paper_here:
        notes.append(f"Paper rows: Table 1 of the paper ({PAPER_RUNS} runs, epoch {PAPER_EPOCH}).")
    for s in summaries:
        if s.incomplete:
            notes.append(
                f"{DISPLAY.get(s.solver, s.solver)}: left out (did not reach "
                f"epoch {s.epoch}): {', '.join(s.incomplete)}."
            )
    text = "\n".join([
        f"### {VIEWS[view][0].upper()}{VIEWS[view][1:]}",
        "",
        _table_markdown(summaries, paper_here),
        "",
        *notes,
        "",
        "Time to 98% test accuracy (median over the seeds that reached it):",
        "",
        _time_markdown(times),
    ])
    time_rows = [{"view": VIEW_LABEL[view], "solver": t.solver, "reached": t.reached,
                  "runs": t.runs, "median_epochs": t.median_epochs,
                  "median_seconds": t.median_seconds, "mean_step_ms": t.mean_step_ms}
                 for t in times]
    return text, _table_rows(dataset, view, summaries, paper_here), time_rows


def write_report(
    root: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    paper: bool | None = None,
    epoch: int | None = None,
) -> str:
    """Write Table 1 (Markdown + CSV), Figures 1-2 (PNG) and time-to-98% for ``root``.

    Args:
        root: directory holding the runs.
        out_dir: where to write (default ``root/report``); files are prefixed with the
            data set name.
        paper: show the paper's values next to ours (default: for MNIST only).
        epoch: the epoch the tables are taken at (default: the last any run reached).

    Returns:
        The report as Markdown text (it names the files written).

    Raises:
        FileNotFoundError: no metrics file under ``root``.
    """
    root = Path(root)
    found = collect_runs(root)
    if not found:
        raise FileNotFoundError(
            f"no runs under {root}: expected <dataset>/<solver>/seed<k>/{METRICS_NAME}"
        )
    out = Path(out_dir) if out_dir is not None else root / "report"
    out.mkdir(parents=True, exist_ok=True)
    parts = []
    for dataset, solvers in found.items():
        with_paper = (dataset == "mnist") if paper is None else paper
        prefix = f"{dataset}_"
        sections, table_rows, time_rows = [], [], []
        for view in available_views(solvers) or ["test"]:
            text, rows, trows = _view_section(dataset, view, solvers, epoch, with_paper)
            sections.append(text)
            table_rows += rows
            time_rows += trows
        md_path, csv_path = out / f"{prefix}table1.md", out / f"{prefix}table1.csv"
        time_path = out / f"{prefix}time_to_98.csv"
        _write_csv(csv_path, CSV_COLUMNS, table_rows)
        _write_csv(time_path, TIME_COLUMNS, time_rows)
        figures = make_figures(solvers, out, prefix)
        text = "\n".join([
            f"## Table 1 — {dataset}",
            "",
            "\n\n".join(sections),
            "",
            "Files: " + ", ".join(str(p) for p in (md_path, csv_path, time_path, *figures)),
        ])
        md_path.write_text(text + "\n")
        parts.append(text)
    return "\n\n".join(parts) + "\n"
