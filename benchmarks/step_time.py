"""Step time of every optimizer, as a user pays it (forward + backward + step).

Each method trains its own copy of the model (same initialisation) on the same fixed
batches. The methods take turns in *rounds* of ``round_len`` consecutive steps (30 by
default, so every round of a method holds exactly one curvature refresh at
``update_freq=30``); the order of the methods rotates from round to round, so machine
drift and noise from other processes hit all methods alike. Every step is timed
individually (``time.perf_counter``, with a device synchronisation on GPU); the first
``warmup_rounds`` rounds are discarded.

Reported per method: mean (what a user pays over a run, refresh steps included), median
and interquartile range of single steps, the ratio of means to SGD, and the median over
rounds of the per-round ratio to SGD (the most noise-robust figure on a shared machine).

A workload with ``max_rounds`` (``mlp-wide``, whose exact K-FAC step takes seconds) is
timed over at most that many rounds after the warm-up round: a *short* cell, marked so in
the table. Method names may carry a rank (``kfac-r128``, see ``common.parse_method``).

Run alone: ``python -m benchmarks.step_time --workload cnn --update-freq 30``.
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import (
    WORKLOADS,
    Workload,
    available_methods,
    is_curvature,
    make,
    now,
    summary,
    synthetic_batches,
)


@dataclass
class Runner:
    """One method's model, optimizer and batch cursor."""

    name: str
    model: nn.Module
    opt: torch.optim.Optimizer
    batches: list[tuple[Tensor, Tensor]]
    device: torch.device
    cursor: int = 0
    times: list[float] = field(default_factory=list)
    round_totals: list[float] = field(default_factory=list)

    def step(self) -> float:
        """One training step; returns its wall time in seconds."""
        x, y = self.batches[self.cursor % len(self.batches)]
        self.cursor += 1
        t0 = now(self.device)
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        self.opt.step()
        return now(self.device) - t0


def build_runners(w: Workload, methods: Sequence[str], update_freq: int, device: torch.device,
                  n_batches: int = 8, seed: int = 0,
                  sgd_kwargs: dict | None = None) -> list[Runner]:
    """One :class:`Runner` per method, all from the same initial weights and batches."""
    torch.manual_seed(seed)
    base = w.build().to(device)
    batches = synthetic_batches(w, n_batches, device, seed)
    runners = []
    for m in methods:
        model = w.build().to(device)
        model.load_state_dict(base.state_dict())
        model.train()
        kw: dict = {"update_freq": update_freq} if is_curvature(m) else {}
        if m == "sgd" and sgd_kwargs:
            kw.update(sgd_kwargs)
        runners.append(Runner(m, model, make(m, model, **kw), batches, device))
    return runners


def run_interleaved(runners: Sequence[Runner], rounds: int, round_len: int,
                    warmup_rounds: int) -> None:
    """Rounds of ``round_len`` steps per method, order rotating; warm-up rounds discarded."""
    k = len(runners)
    for r in range(warmup_rounds + rounds):
        order = [runners[(r + i) % k] for i in range(k)]
        for run in order:
            ts = [run.step() for _ in range(round_len)]
            if r >= warmup_rounds:
                run.times.extend(ts)
                run.round_totals.append(sum(ts))


def report(runners: Sequence[Runner], baseline: str = "sgd") -> list[dict]:
    """Per-method statistics and ratios to ``baseline``."""
    by = {r.name: r for r in runners}
    base = by.get(baseline)
    rows = []
    for r in runners:
        s = summary(r.times)
        row = dict(method=r.name, **{k: v for k, v in s.items()})
        if base is not None:
            row["ratio_mean"] = s["mean"] / statistics.fmean(base.times)
            per_round = [a / b for a, b in zip(r.round_totals, base.round_totals, strict=True)]
            row["ratio_round_median"] = statistics.median(per_round)
            q = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else per_round * 3
            row["ratio_round_q1"], row["ratio_round_q3"] = q[0], q[2]
        row["skipped"] = int(getattr(r.opt, "skipped_steps", 0))
        rows.append(row)
    return rows


def cell_rounds(workload: str, rounds: int) -> tuple[int, bool]:
    """Timed rounds of a cell, capped by the workload's ``max_rounds``; and whether the
    workload has such a cap (its cell is then *short*)."""
    cap = WORKLOADS[workload].max_rounds
    return (rounds, False) if cap is None else (min(rounds, cap), True)


def measure(workload: str, update_freq: int, methods: Sequence[str], device: torch.device,
            rounds: int, round_len: int = 30, warmup_rounds: int = 1) -> list[dict]:
    """Build, run interleaved and report one (workload, update_freq) cell.

    ``rounds`` is capped by the workload's ``max_rounds`` (its rows then say ``short``).
    """
    w = WORKLOADS[workload]
    rounds, short = cell_rounds(workload, rounds)
    runners = build_runners(w, available_methods(methods), update_freq, device)
    run_interleaved(runners, rounds, round_len, warmup_rounds)
    rows = report(runners)
    for row in rows:
        row.update(workload=workload, update_freq=update_freq, rounds=rounds, short=short)
    return rows


def workload_label(row: dict) -> str:
    """The workload, with the device when it is not the CPU (``mlp (cuda)``)."""
    device = row.get("device", "cpu")
    return row["workload"] if device == "cpu" else f"{row['workload']} ({device})"


def format_width(rows: Sequence[dict], narrow: str = "mlp", wide: str = "mlp-wide",
                 update_freq: int = 30) -> str | None:
    """Markdown table: each method's mean step on ``narrow`` and ``wide`` and the growth.

    Only methods measured on both workloads (same device and N_u) appear; ``None`` if none.
    """
    def cells(workload: str) -> dict[tuple[str, str], dict]:
        return {(r["method"], r.get("device", "cpu")): r for r in rows
                if r["workload"] == workload and r["update_freq"] == update_freq}

    small, big = cells(narrow), cells(wide)
    out = [f"| method | device | {narrow} mean ms | {wide} mean ms | growth "
           f"| {narrow} / SGD | {wide} / SGD | runs |", "|---|---|---|---|---|---|---|---|"]
    for key in (k for k in big if k in small):
        a, b = small[key], big[key]
        ratios = [f"{r['ratio_mean']:.2f}" if "ratio_mean" in r else "-" for r in (a, b)]
        out.append(f"| {key[0]} | {key[1]} | {1e3 * a['mean']:.1f} | {1e3 * b['mean']:.1f} "
                   f"| {b['mean'] / a['mean']:.1f}x | {ratios[0]} | {ratios[1]} "
                   f"| {a.get('run', '?')}, {b.get('run', '?')} |")
    return "\n".join(out) if len(out) > 2 else None


def format_rows(rows: Sequence[dict]) -> str:
    """Markdown table of :func:`measure` rows."""
    out = ["| workload | N_u | method | mean ms | median ms | IQR ms | mean / SGD "
           "| per-round ratio (median [IQR]) | steps |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['ratio_mean']:.3f}" if "ratio_mean" in r else "-"
        rr = (f"{r['ratio_round_median']:.3f} [{r['ratio_round_q1']:.3f}, "
              f"{r['ratio_round_q3']:.3f}]") if "ratio_round_median" in r else "-"
        skipped = f" ({r['skipped']} skipped)" if r.get("skipped") else ""
        skipped += " (short cell)" if r.get("short") else ""
        out.append(
            f"| {workload_label(r)} | {r['update_freq']} | {r['method']} | {1e3 * r['mean']:.2f} "
            f"| {1e3 * r['median']:.2f} | {1e3 * r['q1']:.2f}-{1e3 * r['q3']:.2f} | {ratio} "
            f"| {rr} | {r['n']}{skipped} |"
        )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", choices=list(WORKLOADS), action="append")
    p.add_argument("--update-freq", type=int, action="append")
    p.add_argument("--methods", default="sgd,adam,kfac,so,q,qe",
                   help="comma-separated; a rank as in kfac-r128")
    p.add_argument("--steps", type=int, default=210,
                   help="timed steps per method (>= 200; capped for mlp-wide)")
    p.add_argument("--round-len", type=int, default=30)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    rounds = math.ceil(a.steps / a.round_len)
    rows = []
    for wl in a.workload or ["cnn", "mlp"]:
        for uf in a.update_freq or [30]:
            rows += measure(wl, uf, a.methods.split(","), torch.device(a.device), rounds,
                            a.round_len)
    print(format_rows(rows))


if __name__ == "__main__":
    main()
