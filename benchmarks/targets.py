"""The targets of issues 7 and 13, checked against the stored measurements.

Each function returns a Markdown table with one row per target (and per device that has a
measurement): the target, the measured figure, whether it is met, and the run that
produced it. A target of issue 13 without a measurement says "not measured yet" and gives
the command that measures it. Used by ``benchmarks.run`` to render ``docs/benchmarks.md``.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

#: the step-time cells of both issues are at the paper's refresh period
UPDATE_FREQ = 30


def qe_settings() -> tuple[int, int]:
    """``(N_IS, W)``: QE's inner steps and window at the paper's settings (10 and 4)."""
    try:
        from kldwrm import PAPER_SETTINGS

        qe = PAPER_SETTINGS["qe"]
        return int(qe.get("inner_steps", 10)), int(qe.get("window", 4))
    except (ImportError, KeyError):
        return 10, 4


# -- issue 13 ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepTarget:
    """``method`` on ``workload`` at N_u 30: mean step time <= ``limit`` x SGD's."""

    workload: str
    methods: tuple[str, ...]
    limit: float
    stated: str


def issue13_targets() -> list[StepTarget]:
    """The step-time targets of issue 13 (item 3)."""
    n_is, window = qe_settings()
    qe_limit = 1.1 * (1 + n_is + 0.6 * window)
    qe_text = (f"<= 1.1·(1 + N_IS + 0.6·W) = 1.1·(1 + {n_is} + 0.6·{window}) "
               f"= {qe_limit:.2f}x SGD")
    return [
        StepTarget("mlp", ("kfac-r128", "so-r128", "q-r128"), 2.4, "<= 2.4x SGD"),
        StepTarget("cnn", ("kfac", "so", "q"), 1.05, "<= 1.05x SGD"),
        StepTarget("resnet", ("kfac", "so", "q"), 1.05, "<= 1.05x SGD"),
        StepTarget("cnn", ("qe",), qe_limit, qe_text),
    ]


def _command(t: StepTarget) -> str:
    methods = ",".join(("sgd", *t.methods))
    return (f"python -m benchmarks.run --stages step_time --workloads {t.workload} "
            f"--update-freqs {UPDATE_FREQ} --methods {methods}")


def _step_row(t: StepTarget, method: str, row: dict | None) -> str:
    """One Markdown row: the target for ``method`` and its measurement ``row`` (or none)."""
    device = row.get("device", "cpu") if row else "cpu"
    target = (f"{method} step time on {t.workload} ({device}), N_u {UPDATE_FREQ}: mean "
              f"(refresh steps included) {t.stated}")
    if row is None:
        return f"| {target} | not measured yet: `{_command(t)}` | - | - |"
    if "ratio_mean" not in row:
        return (f"| {target} | no SGD in the same run: `{_command(t)}` | - "
                f"| {row.get('run', '?')} |")
    ok = "yes" if row["ratio_mean"] <= t.limit else "no"
    short = ", short cell" if row.get("short") else ""
    return (f"| {target} | {row['ratio_mean']:.3f}x (mean over {row['n']} steps{short}); "
            f"per-round median {row['ratio_round_median']:.3f}x | {ok} "
            f"| {row.get('run', '?')} |")


def issue13(st_rows: Sequence[dict]) -> str:
    """Markdown table of the issue-13 step-time targets (interleaved rounds, N_u 30): the
    CPU row of every target (measured or not), then any other device's."""
    out = ["| target | measured | met | run |", "|---|---|---|---|"]
    for t in issue13_targets():
        for method in t.methods:
            rows = [r for r in st_rows if r["workload"] == t.workload
                    and r["update_freq"] == UPDATE_FREQ and r["method"] == method]
            rows.sort(key=lambda r: r.get("device", "cpu") != "cpu")
            if not any(r.get("device", "cpu") == "cpu" for r in rows):
                out.append(_step_row(t, method, None))
            out += [_step_row(t, method, r) for r in rows]
    return "\n".join(out)


# -- issue 7 (history) ------------------------------------------------------------------------
ISSUE7_METHODS = ("kfac", "so", "q", "qe")


def _issue7_steps(st_rows: Sequence[dict]) -> list[str]:
    inner = qe_settings()[0]
    out = []
    for wl in ("cnn", "mlp"):
        for r in st_rows:
            if r["workload"] != wl or r["update_freq"] != 30 or "ratio_mean" not in r:
                continue
            limit = {"kfac": 1.10, "so": 1.10, "q": 1.10, "qe": inner + 3.0}.get(r["method"])
            if limit is None:
                continue
            ok = r["ratio_mean"] <= limit
            out.append(
                f"| {r['method']} step time on {wl} ({r.get('device', 'cpu')}), N_u 30 "
                f"<= {limit:.2f}x SGD | {r['ratio_mean']:.3f}x (mean over all steps); "
                f"per-round median {r['ratio_round_median']:.3f}x | {'yes' if ok else 'no'} "
                f"| {r.get('run', '?')} |"
            )
    return out


def _issue2(issue2: dict) -> str:
    ratios = [x["ratio"] for x in issue2["rows"]]
    med = statistics.median(ratios)
    return (f"| issue 2: kfac / torch.optim.SGD on cnn, N_u 30 <= 1.10x "
            f"| median {med:.3f}x over {len(ratios)} runs "
            f"({', '.join(f'{x:.3f}' for x in ratios)}) | {'yes' if med <= 1.10 else 'no'} "
            f"| {issue2['run']} |")


def _issue7_memory(mem_rows: Sequence[dict]) -> list[str]:
    out = []
    for r in mem_rows:
        if r["method"] not in ISSUE7_METHODS:
            continue
        measured = f"{r['per_param']:.2f}x params (+ {r['factors']:,} B curvature)"
        if r["method"] == "qe":
            window = int(r.get("window", 0)) or None
            extra = f"; {window} of them are the window" if window else ""
            ok = "yes" if window and r["per_param"] <= 3.0 + window else "see window"
            out.append(f"| qe state <= 3x params + factors + window ({r['workload']}) "
                       f"| {measured}{extra} | {ok} | {r.get('run', '?')} |")
        else:
            ok = "yes" if r["per_param"] <= 3.0 else "no"
            out.append(f"| {r['method']} state <= 3x params + factors ({r['workload']}) "
                       f"| {measured} | {ok} | {r.get('run', '?')} |")
    return out


def issue7(st_rows: Sequence[dict], mem_rows: Sequence[dict], issue2: dict | None) -> str:
    """The issue-7 targets (and issue 2's figure) with the measured figures; methods with a
    rank are left out (issue 7 predates them)."""
    out = ["| target | measured | met | run |", "|---|---|---|---|"]
    out += _issue7_steps(st_rows)
    if issue2:
        out.append(_issue2(issue2))
    out += _issue7_memory(mem_rows)
    return "\n".join(out)

