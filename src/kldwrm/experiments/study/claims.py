"""The claims: each solver against the reference (K-FAC) at one epoch, and their tables.

:func:`claims` tests every other solver against :data:`REFERENCE` with the tests of
:mod:`.stats`: difference of mean test accuracy and loss (Welch, permutation, bootstrap CI)
and ratio of variances across seeds (F-test, Brown–Forsythe); a regression has no accuracy,
and its claims are on the test loss (MSE) only (``metrics=("loss",)``). The rest of this module
renders them: the Markdown section of one run directory (:func:`claims_section`, which also
gives the CSV records), the table of several protocols side by side
(:func:`protocol_claims_markdown`) and how to read both (:func:`claims_conventions`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .runs import (
    VIEW_LABEL,
    VIEWS,
    Protocols,
    Runs,
    display_name,
    final_epoch,
    solver_key,
    values_at,
)
from .stats import Comparison, compare
from .tables import MISSING, fmt, fmt_p, fmt_ratio, md_head, md_row

__all__ = [
    "CLAIM_BOOT",
    "CLAIM_COLUMNS",
    "CLAIM_HEAD",
    "CLAIM_LABEL",
    "CLAIM_METRICS",
    "CLAIM_PERM_EXACT",
    "CLAIM_PERM_MC",
    "CLAIM_SEED",
    "REFERENCE",
    "ClaimRow",
    "claims",
    "claims_conventions",
    "claims_section",
    "protocol_claims_markdown",
]

#: reference solver of the claims (group A)
REFERENCE = "kfac"
#: claim metrics: name → scale applied to ``metrics.csv`` values (accuracy in points)
CLAIM_METRICS: dict[str, float] = {"acc": 100.0, "loss": 1.0}
#: seed, bootstrap resamples, largest exact permutation count and Monte-Carlo relabelings
CLAIM_SEED, CLAIM_BOOT, CLAIM_PERM_EXACT, CLAIM_PERM_MC = 0, 10_000, 200_000, 100_000

CLAIM_LABEL = {"acc": "acc (points)", "loss": "loss"}
_CLAIM_DIGITS = {"acc": 2, "loss": 3}
CLAIM_HEAD = ("Pair (B vs A)", "Metric", "n_A", "n_B", "Δ mean (B − A)", "Welch p",
              "Permutation p", "Bootstrap 95% CI", "s²_B/s²_A", "F-test p", "Brown–Forsythe p")
CLAIM_COLUMNS = ("dataset", "view", "epoch", "solver_a", "solver_b", "metric", "n_a", "n_b",
                 "mean_a", "mean_b", "diff", "welch_t", "welch_df", "welch_p", "perm_p",
                 "perm_exact", "perm_relabelings", "ci_level", "ci_low", "ci_high",
                 "var_ratio", "f_p", "bf_statistic", "bf_p")


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
    metrics: Sequence[str] = tuple(CLAIM_METRICS),
) -> list[ClaimRow]:
    """Every other solver against ``reference`` on each of ``metrics`` (default: test
    accuracy in points and test loss) at ``epoch`` (default: the last epoch any run
    reached), on ``view``; runs that did not reach ``epoch`` are left out. Empty when
    ``reference`` has no runs."""
    if reference not in solvers:
        return []
    if epoch is None:
        epoch = final_epoch(solvers)
    ref = _metric_values(solvers[reference], epoch, view)
    out = []
    for solver, runs in solvers.items():
        if solver == reference:
            continue
        other = _metric_values(runs, epoch, view)
        for metric in metrics:
            pair = (ref[metric], other[metric])
            out.append(_claim_row((reference, solver), metric, epoch, pair))
    return out


def _metric_values(runs: Runs, epoch: int, view: str) -> dict[str, list[float]]:
    """``{"acc": accs, "loss": losses}`` of the runs that reached ``epoch`` on ``view``."""
    accs, losses, _ = values_at(runs, epoch, view)
    return {"acc": accs, "loss": losses}


# --------------------------------------------------------------------------- tables


def _count(n: int) -> str:
    return f"{n:,}".replace(",", " ")


def _directions(metrics: Sequence[str]) -> str:
    """Which sign of Δ favours B, for the claims' ``metrics``."""
    if "acc" in metrics:
        return ("the test metric at the tables' epoch, accuracy in percentage points: "
                "Δ acc > 0 and Δ loss < 0 favour B.")
    return "the test loss (MSE) at the tables' epoch: Δ loss < 0 favours B."


def claims_conventions(metrics: Sequence[str] = tuple(CLAIM_METRICS)) -> str:
    """How to read the claims tables of ``metrics`` (directions, tests, no multiplicity
    correction)."""
    ref = display_name(REFERENCE)
    return (
        f"A = {ref} (the reference), B = the solver named first. Δ = mean(B) − mean(A) of "
        f"{_directions(metrics)} s²_B/s²_A < 1: B varies less across seeds than {ref} (sample "
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
    a, b = (display_name(s) for s in (row.solver_a, row.solver_b))
    head = [f"{b} vs {a}", CLAIM_LABEL[row.metric], str(row.n_a), str(row.n_b)]
    c = row.comparison
    if c is None:
        return head + [MISSING] * (len(CLAIM_HEAD) - len(head))
    signed = f"+.{_CLAIM_DIGITS[row.metric]}f"
    ci = c.bootstrap
    return head + [
        fmt(c.diff, signed), fmt_p(c.welch.p), fmt_p(c.permutation.p),
        f"[{fmt(ci.low, signed)}, {fmt(ci.high, signed)}]",
        fmt_ratio(c.f.ratio), fmt_p(c.f.p), fmt_p(c.brown_forsythe.p),
    ]


def _claim_notes(rows: Sequence[ClaimRow], prefix: str = "") -> list[str]:
    return [f"{prefix}{_claim_cells(r)[0]}, {CLAIM_LABEL[r.metric]}: — ({r.reason})."
            for r in rows if r.comparison is None]


def _claims_markdown(rows: Sequence[ClaimRow]) -> str:
    lines = md_head(CLAIM_HEAD) + [md_row(_claim_cells(r)) for r in rows]
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
    """Why no claims can be made: no run set has the reference and another solver, or no
    solver has 2 runs (``kldwrm compare``'s single seed)."""
    ref = display_name(REFERENCE)
    sets = list(solver_sets)
    if any(REFERENCE in s and len(s) > 1 for s in sets):
        if all(len(runs) < 2 for s in sets for runs in s.values()):
            return ("One run per solver: the tests need at least 2 seeds per solver "
                    "(e.g. --seeds 0-4).")
        return None
    if any(REFERENCE in s for s in sets):
        return f"Only {ref} runs: nothing to compare."
    return f"No {ref} runs: nothing to compare against."


def claims_section(
    dataset: str,
    views: Sequence[str],
    solvers: Mapping[str, Runs],
    epoch: int,
    metrics: Sequence[str] = tuple(CLAIM_METRICS),
) -> tuple[str, list[dict[str, Any]]]:
    """Markdown and CSV records (:data:`CLAIM_COLUMNS`) of the claims on ``metrics`` of
    every view."""
    lines = [f"### Claims: each solver against {display_name(REFERENCE)}", ""]
    if (reason := _nothing_to_compare([solvers])) is not None:
        return "\n".join(lines + [reason]), []
    lines += [claims_conventions(metrics)]
    records = []
    for view in views:
        rows = claims(solvers, epoch, view, metrics=metrics)
        lines += ["", f"#### Claims — {VIEWS[view]} (epoch {epoch})", "", _claims_markdown(rows)]
        records += [_claim_record(dataset, view, r) for r in rows]
    return "\n".join(lines), records


def protocol_claims_markdown(
    per: Protocols,
    epochs: Mapping[str, int],
    view: str,
    metrics: Sequence[str] = tuple(CLAIM_METRICS),
) -> str:
    """Claims rows on ``metrics`` of every protocol (at its epoch in ``epochs``), grouped by
    pair and metric."""
    if (reason := _nothing_to_compare(per.values())) is not None:
        return reason
    rows = [(proto, r) for proto, solvers in per.items()
            for r in claims(solvers, epochs[proto], view, metrics=metrics)]
    rows.sort(key=lambda pr: (solver_key(pr[1].solver_b), list(CLAIM_METRICS).index(
        pr[1].metric)))
    notes = [f"{proto}: no {display_name(REFERENCE)} runs." for proto, solvers in per.items()
             if REFERENCE not in solvers]
    lines = md_head(["Protocol", *CLAIM_HEAD])
    lines += [md_row([proto, *_claim_cells(r)]) for proto, r in rows]
    notes += [n for proto, r in rows for n in _claim_notes([r], f"{proto}: ")]
    return "\n".join(lines + ["", *notes]).rstrip()
