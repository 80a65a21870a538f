"""Where a step's time goes: ``torch.profiler`` over ordinary and refresh steps (issue 25).

One workload and one method (``make_optimizer`` defaults as in the step-time stage, the
N_u given), synthetic batches, the method warmed up over one refresh period; then the
ordinary steps of one period and its refresh step are profiled separately, and SGD's step
alongside for reference. Printed per phase: wall ms per step and the operators by self CPU
time (per step), so a breakdown can be committed as text.

    python -m benchmarks.profile_step --workload cnn --method kfac [--update-freq 30]

Timing on a shared machine is noisy and the profiler adds its own overhead (a few µs per
operator): read the *shares* and operator counts, and take speed ratios from the
interleaved step-time stage.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.profiler import profile

from .common import WORKLOADS, make, synthetic_batches


def _stepper(method: str, workload: str, update_freq: int
             ) -> tuple[Callable[[int], None], torch.optim.Optimizer]:
    w = WORKLOADS[workload]
    torch.manual_seed(0)
    model = w.build()
    opt = (torch.optim.SGD(model.parameters(), lr=0.01) if method == "sgd"
           else make(method, model, update_freq=update_freq))
    batches = synthetic_batches(w, 4, torch.device("cpu"))
    loss_fn = nn.CrossEntropyLoss()

    def step(k: int) -> None:
        x, y = batches[k % len(batches)]
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

    return step, opt


def _phase(step: Callable[[int], None], ks: Sequence[int], rows: int,
           between: Callable[[int], None] | None = None) -> str:
    """Profile ``step(k)`` for each ``k`` in ``ks``; ``between(k)`` runs unprofiled before
    each (the ordinary steps that separate two refreshes)."""
    totals: dict[str, list[float]] = {}
    wall = 0.0
    for k in ks:
        if between is not None:
            between(k)
        t0 = time.perf_counter()
        with profile() as prof:
            step(k)
        wall += time.perf_counter() - t0
        for e in prof.key_averages():
            t = totals.setdefault(e.key, [0.0, 0])
            t[0] += e.self_cpu_time_total
            t[1] += e.count
    n = len(ks)
    lines = [f"{1e3 * wall / n:.2f} ms per step (profiled), {n} steps",
             "| operator | self ms per step | calls per step |", "|---|---|---|"]
    for key, (us, count) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:rows]:
        lines.append(f"| {key} | {us / 1e3 / n:.3f} | {count / n:.1f} |")
    return "\n".join(lines)


def report(workload: str, method: str, update_freq: int, rows: int = 25) -> str:
    """The Markdown breakdown of ``method``'s ordinary and refresh steps, and SGD's."""
    out = [f"## {method} on {workload}, N_u {update_freq} "
           f"(torch {torch.__version__}, {torch.get_num_threads()} threads)"]
    step, _ = _stepper(method, workload, update_freq)
    for k in range(update_freq + 1):  # warm-up: one period and the next refresh
        step(k)
    start = update_freq + 1  # the step after a refresh
    out += ["", "### ordinary steps", "",
            _phase(step, range(start, start + update_freq - 1), rows)]
    refreshes = [update_freq * (j + 2) for j in range(3)]

    def ordinary(k: int) -> None:  # the steps between the previous refresh and k
        for j in range(k - update_freq + 1, k):
            if j >= start + update_freq - 1:
                step(j)

    out += ["", f"### the refresh step ({len(refreshes)} of them)", "",
            _phase(step, refreshes, rows, ordinary)]
    sgd, _ = _stepper("sgd", workload, update_freq)
    for k in range(5):
        sgd(k)
    out += ["", "### SGD", "", _phase(sgd, range(5, 5 + update_freq), rows)]
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="cnn", choices=sorted(WORKLOADS))
    p.add_argument("--method", default="kfac")
    p.add_argument("--update-freq", type=int, default=30)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(report(a.workload, a.method, a.update_freq, a.rows))


if __name__ == "__main__":
    main()
