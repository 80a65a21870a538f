"""Writing the report of a directory of runs: Table 1, time to 98%, claims and Figures 1-2.

:func:`write_report` writes, per data set, Table 1 (Markdown + CSV), the time-to-98% table
(CSV), the claims (CSV) and Figures 1-2 (PNG); :func:`protocol_comparison` puts the tables
and claims of several run directories (protocols) into one Markdown document. This module
renders and writes; the numbers come from :mod:`.runs` (reading runs, Table 1 statistics,
time to 98%), :mod:`.claims` (the statistical tests against K-FAC and their tables) and
:mod:`.figures`.

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
    PAPER_EPOCH,
    PAPER_RUNS,
    PAPER_TABLE1,
    PAPER_VIEW,
    VIEW_LABEL,
    VIEWS,
    Protocols,
    Runs,
    SolverSummary,
    TimeTo98,
    collect_runs,
    display_name,
    final_epoch,
    mean_sd_curve,
    paper_summary,
    report_views,
    solver_key,
    summarize,
    time_to_98,
)
from .runs import available_views as available_views
from .tables import fmt, md_head, md_row, write_csv
from .train import METRICS_NAME

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

COUNT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("n_acc_ge_98", "N acc≥98%"),
    ("n_acc_gt_98", "N acc>98%"),
    ("n_acc_ge_98_5", "N acc≥98.5%"),
    ("n_loss_le_0_25", "N loss≤0.25"),
    ("n_loss_le_0_2", "N loss≤0.2"),
)
_STATS = ("acc_mean", "acc_sd", "loss_mean", "loss_sd")
CSV_COLUMNS = ("dataset", "view", "solver", "source", "runs", "epoch",
               *(k for k, _ in COUNT_COLUMNS), *_STATS)
TABLE_HEAD = ("Runs", *(h for _, h in COUNT_COLUMNS), "μ acc (%)", "σ acc (%)", "μ loss",
              "σ loss")
TIME_HEAD = ("Solver", "reached 98%", "median epochs to 98%", "median seconds to 98%",
             "mean step (ms)")
TIME_COLUMNS = ("view", "solver", "reached", "runs", "median_epochs", "median_seconds",
                "mean_step_ms")
TIME_NOTE = ("Mean step (ms): measured in runs sharing the CPU; not a speed benchmark, "
             "see docs/benchmarks.md.")


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


def _summary_cells(s: SolverSummary, paper: bool = False) -> list[str]:
    """Runs, counts, means and SDs of one Table 1 row (the paper's losses to its 2
    decimals)."""
    loss = ".2f" if paper else ".3f"
    return [str(s.runs), *(str(s.counts[k]) for k, _ in COUNT_COLUMNS),
            fmt(s.acc_mean, ".2f"), fmt(s.acc_sd, ".2f"), fmt(s.loss_mean, loss),
            fmt(s.loss_sd, loss)]


def _table_markdown(summaries: Sequence[SolverSummary], with_paper: bool) -> str:
    lines = md_head(["Solver", "Source", *TABLE_HEAD])
    lines += [md_row([display_name(s.solver), f"{_source(paper)} (epoch {s.epoch})",
                      *_summary_cells(s, paper)])
              for paper, s in _sources(summaries, with_paper)]
    return "\n".join(lines)


def _table_rows(
    dataset: str, view: str, summaries: Sequence[SolverSummary], with_paper: bool
) -> list[dict[str, Any]]:
    """The rows of the table CSV for one view (``source``: this run or paper)."""
    return [{"dataset": dataset, "view": VIEW_LABEL[view], "solver": s.solver,
             "source": _source(paper), "runs": s.runs, "epoch": s.epoch, **s.counts,
             **{k: getattr(s, k) for k in _STATS}}
            for paper, s in _sources(summaries, with_paper)]


def _incomplete_notes(summaries: Sequence[SolverSummary], prefix: str = "") -> list[str]:
    return [
        f"{prefix}{display_name(s.solver)}: left out (did not reach epoch "
        f"{s.epoch}): {', '.join(s.incomplete)}."
        for s in summaries if s.incomplete
    ]


# --------------------------------------------------------------------------- time to 98%


def _time_markdown(times: Sequence[TimeTo98]) -> str:
    lines = md_head(TIME_HEAD)
    lines += [md_row([display_name(t.solver), f"{t.reached}/{t.runs}",
                      *(fmt(x, ".1f") for x in (t.median_epochs, t.median_seconds,
                                                t.mean_step_ms))])
              for t in times]
    return "\n".join(lines)


def _time_rows(view: str, times: Sequence[TimeTo98]) -> list[dict[str, Any]]:
    """The rows of the time-to-98% CSV for one view."""
    return [{"view": VIEW_LABEL[view], **dataclasses.asdict(t)} for t in times]


# --------------------------------------------------------------------------- report


def _heading(view: str) -> str:
    return VIEWS[view][0].upper() + VIEWS[view][1:]


def _with_paper(dataset: str, paper: bool | None) -> bool:
    """Whether to show the paper's rows (by default for MNIST only)."""
    return (dataset == "mnist") if paper is None else paper


def _view_section(
    dataset: str, view: str, solvers: Mapping[str, Runs], epoch: int, with_paper: bool
) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    """Markdown, table rows and time rows of one test-set view."""
    summaries = summarize(solvers, epoch, view)
    times = time_to_98(solvers, view=view)
    paper_here = with_paper and view == PAPER_VIEW
    notes = [f"Test metrics after epoch {epoch}; SD is the sample SD (ddof=1)."]
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
    return text, _table_rows(dataset, view, summaries, paper_here), _time_rows(view, times)


def _dataset_report(
    dataset: str, solvers: Mapping[str, Runs], out: Path, epoch: int | None, with_paper: bool
) -> str:
    """Write the files of one data set; returns its Markdown."""
    epoch = final_epoch(solvers) if epoch is None else epoch
    views = report_views([solvers])
    sections, table_rows, time_rows = [], [], []
    for view in views:
        text, rows, trows = _view_section(dataset, view, solvers, epoch, with_paper)
        sections.append(text)
        table_rows += rows
        time_rows += trows
    claims_text, claim_rows = claims_section(dataset, views, solvers, epoch)
    paths = [out / f"{dataset}_{name}" for name in
             ("table1.md", "table1.csv", "time_to_98.csv", "claims.csv")]
    write_csv(paths[1], CSV_COLUMNS, table_rows)
    write_csv(paths[2], TIME_COLUMNS, time_rows)
    write_csv(paths[3], CLAIM_COLUMNS, claim_rows)
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
    parts = [_dataset_report(dataset, solvers, out, epoch, _with_paper(dataset, paper))
             for dataset, solvers in found.items()]
    return "\n\n".join(parts) + "\n"


# --------------------------------------------------------------------------- protocols


def _protocol_table(
    per: Protocols, epochs: Mapping[str, int], view: str, with_paper: bool
) -> tuple[str, list[str]]:
    """Table 1 rows of every protocol, grouped by solver; and the notes on left-out runs."""
    summaries = {name: {s.solver: s for s in summarize(solvers, epochs[name], view)}
                 for name, solvers in per.items()}
    order = sorted({s for by in summaries.values() for s in by}, key=solver_key)
    lines = md_head(["Protocol", "Solver", "Epoch", *TABLE_HEAD])
    for solver in order:
        rows = [(proto, False, by[solver]) for proto, by in summaries.items() if solver in by]
        if with_paper and (p := paper_summary(solver)) is not None:
            rows.append((_source(True), True, p))
        lines += [md_row([label, display_name(solver), str(s.epoch), *_summary_cells(s, paper)])
                  for label, paper, s in rows]
    notes = [n for proto, by in summaries.items()
             for n in _incomplete_notes(list(by.values()), f"{proto}: ")]
    return "\n".join(lines), notes


def _protocol_dataset(dataset: str, per: Protocols, epoch: int | None, with_paper: bool) -> str:
    epochs = {name: final_epoch(s) if epoch is None else epoch for name, s in per.items()}
    lines = [
        f"## Protocol comparison — {dataset}",
        "",
        "Epoch: " + ", ".join(f"{e} ({name})" for name, e in epochs.items())
        + ". SD is the sample SD (ddof=1).",
        "",
        claims_conventions(),
    ]
    for view in report_views(per.values()):
        table, notes = _protocol_table(per, epochs, view, with_paper and view == PAPER_VIEW)
        lines += ["", f"### {_heading(view)}", "", table, *([""] + notes if notes else []),
                  "", f"Claims against {display_name(REFERENCE)}:", "",
                  protocol_claims_markdown(per, epochs, view)]
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
        parts.append(_protocol_dataset(dataset, per, epoch, _with_paper(dataset, paper)))
    return "\n\n".join(parts) + "\n"
