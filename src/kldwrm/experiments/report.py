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

After the tables, a "Claims" section tests each solver against K-FAC at the same epoch
(:func:`claims`, with the tests of :mod:`.stats`): difference of mean test accuracy and
loss (Welch, permutation, bootstrap CI) and ratio of variances across seeds (F-test,
Brown–Forsythe). :func:`protocol_comparison` puts the tables and claims of several run
directories (protocols) into one Markdown document.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .stats import Comparison, compare
from .train import METRICS_NAME, read_metrics

__all__ = [
    "PAPER_TABLE1",
    "VIEWS",
    "ClaimRow",
    "SolverSummary",
    "TimeTo98",
    "claims",
    "collect_runs",
    "final_epoch",
    "make_figures",
    "mean_sd_curve",
    "protocol_comparison",
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


def final_epoch(solvers: Mapping[str, Runs]) -> int:
    """The last epoch any run of ``solvers`` reached (the tables' default epoch)."""
    return max(int(r["epoch"]) for runs in solvers.values() for rows in runs.values() for r in rows)


def _values_at(
    runs: Runs, epoch: int, view: str
) -> tuple[list[float], list[float], list[str]]:
    """``(accs, losses, incomplete)``: test metrics of the runs that reached ``epoch`` on
    ``view`` (accuracies as fractions) and the seeds that did not reach it."""
    accs, losses, incomplete = [], [], []
    for seed, rows in runs.items():
        row = _row_at(rows, epoch)
        if row is None:
            incomplete.append(seed)
            continue
        accs.append(_metric(row, view, "acc"))
        losses.append(_metric(row, view, "loss"))
    return accs, losses, incomplete


def summarize(
    solvers: Mapping[str, Runs], epoch: int | None = None, view: str = "test"
) -> list[SolverSummary]:
    """Table 1 statistics of each solver at ``epoch`` (default: the last epoch any run
    reached), on the test-set ``view`` (a key of :data:`VIEWS`)."""
    if epoch is None:
        epoch = final_epoch(solvers)
    out = []
    for solver, runs in solvers.items():
        accs, losses, incomplete = _values_at(runs, epoch, view)
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


#: reference solver of the claims (group A)
REFERENCE = "kfac"
#: claim metrics: name → scale applied to ``metrics.csv`` values (accuracy in points)
CLAIM_METRICS: dict[str, float] = {"acc": 100.0, "loss": 1.0}
#: seed, bootstrap resamples, largest exact permutation count and Monte-Carlo relabelings
CLAIM_SEED, CLAIM_BOOT, CLAIM_PERM_EXACT, CLAIM_PERM_MC = 0, 10_000, 200_000, 100_000


@dataclass
class ClaimRow:
    """One solver against the reference on one metric at one epoch and view.

    ``comparison`` holds the tests of :func:`.stats.compare` with ``A = solver_a`` (the
    reference) and ``B = solver_b``, accuracy in percent; it is ``None`` when a group has
    fewer than 2 runs or a non-finite value (``reason`` says which).
    """

    solver_a: str
    solver_b: str
    metric: str
    epoch: int
    n_a: int
    n_b: int
    comparison: Comparison | None
    reason: str = ""


def _claim_row(
    pair: tuple[str, str], metric: str, epoch: int, samples: Sequence[list[float]]
) -> ClaimRow:
    xa, xb = ([CLAIM_METRICS[metric] * v for v in x] for x in samples)
    row = ClaimRow(pair[0], pair[1], metric, epoch, len(xa), len(xb), None)
    if min(len(xa), len(xb)) < 2:
        row.reason = "fewer than 2 runs in a group"
    elif not all(math.isfinite(v) for v in (*xa, *xb)):
        row.reason = "non-finite values"
    else:
        row.comparison = compare(xa, xb, seed=CLAIM_SEED, boot_resamples=CLAIM_BOOT,
                                 perm_max_exact=CLAIM_PERM_EXACT, perm_resamples=CLAIM_PERM_MC)
    return row


def claims(
    solvers: Mapping[str, Runs],
    epoch: int | None = None,
    view: str = "test",
    reference: str = REFERENCE,
) -> list[ClaimRow]:
    """Every other solver against ``reference`` on test accuracy (points) and test loss at
    ``epoch`` (default: the last epoch any run reached), on ``view``; runs that did not
    reach ``epoch`` are left out. Empty when ``reference`` has no runs."""
    if reference not in solvers:
        return []
    if epoch is None:
        epoch = final_epoch(solvers)
    ref = _values_at(solvers[reference], epoch, view)
    out = []
    for solver, runs in solvers.items():
        if solver == reference:
            continue
        other = _values_at(runs, epoch, view)
        for i, metric in enumerate(CLAIM_METRICS):
            out.append(_claim_row((reference, solver), metric, epoch, (ref[i], other[i])))
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


def _fmt_signed(x: float, digits: int) -> str:
    return "—" if math.isnan(x) else f"{x:+.{digits}f}"


def _fmt_p(p: float) -> str:
    """p-values: 3 decimals, scientific notation below 0.001."""
    if math.isnan(p):
        return "—"
    return f"{p:.3f}" if p >= 1e-3 else f"{p:.1e}"


def _fmt_ratio(r: float) -> str:
    if math.isnan(r):
        return "—"
    return "∞" if math.isinf(r) else f"{r:#.3g}"


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _md_head(head: Sequence[str]) -> list[str]:
    return [_md_row(head), "|" + "---|" * len(head)]


TABLE_HEAD = ("Runs", *(h for _, h in COUNT_COLUMNS), "μ acc (%)", "σ acc (%)", "μ loss",
              "σ loss")


def _summary_cells(s: SolverSummary) -> list[str]:
    """Runs, counts, means and SDs of one Table 1 row."""
    return [str(s.runs), *(str(s.counts[k]) for k, _ in COUNT_COLUMNS),
            _fmt(s.acc_mean, 2), _fmt(s.acc_sd, 2), _fmt(s.loss_mean, 3), _fmt(s.loss_sd, 3)]


def _paper_cells(solver: str) -> list[str]:
    """The same cells for the paper's row of ``solver``."""
    p = PAPER_TABLE1[solver]
    return [str(PAPER_RUNS), *(str(int(p[k])) for k, _ in COUNT_COLUMNS),
            *(f"{p[k]:.2f}" for k in ("acc_mean", "acc_sd", "loss_mean", "loss_sd"))]


def _table_markdown(summaries: Sequence[SolverSummary], with_paper: bool) -> str:
    lines = _md_head(["Solver", "Source", *TABLE_HEAD])
    for s in summaries:
        name = DISPLAY.get(s.solver, s.solver)
        lines.append(_md_row([name, f"this run (epoch {s.epoch})", *_summary_cells(s)]))
        if with_paper and s.solver in PAPER_TABLE1:
            lines.append(_md_row([name, f"paper (epoch {PAPER_EPOCH})",
                                  *_paper_cells(s.solver)]))
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
TIME_NOTE = ("Mean step (ms): measured in runs sharing the CPU; not a speed benchmark, "
             "see docs/benchmarks.md.")


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


# --------------------------------------------------------------------------- claims tables

CLAIM_LABEL = {"acc": "acc (points)", "loss": "loss"}
_CLAIM_DIGITS = {"acc": 2, "loss": 3}
CLAIM_HEAD = ("Pair (B vs A)", "Metric", "n_A", "n_B", "Δ mean (B − A)", "Welch p",
              "Permutation p", "Bootstrap 95% CI", "s²_B/s²_A", "F-test p", "Brown–Forsythe p")
CLAIM_COLUMNS = ("dataset", "view", "epoch", "solver_a", "solver_b", "metric", "n_a", "n_b",
                 "mean_a", "mean_b", "diff", "welch_t", "welch_df", "welch_p", "perm_p",
                 "perm_exact", "perm_relabelings", "ci_level", "ci_low", "ci_high",
                 "var_ratio", "f_p", "bf_statistic", "bf_p")


def _count(n: int) -> str:
    return f"{n:,}".replace(",", " ")


def _claims_conventions() -> str:
    """How to read the claims tables (directions, tests, no multiplicity correction)."""
    ref = DISPLAY.get(REFERENCE, REFERENCE)
    return (
        f"A = {ref} (the reference), B = the solver named first. Δ = mean(B) − mean(A) of "
        "the test metric at the tables' epoch, accuracy in percentage points: Δ acc > 0 and "
        f"Δ loss < 0 favour B. s²_B/s²_A < 1: B varies less across seeds than {ref} (sample "
        "variances, ddof=1). All p-values are two-sided and uncorrected for multiple "
        "comparisons. Welch: t-test with unequal variances (Welch–Satterthwaite df). "
        "Permutation: |Δ| over all C(n_A + n_B, n_B) splits of the pooled runs (Monte-Carlo "
        f"with {_count(CLAIM_PERM_MC)} random splits, seed {CLAIM_SEED}, above "
        f"{_count(CLAIM_PERM_EXACT)}). Bootstrap: percentile interval from "
        f"{_count(CLAIM_BOOT)} resamples of each group separately (seed {CLAIM_SEED}), too "
        "narrow with few runs. "
        "F-test: s²_B/s²_A against F(n_B − 1, n_A − 1), assumes normal data. Brown–Forsythe: "
        "Levene's test on absolute deviations from each group's median, against "
        "F(1, n_A + n_B − 2). Runs that did not reach the epoch are left out, as in the "
        "tables; — : fewer than 2 runs in a group."
    )


def _claim_cells(row: ClaimRow) -> list[str]:
    """The cells of :data:`CLAIM_HEAD` for one claim row."""
    a, b = (DISPLAY.get(s, s) for s in (row.solver_a, row.solver_b))
    head = [f"{b} vs {a}", CLAIM_LABEL[row.metric], str(row.n_a), str(row.n_b)]
    c = row.comparison
    if c is None:
        return head + ["—"] * (len(CLAIM_HEAD) - len(head))
    digits = _CLAIM_DIGITS[row.metric]
    ci = c.bootstrap
    return head + [
        _fmt_signed(c.diff, digits), _fmt_p(c.welch.p), _fmt_p(c.permutation.p),
        f"[{_fmt_signed(ci.low, digits)}, {_fmt_signed(ci.high, digits)}]",
        _fmt_ratio(c.f.ratio), _fmt_p(c.f.p), _fmt_p(c.brown_forsythe.p),
    ]


def _claim_notes(rows: Sequence[ClaimRow], prefix: str = "") -> list[str]:
    return [f"{prefix}{_claim_cells(r)[0]}, {CLAIM_LABEL[r.metric]}: — ({r.reason})."
            for r in rows if r.comparison is None]


def _claims_markdown(rows: Sequence[ClaimRow]) -> str:
    lines = _md_head(CLAIM_HEAD) + [_md_row(_claim_cells(r)) for r in rows]
    return "\n".join(lines + ["", *_claim_notes(rows)]).rstrip()


def _claim_record(dataset: str, view: str, row: ClaimRow) -> dict[str, Any]:
    """One row of the claims CSV (accuracies in percent; NaN where not computed)."""
    rec: dict[str, Any] = dict.fromkeys(CLAIM_COLUMNS, math.nan)
    rec.update(dataset=dataset, view=VIEW_LABEL[view], epoch=row.epoch, solver_a=row.solver_a,
               solver_b=row.solver_b, metric=row.metric, n_a=row.n_a, n_b=row.n_b)
    c = row.comparison
    if c is not None:
        rec.update(
            mean_a=c.mean_a, mean_b=c.mean_b, diff=c.diff, welch_t=c.welch.t,
            welch_df=c.welch.df, welch_p=c.welch.p, perm_p=c.permutation.p,
            perm_exact=c.permutation.exact, perm_relabelings=c.permutation.relabelings,
            ci_level=c.bootstrap.level, ci_low=c.bootstrap.low, ci_high=c.bootstrap.high,
            var_ratio=c.f.ratio, f_p=c.f.p, bf_statistic=c.brown_forsythe.statistic,
            bf_p=c.brown_forsythe.p,
        )
    return rec


def _nothing_to_compare(solver_sets: Iterable[Mapping[str, Runs]]) -> str | None:
    """Why no claims can be made (no run set has the reference and another solver)."""
    ref = DISPLAY.get(REFERENCE, REFERENCE)
    sets = list(solver_sets)
    if any(REFERENCE in s and len(s) > 1 for s in sets):
        return None
    if any(REFERENCE in s for s in sets):
        return f"Only {ref} runs: nothing to compare."
    return f"No {ref} runs: nothing to compare against."


def _claims_section(
    dataset: str, views: Sequence[str], solvers: Mapping[str, Runs], epoch: int
) -> tuple[str, list[dict[str, Any]]]:
    """Markdown and CSV rows of the claims of every view."""
    ref = DISPLAY.get(REFERENCE, REFERENCE)
    lines = [f"### Claims: each solver against {ref}", ""]
    if (reason := _nothing_to_compare([solvers])) is not None:
        return "\n".join(lines + [reason]), []
    lines += [_claims_conventions()]
    records = []
    for view in views:
        rows = claims(solvers, epoch, view)
        lines += ["", f"#### Claims — {VIEWS[view]} (epoch {epoch})", "", _claims_markdown(rows)]
        records += [_claim_record(dataset, view, r) for r in rows]
    return "\n".join(lines), records


# --------------------------------------------------------------------------- report


def _incomplete_notes(summaries: Sequence[SolverSummary], prefix: str = "") -> list[str]:
    return [
        f"{prefix}{DISPLAY.get(s.solver, s.solver)}: left out (did not reach epoch "
        f"{s.epoch}): {', '.join(s.incomplete)}."
        for s in summaries if s.incomplete
    ]


def _heading(view: str) -> str:
    return VIEWS[view][0].upper() + VIEWS[view][1:]


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
    notes += _incomplete_notes(summaries)
    text = "\n".join([
        f"### {_heading(view)}",
        "",
        _table_markdown(summaries, paper_here),
        "",
        *notes,
        "",
        "Time to 98% test accuracy (median over the seeds that reached it):",
        "",
        _time_markdown(times),
        "",
        TIME_NOTE,
    ])
    time_rows = [{"view": VIEW_LABEL[view], "solver": t.solver, "reached": t.reached,
                  "runs": t.runs, "median_epochs": t.median_epochs,
                  "median_seconds": t.median_seconds, "mean_step_ms": t.mean_step_ms}
                 for t in times]
    return text, _table_rows(dataset, view, summaries, paper_here), time_rows


def _dataset_report(
    dataset: str, solvers: Mapping[str, Runs], out: Path, epoch: int | None, with_paper: bool
) -> str:
    """Write the files of one data set; returns its Markdown."""
    epoch = final_epoch(solvers) if epoch is None else epoch
    views = available_views(solvers) or ["test"]
    sections, table_rows, time_rows = [], [], []
    for view in views:
        text, rows, trows = _view_section(dataset, view, solvers, epoch, with_paper)
        sections.append(text)
        table_rows += rows
        time_rows += trows
    claims_text, claim_rows = _claims_section(dataset, views, solvers, epoch)
    paths = [out / f"{dataset}_{name}" for name in
             ("table1.md", "table1.csv", "time_to_98.csv", "claims.csv")]
    _write_csv(paths[1], CSV_COLUMNS, table_rows)
    _write_csv(paths[2], TIME_COLUMNS, time_rows)
    _write_csv(paths[3], CLAIM_COLUMNS, claim_rows)
    figures = make_figures(solvers, out, f"{dataset}_")
    text = "\n".join([
        f"## Table 1 — {dataset}",
        "",
        "\n\n".join([*sections, claims_text]),
        "",
        "Files: " + ", ".join(str(p) for p in (*paths, *figures)),
    ])
    paths[0].write_text(text + "\n")
    return text


def write_report(
    root: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    paper: bool | None = None,
    epoch: int | None = None,
) -> str:
    """Write Table 1 (Markdown + CSV), the claims (CSV), Figures 1-2 (PNG) and time-to-98%
    for ``root``.

    Args:
        root: directory holding the runs.
        out_dir: where to write (default ``root/report``); files are prefixed with the
            data set name.
        paper: show the paper's values next to ours (default: for MNIST only).
        epoch: the epoch the tables and claims are taken at (default: the last any run
            reached).

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
        parts.append(_dataset_report(dataset, solvers, out, epoch, with_paper))
    return "\n\n".join(parts) + "\n"


# --------------------------------------------------------------------------- protocols

Protocols = Mapping[str, Mapping[str, Runs]]  # protocol name -> {solver: runs}


def _protocol_table(
    per: Protocols, epochs: Mapping[str, int], view: str, with_paper: bool
) -> tuple[str, list[str]]:
    """Table 1 rows of every protocol, grouped by solver; and the notes on left-out runs."""
    summaries = {name: {s.solver: s for s in summarize(solvers, epochs[name], view)}
                 for name, solvers in per.items()}
    order = sorted({s for by in summaries.values() for s in by}, key=_solver_key)
    lines = _md_head(["Protocol", "Solver", "Epoch", *TABLE_HEAD])
    for solver in order:
        name = DISPLAY.get(solver, solver)
        lines += [_md_row([proto, name, str(by[solver].epoch), *_summary_cells(by[solver])])
                  for proto, by in summaries.items() if solver in by]
        if with_paper and solver in PAPER_TABLE1:
            lines.append(_md_row(["paper", name, str(PAPER_EPOCH), *_paper_cells(solver)]))
    notes = [n for proto, by in summaries.items()
             for n in _incomplete_notes(list(by.values()), f"{proto}: ")]
    return "\n".join(lines), notes


def _protocol_claims(per: Protocols, epochs: Mapping[str, int], view: str) -> str:
    """Claims rows of every protocol, grouped by pair and metric."""
    rows = [(proto, r) for proto, solvers in per.items()
            for r in claims(solvers, epochs[proto], view)]
    rows.sort(key=lambda pr: (_solver_key(pr[1].solver_b), list(CLAIM_METRICS).index(
        pr[1].metric)))
    ref = DISPLAY.get(REFERENCE, REFERENCE)
    if (reason := _nothing_to_compare(per.values())) is not None:
        return reason
    notes = [f"{proto}: no {ref} runs." for proto, solvers in per.items()
             if REFERENCE not in solvers]
    lines = _md_head(["Protocol", *CLAIM_HEAD])
    lines += [_md_row([proto, *_claim_cells(r)]) for proto, r in rows]
    notes += [n for proto, r in rows for n in _claim_notes([r], f"{proto}: ")]
    return "\n".join(lines + ["", *notes]).rstrip()


def _protocol_dataset(dataset: str, per: Protocols, epoch: int | None, with_paper: bool) -> str:
    epochs = {name: final_epoch(s) if epoch is None else epoch for name, s in per.items()}
    views = [v for v in VIEWS if any(v in available_views(s) for s in per.values())] or ["test"]
    lines = [
        f"## Protocol comparison — {dataset}",
        "",
        "Epoch: " + ", ".join(f"{e} ({name})" for name, e in epochs.items())
        + ". SD is the sample SD (ddof=1).",
        "",
        _claims_conventions(),
    ]
    for view in views:
        table, notes = _protocol_table(per, epochs, view, with_paper and view == PAPER_VIEW)
        lines += ["", f"### {_heading(view)}", "", table, *([""] + notes if notes else []),
                  "", f"Claims against {DISPLAY.get(REFERENCE, REFERENCE)}:", "",
                  _protocol_claims(per, epochs, view)]
    return "\n".join(lines)


def protocol_comparison(
    roots: Mapping[str, str | os.PathLike[str]],
    epoch: int | None = None,
    *,
    paper: bool | None = None,
) -> str:
    """Markdown putting the Table 1 rows and claims of several protocols side by side.

    Args:
        roots: protocol name → run directory, e.g. ``{"corrected": ..., "released": ...}``
            (the order of the rows within each solver or pair).
        epoch: the epoch of every table and claim (default: each protocol's last epoch).
        paper: add the paper's rows to the raw view (default: for MNIST only).

    Returns:
        One section per data set found under any root, each with one table and one claims
        table per test-set view. Nothing is written.

    Raises:
        FileNotFoundError: a root holds no runs.
    """
    found = {name: collect_runs(root) for name, root in roots.items()}
    for name, datasets in found.items():
        if not datasets:
            raise FileNotFoundError(f"no runs for protocol {name!r} under {roots[name]}")
    names = list(dict.fromkeys(d for datasets in found.values() for d in datasets))
    parts = []
    for dataset in names:
        per = {proto: ds[dataset] for proto, ds in found.items() if dataset in ds}
        with_paper = (dataset == "mnist") if paper is None else paper
        parts.append(_protocol_dataset(dataset, per, epoch, with_paper))
    return "\n\n".join(parts) + "\n"
