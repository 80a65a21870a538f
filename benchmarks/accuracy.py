"""Time to accuracy on MNIST with the paper's CNN (batch 512).

For every optimizer and seed the network is trained for ``--epochs`` epochs; the test
accuracy is evaluated after every epoch (evaluation time excluded). Reported: the first
epoch, and the training seconds up to the end of it, at which the test accuracy reaches
97% and 98%; the median over seeds (a seed that never reaches the level counts as
infinitely slow, so the median is "not reached" when half the seeds or more miss it).

Settings: ``kfac``, ``so``, ``q``, ``qe`` at their DESIGN section 4 settings
(``kldwrm.PAPER_SETTINGS``). SGD (momentum 0.9, weight decay 1e-3) and Adam take the
learning rate chosen by a small sweep: SGD lr in {0.01, 0.03, 0.1, 0.3}, Adam lr in
{3e-4, 1e-3, 3e-3, 1e-2}, each trained ``--sweep-epochs`` epochs (seed 0) on the first 55,000
training images and scored on the held-out last 5,000 (the test set is not used to pick).
Inputs are normalised with mean 0.1307 / std 0.3081, train and test alike.

Run alone: ``python -m benchmarks.accuracy --epochs 10 --seeds 3``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import available_methods, load_mnist, make, paper_cnn

SWEEPS = {"sgd": (0.01, 0.03, 0.1, 0.3), "adam": (3e-4, 1e-3, 3e-3, 1e-2)}
LEVELS = (0.97, 0.98)
MEAN, STD = 0.1307, 0.3081


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int = 2000) -> float:
    model.eval()
    correct = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
                  for i in range(0, len(x), batch))
    model.train()
    return correct / len(x)


def train(method: str, seed: int, data: tuple[Tensor, ...], epochs: int, device: torch.device,
          batch: int = 512, build: Callable[[], nn.Module] = paper_cnn, **kw: object
          ) -> list[tuple[float, float]]:
    """``(test accuracy, cumulative training seconds)`` after each epoch.

    ``build`` makes the network (the paper CNN by default). The initial weights and the
    order of the training examples depend on ``seed`` only, not on ``method`` (a rank in
    the name, as ``kfac-r64``, is passed on as ``rank=``).
    """
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    model = build().to(device)
    opt = make(method, model, **kw)
    g = torch.Generator().manual_seed(seed)
    spent = 0.0
    hist = []
    for _ in range(epochs):
        perm = torch.randperm(len(xtr), generator=g)
        t0 = time.perf_counter()
        for i in range(0, len(xtr), batch):
            idx = perm[i:i + batch]
            xb, yb = xtr[idx].to(device), ytr[idx].to(device)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        spent += time.perf_counter() - t0
        hist.append((accuracy(model, xte.to(device), yte.to(device)), spent))
    return hist


def sweep(method: str, data: tuple[Tensor, ...], epochs: int, device: torch.device
          ) -> tuple[float, dict[float, float]]:
    """Pick ``lr`` for SGD/Adam on a 55k/5k split of the training set."""
    xtr, ytr = data[0], data[1]
    split = (xtr[:55000], ytr[:55000], xtr[55000:], ytr[55000:])
    scores = {lr: train(method, 0, split, epochs, device, lr=lr)[-1][0] for lr in SWEEPS[method]}
    return max(scores, key=lambda lr: scores[lr]), scores


def first_reach(hist: Sequence[tuple[float, float]], level: float) -> tuple[float, float]:
    """``(epoch, seconds)`` at which ``level`` is first reached (``inf`` if never)."""
    for e, (acc, sec) in enumerate(hist, 1):
        if acc >= level:
            return float(e), sec
    return math.inf, math.inf


def normalised_mnist() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """MNIST (train images, labels, test images, labels), inputs normalised with
    :data:`MEAN` / :data:`STD`, train and test alike."""
    xtr, ytr, xte, yte = load_mnist()
    return (xtr - MEAN) / STD, ytr, (xte - MEAN) / STD, yte


def run(methods: Sequence[str], epochs: int, seeds: int, sweep_epochs: int,
        device: torch.device) -> tuple[list[dict], dict[str, dict]]:
    """Rows per method and the sweep results."""
    data = normalised_mnist()
    sweeps: dict[str, dict] = {}
    rows = []
    for m in available_methods(methods):
        kw: dict = {}
        if m in SWEEPS:
            lr, scores = sweep(m, data, sweep_epochs, device)
            sweeps[m] = dict(chosen=lr, scores=scores)
            kw["lr"] = lr
            print(f"[accuracy] {m}: sweep {scores} -> lr {lr}", file=sys.stderr)
        hists = [train(m, s, data, epochs, device, **kw) for s in range(seeds)]
        row: dict = dict(method=m, seeds=seeds, epochs=epochs,
                         final=statistics.median(h[-1][0] for h in hists),
                         epoch_s=statistics.median(h[-1][1] / len(h) for h in hists))
        for level in LEVELS:
            reach = [first_reach(h, level) for h in hists]
            row[f"ep{level}"] = statistics.median(r[0] for r in reach)
            row[f"s{level}"] = statistics.median(r[1] for r in reach)
            row[f"hit{level}"] = sum(math.isfinite(r[0]) for r in reach)
        print(f"[accuracy] {row}", file=sys.stderr)
        rows.append(row)
    return rows, sweeps


def format_rows(rows: Sequence[dict], sweeps: dict[str, dict]) -> str:
    def fmt(v: float, spec: str) -> str:
        return "not reached" if not math.isfinite(v) else format(v, spec)

    out = ["| method | epochs to 97% | s to 97% | epochs to 98% | s to 98% "
           "| final test acc (median) | s / epoch | seeds reaching 97% / 98% |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(
            f"| {r['method']} | {fmt(r['ep0.97'], '.0f')} | {fmt(r['s0.97'], '.1f')} "
            f"| {fmt(r['ep0.98'], '.0f')} | {fmt(r['s0.98'], '.1f')} | {100 * r['final']:.2f}% "
            f"| {r['epoch_s']:.1f} | {r['hit0.97']}/{r['seeds']}, {r['hit0.98']}/{r['seeds']} |"
        )
    for m, sw in sweeps.items():
        scores = ", ".join(f"lr {lr:g}: {100 * a:.2f}%" for lr, a in sw["scores"].items())
        out.append(f"\nLearning-rate sweep for {m} (held-out accuracy): {scores}; "
                   f"chosen lr = {sw['chosen']:g}.")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="sgd,adam,kfac,so,q,qe", help="a rank as in kfac-r128")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--sweep-epochs", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows, sweeps = run(a.methods.split(","), a.epochs, a.seeds, a.sweep_epochs,
                       torch.device(a.device))
    print(format_rows(rows, sweeps))


if __name__ == "__main__":
    main()
