"""QE-KLD-WRM step time relative to SGD and Q-KLD-WRM on the paper's MNIST CNN.

Batch 512 of MNIST-shaped random data (the step time does not depend on the pixel values),
``torch.set_num_threads(2)``; every round times ``--steps`` consecutive steps of each
optimizer in turn (interleaved, so load from other processes affects all alike), and the
table reports the median over rounds of the milliseconds per step and its ratio to SGD.
Each optimizer runs on its own copy of the model; a full training step (zero_grad, forward,
backward, step) is timed. Curvature refreshes are included at the paper's rate
(update_freq 30) by running 30 steps per round by default.

    python benchmarks/qe_step_time.py [--rounds 5] [--steps 30] [--threads 2] [--clock cpu]

``--clock cpu`` times with ``time.process_time`` (CPU seconds of this process, all threads):
on a machine shared with other jobs it is far less noisy than wall time, and ratios of CPU
time are what the cost model below predicts.

QE's target is at most (inner_steps + 3) x SGD: each inner step costs one forward and one
backward, the stored iterates' outputs one vectorised forward over the window.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kldwrm.optim.q import QKLDWRM
from kldwrm.optim.qe import QEKLDWRM


def paper_cnn() -> nn.Sequential:
    """The paper's MNIST network (DESIGN section 4)."""
    return nn.Sequential(
        nn.Conv2d(1, 5, 5), nn.MaxPool2d(2), nn.ReLU(),
        nn.Conv2d(5, 7, 5), nn.MaxPool2d(2), nn.ReLU(),
        nn.Flatten(), nn.Linear(112, 30), nn.ReLU(), nn.Dropout(0.5), nn.Linear(30, 10),
    )


COMMON = dict(lr=0.01, rho=0.5, damping=1e-2, weight_decay=1e-3, kl_clip=0.1, update_freq=30,
              block_clip=2.0)


def builders() -> dict[str, Callable[[nn.Module], torch.optim.Optimizer]]:
    return {
        "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.01),
        "q": lambda m: QKLDWRM(m, **COMMON),
        "qe released (W=3, N_IS=7)": lambda m: QEKLDWRM(
            m, **COMMON, window=3, inner_steps=7, inner_lr=1e-3, inner_momentum=0.5,
            kl_weight=1 / 660),
        "qe paper (W=4, N_IS=10)": lambda m: QEKLDWRM(
            m, **COMMON, window=4, inner_steps=10, inner_lr=7e-4, kl_weight=1 / 330),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = ap.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch,))
    runs = {}
    for name, build in builders().items():
        model = paper_cnn()
        runs[name] = (model, build(model))

    def train(model: nn.Module, opt: torch.optim.Optimizer, n: int) -> float:
        t0 = clock()
        for _ in range(n):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return (clock() - t0) * 1e3 / n

    for model, opt in runs.values():  # warm-up: fill QE's window, first refresh
        train(model, opt, 5)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, (model, opt) in runs.items():
            times[name].append(train(model, opt, args.steps))
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"paper CNN, batch {args.batch}, {args.threads} threads, {args.clock} clock, "
          f"median of {args.rounds} interleaved rounds x {args.steps} steps")
    print(f"{'optimizer':<28}{'ms/step':>10}{'x SGD':>8}{'x Q':>7}{'target':>9}")
    for name, ms in med.items():
        target = ""
        opt = runs[name][1]
        if isinstance(opt, QEKLDWRM):
            target = f"<= {opt.inner_steps + 3}x"
        print(f"{name:<28}{ms:>10.1f}{ms / med['sgd']:>8.2f}{ms / med['q']:>7.2f}{target:>9}")


if __name__ == "__main__":
    main()
