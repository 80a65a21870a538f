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
import math
import os
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

__all__ = ["CliError", "build_parser", "main"]

_OPTIMIZERS = ("sgd", "adam", "kfac", "so", "q", "qe")


class CliError(Exception):
    """Bad command-line input found after parsing; printed as one ``kldwrm: error:`` line."""


def _opt_float(text: str) -> float | None:
    """A float, or None for 'none'/'off'."""
    if text.strip().lower() in ("none", "off", "null"):
        return None
    return float(text)


def _fraction(text: str) -> float:
    """A float that may be written as a fraction such as 1/330."""
    if "/" in text:
        num, den = text.split("/", 1)
        return float(num) / float(den)
    return float(text)


def _int_at_least(least: int) -> Any:
    """An argparse type: an integer >= ``least``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < least:
            raise argparse.ArgumentTypeError(f"must be an integer >= {least}, got {text}")
        return value

    return parse


_positive_int = _int_at_least(1)
_nonnegative_int = _int_at_least(0)


def _positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def _seeds(values: Sequence[str]) -> list[int]:
    """Seeds from '0-9', '0,1,2' or '3 4 5' (:class:`CliError` when malformed)."""
    out: list[int] = []
    for v in values:
        for part in v.split(","):
            part = part.strip()
            if not part:
                continue
            lo, dash, hi = part.partition("-")
            try:
                first, last = int(lo), int(hi if dash else lo)
            except ValueError:
                raise CliError(
                    f"argument --seeds: invalid seed {part!r} (write e.g. 0-9, 0,1,2 or 0 1 2)"
                ) from None
            if first < 0 or last < first:
                raise CliError(
                    f"argument --seeds: invalid range {part!r} (seeds are integers >= 0, "
                    "ranges are low-high)"
                )
            out.extend(range(first, last + 1))
    if not out:
        raise CliError("argument --seeds: no seeds given")
    return out


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dataset", default="mnist", help="mnist, fashion-mnist or regression (default: mnist)"
    )
    p.add_argument(
        "--data-dir", default=None, help="directory with the IDX .gz files (searched first)"
    )
    p.add_argument(
        "--subset", type=_positive_int, default=None, help="use only the first N training examples"
    )
    p.add_argument(
        "--batch-size", type=_positive_int, default=512, help="mini-batch size (default 512)"
    )
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="torch threads (per worker for sweeps; default: split the CPUs)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_hyperparameters(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "optimizer hyperparameters (only those given are passed; the rest are "
        "kldwrm.make_optimizer's defaults, the paper's settings)"
    )
    g.add_argument("--lr", type=float, help="learning rate 1/λ")
    g.add_argument("--rho", type=float, help="EA decay ρ")
    g.add_argument("--damping", type=float, help="damping γ")
    g.add_argument("--weight-decay", type=float, help="L2 term added to the gradient")
    g.add_argument(
        "--kl-clip", type=_opt_float, default=argparse.SUPPRESS, help="K-FAC KL clip ('none' off)"
    )
    g.add_argument("--update-freq", type=int, help="curvature refresh period N_u")
    g.add_argument("--fisher", choices=("mc", "empirical"), help="Fisher type")
    g.add_argument(
        "--likelihood",
        choices=("categorical", "gaussian"),
        help="default: categorical, gaussian for --dataset regression",
    )
    g.add_argument(
        "--block-clip",
        type=_opt_float,
        default=argparse.SUPPRESS,
        help="per-tensor RMS clip (Q, QE; 'none' off)",
    )
    g.add_argument("--q-solve", choices=("exact", "augmented"), help="Q/QE refresh solve")
    g.add_argument(
        "--bias",
        choices=("homogeneous", "separate"),
        help="bias as an input coordinate of its layer's block, or its own block",
    )
    g.add_argument("--window", type=int, help="QE: stored iterates N_CAP")
    g.add_argument("--inner-steps", type=int, help="QE: inner SGD steps N_IS")
    g.add_argument("--inner-lr", type=float, help="QE: inner SGD learning rate (the paper's ω/λ)")
    g.add_argument("--inner-momentum", type=float, help="QE: inner SGD momentum")
    g.add_argument("--kl-weight", type=_fraction, help="QE: SKL weight, e.g. 1/330")
    g.add_argument(
        "--kl-train-mode",
        action="store_true",
        default=None,
        help="QE: evaluate stored networks with dropout active (released quirk)",
    )
    g.add_argument("--momentum", type=float, help="SGD momentum")


_HP_NAMES = (
    "lr",
    "rho",
    "damping",
    "weight_decay",
    "kl_clip",
    "update_freq",
    "fisher",
    "likelihood",
    "block_clip",
    "q_solve",
    "bias",
    "window",
    "inner_steps",
    "inner_lr",
    "inner_momentum",
    "kl_weight",
    "kl_train_mode",
    "momentum",
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``kldwrm``."""
    parser = argparse.ArgumentParser(
        prog="kldwrm",
        description="KLD-WRM / EA-KFAC experiments (Rethinking Exponential Averaging of "
        "the Fisher).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one model with one optimizer")
    _add_common(p)
    p.add_argument(
        "--model",
        default=None,
        help="paper-cnn, mlp, resnet-small, regression-mlp or module:factory "
        "(default: paper-cnn; regression-mlp for --dataset regression)",
    )
    p.add_argument("--optimizer", default="kfac", choices=_OPTIMIZERS)
    _add_hyperparameters(p)
    p.add_argument("--epochs", type=_positive_int, default=2)
    p.add_argument("--seed", type=_nonnegative_int, default=0)
    p.add_argument(
        "--out",
        default=None,
        help="run directory (default runs/train/<dataset>/<optimizer>/seed<k>)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    p.add_argument(
        "--dist-timeout",
        type=_positive_float,
        default=600.0,
        help="under torchrun: seconds after which a collective waiting for a dead or hung "
        "rank fails, so every rank exits non-zero (default 600); --batch-size is the "
        "global batch, split evenly over the ranks",
    )
    p.add_argument("--no-normalize", action="store_true", help="do not standardise inputs")

    p = sub.add_parser("compare", help="short comparison of all optimizers (about 5 min)")
    _add_common(p)
    p.add_argument("--model", default="paper-cnn")
    p.add_argument("--optimizers", nargs="+", default=list(_OPTIMIZERS), choices=_OPTIMIZERS)
    p.add_argument("--seeds", nargs="+", default=["0"], help="e.g. 0-2 or 0 1 2 (default 0)")
    p.add_argument("--epochs", type=_positive_int, default=2)
    p.add_argument(
        "--workers", type=_positive_int, default=None, help="parallel runs (default: CPUs)"
    )
    p.add_argument("--out", default="runs/compare")
    p.add_argument(
        "--no-timing",
        action="store_true",
        help="skip the step-time check after the runs (about 15-30 s: every optimizer timed "
        "in this process, interleaved)",
    )

    p = sub.add_parser("reproduce", help="the paper's Table 1 protocol")
    _add_common(p)
    p.add_argument("--solvers", nargs="+", default=["kfac", "so", "q", "qe"], choices=_OPTIMIZERS)
    p.add_argument("--seeds", nargs="+", default=["0-9"], help="default 0-9")
    p.add_argument(
        "--task",
        choices=("mnist", "fashion-mnist", "regression"),
        default=None,
        help="a named task: its data set, model, batch size, epochs and settings "
        "(regression: the eq. 35 task of the QE tests); default: the --dataset given",
    )
    p.add_argument(
        "--epochs", type=_positive_int, default=None, help="default: 50 (the task's)"
    )
    p.add_argument(
        "--workers", type=_positive_int, default=None, help="parallel runs (default: CPUs)"
    )
    p.add_argument(
        "--out",
        default=None,
        help="default runs/reproduce (runs/reproduce-released with --as-released)",
    )
    p.add_argument("--lr", type=float, default=0.01)
    q = p.add_argument_group("released-code quirks (default: corrected protocol)")
    q.add_argument("--as-released", action="store_true", help="all quirks below")
    q.add_argument("--empirical-fisher", action="store_true", help="fisher='empirical'")
    q.add_argument("--augmented-q-solve", action="store_true", help="q_solve='augmented'")
    q.add_argument(
        "--separate-bias", action="store_true", help="bias='separate': the bias's own blocks"
    )
    q.add_argument(
        "--damping-plus-wd", action="store_true", help="damp with damping + weight decay"
    )
    q.add_argument(
        "--kl-train-mode",
        action="store_true",
        help="QE: stored networks evaluated with dropout active",
    )
    q.add_argument(
        "--released-qe-settings",
        action="store_true",
        help="QE: window 3, 7 inner steps, inner_lr 0.1·lr, momentum 0.5, kl_weight 1/660",
    )
    q.add_argument(
        "--qe-inner-lr",
        type=float,
        default=None,
        help="override QE's inner SGD learning rate (default 7e-4)",
    )

    p = sub.add_parser(
        "report",
        help="Table 1, figures and time-to-98%% from a run directory, or several run "
        "directories side by side (--protocols)",
    )
    p.add_argument(
        "dir", nargs="?", default=None, help="directory with <dataset>/<solver>/seed<k>/metrics.csv"
    )
    p.add_argument(
        "--protocols",
        nargs="+",
        metavar="NAME=DIR",
        default=None,
        help="instead of DIR: print the tables and claims of these run directories side by "
        "side (Markdown), e.g. corrected=runs/reproduce released=runs/reproduce-released",
    )
    p.add_argument(
        "--out",
        default=None,
        help="where to write (default DIR/report); with --protocols, a Markdown file "
        "(default: print only)",
    )
    p.add_argument(
        "--paper",
        dest="paper",
        action="store_true",
        default=None,
        help="show the paper's values (default: for mnist)",
    )
    p.add_argument("--no-paper", dest="paper", action="store_false")
    p.add_argument(
        "--epoch",
        type=_positive_int,
        default=None,
        help="take the tables at this epoch (default: the last epoch any run reached)",
    )
    return parser


# ----------------------------------------------------------------------------- progress


class _SweepProgress:
    """A tqdm bar over all optimizer steps of a sweep, fed by worker events."""

    def __init__(self, total: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.tqdm = tqdm
        self.bar = tqdm(total=total, unit="step", disable=not enabled, dynamic_ncols=True)
        self.pos: dict[tuple[str, int], int] = {}
        self.nb: dict[tuple[str, int], int] = {}
        self.epochs: dict[tuple[str, int], int] = {}

    def set_epochs(self, key: tuple[str, int], epochs: int, nb: int) -> None:
        self.epochs[key], self.nb[key] = epochs, nb

    def _advance_to(self, key: tuple[str, int], pos: int) -> None:
        delta = pos - self.pos.get(key, 0)
        if delta > 0:
            self.bar.update(delta)
        self.pos[key] = max(pos, self.pos.get(key, 0))

    def __call__(self, ev: dict[str, Any]) -> None:
        key = (ev["solver"], ev["seed"])
        kind = ev["kind"]
        nb = self.nb.get(key, 1)
        if kind == "skip":
            self._advance_to(key, self.epochs.get(key, 0) * nb)
            self.write(f"{ev['solver']} seed {ev['seed']}: finished earlier, skipped")
        elif kind in ("epoch_start", "step"):
            self._advance_to(key, (ev["epoch"] - 1) * nb + ev["batch"])
            if kind == "step":
                self.bar.set_postfix_str(
                    f"{ev['solver']} s{ev['seed']} ep{ev['epoch']} loss {ev['loss']:.3f}"
                )
        elif kind == "epoch_end":
            row = ev["row"]
            self._advance_to(key, ev["epoch"] * nb)
            acc = row["test_acc"]
            acc_s = "" if math.isnan(acc) else f", test acc {100 * acc:.2f}%"
            self.write(
                f"{ev['solver']} seed {ev['seed']} epoch {ev['epoch']}: "
                f"test loss {row['test_loss']:.4f}{acc_s}"
            )
        elif kind == "failed":
            self.write(f"{ev['solver']} seed {ev['seed']}: FAILED: {ev.get('error')}")
        elif kind == "notice":
            self.write(f"kldwrm: warning: {ev['solver']} seed {ev['seed']}: {ev['message']}")

    def write(self, text: str) -> None:
        self.tqdm.write(text, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


# ----------------------------------------------------------------------------- commands


def _cmd_train(args: argparse.Namespace) -> int:
    """``kldwrm train``; under ``torchrun`` one data-parallel run over all ranks."""
    import torch

    from .. import distributed as kdist

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


class _TrainProgress:
    """``kldwrm train``'s callback: a tqdm bar per epoch, one line per finished epoch.

    It has :class:`~kldwrm.experiments.train.TrainCallback`'s methods without deriving
    from it (that would import torch before :func:`main` has checked the extras).
    """

    def __init__(self, epochs: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.tqdm, self.epochs, self.enabled = tqdm, epochs, enabled
        self.bar: Any = None

    def on_epoch_start(self, epoch: int, num_batches: int, start_batch: int) -> None:
        self.bar = self.tqdm(
            total=num_batches,
            initial=start_batch,
            unit="batch",
            desc=f"epoch {epoch}/{self.epochs}",
            leave=False,
            disable=not self.enabled,
            dynamic_ncols=True,
        )

    def on_step(self, epoch: int, batch: int, loss: float, acc: float) -> None:
        self.bar.update(batch - self.bar.n)
        post = f"loss {loss:.4f}" + ("" if math.isnan(acc) else f" acc {100 * acc:.2f}%")
        self.bar.set_postfix_str(post, refresh=False)

    def on_notice(self, message: str) -> None:
        self.tqdm.write(f"kldwrm: warning: {message}", file=sys.stderr)

    def on_epoch_end(self, row: dict[str, float]) -> None:
        self.close()
        acc = (
            ""
            if math.isnan(row["test_acc"])
            else f"  train acc {100 * row['train_acc']:.2f}%  test acc {100 * row['test_acc']:.2f}%"
        )
        self.tqdm.write(
            f"epoch {int(row['epoch'])}: train loss {row['train_loss']:.4f}  "
            f"test loss {row['test_loss']:.4f}{acc}  "
            f"{row['mean_step_ms']:.1f} ms/step  {row['wall_time_s']:.1f} s"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _train_config(args: argparse.Namespace) -> Any:
    """The :class:`~kldwrm.experiments.train.TrainConfig` of ``kldwrm train``'s arguments."""
    from .train import TrainConfig

    model = args.model or ("regression-mlp" if args.dataset == "regression" else "paper-cnn")
    hp = {
        k: getattr(args, k) for k in _HP_NAMES if hasattr(args, k) and getattr(args, k) is not None
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
    from .train import CHECKPOINT_NAME, TrainCallback, train, validate_config

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
    progress = _TrainProgress(config.epochs, not args.no_progress)
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
    from .reproduce import launcher_ranks, load_sweep_data, plan_runs, reproduce, validate_specs

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
    progress bar; returns its :class:`~kldwrm.experiments.reproduce.SweepResult`."""
    from .data import num_batches
    from .report import write_report
    from .reproduce import reproduce, run_sweep, split_cpus, total_steps

    workers, threads = split_cpus(len(specs), options.workers, options.threads)
    print(
        f"{len(specs)} runs in {options.out}/{options.dataset}; {workers} worker(s) x "
        f"{threads} thread(s)" + (f" on rank 0 of {world}" if world > 1 else ""),
        file=sys.stderr,
    )
    progress = _SweepProgress(total_steps(specs, n_train), not args.no_progress)
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

    from .reproduce import compare_hyperparameters
    from .timing import format_step_times, time_configs
    from .train import resolve_device

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
    from .reproduce import ReproduceOptions

    options = ReproduceOptions(
        out=args.out, model=args.model, solvers=tuple(args.optimizers), **_sweep_fields(args)
    )
    return _run_sweep_cli(args, options, compare=True)


def _sweep_fields(args: argparse.Namespace) -> dict:
    """ReproduceOptions fields shared by ``compare`` and ``reproduce``."""
    return dict(
        dataset=args.dataset,
        seeds=tuple(_seeds(args.seeds)),
        epochs=args.epochs,
        batch_size=args.batch_size,
        subset=args.subset,
        data_dir=args.data_dir,
        device=args.device,
        workers=args.workers,
        threads=args.threads,
    )


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from .reproduce import ReproduceOptions, for_task, released

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
    from .report import protocol_comparison

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
    from .report import write_report

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
    from .checkpoint import CheckpointError
    from .data import ChecksumError, DatasetNotFoundError
    from .train import ConfigMismatchError, InvalidRunError

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
