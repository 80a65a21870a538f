"""The paper's Table 1 protocol (DESIGN section 4) and short optimizer comparisons.

Every run lives in ``<out>/<dataset>/<solver>/seed<k>/`` (``metrics.csv``, ``checkpoint.pt``,
``config.json``). Finished runs are skipped, unfinished ones resumed, and runs execute in
parallel worker processes (``spawn``) with the machine's threads split between them. Ctrl-C
in the parent stops every worker at its next step boundary; each saves a checkpoint, so
running the same command again continues bit-exactly.

The settings each run gets (the corrected protocol, the released code's quirks, the other
tasks) are in :mod:`.protocol`.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import queue as queue_mod
import signal
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data.datasets import ChecksumError, TensorData, load_dataset, num_batches
from ..training.train import (
    InvalidRunError,
    TrainCallback,
    TrainConfig,
    checkpoint_status,
    train,
    validate_config,
)
from .protocol import (
    COMPARE_OPTIMIZERS,
    PAPER_SOLVERS,
    TASKS,
    ReproduceOptions,
    compare_hyperparameters,
    for_task,
    released,
    solver_hyperparameters,
)

__all__ = [
    "COMPARE_OPTIMIZERS",
    "PAPER_SOLVERS",
    "ReproduceOptions",
    "RunResult",
    "RunSpec",
    "SweepResult",
    "compare_hyperparameters",
    "load_sweep_data",
    "plan_runs",
    "released",
    "for_task",
    "TASKS",
    "reproduce",
    "run_sweep",
    "solver_hyperparameters",
    "split_cpus",
    "validate_specs",
]

_RELATIVE_COST = {"qe": 5.0, "q": 1.5, "so": 1.3, "kfac": 1.3}


def split_cpus(
    n_runs: int, workers: int | None = None, threads: int | None = None
) -> tuple[int, int]:
    """Worker processes and torch threads per worker for ``n_runs`` runs on this machine."""
    cpus = os.cpu_count() or 1
    if workers is None:
        workers = max(1, min(n_runs, cpus))
    workers = max(1, workers)
    if threads is None:
        threads = max(1, cpus // workers)
    return workers, max(1, threads)


@dataclass(frozen=True)
class RunSpec:
    """One training run of a sweep."""

    solver: str
    seed: int
    out_dir: Path
    config: TrainConfig


@dataclass
class RunResult:
    """Outcome of one run of a sweep: ``status`` is finished/skipped/interrupted/failed."""

    solver: str
    seed: int
    out_dir: Path
    status: str
    final: dict[str, float] | None = None
    error: str | None = None


@dataclass
class SweepResult:
    """Outcome of :func:`run_sweep` / :func:`reproduce`."""

    runs: list[RunResult]
    interrupted: bool
    report: str | None = None
    report_dir: Path | None = None

    def count(self, status: str) -> int:
        """Number of runs with the given status."""
        return sum(r.status == status for r in self.runs)


def plan_runs(options: ReproduceOptions) -> list[RunSpec]:
    """The runs of the protocol, in seed-major order (the pool starts the costliest first)."""
    base = Path(options.out) / options.dataset
    specs = []
    for seed in options.seeds:
        for solver in options.solvers:
            cfg = TrainConfig(
                dataset=options.dataset,
                model=options.model,
                optimizer=solver,
                optimizer_kwargs=solver_hyperparameters(solver, options),
                epochs=options.epochs,
                batch_size=options.batch_size,
                seed=int(seed),
                device=options.device,
                subset=options.subset,
                data_dir=options.data_dir,
                normalize=True,
            )
            specs.append(RunSpec(solver, int(seed), base / solver / f"seed{seed}", cfg))
    return specs


def validate_specs(specs: Sequence[RunSpec]) -> None:
    """:func:`~kldwrm.experiments.training.train.validate_config` of every solver's configuration,
    so a bad model or hyperparameter stops a sweep before it starts.

    Raises:
        InvalidRunError: the first problem found.
    """
    seen: set[str] = set()
    for spec in specs:
        if spec.solver not in seen:  # the runs of a solver differ only in their seed
            seen.add(spec.solver)
            validate_config(spec.config)


# ----------------------------------------------------------------------------- workers

Event = dict[str, Any]
ProgressFn = Callable[[Event], None]

_WORKER: dict[str, Any] = {}


def _worker_init(events: Any, stop: Any, threads: int) -> None:
    """Process-pool initializer: the parent handles Ctrl-C and tells workers via ``stop``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    _WORKER.update(events=events, stop=stop, parent=os.getppid())


def _orphaned() -> bool:
    """Whether this pool worker's parent (the sweep) has died: a worker outlives a parent
    killed outright (SIGKILL, OOM) and is re-parented, so its parent id changes."""
    parent = _WORKER.get("parent")
    return parent is not None and os.getppid() != parent


def _should_stop(stop: Any) -> bool:
    """Stop at this step boundary (checkpoint saved): asked to, or nobody is left to ask."""
    return (stop is not None and stop.is_set()) or _orphaned()


class _EventCallback(TrainCallback):
    """Forwards progress to the parent (throttled) and stops when asked to."""

    def __init__(self, emit: Callable[[Event], None], spec: RunSpec, stop: Any) -> None:
        self.emit, self.spec, self.stop = emit, spec, stop
        self._last = 0.0
        self._num_batches = 0

    def _base(self) -> Event:
        return {"solver": self.spec.solver, "seed": self.spec.seed}

    def on_epoch_start(self, epoch: int, num_batches: int, start_batch: int) -> None:
        self._num_batches = num_batches
        self.emit(
            {
                **self._base(),
                "kind": "epoch_start",
                "epoch": epoch,
                "batch": start_batch,
                "num_batches": num_batches,
            }
        )

    def on_step(self, epoch: int, batch: int, loss: float, acc: float) -> None:
        now = time.monotonic()
        if now - self._last > 0.5 or batch == self._num_batches:
            self._last = now
            self.emit(
                {
                    **self._base(),
                    "kind": "step",
                    "epoch": epoch,
                    "batch": batch,
                    "num_batches": self._num_batches,
                    "loss": loss,
                    "acc": acc,
                }
            )
        if _should_stop(self.stop):
            raise KeyboardInterrupt

    def on_epoch_end(self, row: dict[str, float]) -> None:
        self.emit({**self._base(), "kind": "epoch_end", "epoch": int(row["epoch"]), "row": row})

    def on_notice(self, message: str) -> None:
        self.emit({**self._base(), "kind": "notice", "message": message})


def _execute(spec: RunSpec, emit: Callable[[Event], None], stop: Any) -> RunResult:
    status = checkpoint_status(spec.out_dir, spec.config)
    if status == "finished":
        emit({"solver": spec.solver, "seed": spec.seed, "kind": "skip"})
        return RunResult(spec.solver, spec.seed, spec.out_dir, "skipped", _final(spec.out_dir))
    emit(
        {"solver": spec.solver, "seed": spec.seed, "kind": "start", "resumed": status == "partial"}
    )
    result = train(
        spec.config, spec.out_dir, resume=True, callback=_EventCallback(emit, spec, stop)
    )
    final = result.metrics[-1] if result.metrics else None
    st = "interrupted" if result.interrupted else "finished"
    emit({"solver": spec.solver, "seed": spec.seed, "kind": "done", "status": st})
    return RunResult(spec.solver, spec.seed, spec.out_dir, st, final)


def _final(out_dir: Path) -> dict[str, float] | None:
    from ..training.train import METRICS_NAME, read_metrics

    path = out_dir / METRICS_NAME
    if not path.is_file():
        return None
    rows = read_metrics(path)
    return rows[-1] if rows else None


def _failed(spec: RunSpec, exc: Exception) -> RunResult:
    return RunResult(spec.solver, spec.seed, spec.out_dir, "failed",
                     error=f"{type(exc).__name__}: {exc}")


def _worker_run(spec: RunSpec) -> RunResult:
    events, stop = _WORKER["events"], _WORKER["stop"]
    if _orphaned():  # a run queued before the parent died: leave it for the resumed sweep
        os._exit(1)
    try:
        result = _execute(spec, events.put, stop)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, the sweep goes on
        result = _failed(spec, exc)
    if _orphaned():  # the run stopped with its checkpoint saved; nobody to report to
        os._exit(1)
    return result


def run_sweep(
    specs: Sequence[RunSpec],
    *,
    workers: int | None = None,
    threads: int | None = None,
    progress: ProgressFn | None = None,
) -> SweepResult:
    """Run ``specs`` (skipping finished ones, resuming partial ones).

    With one worker the runs execute in this process (``threads`` applied for the duration
    of the sweep); otherwise in a ``spawn`` process pool. ``progress`` receives event
    dicts (``kind``: skip, start, epoch_start, step, epoch_end, notice, done, failed).
    Ctrl-C (or SIGTERM through the CLI) stops every run at a step boundary with its
    checkpoint saved; so does a parent killed outright, for the pool's workers.
    """
    emit = progress or (lambda event: None)
    workers, threads = split_cpus(len(specs), workers, threads)
    if not specs:
        return SweepResult([], False)
    if workers == 1:
        return _run_inline(specs, threads, emit)
    results, interrupted = _run_pool(specs, workers, threads, emit)
    interrupted = interrupted or any(r.status == "interrupted" for r in results)
    order = {(s.solver, s.seed): i for i, s in enumerate(specs)}
    results.sort(key=lambda r: order.get((r.solver, r.seed), math.inf))
    return SweepResult(results, interrupted)


def _failed_event(res: RunResult) -> Event:
    return {"solver": res.solver, "seed": res.seed, "kind": "failed", "error": res.error}


def _run_inline(specs: Sequence[RunSpec], threads: int, emit: ProgressFn) -> SweepResult:
    """The runs one after the other in this process."""
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    results: list[RunResult] = []
    try:
        for spec in specs:
            try:
                res = _execute(spec, emit, None)
            except Exception as exc:  # noqa: BLE001 - reported, the sweep goes on
                res = _failed(spec, exc)
                emit(_failed_event(res))
            results.append(res)
            if res.status == "interrupted":
                return SweepResult(results, True)
    finally:
        torch.set_num_threads(old_threads)
    return SweepResult(results, False)


def _run_pool(
    specs: Sequence[RunSpec], workers: int, threads: int, emit: ProgressFn
) -> tuple[list[RunResult], bool]:
    """The runs in a ``spawn`` pool; the workers' events are relayed to ``emit`` from here.
    Returns the results and whether Ctrl-C stopped the sweep."""
    ctx = mp.get_context("spawn")
    events, stop = ctx.Queue(), ctx.Event()
    results: list[RunResult] = []
    interrupted = False

    def drain(timeout: float) -> None:
        try:
            emit(events.get(timeout=timeout))
            while True:
                emit(events.get_nowait())
        except queue_mod.Empty:
            pass

    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                             initargs=(events, stop, threads)) as pool:
        # most expensive first (QE's inner loop), so the pool does not end on one long run
        by_cost = sorted(specs, key=lambda s: -_RELATIVE_COST.get(s.solver, 1.0))
        pending: set[Future[RunResult]] = {pool.submit(_worker_run, s) for s in by_cost}
        while pending:
            try:
                drain(0.2)
                done, pending = wait(pending, timeout=0, return_when=FIRST_COMPLETED)
                for res in (f.result() for f in done if not f.cancelled()):
                    if res.status == "failed":
                        emit(_failed_event(res))
                    results.append(res)
            except KeyboardInterrupt:
                interrupted = True
                stop.set()
                for fut in pending:
                    fut.cancel()
        drain(0.1)
    return results, interrupted


def reproduce(options: ReproduceOptions, progress: ProgressFn | None = None) -> SweepResult:
    """Run the Table 1 protocol and write the report (see :mod:`.report`).

    Returns the sweep result with ``report`` (Markdown text) and ``report_dir`` set,
    unless the sweep was interrupted.
    """
    from .report import write_report

    specs = plan_runs(options)
    validate_specs(specs)
    if options.dataset != "regression":
        # fail early (clear "where to put the files" error) and warm the cache in-process
        load_sweep_data(options)
    rank, world, local_world = launcher_ranks()
    if world > 1:  # under torchrun: one run at a time per process, the runs dealt round-robin
        cpus = os.cpu_count() or 1
        threads = options.threads or max(1, cpus // local_world)
        result = run_sweep(specs[rank::world], workers=1, threads=threads, progress=progress)
        _wait_for_ranks(Path(options.out), rank, world, result.interrupted)
        if rank != 0 or result.interrupted:
            return result
    else:
        workers, threads = split_cpus(len(specs), options.workers, options.threads)
        result = run_sweep(specs, workers=workers, threads=threads, progress=progress)
    if result.interrupted:
        return result
    report_dir = Path(options.out) / "report"
    result.report = write_report(Path(options.out) / options.dataset, report_dir)
    result.report_dir = report_dir
    return result


def load_sweep_data(options: ReproduceOptions, download: bool = True) -> TensorData:
    """The sweep's data set as its runs see it (an unknown name raises
    :class:`~kldwrm.experiments.training.train.InvalidRunError`)."""
    try:
        return load_dataset(options.dataset, options.data_dir, download=download)
    except ChecksumError:
        raise
    except ValueError as exc:
        raise InvalidRunError(str(exc)) from exc


def launcher_ranks() -> tuple[int, int, int]:
    """``(RANK, WORLD_SIZE, LOCAL_WORLD_SIZE)`` from ``torchrun``'s environment (0, 1, 1 alone).

    ``kldwrm reproduce`` under ``torchrun`` places one run per process (no process group:
    the runs are independent), dealing the runs round-robin over the ranks.
    """
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    return int(env.get("RANK", "0")), world, int(env.get("LOCAL_WORLD_SIZE", str(world)))


def _wait_for_ranks(out: Path, rank: int, world: int, interrupted: bool) -> None:
    """Rank 0 waits until every rank has finished its share (marker files in ``out``).

    If a rank dies, ``torchrun`` stops the others, so the wait is bounded by the launcher.
    """
    launch = f"{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}-{os.environ.get('MASTER_PORT', '')}"
    marks = out / ".ranks"
    marks.mkdir(parents=True, exist_ok=True)
    (marks / f"{launch}-rank{rank}").write_text("interrupted" if interrupted else "done")
    if rank != 0:
        return
    while not all((marks / f"{launch}-rank{r}").is_file() for r in range(world)):
        time.sleep(1.0)
    for r in range(world):
        (marks / f"{launch}-rank{r}").unlink(missing_ok=True)


def total_steps(specs: Sequence[RunSpec], n_train: int) -> int:
    """Total optimizer steps of ``specs`` (for a progress bar)."""
    total = 0
    for s in specs:
        n = min(n_train, s.config.subset) if s.config.subset else n_train
        total += s.config.epochs * num_batches(n, s.config.batch_size, s.config.drop_last)
    return total
