"""Command line interface: ``kldwrm {train,compare,reproduce,report}``.

This is the only module of the package that prints. Bad input is answered like a
command-line tool: argparse's usage errors, or one ``kldwrm: error: ...`` line on stderr for
what is found later (an invalid hyperparameter, model or seed list, a damaged checkpoint,
missing data), with exit status 2 and no traceback; a traceback means a bug. Under
``torchrun`` every rank reports its own error and exits 1.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from .arguments import HP_NAMES, CliError, build_parser, parse_seeds
from .progress import SweepProgress, TrainProgress

__all__ = ["CliError", "build_parser", "main"]


# ----------------------------------------------------------------------------- commands


def _cmd_train(args: argparse.Namespace) -> int:
    """``kldwrm train``; under ``torchrun`` one data-parallel run over all ranks."""
    import torch

    from ... import distributed as kdist

    if args.threads:
        torch.set_num_threads(args.threads)
    if not kdist.init_from_env(args.device, timeout_s=args.dist_timeout):
        return _train_one(args)
    try:
        status = _train_one(args, quiet=kdist.rank() != 0)
    except Exception as exc:  # noqa: BLE001 - reported with the rank, then non-zero exit
        print(
            f"error: rank {kdist.rank()} of {kdist.world_size()}: {type(exc).__name__}: {exc}"
            "\n(if another rank died or hung, this rank stops after at most --dist-timeout "
            f"= {args.dist_timeout:g} s)",
            file=sys.stderr,
        )
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # do not wait in the process group's teardown for a dead peer
    kdist.shutdown()
    return status



def _train_config(args: argparse.Namespace) -> Any:
    """The :class:`~kldwrm.experiments.training.config.TrainConfig` of ``kldwrm train``'s
    arguments."""
    from ..training.train import TrainConfig

    model = args.model or ("regression-mlp" if args.dataset == "regression" else "paper-cnn")
    hp = {
        k: getattr(args, k) for k in HP_NAMES if hasattr(args, k) and getattr(args, k) is not None
    }
    if (
        args.dataset == "regression"
        and "likelihood" not in hp
        and args.optimizer not in ("sgd", "adam")
    ):
        hp["likelihood"] = "gaussian"
    return TrainConfig(
        dataset=args.dataset,
        model=model,
        optimizer=args.optimizer,
        optimizer_kwargs=hp,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
        subset=args.subset,
        data_dir=args.data_dir,
        normalize=not args.no_normalize,
    )


def _train_one(args: argparse.Namespace, quiet: bool = False) -> int:
    from ..training.train import CHECKPOINT_NAME, TrainCallback, train, validate_config

    config = _train_config(args)
    validate_config(config)  # a bad model or hyperparameter: refused before loading data
    out = Path(args.out or Path("runs/train") / args.dataset / args.optimizer / f"seed{args.seed}")
    if (out / CHECKPOINT_NAME).is_file() and not args.resume and not quiet:
        print(
            f"note: {out} holds a checkpoint; starting over (use --resume to continue)",
            file=sys.stderr,
        )
    if quiet:  # another rank than 0 under torchrun
        result = train(config, out, resume=args.resume, callback=TrainCallback())
        return 130 if result.interrupted else 0
    progress = TrainProgress(config.epochs, not args.no_progress)
    try:
        result = train(config, out, resume=args.resume, callback=progress)
    finally:
        progress.close()
    print(f"metrics: {result.metrics_path}")
    if result.interrupted:
        saved = (
            f"checkpoint saved to {result.checkpoint}; rerun with --resume to continue"
            if result.checkpoint is not None
            else "stopped before the first checkpoint; nothing to resume"
        )
        print(f"interrupted; {saved}", file=sys.stderr)
        return 130
    return 0


def _run_sweep_cli(args: argparse.Namespace, options: Any, compare: bool) -> int:
    from ..study.reproduce import (
        launcher_ranks,
        load_sweep_data,
        plan_runs,
        reproduce,
        validate_specs,
    )

    specs = plan_runs(options)
    validate_specs(specs)
    rank, world, _ = launcher_ranks()
    if world > 1:
        if compare:
            raise CliError("compare runs in parallel with --workers; under torchrun use "
                           "kldwrm reproduce")
        if rank != 0:  # torchrun: this process runs its share of the runs, silently
            result = reproduce(options)
            failed_any = any(r.status == "failed" for r in result.runs)
            return 130 if result.interrupted else int(failed_any)
        specs = specs[::world]  # rank 0's share, for the progress bar
    data = load_sweep_data(options)
    result = _sweep_with_progress(args, options, specs, data.x_train.shape[0], compare, world)
    failed = [r for r in result.runs if r.status == "failed"]
    for r in failed:
        print(f"FAILED {r.solver} seed {r.seed}: {r.error}", file=sys.stderr)
    if result.interrupted:
        print(
            "interrupted; checkpoints saved, run the same command again to continue",
            file=sys.stderr,
        )
        return 130
    print(result.report)
    if result.report_dir is not None:
        figs = sorted(result.report_dir.glob(f"{options.dataset}_figure*.png"))
        for f in figs:
            print(f"figure: {f}")
    if compare and not args.no_timing:
        bad = {r.solver for r in failed}
        _print_step_time_check(args, options, [s for s in specs if s.solver not in bad], data)
    return 1 if failed else 0


def _sweep_with_progress(
    args: argparse.Namespace, options: Any, specs: list, n_train: int, compare: bool, world: int
) -> Any:
    """Run the sweep (compare: ``run_sweep`` and the report; else ``reproduce``) under a
    progress bar; returns its :class:`~kldwrm.experiments.study.reproduce.SweepResult`."""
    from ..data.datasets import num_batches
    from ..study.report import write_report
    from ..study.reproduce import reproduce, run_sweep, split_cpus, total_steps

    workers, threads = split_cpus(len(specs), options.workers, options.threads)
    print(
        f"{len(specs)} runs in {options.out}/{options.dataset}; {workers} worker(s) x "
        f"{threads} thread(s)" + (f" on rank 0 of {world}" if world > 1 else ""),
        file=sys.stderr,
    )
    progress = SweepProgress(total_steps(specs, n_train), not args.no_progress)
    for s in specs:
        n = min(n_train, s.config.subset) if s.config.subset else n_train
        progress.set_epochs(
            (s.solver, s.seed), s.config.epochs, num_batches(n, s.config.batch_size)
        )
    try:
        if not compare:
            return reproduce(options, progress=progress)
        result = run_sweep(specs, workers=workers, threads=threads, progress=progress)
        if not result.interrupted:
            result.report_dir = Path(options.out) / "report"
            result.report = write_report(Path(options.out) / options.dataset, result.report_dir)
        return result
    finally:
        progress.close()


def _print_step_time_check(
    args: argparse.Namespace, options: Any, specs: list, data: Any
) -> None:
    """Time every compared optimizer in this process, interleaved, and print the table
    (the workers' own per-epoch step times overlap on shared CPUs)."""
    import torch

    from ..study.reproduce import compare_hyperparameters
    from ..study.timing import format_step_times, time_configs
    from ..training.train import resolve_device

    configs = {}
    for s in specs:
        configs.setdefault(s.solver, s.config)
    if not configs:
        return
    if "sgd" not in configs:  # the baseline of the ratios
        first = next(iter(configs.values()))
        sgd = replace(first, optimizer="sgd", optimizer_kwargs=compare_hyperparameters("sgd"))
        configs = {"sgd": sgd, **configs}
    threads = args.threads or torch.get_num_threads()
    print(
        f"timing {', '.join(configs)} in one process, interleaved ({threads} thread(s); "
        "--no-timing skips this)...",
        file=sys.stderr,
    )
    device = resolve_device(options.device)
    n = options.batch_size
    x, y = data.x_train[:n].to(device), data.y_train[:n].to(device)
    times = time_configs(configs, x, y, data.task, threads=threads)
    what = f"{options.model} on a fixed batch of {x.shape[0]} {options.dataset} examples"
    print()
    print(format_step_times(times, threads=threads, what=f"{what} ({device.type})"))


def _cmd_compare(args: argparse.Namespace) -> int:
    from ..study.reproduce import ReproduceOptions

    options = ReproduceOptions(
        out=args.out, model=args.model, solvers=tuple(args.optimizers), **_sweep_fields(args)
    )
    return _run_sweep_cli(args, options, compare=True)


def _sweep_fields(args: argparse.Namespace) -> dict:
    """ReproduceOptions fields shared by ``compare`` and ``reproduce``."""
    return dict(
        dataset=args.dataset,
        seeds=tuple(parse_seeds(args.seeds)),
        epochs=args.epochs,
        batch_size=args.batch_size,
        subset=args.subset,
        data_dir=args.data_dir,
        device=args.device,
        workers=args.workers,
        threads=args.threads,
    )


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from ..study.reproduce import ReproduceOptions, for_task, released

    out = args.out or ("runs/reproduce-released" if args.as_released else "runs/reproduce")
    fields = {**_sweep_fields(args), "epochs": args.epochs or 50}
    options = ReproduceOptions(out=out, solvers=tuple(args.solvers), lr=args.lr, **fields)
    if args.task:
        options = for_task(options, args.task)
        if args.epochs is not None:
            options = replace(options, epochs=args.epochs)
    if args.as_released:
        options = released(options)
    if args.empirical_fisher:
        options = replace(options, fisher="empirical")
    if args.augmented_q_solve:
        options = replace(options, q_solve="augmented")
    if args.separate_bias:
        options = replace(options, bias="separate")
    if args.damping_plus_wd:
        options = replace(options, damping_plus_wd=True)
    if args.kl_train_mode:
        options = replace(options, kl_train_mode=True)
    if args.released_qe_settings:
        options = replace(options, qe_released=True)
    if args.qe_inner_lr is not None:
        options = replace(options, overrides={"qe": {"inner_lr": args.qe_inner_lr}})
    return _run_sweep_cli(args, options, compare=False)


def _protocol_roots(values: Sequence[str]) -> dict[str, str]:
    """``{name: dir}`` from ``NAME=DIR`` arguments (:class:`CliError` when malformed)."""
    roots: dict[str, str] = {}
    for value in values:
        name, eq, root = value.partition("=")
        name, root = name.strip(), root.strip()
        if not (eq and name and root):
            raise CliError(f"argument --protocols: expected NAME=DIR, got {value!r}")
        if name in roots:
            raise CliError(f"argument --protocols: protocol {name!r} given twice")
        roots[name] = root
    return roots


def _cmd_protocols(args: argparse.Namespace) -> int:
    """``kldwrm report --protocols NAME=DIR ...``: print (and with --out write) the
    comparison."""
    from ..study.report import protocol_comparison

    if args.dir is not None:
        raise CliError("give either a run directory or --protocols, not both")
    roots = _protocol_roots(args.protocols)
    out = Path(args.out) if args.out is not None else None
    if out is not None and out.is_dir():
        raise CliError(f"argument --out: {out} is a directory; with --protocols give a file")
    text = protocol_comparison(roots, args.epoch, paper=args.paper)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    print(text)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from ..study.report import write_report

    if args.protocols is not None:
        return _cmd_protocols(args)
    if args.dir is None:
        raise CliError("report: give a run directory, or --protocols NAME=DIR ...")
    print(write_report(args.dir, args.out, paper=args.paper, epoch=args.epoch))
    return 0


#: what the command line needs beyond torch: the ``experiments`` extra
EXTRA_MODULES = ("numpy", "tqdm", "matplotlib")


def missing_extras() -> list[str]:
    """Modules of the ``experiments`` extra that are not installed."""
    return [m for m in EXTRA_MODULES if importlib.util.find_spec(m) is None]


def _sigterm_as_ctrl_c(signum: int, frame: Any) -> None:
    """``kill PID`` (SIGTERM) stops a command as Ctrl-C does: a run stops at a step boundary
    with its checkpoint saved, a sweep tells its workers to do the same. Needed because a
    job started in the background by a non-interactive shell ignores SIGINT."""
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:  # SIGINT ignored or default: stop the way an uncaught Ctrl-C would
        raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kldwrm`` console script; returns the exit status."""
    if threading.current_thread() is not threading.main_thread():
        return _main(argv)
    previous = signal.signal(signal.SIGTERM, _sigterm_as_ctrl_c)
    try:
        return _main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(argv: Sequence[str] | None) -> int:
    missing = missing_extras()
    if missing:
        print(
            f"kldwrm: error: the command line needs the experiments extra (missing: "
            f"{', '.join(missing)}); install it with: pip install 'kldwrm[experiments]'",
            file=sys.stderr,
        )
        return 2
    from ..data.datasets import ChecksumError, DatasetNotFoundError
    from ..training.checkpoint import CheckpointError
    from ..training.train import ConfigMismatchError, InvalidRunError

    args = build_parser().parse_args(argv)
    commands = {
        "train": _cmd_train,
        "compare": _cmd_compare,
        "reproduce": _cmd_reproduce,
        "report": _cmd_report,
    }
    try:
        return commands[args.command](args)
    except (
        CliError,
        InvalidRunError,  # a bad model, setting or optimizer hyperparameter
        CheckpointError,  # a damaged checkpoint without a good previous one
        ConfigMismatchError,
        DatasetNotFoundError,
        ChecksumError,
        FileNotFoundError,
    ) as exc:
        print(f"kldwrm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
