"""KFAC against ``torch.optim.SGD`` on the paper's CNN (issue 2's closing measurement).

Batch 512, ``update_freq=30``, 2 threads, the two optimizers interleaved in rounds of 30
steps (so every KFAC round holds exactly one curvature refresh), mean step time
(forward + backward + step) over >= 200 steps after one warm-up round. Target: KFAC <=
1.10x SGD. SGD is ``torch.optim.SGD`` at ``kldwrm.PAPER_SETTINGS['sgd']`` (lr 0.1,
momentum 0.9, weight decay 1e-3); KFAC at the paper's settings.

Run: ``python -m benchmarks.kfac_vs_sgd [--steps 240] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Sequence

import torch

from .common import WORKLOADS, machine_info
from .step_time import build_runners, report, run_interleaved


def compare(steps: int = 240, repeats: int = 3, device: str = "cpu") -> list[dict]:
    """``repeats`` independent interleaved runs; one row of statistics per run."""
    rounds = math.ceil(steps / 30)
    out = []
    for rep in range(repeats):
        runners = build_runners(WORKLOADS["cnn"], ["sgd", "kfac"], 30, torch.device(device),
                                seed=rep)
        run_interleaved(runners, rounds, 30, warmup_rounds=1)
        rows = {r["method"]: r for r in report(runners)}
        out.append(dict(sgd_mean=rows["sgd"]["mean"], kfac_mean=rows["kfac"]["mean"],
                        ratio=rows["kfac"]["ratio_mean"],
                        round_ratio=rows["kfac"]["ratio_round_median"], steps=rows["kfac"]["n"]))
    return out


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=240)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    info = machine_info(torch.device(a.device))
    rows = compare(a.steps, a.repeats, a.device)
    print("; ".join(f"{k}: {v}" for k, v in info.items()))
    for i, r in enumerate(rows):
        print(f"run {i}: SGD {1e3 * r['sgd_mean']:.2f} ms, KFAC {1e3 * r['kfac_mean']:.2f} ms "
              f"(mean over {r['steps']} steps) -> {r['ratio']:.3f}x; per-round median "
              f"{r['round_ratio']:.3f}x")
    print(f"median over runs: {statistics.median(r['ratio'] for r in rows):.3f}x SGD "
          f"(target <= 1.10x)")


if __name__ == "__main__":
    main()
