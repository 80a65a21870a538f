"""The curvature refresh step, itemised.

On a refresh step a curvature optimizer pays, beyond a plain step:

* **capture**: the armed hooks and, for ``fisher="mc"``, the backward pass of the
  sampled-label loss (measured as refresh forward+backward minus the median plain one);
* **factors**: the fresh Kronecker/diagonal estimates (``engine.fresh_estimates``);
* **all-reduce**: averaging the factors over ranks (none in a single process: 0);
* **EA**: folding the estimate into the exponential average (``engine.fold`` minus the
  eigendecompositions);
* **decomposition**: the eigendecompositions inside ``fold`` (``sym_eig``, or with a rank
  the randomized eigensolver ``randomized_eigh``);
* **solve**: the damped solves and matrix-vector products of the step rule
  (``engine.solve`` + ``engine.matvec``), which every step pays;
* **rest**: everything else in ``optimizer.step()`` (clipping, update, bookkeeping).

Each item is timed with ``time.perf_counter`` around the engine call (with a device
synchronisation on GPU), by wrapping the engine's methods on the instance: nothing is
re-implemented. Method names may carry a rank (``kfac-r128``). Run alone:
``python -m benchmarks.refresh --workload cnn``.
"""

from __future__ import annotations

import argparse
import functools
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

import kldwrm.curvature.kronecker.factors as blocks_mod

from .common import WORKLOADS, available_methods, is_curvature, now
from .step_time import Runner, build_runners, workload_label

ITEMS = ("capture", "factors", "all-reduce", "EA", "decomposition", "solve", "rest")


class _Timers:
    """Accumulates wall time per label for the current step; ``open`` holds the labels
    being timed right now (innermost last)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.acc: dict[str, float] = defaultdict(float)
        self.open: list[str] = []

    def wrap(self, label: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t0 = now(self.device)
            self.open.append(label)
            try:
                return fn(*args, **kwargs)
            finally:
                self.open.pop()
                self.acc[label] += now(self.device) - t0

        return timed


@contextmanager
def _timed_decompositions(current: list[_Timers | None]) -> Iterator[None]:
    """Time the factor decompositions (exact and randomized) made inside ``engine.fold``
    under ``current[0]``. Those made inside a solve (Q's fresh factors truncated to a
    rank, the augmented solve) stay in *solve*, which already contains their time."""
    originals = {name: getattr(blocks_mod, name) for name in ("sym_eig", "randomized_eigh")}

    def timed(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def call(*args, **kwargs):
            t = current[0]
            if t is None or not t.open or t.open[-1] != "fold":
                return fn(*args, **kwargs)
            return t.wrap("decomposition", fn)(*args, **kwargs)

        return call

    for name, fn in originals.items():
        setattr(blocks_mod, name, timed(fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(blocks_mod, name, fn)


def itemise(workload: str, methods: Sequence[str], device: torch.device, refreshes: int,
            update_freq: int = 30) -> list[dict]:
    """Median over ``refreshes`` refresh steps of each item, per method (seconds)."""
    w = WORKLOADS[workload]
    methods = [m for m in available_methods(methods) if is_curvature(m)]
    runners = build_runners(w, methods, update_freq, device)
    timers = {r.name: _Timers(device) for r in runners}
    eig_timer: list[_Timers | None] = [None]
    for r in runners:
        eng = r.opt.engine  # type: ignore[attr-defined]
        t = timers[r.name]
        eng.fresh_estimates = t.wrap("factors", eng.fresh_estimates)
        eng.fold = t.wrap("fold", eng.fold)
        eng.solve = t.wrap("solve", eng.solve)
        eng.matvec = t.wrap("solve", eng.matvec)
    rows = []
    with _timed_decompositions(eig_timer):
        for r in runners:
            eig_timer[0] = timers[r.name]
            med = _itemise_runner(r, timers[r.name], refreshes, update_freq)
            med.update(method=r.name, workload=workload)
            rows.append(med)
    return rows


def _itemise_runner(r: Runner, t: _Timers, refreshes: int, update_freq: int) -> dict:
    """Train ``r`` for ``refreshes + 1`` refresh periods (the first one is a warm-up) and
    return the median of every item over its refresh steps, and their number ``n``."""
    device = r.device
    plain_fb: list[float] = []
    items: dict[str, list[float]] = defaultdict(list)
    for k in range((refreshes + 1) * update_freq):
        x, y = r.batches[k % len(r.batches)]
        refresh = r.opt.is_refresh_step  # type: ignore[attr-defined]
        t.acc.clear()
        t0 = now(device)
        r.opt.zero_grad(set_to_none=True)
        F.cross_entropy(r.model(x), y).backward()
        t1 = now(device)
        r.opt.step()
        t2 = now(device)
        if k < update_freq:  # warm-up: the first refresh seeds the averages
            continue
        if not refresh:
            plain_fb.append(t1 - t0)
            items["plain step"].append(t2 - t1)
            continue
        acc = dict(t.acc)
        items["fwd+bwd"].append(t1 - t0)
        items["factors"].append(acc.get("factors", 0.0))
        items["all-reduce"].append(0.0)
        dec = acc.get("decomposition", 0.0)
        items["decomposition"].append(dec)
        items["EA"].append(acc.get("fold", 0.0) - dec)
        items["solve"].append(acc.get("solve", 0.0))
        items["rest"].append((t2 - t1) - acc.get("factors", 0.0) - acc.get("fold", 0.0)
                             - acc.get("solve", 0.0))
        items["refresh step"].append(t2 - t1)
    med = {k: statistics.median(v) for k, v in items.items()}
    med["plain fwd+bwd"] = fb = statistics.median(plain_fb)
    med["capture"] = med.pop("fwd+bwd") - fb
    med["n"] = len(items["refresh step"])
    return med


def format_rows(rows: Sequence[dict]) -> str:
    """Markdown table (milliseconds)."""
    cols = ["plain fwd+bwd", "plain step", *ITEMS, "refresh step"]
    out = ["| workload | method | " + " | ".join(cols) + " | refreshes |",
           "|---|---|" + "---|" * (len(cols) + 1)]
    for r in rows:
        vals = " | ".join(f"{1e3 * r[c]:.2f}" for c in cols)
        out.append(f"| {workload_label(r)} | {r['method']} | {vals} | {r['n']} |")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", choices=list(WORKLOADS), action="append")
    p.add_argument("--methods", default="kfac,so,q,qe", help="a rank as in kfac-r128")
    p.add_argument("--refreshes", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = []
    for wl in a.workload or ["cnn"]:
        rows += itemise(wl, a.methods.split(","), torch.device(a.device), a.refreshes)
    print(format_rows(rows))


if __name__ == "__main__":
    main()
