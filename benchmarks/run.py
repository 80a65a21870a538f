"""Run the benchmark suite and write ``docs/benchmarks.md``.

Usage (from the repository root, after ``pip install -e .``)::

    python -m benchmarks.run --quick            # ~30-60 min on 2 CPU cores
    python -m benchmarks.run                    # full: more steps, 10 epochs x 3 seeds
    python -m benchmarks.run --device cuda      # the same suite on a GPU
    python -m benchmarks.run --stages step_time,memory   # a subset (others: "not run")

Stages: ``step_time`` (per-step wall time, interleaved rounds), ``refresh`` (the refresh
step itemised), ``memory`` (peak memory and optimizer state), ``accuracy`` (time to 97%
and 98% test accuracy on MNIST). ``kfac_vs_sgd`` is its own script
(``python -m benchmarks.kfac_vs_sgd``). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from . import accuracy, memory, refresh, step_time
from .common import ALL_METHODS, REPO_ROOT, available_methods, machine_info

QUICK_NOTE = (
    "**Quick run** (`--quick`): the N_u = 30 cells of (a) and (b) have the full step count; "
    "the other step-time cells 60 steps; `qe` is timed only in its own short cell on (a) "
    "and left out of the refresh and accuracy stages; accuracy 2 epochs x 1 seed.\n"
)
STAGES = ("step_time", "refresh", "memory", "accuracy")


def _targets(st_rows: Sequence[dict], mem_rows: Sequence[dict]) -> str:
    """The issue-7 targets with the measured figures."""
    out = ["| target | measured | met |", "|---|---|---|"]
    try:
        from kldwrm import PAPER_SETTINGS

        inner = int(PAPER_SETTINGS["qe"].get("inner_steps", 10))
    except (ImportError, KeyError):
        inner = 10
    for wl in ("cnn", "mlp"):
        for r in st_rows:
            if r["workload"] != wl or r["update_freq"] != 30 or "ratio_mean" not in r:
                continue
            limit = {"kfac": 1.10, "so": 1.10, "q": 1.10, "qe": inner + 3.0}.get(r["method"])
            if limit is None:
                continue
            ok = r["ratio_mean"] <= limit
            out.append(
                f"| {r['method']} step time on {wl}, N_u 30 <= {limit:.2f}x SGD "
                f"| {r['ratio_mean']:.3f}x (mean); per-round median "
                f"{r['ratio_round_median']:.3f}x | {'yes' if ok else 'no'} |"
            )
    for r in mem_rows:
        if r["method"] in ("sgd", "adam"):
            continue
        limit = 3.0 if r["method"] != "qe" else None
        measured = f"{r['per_param']:.2f}x params (+ {r['factors']:,} B curvature)"
        if limit is None:
            out.append(f"| qe state <= 3x params + factors + window ({r['workload']}) "
                       f"| {measured} | see window |")
        else:
            ok = "yes" if r["per_param"] <= limit else "no"
            out.append(f"| {r['method']} state <= 3x params + factors ({r['workload']}) "
                       f"| {measured} | {ok} |")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Run the kldwrm benchmark suite.")
    p.add_argument("--quick", action="store_true", help="fewer refreshes, epochs and seeds")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--methods", default=",".join(ALL_METHODS))
    p.add_argument("--steps", type=int, default=210, help="timed steps per method (>= 200)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--note", default="", help="free text added to the report header")
    p.add_argument("--out", default=str(REPO_ROOT / "docs" / "benchmarks.md"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    stages = [s for s in a.stages.split(",") if s]
    unknown = set(stages) - set(STAGES)
    if unknown:
        p.error(f"unknown stages {sorted(unknown)}; choose from {', '.join(STAGES)}")
    methods = available_methods(a.methods.split(","))
    info = machine_info(device)
    command = "python -m benchmarks.run " + shlex.join(argv if argv is not None else sys.argv[1:])
    started = time.time()
    sections: dict[str, str] = {}
    st_rows: list[dict] = []
    mem_rows: list[dict] = []

    def log(msg: str) -> None:
        print(f"[run +{time.time() - started:.0f}s] {msg}", file=sys.stderr, flush=True)

    if "step_time" in stages:
        rounds = math.ceil(a.steps / 30)
        cells = [("cnn", 30, rounds), ("mlp", 30, rounds)]
        short = 2 if a.quick else rounds  # secondary cells in quick mode: 60 steps
        cells += [("resnet", 30, short), ("cnn", 1, short), ("mlp", 1, short),
                  ("resnet", 1, short)]
        # QE costs ~(inner_steps + 3) plain steps: in quick mode it gets one short cell
        main_methods = [m for m in methods if not (a.quick and m == "qe")]
        for wl, uf, nr in cells:
            log(f"step time {wl} N_u={uf} ({nr} rounds)")
            st_rows += step_time.measure(wl, uf, main_methods, device, nr)
        if a.quick and "qe" in methods:
            log("step time qe cell: cnn N_u=30 (2 rounds)")
            for r in step_time.measure("cnn", 30, ["sgd", "qe"], device, 2):
                if r["method"] == "sgd":
                    r["method"] = "sgd (qe cell)"
                st_rows.append(r)
        sections["step_time"] = step_time.format_rows(st_rows)
    if "refresh" in stages:
        main_methods_r = [m for m in methods if not (a.quick and m == "qe")]
        rows = []
        for wl in ("cnn", "mlp", "resnet"):
            log(f"refresh itemised {wl}")
            rows += refresh.itemise(wl, main_methods_r, device, 2 if a.quick else 5)
        sections["refresh"] = refresh.format_rows(rows)
    if "memory" in stages:
        for wl in ("cnn", "mlp", "resnet"):
            log(f"memory {wl}")
            mem_rows += memory.measure(wl, methods, a.device, 10 if a.quick else 30, a.threads)
        sections["memory"] = memory.format_rows(mem_rows, a.device)
    if "accuracy" in stages:
        epochs = a.epochs or (2 if a.quick else 10)
        seeds = a.seeds or (1 if a.quick else 3)
        log(f"accuracy: {epochs} epochs x {seeds} seeds")
        acc_methods = [m for m in methods if not (a.quick and m == "qe")]
        rows, sweeps = accuracy.run(acc_methods, epochs, seeds, 1 if a.quick else 2, device)
        sections["accuracy"] = (f"{epochs} epochs, {seeds} seed(s), median over seeds.\n\n"
                                + accuracy.format_rows(rows, sweeps))
    elapsed = time.time() - started

    header = "\n".join(f"- {k}: {v}" for k, v in info.items())
    missing = "_not run in this invocation_"
    doc = f"""# Benchmarks

Regenerated by the benchmark suite (`benchmarks/`, not part of the tests). Command:

```
{command}
```

{header}
- suite wall time: {elapsed / 60:.1f} min
{('- note: ' + a.note) if a.note else ''}

{QUICK_NOTE if a.quick else ""}
Methods: `sgd`, `adam` (torch.optim, `kldwrm.PAPER_SETTINGS`), `kfac`, `so`, `q`, `qe` (if
importable) at their DESIGN section 4 settings with the `update_freq` (N_u) shown. Every
curvature method uses `fisher="mc"` (one extra backward of a sampled-label loss on refresh
steps). Step-time batches are fixed random tensors of the workload's shape.

## Targets (issue 7)

{_targets(st_rows, mem_rows) if st_rows or mem_rows else missing}

## Step time

Forward + backward + `optimizer.step()`, each step timed; methods interleaved in rounds of
30 steps with the order rotating, one warm-up round discarded. *mean / SGD* is what a user
pays over a run (refresh steps included); the per-round ratio (median and IQR over rounds of
a method's round time over SGD's round time in the same rotation) is the most robust figure
when the machine is shared.

Workloads: {"; ".join(w.label for w in step_time.WORKLOADS.values())}.

{sections.get("step_time", missing)}

## The refresh step, itemised (milliseconds, median over refreshes, N_u = 30)

*capture* = refresh forward+backward minus the median plain one (hooks + the sampled-label
backward); *factors* = `engine.fresh_estimates`; *all-reduce* = 0 in one process; *EA* =
`engine.fold` minus its eigendecompositions (*decomposition*); *solve* = `engine.solve` +
`engine.matvec`; *rest* = the remainder of `step()`.

{sections.get("refresh", missing)}

## Memory and optimizer state

Each method measured in its own process after N_u + 1 steps (two refreshes). *state bytes*
is `optimizer.state_bytes()` (curvature factors, eigenvectors and eigenvalues, plus
per-parameter vectors) or the state tensors of SGD/Adam; the last column is the
per-parameter part in units of one float32 copy of the parameters.

{sections.get("memory", missing)}

## Time to accuracy on MNIST (paper CNN, batch 512)

{sections.get("accuracy", missing)}
"""
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(doc)
    log(f"wrote {a.out}")


if __name__ == "__main__":
    main()
