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

from .common import WORKLOADS, Workload, available_methods, make, now, summary, synthetic_batches


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
        kw: dict = {} if m in ("sgd", "adam") else {"update_freq": update_freq}
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


def measure(workload: str, update_freq: int, methods: Sequence[str], device: torch.device,
            rounds: int, round_len: int = 30, warmup_rounds: int = 1) -> list[dict]:
    """Build, run interleaved and report one (workload, update_freq) cell."""
    w = WORKLOADS[workload]
    runners = build_runners(w, available_methods(methods), update_freq, device)
    run_interleaved(runners, rounds, round_len, warmup_rounds)
    rows = report(runners)
    for row in rows:
        row.update(workload=workload, update_freq=update_freq)
    return rows


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
        out.append(
            f"| {r['workload']} | {r['update_freq']} | {r['method']} | {1e3 * r['mean']:.2f} "
            f"| {1e3 * r['median']:.2f} | {1e3 * r['q1']:.2f}-{1e3 * r['q3']:.2f} | {ratio} "
            f"| {rr} | {r['n']}{skipped} |"
        )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", choices=list(WORKLOADS), action="append")
    p.add_argument("--update-freq", type=int, action="append")
    p.add_argument("--methods", default="sgd,adam,kfac,so,q,qe")
    p.add_argument("--steps", type=int, default=210, help="timed steps per method (>= 200)")
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
