"""Writing the report of a directory of runs: Table 1, time to 98%, claims and Figures 1-2.

:func:`write_report` writes, per data set, Table 1 (Markdown + CSV), the time-to-98% table
(CSV), the claims (CSV) and Figures 1-2 (PNG); :func:`protocol_comparison` puts the tables
and claims of several run directories (protocols) into one Markdown document. This module
renders and writes; the numbers come from :mod:`.runs` (reading runs, what a data set is
measured by, Table 1 statistics, time to a level), :mod:`.claims` (the statistical tests
against K-FAC and their tables) and :mod:`.figures`.

The "time to" table is about the data set's accuracy level (:data:`.runs.ACC_TARGET`: 98%
for MNIST, 88% for Fashion-MNIST), named in its heading and in its file,
``<dataset>_time_to_<level>.csv`` (``mnist_time_to_98.csv``). A data set where no run has a
finite accuracy is a regression (:func:`.runs.measures`): its tables show the runs, the mean
± SD of the test MSE and, where :mod:`..data.datasets` knows the noise floor, how many runs
are within twice of it and how fast they got there (``<dataset>_time_to_2x_noise_floor.csv``);
its claims are on the MSE only, it has Figure 1 only and never the paper's rows.

For each data set the tables use the test metrics after the last epoch ``E`` that any of
its runs reached; runs that stopped earlier are listed as incomplete and left out. SDs are
sample standard deviations (``ddof=1``), as for the paper's 10 runs. Accuracies are shown
in percent. Every table and figure comes in two views of the test set (:data:`VIEWS`):
inputs standardised like the training inputs, and the raw inputs the released notebooks
evaluated on. The paper's rows sit beside the raw view, the evaluation its numbers come
from.

The names of :mod:`.runs`, :mod:`.claims` and :mod:`.figures` that this module held before
they were split out stay importable from here (the ``import name as name`` lines re-export
those this module does not use itself).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..training.train import METRICS_NAME
from .claims import CLAIM_BOOT as CLAIM_BOOT
from .claims import (
    CLAIM_COLUMNS,
    REFERENCE,
    ClaimRow,
    claims,
    claims_conventions,
    claims_section,
    protocol_claims_markdown,
)
from .claims import CLAIM_HEAD as CLAIM_HEAD
from .claims import CLAIM_LABEL as CLAIM_LABEL
from .claims import CLAIM_METRICS as CLAIM_METRICS
from .claims import CLAIM_PERM_EXACT as CLAIM_PERM_EXACT
from .claims import CLAIM_PERM_MC as CLAIM_PERM_MC
from .claims import CLAIM_SEED as CLAIM_SEED
from .figures import make_figures
from .runs import DISPLAY as DISPLAY
from .runs import (
    FLOOR_FACTOR,
    PAPER_EPOCH,
    PAPER_RUNS,
    PAPER_TABLE1,
    PAPER_VIEW,
    TABLE1_COUNTS,
    VIEW_LABEL,
    VIEWS,
    Level,
    Measures,
    Protocols,
    Runs,
    SolverSummary,
    TimeTo98,
    collect_runs,
    display_name,
    final_epoch,
    mean_sd_curve,
    measures,
    paper_summary,
    report_views,
    solver_key,
    summarize,
    time_to,
    time_to_98,
)
from .runs import available_views as available_views
from .tables import fmt, md_head, md_row, write_csv

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

_SYMBOL = {">=": "≥", ">": ">", "<=": "≤"}


def _level_text(level: Level, loss: str = "loss") -> str:
    """``acc≥98%``, ``loss≤0.25``; ``loss`` names the loss (``MSE≤0.02``)."""
    if level.metric == "acc":
        return f"acc{_SYMBOL[level.op]}{100 * level.value:g}%"
    return f"{loss}{_SYMBOL[level.op]}{level.value:g}"


def _time_head(level: str) -> tuple[str, ...]:
    """The header of the "time to" table of ``level`` (``"98%"``)."""
    return ("Solver", f"reached {level}", f"median epochs to {level}",
            f"median seconds to {level}", "mean step (ms)")


COUNT_COLUMNS: tuple[tuple[str, str], ...] = tuple(
    (key, f"N {_level_text(level)}") for key, level in TABLE1_COUNTS.items())
_STATS = ("acc_mean", "acc_sd", "loss_mean", "loss_sd")
CSV_COLUMNS = ("dataset", "view", "solver", "source", "runs", "epoch",
               *(k for k, _ in COUNT_COLUMNS), *_STATS)
TABLE_HEAD = ("Runs", *(h for _, h in COUNT_COLUMNS), "μ acc (%)", "σ acc (%)", "μ loss",
              "σ loss")
TIME_HEAD = _time_head("98%")
TIME_COLUMNS = ("view", "solver", "reached", "runs", "median_epochs", "median_seconds",
                "mean_step_ms", "timed")
TIME_NOTE = ("Mean step (ms): measured in runs sharing the CPU; not a speed benchmark, "
             "see docs/benchmarks.md.")


# --------------------------------------------------------------------------- layout


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How a data set's tables look (from its :class:`~.runs.Measures`).

    ``counts``: (CSV key, header) per count; ``stats``: (:class:`SolverSummary` field,
    header, format) per statistic; ``notes``: under every table; ``extra``: constant columns
    of the table CSV.
    """

    measures: Measures
    counts: tuple[tuple[str, str], ...]
    stats: tuple[tuple[str, str, str], ...]
    notes: tuple[str, ...] = ()
    extra: Mapping[str, float] = dataclasses.field(default_factory=dict)

    @property
    def time(self) -> tuple[str, str, str] | None:
        """(short label, long label, file-name part) of the "time to" table; ``None`` for
        none."""
        return _time_labels(self.measures.target)

    @property
    def head(self) -> tuple[str, ...]:
        return ("Runs", *(h for _, h in self.counts), *(h for _, h, _ in self.stats))

    @property
    def csv_columns(self) -> tuple[str, ...]:
        return ("dataset", "view", "solver", "source", "runs", "epoch",
                *(k for k, _ in self.counts), *(k for k, _, _ in self.stats), *self.extra)


_CLASSIFICATION_STATS = tuple(zip(_STATS, TABLE_HEAD[-4:], (".2f", ".2f", ".3f", ".3f"),
                                  strict=True))
_REGRESSION_STATS = (("loss_mean", "μ test MSE", ".4f"), ("loss_sd", "σ test MSE", ".4f"))


def _time_labels(target: Level | None) -> tuple[str, str, str] | None:
    """(short label, long label, file-name part) of the "time to" table of ``target``."""
    if target is None:
        return None
    if target.metric == "acc":
        pct = f"{100 * target.value:g}"
        return f"{pct}%", f"{pct}% test accuracy", pct
    return (_level_text(target, "MSE"),
            f"test MSE ≤ {target.value:g}, {FLOOR_FACTOR:g}× the noise floor",
            f"{FLOOR_FACTOR:g}x_noise_floor")


def _floor_note(dataset: str, floor: float | None) -> str:
    """What the noise floor of a regression is (or that there is none)."""
    if floor is None:
        return f"Regression; no noise floor is known for {dataset}: no count or time near it."
    return (f"Noise floor: test MSE {floor:g} (the variance of the label noise of {dataset}, "
            f"kldwrm.experiments.data); N MSE≤{FLOOR_FACTOR * floor:g}: the runs within "
            f"{FLOOR_FACTOR:g}× of it.")


def _layout(dataset: str, m: Measures) -> _Layout:
    """The layout of a data set measured by ``m``."""
    loss = "MSE" if m.regression else "loss"
    counts = tuple((k, f"N {_level_text(lv, loss)}") for k, lv in m.counts.items())
    if not m.regression:
        return _Layout(m, counts, _CLASSIFICATION_STATS)
    extra = {} if m.noise_floor is None else {"noise_floor": m.noise_floor}
    return _Layout(m, counts, _REGRESSION_STATS, (_floor_note(dataset, m.noise_floor),), extra)


def _with_paper(dataset: str, paper: bool | None, m: Measures) -> bool:
    """Whether to show the paper's rows (by default for MNIST only; never for a
    regression)."""
    return not m.regression and ((dataset == "mnist") if paper is None else paper)


# --------------------------------------------------------------------------- Table 1


def _sources(
    summaries: Sequence[SolverSummary], with_paper: bool
) -> Iterator[tuple[bool, SolverSummary]]:
    """``(False, row)`` for each summary, each followed by ``(True, the paper's row)`` where
    ``with_paper`` and the paper has the solver."""
    for s in summaries:
        yield False, s
        if with_paper and (p := paper_summary(s.solver)) is not None:
            yield True, p


def _source(paper: bool) -> str:
    return "paper" if paper else "this run"


def _summary_cells(s: SolverSummary, layout: _Layout, paper: bool = False) -> list[str]:
    """Runs, counts, means and SDs of one Table 1 row (the paper's losses to its 2
    decimals)."""
    stats = [fmt(getattr(s, k), ".2f" if paper and k.startswith("loss") else spec)
             for k, _, spec in layout.stats]
    return [str(s.runs), *(str(s.counts[k]) for k, _ in layout.counts), *stats]


def _table_markdown(
    summaries: Sequence[SolverSummary], with_paper: bool, layout: _Layout
) -> str:
    lines = md_head(["Solver", "Source", *layout.head])
    lines += [md_row([display_name(s.solver), f"{_source(paper)} (epoch {s.epoch})",
                      *_summary_cells(s, layout, paper)])
              for paper, s in _sources(summaries, with_paper)]
    return "\n".join(lines)


def _table_rows(
    dataset: str, view: str, summaries: Sequence[SolverSummary], with_paper: bool,
    layout: _Layout,
) -> list[dict[str, Any]]:
    """The rows of the table CSV for one view (``source``: this run or paper)."""
    return [{"dataset": dataset, "view": VIEW_LABEL[view], "solver": s.solver,
             "source": _source(paper), "runs": s.runs, "epoch": s.epoch, **s.counts,
             **{k: getattr(s, k) for k, _, _ in layout.stats}, **layout.extra}
            for paper, s in _sources(summaries, with_paper)]


def _incomplete_notes(summaries: Sequence[SolverSummary], prefix: str = "") -> list[str]:
    return [
        f"{prefix}{display_name(s.solver)}: left out (did not reach epoch "
        f"{s.epoch}): {', '.join(s.incomplete)}."
        for s in summaries if s.incomplete
    ]


# --------------------------------------------------------------------------- time to 98%


def _time_markdown(times: Sequence[TimeTo98], level: str = "98%") -> str:
    lines = md_head(_time_head(level))
    lines += [md_row([display_name(t.solver), f"{t.reached}/{t.runs}",
                      *(fmt(x, ".1f") for x in (t.median_epochs, t.median_seconds,
                                                t.mean_step_ms))])
              for t in times]
    return "\n".join(lines)


def _time_rows(view: str, times: Sequence[TimeTo98]) -> list[dict[str, Any]]:
    """The rows of the time-to-98% CSV for one view."""
    return [{"view": VIEW_LABEL[view], **dataclasses.asdict(t)} for t in times]


def _time_section(
    solvers: Mapping[str, Runs], view: str, layout: _Layout
) -> tuple[list[str], list[dict[str, Any]]]:
    """Markdown lines and CSV rows of the "time to" table of one view (none without a
    level)."""
    target, labels = layout.measures.target, layout.time
    if target is None or labels is None:
        return [], []
    times = time_to(solvers, target, view)
    short, long, _ = labels
    lines = ["", f"Time to {long} (median over the seeds that reached it):", "",
             _time_markdown(times, short), "", TIME_NOTE + _untimed_note(times)]
    return lines, _time_rows(view, times)


def _untimed_note(times: Sequence[TimeTo98]) -> str:
    """Which solvers' seconds and step times leave runs out (trained on other hardware)."""
    parts = [f"{display_name(t.solver)} {t.timed} of {t.runs}" for t in times
             if t.timed < t.runs]
    if not parts:
        return ""
    return (" Seconds and step times are over the runs that trained wholly on one device "
            f"type, the CPU where any run did ({', '.join(parts)}); the others trained "
            "elsewhere in whole or in part and count for epochs only.")


# --------------------------------------------------------------------------- report


def _heading(view: str) -> str:
    return VIEWS[view][0].upper() + VIEWS[view][1:]


def _view_section(
    dataset: str, view: str, solvers: Mapping[str, Runs], epoch: int, with_paper: bool,
    layout: _Layout,
) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    """Markdown, table rows and time rows of one test-set view."""
    summaries = summarize(solvers, epoch, view, layout.measures.counts)
    paper_here = with_paper and view == PAPER_VIEW
    notes = [f"Test metrics after epoch {epoch}; SD is the sample SD (ddof=1).", *layout.notes]
    if paper_here:
        notes.append(f"Paper rows: Table 1 of the paper ({PAPER_RUNS} runs, epoch {PAPER_EPOCH}).")
    notes += _incomplete_notes(summaries)
    time_lines, time_rows = _time_section(solvers, view, layout)
    text = "\n".join([
        f"### {_heading(view)}",
        "",
        _table_markdown(summaries, paper_here, layout),
        "",
        *notes,
        *time_lines,
    ])
    return text, _table_rows(dataset, view, summaries, paper_here, layout), time_rows


def _write_csvs(
    out: Path, dataset: str, layout: _Layout, rows: Mapping[str, list[dict[str, Any]]]
) -> list[Path]:
    """Write the table, time (where the layout has one) and claims CSVs of ``rows`` (keyed
    ``"table"``, ``"time"``, ``"claims"``); returns their paths in that order."""
    files = [("table1", layout.csv_columns, rows["table"])]
    if (labels := layout.time) is not None:
        files.append((f"time_to_{labels[2]}", TIME_COLUMNS, rows["time"]))
    files.append(("claims", CLAIM_COLUMNS, rows["claims"]))
    paths = []
    for name, columns, records in files:
        paths.append(out / f"{dataset}_{name}.csv")
        write_csv(paths[-1], columns, records)
    return paths


def _dataset_report(
    dataset: str, solvers: Mapping[str, Runs], out: Path, epoch: int | None,
    paper: bool | None,
) -> str:
    """Write the files of one data set; returns its Markdown."""
    epoch = final_epoch(solvers) if epoch is None else epoch
    layout = _layout(dataset, measures(dataset, [solvers]))
    with_paper = _with_paper(dataset, paper, layout.measures)
    views = report_views([solvers])
    sections, rows = [], {"table": [], "time": []}
    for view in views:
        text, table_rows, time_rows = _view_section(dataset, view, solvers, epoch, with_paper,
                                                    layout)
        sections.append(text)
        rows["table"] += table_rows
        rows["time"] += time_rows
    metrics = layout.measures.metrics
    claims_text, rows["claims"] = claims_section(dataset, views, solvers, epoch, metrics)
    paths = [out / f"{dataset}_table1.md", *_write_csvs(out, dataset, layout, rows)]
    figures = make_figures(solvers, out, f"{dataset}_", metrics=metrics,
                           guide=layout.measures.target)
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
    parts = [_dataset_report(dataset, solvers, out, epoch, paper)
             for dataset, solvers in found.items()]
    return "\n\n".join(parts) + "\n"


# --------------------------------------------------------------------------- protocols


def _protocol_table(
    per: Protocols, epochs: Mapping[str, int], view: str, with_paper: bool, layout: _Layout
) -> tuple[str, list[str]]:
    """Table 1 rows of every protocol, grouped by solver; and the notes on left-out runs."""
    counts = layout.measures.counts
    summaries = {name: {s.solver: s for s in summarize(solvers, epochs[name], view, counts)}
                 for name, solvers in per.items()}
    order = sorted({s for by in summaries.values() for s in by}, key=solver_key)
    lines = md_head(["Protocol", "Solver", "Epoch", *layout.head])
    for solver in order:
        rows = [(proto, False, by[solver]) for proto, by in summaries.items() if solver in by]
        if with_paper and (p := paper_summary(solver)) is not None:
            rows.append((_source(True), True, p))
        lines += [md_row([label, display_name(solver), str(s.epoch),
                          *_summary_cells(s, layout, paper)])
                  for label, paper, s in rows]
    notes = [n for proto, by in summaries.items()
             for n in _incomplete_notes(list(by.values()), f"{proto}: ")]
    return "\n".join(lines), notes


def _protocol_dataset(dataset: str, per: Protocols, epoch: int | None, paper: bool | None) -> str:
    epochs = {name: final_epoch(s) if epoch is None else epoch for name, s in per.items()}
    layout = _layout(dataset, measures(dataset, per.values()))
    with_paper, metrics = _with_paper(dataset, paper, layout.measures), layout.measures.metrics
    lines = [
        f"## Protocol comparison — {dataset}",
        "",
        "Epoch: " + ", ".join(f"{e} ({name})" for name, e in epochs.items())
        + ". SD is the sample SD (ddof=1).",
        *layout.notes,
        "",
        claims_conventions(metrics),
    ]
    for view in report_views(per.values()):
        table, notes = _protocol_table(per, epochs, view, with_paper and view == PAPER_VIEW,
                                       layout)
        lines += ["", f"### {_heading(view)}", "", table, *([""] + notes if notes else []),
                  "", f"Claims against {display_name(REFERENCE)}:", "",
                  protocol_claims_markdown(per, epochs, view, metrics)]
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
        parts.append(_protocol_dataset(dataset, per, epoch, paper))
    return "\n\n".join(parts) + "\n"
