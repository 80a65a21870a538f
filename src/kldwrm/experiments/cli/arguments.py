"""The ``kldwrm`` command's arguments: the parser, its value types and the seed lists.

Parsing only: what a command does with its arguments is in :mod:`.commands`.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import Any

__all__ = ["HP_NAMES", "CliError", "build_parser", "parse_seeds"]

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


def parse_seeds(values: Sequence[str]) -> list[int]:
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


HP_NAMES = (
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
    """The argument parser of ``kldwrm``: one sub-command each for train, compare,
    reproduce and report."""
    parser = argparse.ArgumentParser(
        prog="kldwrm",
        description="KLD-WRM / EA-KFAC experiments (Rethinking Exponential Averaging of "
        "the Fisher).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub.add_parser("train", help="train one model with one optimizer"))
    _add_compare(
        sub.add_parser("compare", help="short comparison of all optimizers (about 5 min)")
    )
    _add_reproduce(sub.add_parser("reproduce", help="the paper's Table 1 protocol"))
    _add_report(
        sub.add_parser(
            "report",
            help="Table 1, figures and time-to-98%% from a run directory, or several run "
            "directories side by side (--protocols)",
        )
    )
    return parser


def _add_train(p: argparse.ArgumentParser) -> None:
    """``kldwrm train``: one model, one optimizer, one seed."""
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


def _add_compare(p: argparse.ArgumentParser) -> None:
    """``kldwrm compare``: a short sweep of several optimizers, then the step-time check."""
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


def _add_reproduce(p: argparse.ArgumentParser) -> None:
    """``kldwrm reproduce``: the paper's protocol (or a named task) over solvers and seeds."""
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
    _add_released_quirks(p)


def _add_released_quirks(p: argparse.ArgumentParser) -> None:
    """``kldwrm reproduce``'s switches for the released code's quirks, one by one or all."""
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


def _add_report(p: argparse.ArgumentParser) -> None:
    """``kldwrm report``: tables, figures and claims of one run directory or several."""
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
