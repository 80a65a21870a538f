"""Run the benchmark suite and regenerate ``docs/benchmarks.md``.

Usage (from the repository root, after ``pip install -c constraints.txt -e ".[experiments]"``)::

    python -m benchmarks.run                     # every stage, full size (~2-3 h on 2 cores)
    python -m benchmarks.run --quick             # smaller: 60-step secondary cells, 2 epochs
    python -m benchmarks.run --stages step_time --workloads mlp --update-freqs 30
    python -m benchmarks.run --stages step_time --workloads mlp,mlp-wide --update-freqs 30 \
        --methods sgd,kfac,kfac-r128,so-r128,q-r128   # issue 13: low rank, width
    python -m benchmarks.run --stages rank_tradeoff   # issue 13: accuracy against rank
    python -m benchmarks.run --stages accuracy --dataset fashion-mnist   # time to 84% / 85%
    python -m benchmarks.run --device cuda       # the same suite on a GPU
    python -m benchmarks.run --render-only       # rebuild the Markdown from the store
    python -m benchmarks.run --merge gpu_check/benchmarks.json   # add another store's runs

Stages: ``step_time`` (per-step wall time, interleaved rounds), ``refresh`` (the refresh
step itemised), ``memory`` (peak memory and optimizer state), ``accuracy`` (time to 97%
and 98% test accuracy on MNIST, to 84% and 85% on Fashion-MNIST with ``--dataset
fashion-mnist``), ``kfac_vs_sgd`` (issue 2's figure, three repeats) and
``rank_tradeoff`` (K-FAC exact and low rank on the MNIST MLP: accuracy and seconds).
Method names may carry a rank: ``kfac-r128`` is ``make_optimizer("kfac", model,
rank=128)``. The workload ``mlp-wide`` (784-4096-4096-10) is not in the default list: its
exact curvature step takes seconds, so its step-time cell is one timed round (short).

Every measurement is stored with the run that produced it in ``docs/benchmarks.json``;
a run replaces only the cells it measures (a step-time cell is a workload, N_u, method and
device), and the Markdown is rendered from the whole store, so a partial rerun keeps the
other figures and the page says which run (command, date, machine, load) produced each
table; a figure not in the store is rendered as "not measured yet" with its command.
``--fresh`` starts an empty store. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from . import accuracy, kfac_vs_sgd, memory, rank_tradeoff, refresh, step_time
from .common import ALL_METHODS, REPO_ROOT, available_methods, machine_info, parse_method
from .page import render
from .store import STAGE_KEYS, load_store, merge, merge_store

STAGES = ("step_time", "refresh", "memory", "accuracy", "kfac_vs_sgd", "rank_tradeoff")
WORKLOADS = tuple(step_time.WORKLOADS)
DEFAULT_WORKLOADS = ("cnn", "mlp", "resnet")


# -- the run ----------------------------------------------------------------------------------
class Session:
    """One run of the suite: its record in the store, logging and saving after each cell."""

    def __init__(self, store: dict, out: Path, command: str, device: torch.device,
                 note: str, quick: bool) -> None:
        self.store, self.out, self.device = store, out, device
        self.run_id = len(store["runs"])
        self.started = time.time()
        self.run = {"command": command, "info": machine_info(device), "note": note,
                    "quick": quick}
        store["runs"].append(self.run)

    def log(self, msg: str) -> None:
        print(f"[run +{time.time() - self.started:.0f}s] {msg}", file=sys.stderr, flush=True)

    def save(self) -> None:
        """Write the store (next to ``out``) and the Markdown."""
        self.run["finished"] = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
        self.run["wall_min"] = (time.time() - self.started) / 60
        store_path = self.out.with_suffix(".json")
        store_path.parent.mkdir(parents=True, exist_ok=True)
        store_path.write_text(json.dumps(self.store, indent=1))
        render(self.store, self.out)
        self.log(f"wrote {self.out} and {store_path.name}")

    def put(self, stage: str, rows: list[dict]) -> None:
        """Store ``rows`` of ``stage`` (replacing rows with the same key) and save."""
        for r in rows:
            r["run"] = self.run_id
            r.setdefault("device", str(self.device))
        entry = self.store["stages"].setdefault(stage, {"rows": []})
        entry["rows"] = merge(entry["rows"], rows, STAGE_KEYS[stage])
        self.save()


def _step_time(s: Session, a: argparse.Namespace, methods: list[str], wls: list[str]) -> None:
    rounds = math.ceil(a.steps / 30)
    for uf in (int(u) for u in a.update_freqs.split(",") if u):
        for wl in wls:
            main_cell = uf == 30 and wl in ("cnn", "mlp")
            nr, short = step_time.cell_rounds(wl, rounds if (main_cell or not a.quick) else 2)
            s.log(f"step time {wl} N_u={uf} ({nr} rounds of 30{', short' if short else ''})")
            s.put("step_time", step_time.measure(wl, uf, methods, s.device, nr))


def _refresh(s: Session, a: argparse.Namespace, methods: list[str], wls: list[str]) -> None:
    for wl in wls:
        s.log(f"refresh itemised {wl}")
        s.put("refresh", refresh.itemise(wl, methods, s.device, 2 if a.quick else 5))


def _memory(s: Session, a: argparse.Namespace, methods: list[str], wls: list[str]) -> None:
    for wl in wls:
        s.log(f"memory {wl}")
        s.put("memory", memory.measure(wl, methods, a.device, 30, a.threads))


def _accuracy(s: Session, a: argparse.Namespace, methods: list[str], wls: list[str]) -> None:
    """Per data set, per method: its row and sweep, stored as soon as measured."""
    epochs = a.epochs or (2 if a.quick else 10)
    seeds = a.seeds or (1 if a.quick else 3)
    sweep_epochs = a.sweep_epochs or (1 if a.quick else 2)
    for ds in _datasets(a):
        data = accuracy.normalised(ds, a.train_limit)
        for m in methods:
            s.log(f"accuracy {ds} {m}: {epochs} epochs x {seeds} seeds"
                  f"{f', sweep {sweep_epochs} epochs' if m in accuracy.SWEEPS else ''}"
                  f"{f', first {a.train_limit} images' if a.train_limit else ''}")
            row, swept = accuracy.run_method(m, data, epochs, seeds, sweep_epochs, s.device, ds)
            if swept is not None:
                _store_sweep(s, ds, m, swept)
            s.put("accuracy", [row])


def _store_sweep(s: Session, dataset: str, method: str, swept: dict) -> None:
    """Keep a sweep in the store under :func:`accuracy.sweep_key` (saved by the next put)."""
    entry = s.store["stages"].setdefault("accuracy", {"rows": [], "sweeps": {}})
    entry.setdefault("sweeps", {})[accuracy.sweep_key(dataset, method)] = {
        "dataset": dataset, "method": method, "chosen": swept["chosen"],
        "scores": list(swept["scores"].items()), "run": s.run_id}


def _kfac_vs_sgd(s: Session, a: argparse.Namespace, methods: list[str], wls: list[str]
                 ) -> None:
    s.log("issue 2: kfac vs torch.optim.SGD, 3 runs")
    s.store["stages"]["kfac_vs_sgd"] = {"run": s.run_id,
                                        "rows": kfac_vs_sgd.compare(240, 3, a.device)}


def _rank_tradeoff(s: Session, a: argparse.Namespace, methods: list[str], wls: list[str]
                   ) -> None:
    ranks = rank_tradeoff.parse_ranks(a.ranks)
    s.log(f"rank trade-off: kfac exact and ranks {ranks}, {a.rank_epochs} epochs")
    s.put("rank_tradeoff", rank_tradeoff.run(ranks, a.rank_epochs, s.device,
                                             train_limit=a.train_limit))


def _datasets(a: argparse.Namespace) -> list[str]:
    """The data sets of the accuracy stage (``--dataset``, comma-separated)."""
    return [d for d in a.dataset.split(",") if d]


STAGE_RUNNERS = {"step_time": _step_time, "refresh": _refresh, "memory": _memory,
                 "accuracy": _accuracy, "kfac_vs_sgd": _kfac_vs_sgd,
                 "rank_tradeoff": _rank_tradeoff}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Run the kldwrm benchmark suite.")
    p.add_argument("--quick", action="store_true",
                   help="secondary step-time cells 60 steps, 2 refreshes, 2 epochs x 1 seed")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda:1, ...)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--methods", default=",".join(ALL_METHODS),
                   help="comma-separated; a curvature method may carry a rank: kfac-r128")
    p.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS),
                   help=f"comma-separated, from {', '.join(WORKLOADS)}")
    p.add_argument("--update-freqs", default="30,1", help="N_u of the step-time cells")
    p.add_argument("--steps", type=int, default=210,
                   help="timed steps per method (>= 200; mlp-wide: one round of 30)")
    p.add_argument("--dataset", default="mnist",
                   help=f"accuracy stage, comma-separated: {', '.join(accuracy.DATASETS)}")
    p.add_argument("--epochs", type=int, default=None, help="accuracy stage (10)")
    p.add_argument("--seeds", type=int, default=None, help="accuracy stage (3)")
    p.add_argument("--sweep-epochs", type=int, default=None,
                   help="accuracy stage: epochs per SGD/Adam sweep point (2)")
    p.add_argument("--ranks", default=",".join(map(str, rank_tradeoff.DEFAULT_RANKS)),
                   help="rank_tradeoff stage: the ranks besides exact K-FAC")
    p.add_argument("--rank-epochs", type=int, default=2, help="rank_tradeoff stage")
    p.add_argument("--train-limit", type=int, default=None,
                   help="smoke runs only: rank_tradeoff and accuracy train on the first "
                        "N images (the tables say so)")
    p.add_argument("--note", default="", help="free text shown with the run")
    p.add_argument("--out", default=str(REPO_ROOT / "docs" / "benchmarks.md"),
                   help="the Markdown page; the store is the .json next to it")
    p.add_argument("--fresh", action="store_true", help="discard the stored measurements")
    p.add_argument("--render-only", action="store_true",
                   help="regenerate the Markdown from the store without measuring")
    p.add_argument("--merge", metavar="STORE", action="append", default=[],
                   help="add the runs of another store (e.g. gpu_check/benchmarks.json), "
                        "then render")
    return p


def _checked(p: argparse.ArgumentParser, a: argparse.Namespace
             ) -> tuple[list[str], list[str], list[str]]:
    """Stages, workloads and methods from the arguments (an error exits)."""
    stages = [s for s in a.stages.split(",") if s]
    unknown = set(stages) - set(STAGES)
    if unknown:
        p.error(f"unknown stages {sorted(unknown)}; choose from {', '.join(STAGES)}")
    workloads = [w for w in a.workloads.split(",") if w]
    if set(workloads) - set(WORKLOADS):
        p.error(f"--workloads: choose from {', '.join(WORKLOADS)}")
    if not _datasets(a) or set(_datasets(a)) - set(accuracy.DATASETS):
        p.error(f"--dataset: choose from {', '.join(accuracy.DATASETS)}")
    try:
        for m in a.methods.split(","):
            parse_method(m)
        rank_tradeoff.method_names("kfac", rank_tradeoff.parse_ranks(a.ranks))
    except ValueError as e:
        p.error(str(e))
    return stages, workloads, available_methods(a.methods.split(","))


def main(argv: Sequence[str] | None = None) -> None:
    p = _parser()
    a = p.parse_args(argv)
    out = Path(a.out)
    store_path = out.with_suffix(".json")
    store = {"runs": [], "stages": {}} if a.fresh else load_store(store_path)
    if a.render_only or a.merge:
        for other in a.merge:
            merge_store(store, load_store(Path(other)), other)
        if a.merge:
            store_path.write_text(json.dumps(store, indent=1))
        render(store, out)
        return
    stages, workloads, methods = _checked(p, a)
    torch.set_num_threads(a.threads)
    command = "python -m benchmarks.run " + shlex.join(
        argv if argv is not None else sys.argv[1:])
    session = Session(store, out, command, torch.device(a.device), a.note, a.quick)
    for stage in (s for s in STAGES if s in stages):  # in the suite's order
        STAGE_RUNNERS[stage](session, a, methods, workloads)
    session.save()


if __name__ == "__main__":
    main()
