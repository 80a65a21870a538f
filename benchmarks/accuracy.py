"""Time to accuracy on MNIST and Fashion-MNIST with the paper's CNN (batch 512).

For every optimizer and seed the network is trained for ``--epochs`` epochs; the test
accuracy is evaluated after every epoch (evaluation time excluded). Reported: the first
epoch, and the training seconds up to the end of it, at which the test accuracy reaches
each level of the data set (MNIST 97% and 98%; Fashion-MNIST 84% and 85%: the paper CNN
ends 10 epochs at 84-86% there (measured), and 85% is the level of the project's reports,
``kldwrm.experiments.study.runs.ACC_TARGET``); the median over seeds (a seed that never reaches the
level counts as infinitely slow, so the median is "not reached" when half the seeds or more
miss it); and the median training seconds per epoch, which tells whether a method wins by
needing fewer epochs or by cheaper ones.

Settings: ``kfac``, ``so``, ``q``, ``qe`` at their DESIGN section 4 settings
(``kldwrm.PAPER_SETTINGS``). SGD (momentum 0.9, weight decay 1e-3) and Adam take the
learning rate chosen by a small sweep, per data set: SGD lr in {0.01, 0.03, 0.1, 0.3}, Adam
lr in {3e-4, 1e-3, 3e-3, 1e-2, 3e-2}, each trained ``--sweep-epochs`` epochs (seed 0) on the first
11/12 of the training images (55,000) and scored on the held-out rest (5,000; the test set is
not used to pick). Inputs are normalised with the data set's mean / std (MNIST 0.1307 /
0.3081, Fashion-MNIST 0.2860 / 0.3530, as ``kldwrm.experiments.data.datasets``), train and
test alike.
``--train-limit N`` (smoke runs only) trains and sweeps on the first N training images; the
table then says so.

Run alone: ``python -m benchmarks.accuracy --dataset fashion-mnist --epochs 10 --seeds 3``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import available_methods, find_idx_dir, load_idx, make, paper_cnn

#: the learning-rate grids (Adam's reached 1e-2, its end then, on MNIST in the first runs)
SWEEPS = {"sgd": (0.01, 0.03, 0.1, 0.3), "adam": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)}
#: training images of the full data sets (fewer: a ``--train-limit`` smoke run)
FULL_TRAIN = 60000


@dataclass(frozen=True)
class DataSet:
    """An MNIST-type data set: its directory name, label, normalisation and levels."""

    key: str
    label: str
    mean: float
    std: float
    levels: tuple[float, ...]


DATASETS: dict[str, DataSet] = {
    "mnist": DataSet("mnist", "MNIST", 0.1307, 0.3081, (0.97, 0.98)),
    "fashion-mnist": DataSet("fashion-mnist", "Fashion-MNIST", 0.2860, 0.3530, (0.84, 0.85)),
}


def command(dataset: str) -> str:
    """The command that measures the table of ``dataset``."""
    return f"python -m benchmarks.run --stages accuracy --dataset {dataset}"


def sweep_key(dataset: str, method: str) -> str:
    """Key of a sweep in the store: the method for MNIST (as the store's first runs had
    it), ``<dataset>:<method>`` otherwise."""
    return method if dataset == "mnist" else f"{dataset}:{method}"


def percent(level: float) -> str:
    """``0.98`` → ``"98%"``, ``0.985`` → ``"98.5%"``."""
    return f"{100 * level:g}%"


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int = 2000) -> float:
    """Accuracy of ``model`` on ``(x, y)`` in eval mode, ``batch`` examples at a time."""
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


def holdout_split(xtr: Tensor, ytr: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The first 11/12 of the training set to train on, the rest held out
    (55,000 / 5,000 of the full 60,000)."""
    cut = len(xtr) - len(xtr) // 12
    return xtr[:cut], ytr[:cut], xtr[cut:], ytr[cut:]


def sweep(method: str, data: tuple[Tensor, ...], epochs: int, device: torch.device
          ) -> tuple[float, dict[float, float]]:
    """Pick ``lr`` for SGD/Adam on :func:`holdout_split` of the training set."""
    split = holdout_split(data[0], data[1])
    scores = {lr: train(method, 0, split, epochs, device, lr=lr)[-1][0] for lr in SWEEPS[method]}
    return max(scores, key=lambda lr: scores[lr]), scores


def first_reach(hist: Sequence[tuple[float, float]], level: float) -> tuple[float, float]:
    """``(epoch, seconds)`` at which ``level`` is first reached (``inf`` if never)."""
    for e, (acc, sec) in enumerate(hist, 1):
        if acc >= level:
            return float(e), sec
    return math.inf, math.inf


def normalised(dataset: str = "mnist", train_limit: int | None = None
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``dataset`` (train images, labels, test images, labels), inputs normalised with its
    mean / std, train and test alike; the first ``train_limit`` training images only if
    given (smoke runs)."""
    ds = DATASETS[dataset]
    xtr, ytr, xte, yte = load_idx(find_idx_dir(dataset))
    xtr, ytr = xtr[:train_limit], ytr[:train_limit]
    return (xtr - ds.mean) / ds.std, ytr, (xte - ds.mean) / ds.std, yte


def normalised_mnist() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """MNIST as :func:`normalised` gives it."""
    return normalised("mnist")


def summarise(method: str, hists: Sequence[Sequence[tuple[float, float]]],
              levels: Sequence[float]) -> dict:
    """One table row from the per-seed histories: medians over seeds of the final test
    accuracy, the seconds per epoch and, per level, the epoch and seconds to reach it."""
    row: dict = dict(method=method, seeds=len(hists), epochs=len(hists[0]),
                     final=statistics.median(h[-1][0] for h in hists),
                     epoch_s=statistics.median(h[-1][1] / len(h) for h in hists))
    for level in levels:
        reach = [first_reach(h, level) for h in hists]
        row[f"ep{level}"] = statistics.median(r[0] for r in reach)
        row[f"s{level}"] = statistics.median(r[1] for r in reach)
        row[f"hit{level}"] = sum(math.isfinite(r[0]) for r in reach)
    return row


def run_method(method: str, data: tuple[Tensor, ...], epochs: int, seeds: int,
               sweep_epochs: int, device: torch.device, dataset: str = "mnist"
               ) -> tuple[dict, dict | None]:
    """One row (with ``dataset``, ``train_images`` and, for SGD/Adam, the swept ``lr``)
    and the sweep result (``None`` for a method without a sweep); ``data`` as
    :func:`normalised` gives it."""
    kw: dict = {}
    swept = None
    if method in SWEEPS:
        lr, scores = sweep(method, data, sweep_epochs, device)
        swept = dict(chosen=lr, scores=scores)
        kw["lr"] = lr
        print(f"[accuracy] {dataset} {method}: sweep {scores} -> lr {lr}", file=sys.stderr)
    hists = [train(method, s, data, epochs, device, **kw) for s in range(seeds)]
    row = dict(summarise(method, hists, DATASETS[dataset].levels), dataset=dataset,
               train_images=len(data[0]), **kw)
    print(f"[accuracy] {row}", file=sys.stderr, flush=True)
    return row, swept


def run(methods: Sequence[str], epochs: int, seeds: int, sweep_epochs: int,
        device: torch.device, dataset: str = "mnist", train_limit: int | None = None
        ) -> tuple[list[dict], dict[str, dict]]:
    """Rows per method (:func:`run_method`) and the sweep results per method."""
    data = normalised(dataset, train_limit)
    rows, sweeps = [], {}
    for m in available_methods(methods):
        row, swept = run_method(m, data, epochs, seeds, sweep_epochs, device, dataset)
        rows.append(row)
        if swept is not None:
            sweeps[m] = swept
    return rows, sweeps


def _fmt(v: float | None, spec: str) -> str:
    """``v`` formatted; ``-`` if absent, "not reached" if infinite."""
    if v is None:
        return "-"
    return "not reached" if not math.isfinite(v) else format(v, spec)


def _lr_text(row: dict, sweeps: dict[str, dict]) -> str:
    """The learning rate column: the swept rate of SGD/Adam, else the paper settings."""
    lr = row.get("lr", sweeps.get(row["method"], {}).get("chosen"))
    return f"{lr:g} (swept)" if lr is not None else "paper settings"


def _cost_key(r: dict) -> tuple:
    """What a row is compared with SGD's on: the same device and training set size (a
    smoke run's rows are not compared with a full run's)."""
    return r.get("device", "cpu"), r.get("train_images", FULL_TRAIN)


def _sgd_epoch_s(rows: Sequence[dict]) -> dict[tuple, float]:
    """SGD's seconds per epoch, by :func:`_cost_key`."""
    return {_cost_key(r): r["epoch_s"] for r in rows if r["method"] == "sgd"}


def _header(levels: Sequence[float]) -> list[str]:
    """The table header and its separator for ``levels``."""
    cols = "".join(f" epochs to {percent(v)} | s to {percent(v)} |" for v in levels)
    hits = " / ".join(percent(v) for v in levels)
    return [f"| method | lr |{cols} s / epoch | s / epoch over SGD's "
            f"| final test acc (median) | seeds reaching {hits} |",
            "|---|---|" + "---|---|" * len(levels) + "---|---|---|---|"]


def _row_line(r: dict, levels: Sequence[float], sweeps: dict[str, dict],
              sgd_epoch: dict[tuple, float]) -> str:
    """One method's table line (the device named when it is not the CPU)."""
    device = r.get("device", "cpu")
    name = r["method"] if device == "cpu" else f"{r['method']} ({device})"
    cols = "".join(f" {_fmt(r.get(f'ep{v}'), '.0f')} | {_fmt(r.get(f's{v}'), '.1f')} |"
                   for v in levels)
    base = sgd_epoch.get(_cost_key(r))
    rel = f"{r['epoch_s'] / base:.2f}" if base else "-"
    hits = ", ".join(f"{r.get(f'hit{v}', '?')}/{r['seeds']}" for v in levels)
    return (f"| {name} | {_lr_text(r, sweeps)} |{cols} {r['epoch_s']:.2f} | {rel} "
            f"| {100 * r['final']:.2f}% | {hits} |")


def _sweep_lines(sweeps: dict[str, dict]) -> list[str]:
    """One line per sweep: the held-out accuracy per rate and the rate chosen."""
    out = []
    for m, sw in sweeps.items():
        scores = ", ".join(f"lr {lr:g}: {100 * a:.2f}%" for lr, a in sw["scores"].items())
        run = f"; run {sw['run']}" if "run" in sw else ""
        edge = (", an end of the grid (the best rate may lie beyond it)"
                if sw["chosen"] in (min(sw["scores"]), max(sw["scores"])) else "")
        out.append(f"\nLearning-rate sweep for {m} (held-out accuracy): {scores}; "
                   f"chosen lr = {sw['chosen']:g}{edge}{run}.")
    return out


def format_rows(rows: Sequence[dict], sweeps: dict[str, dict],
                levels: Sequence[float] = DATASETS["mnist"].levels) -> str:
    """Markdown table of one data set's rows at ``levels``, then its sweep lines and, for
    a ``--train-limit`` run, a smoke-run note."""
    sgd_epoch = _sgd_epoch_s(rows)
    out = _header(levels) + [_row_line(r, levels, sweeps, sgd_epoch) for r in rows]
    out += _sweep_lines(sweeps)
    limited = sorted({r["train_images"] for r in rows
                      if r.get("train_images", FULL_TRAIN) < FULL_TRAIN})
    if limited:
        out.append(f"\nSmoke run: trained (and swept) on the first "
                   f"{', '.join(map(str, limited))} training images only.")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="mnist", choices=tuple(DATASETS))
    p.add_argument("--methods", default="sgd,adam,kfac,so,q,qe", help="a rank as in kfac-r128")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--sweep-epochs", type=int, default=2)
    p.add_argument("--train-limit", type=int, default=None,
                   help="smoke runs only: train and sweep on the first N training images")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows, sweeps = run(a.methods.split(","), a.epochs, a.seeds, a.sweep_epochs,
                       torch.device(a.device), a.dataset, a.train_limit)
    print(format_rows(rows, sweeps, DATASETS[a.dataset].levels))


if __name__ == "__main__":
    main()
