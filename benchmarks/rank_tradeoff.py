"""Accuracy against rank: K-FAC exact and low rank on the MNIST MLP (issue 13).

The MLP 784-1024-1024-10 (``common.mlp``) at batch 256 on real MNIST, inputs normalised
as in ``accuracy.py`` (mean 0.1307, std 0.3081), trained ``--epochs`` epochs (2) from one
seed: once with exact eigendecompositions (``rank=None``) and once per rank in ``--ranks``
(16, 32, 64, 128, 256 by default; ``kfac-r64`` is ``rank=64``), all at the paper's
settings (``kldwrm.PAPER_SETTINGS``, N_u 30). Every run starts from the same weights and
sees the training examples in the same order (both depend on the seed only).

Reported per run: test accuracy after each epoch and the training seconds (evaluation
excluded, a device synchronisation before the clock stops on GPU), and those seconds over
the exact run's. Two untimed steps of the exact and the first low-rank method come first,
so that neither timed run pays first-call costs (thread pools, CUDA library handles). A
factor no larger than the rank is decomposed exactly (the output-side factor of the last
layer is 10 x 10).

Run alone: ``python -m benchmarks.rank_tradeoff [--ranks 16,32,64,128,256] [--epochs 2]``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from .accuracy import normalised_mnist, train
from .common import mlp, parse_method

DEFAULT_RANKS = (16, 32, 64, 128, 256)
BATCH = 256


def method_names(optimizer: str, ranks: Sequence[int]) -> list[str]:
    """The exact method, then one name per rank: ``["kfac", "kfac-r16", ...]``."""
    names = [optimizer, *(f"{optimizer}-r{r}" for r in ranks)]
    for n in names:
        parse_method(n)  # raises ValueError for a bad optimizer or rank
    return names


def run(ranks: Sequence[int], epochs: int, device: torch.device, seed: int = 0,
        optimizer: str = "kfac", train_limit: int | None = None) -> list[dict]:
    """One row per method of :func:`method_names`; ``train_limit`` (smoke runs only)
    trains on the first ``train_limit`` training images."""
    xtr, ytr, xte, yte = normalised_mnist()
    data = (xtr[:train_limit], ytr[:train_limit], xte, yte)
    names = method_names(optimizer, ranks)
    for m in names[:2]:  # not timed: first-call costs (threads, CUDA handles) of both paths
        train(m, seed, (xtr[:2 * BATCH], ytr[:2 * BATCH], xte[:BATCH], yte[:BATCH]), 1,
              device, batch=BATCH, build=mlp)
    rows = []
    for m in names:
        hist = train(m, seed, data, epochs, device, batch=BATCH, build=mlp)
        row = dict(method=m, rank=parse_method(m)[1].get("rank"), epochs=epochs, seed=seed,
                   acc=[a for a, _ in hist], seconds=[s for _, s in hist],
                   train_images=len(data[0]))
        print(f"[rank_tradeoff] {row}", file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def _exact_seconds(rows: Sequence[dict]) -> dict[str, float]:
    """Training seconds of the exact run, per device."""
    return {r.get("device", "cpu"): r["seconds"][-1] for r in rows if r["rank"] is None}


def format_rows(rows: Sequence[dict]) -> str:
    """Markdown table: accuracy after each epoch, training seconds, seconds / exact."""
    epochs = max(len(r["acc"]) for r in rows)
    exact = _exact_seconds(rows)
    head = "".join(f" test acc, epoch {e} |" for e in range(1, epochs + 1))
    out = [f"| method | rank |{head} training s | s / exact |",
           "|---|---|" + "---|" * (epochs + 2)]
    for r in rows:
        device = r.get("device", "cpu")
        name = r["method"] if device == "cpu" else f"{r['method']} ({device})"
        accs = [f"{100 * a:.2f}%" for a in r["acc"]] + ["-"] * (epochs - len(r["acc"]))
        base = exact.get(device)
        rel = f"{r['seconds'][-1] / base:.2f}" if base else "-"
        out.append(f"| {name} | {r['rank'] or 'exact'} | {' | '.join(accs)} "
                   f"| {r['seconds'][-1]:.1f} | {rel} |")
    limited = sorted({r["train_images"] for r in rows if r["train_images"] < 60000})
    if limited:
        sizes = ", ".join(map(str, limited))
        out.append(f"\nSmoke run: trained on the first {sizes} training images only.")
    return "\n".join(out)


def parse_ranks(text: str) -> list[int]:
    """``"16,32"`` → ``[16, 32]``."""
    return [int(r) for r in text.split(",") if r]


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", default=",".join(map(str, DEFAULT_RANKS)))
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--optimizer", default="kfac", help="kfac, so, q or qe")
    p.add_argument("--train-limit", type=int, default=None,
                   help="smoke runs only: train on the first N training images")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = run(parse_ranks(a.ranks), a.epochs, torch.device(a.device), a.seed, a.optimizer,
               a.train_limit)
    print(format_rows(rows))


if __name__ == "__main__":
    main()
