"""Training loop with per-epoch metrics, atomic checkpoints and bit-exact resume.

One run lives in one directory::

    <out_dir>/config.json      the run's configuration (informational)
    <out_dir>/metrics.csv      one row per finished epoch (:data:`METRIC_FIELDS`)
    <out_dir>/checkpoint.pt    model, optimizer and RNG states after the last finished step

The checkpoint holds only tensors, dicts, lists, numbers and strings, so
``torch.load(path, weights_only=True)`` reads it. It is written atomically (temporary file +
``os.replace``) at the end of every epoch and when the run is interrupted (Ctrl-C or a
callback raising :class:`KeyboardInterrupt`), also in the middle of an epoch: it records the
position inside the epoch, the data-order generator state at the start of the epoch, the
global torch RNG state (dropout) and the optimizer state, so ``train(..., resume=True)``
continues exactly where the run stopped and reproduces the losses and accuracies of an
uninterrupted run (only the timings differ).

Under ``torchrun`` (a process group initialised, e.g. by
:func:`kldwrm.distributed.init_from_env`) the model is wrapped in
``DistributedDataParallel``; ``config.batch_size`` is the *global* batch, each rank takes
its contiguous shard of every batch (a final batch whose size is not a multiple of the
number of ranks is trimmed to one, so shards are always equal), metrics are over the whole
batch, and only rank 0 writes ``metrics.csv``, ``config.json`` and the checkpoint, which
also holds every rank's RNG states; it resumes with the same number of ranks. See
``docs/distributed.md``.

The library never prints; progress is reported through :class:`TrainCallback`.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import distributed as kdist
from .data import TensorData, iterate_batches, load_dataset, num_batches
from .models import build_model

__all__ = [
    "CHECKPOINT_NAME",
    "METRICS_NAME",
    "METRIC_FIELDS",
    "ConfigMismatchError",
    "TrainCallback",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "checkpoint_status",
    "get_optimizer_factory",
    "load_checkpoint",
    "read_metrics",
    "resolve_device",
    "run_is_finished",
    "train",
]

METRIC_FIELDS: tuple[str, ...] = (
    "epoch",
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
    "raw_test_loss",
    "raw_test_acc",
    "wall_time_s",
    "mean_step_ms",
)
METRICS_NAME = "metrics.csv"
CHECKPOINT_NAME = "checkpoint.pt"
CONFIG_NAME = "config.json"
_FORMAT = 1

OptimizerFactory = Callable[..., torch.optim.Optimizer]


@dataclass
class TrainConfig:
    """Everything that defines a training run.

    ``optimizer_kwargs`` go to ``kldwrm.make_optimizer(optimizer, model, **kwargs)``
    (keyword names as in DESIGN section 1: lr, rho, damping, weight_decay, ...).
    Accuracies are fractions in ``[0, 1]``; ``NaN`` for regression.

    Every epoch evaluates two views of the test set: ``test_*``, inputs standardised like
    the training inputs, and ``raw_test_*``, inputs on the files' own scale as the released
    notebooks fed them (``NaN`` where a data set has no raw view).
    """

    dataset: str = "mnist"
    model: str = "paper-cnn"
    optimizer: str = "kfac"
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    epochs: int = 2
    batch_size: int = 512
    eval_batch_size: int = 2000
    seed: int = 0
    device: str = "cpu"
    subset: int | None = None
    data_dir: str | None = None
    normalize: bool = True
    drop_last: bool = False

    def to_dict(self) -> dict[str, Any]:
        """A JSON- and ``weights_only``-safe dict of the configuration."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict` (unknown keys are ignored)."""
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


class TrainCallback:
    """Progress hooks (all no-ops by default). Raising KeyboardInterrupt stops the run."""

    def on_epoch_start(self, epoch: int, num_batches: int, start_batch: int) -> None:
        """Called before the first (or, when resuming, the next) batch of ``epoch``."""

    def on_step(self, epoch: int, batch: int, loss: float, acc: float) -> None:
        """Called after each step with the running mean train loss and accuracy."""

    def on_epoch_end(self, row: dict[str, float]) -> None:
        """Called with the epoch's metrics row once it is written."""


@dataclass
class TrainResult:
    """Outcome of :func:`train`."""

    out_dir: Path
    metrics: list[dict[str, float]]
    interrupted: bool
    finished: bool
    checkpoint: Path | None

    @property
    def metrics_path(self) -> Path:
        """Path of the metrics CSV."""
        return self.out_dir / METRICS_NAME


# ----------------------------------------------------------------------------- helpers


def resolve_device(device: str) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; anything else is passed to torch."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch.cuda.is_available() is False")
    return dev


def get_optimizer_factory() -> OptimizerFactory:
    """``kldwrm.make_optimizer``, with a clear error if the optimizer core lacks it."""
    import kldwrm

    factory = getattr(kldwrm, "make_optimizer", None)
    if factory is None:
        raise ImportError("kldwrm.make_optimizer is not available in this installation")
    return factory


def _atomic_write_bytes(path: Path, writer: Callable[[Any], None], mode: str = "wb") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"newline": ""})) as fh:
            writer(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _write_metrics(path: Path, rows: list[dict[str, float]]) -> None:
    def writer(fh: Any) -> None:
        w = csv.DictWriter(fh, fieldnames=list(METRIC_FIELDS))
        w.writeheader()
        for row in rows:
            w.writerow({k: repr(row[k]) if isinstance(row[k], float) else row[k] for k in row})

    _atomic_write_bytes(path, writer, mode="w")


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, float]]:
    """Rows of a metrics CSV as dicts of floats (``epoch`` as int)."""
    rows = []
    with open(path, newline="") as fh:
        for raw in csv.DictReader(fh):
            row: dict[str, float] = {}
            for k, v in raw.items():
                if k is None:
                    continue
                row[k] = int(v) if k == "epoch" else float(v)
            rows.append(row)
    return rows


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint written by :func:`train` (``weights_only=True``)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def run_is_finished(out_dir: str | os.PathLike[str], epochs: int) -> bool:
    """Whether the run in ``out_dir`` has completed at least ``epochs`` epochs."""
    ckpt = Path(out_dir) / CHECKPOINT_NAME
    if not ckpt.is_file():
        return False
    state = load_checkpoint(ckpt)
    return int(state.get("epoch", 0)) >= epochs and int(state.get("batch", 0)) == 0


class ConfigMismatchError(ValueError):
    """A run directory holds a run with different settings than the one requested."""


#: Settings that may differ between a checkpoint and a resumed run.
_RESUME_FREE = ("epochs", "device", "data_dir", "eval_batch_size")


def _check_same_run(saved: Mapping[str, Any], config: TrainConfig, where: Path) -> None:
    current = config.to_dict()
    diffs = [
        f"{k}: {saved.get(k)!r} (saved) vs {current[k]!r} (requested)"
        for k in current
        if k not in _RESUME_FREE and saved.get(k) != current[k]
    ]
    if diffs:
        raise ConfigMismatchError(
            f"{where} holds a run with different settings; use another output directory "
            "or delete it. Differences: " + "; ".join(diffs)
        )


def checkpoint_status(out_dir: str | os.PathLike[str], config: TrainConfig) -> str:
    """``"missing"``, ``"partial"`` or ``"finished"`` (``config.epochs`` reached).

    A run directory kept without its checkpoint (an archived study keeps only
    ``metrics.csv`` and ``config.json``) is ``"finished"`` when its ``config.json`` is this
    configuration and its metrics reach ``config.epochs``.

    Raises:
        ConfigMismatchError: the checkpoint (or the archived configuration) was written for
            different settings.
    """
    ckpt = Path(out_dir) / CHECKPOINT_NAME
    if not ckpt.is_file():
        return _archived_status(Path(out_dir), config)
    state = load_checkpoint(ckpt)
    _check_same_run(state.get("config", {}), config, ckpt)
    done = int(state.get("epoch", 0)) >= config.epochs and int(state.get("batch", 0)) == 0
    return "finished" if done else "partial"


def _archived_status(out_dir: Path, config: TrainConfig) -> str:
    cfg, metrics = out_dir / CONFIG_NAME, out_dir / METRICS_NAME
    if not (cfg.is_file() and metrics.is_file()):
        return "missing"
    _check_same_run(json.loads(cfg.read_text()), config, cfg)
    epochs = [int(r["epoch"]) for r in read_metrics(metrics)]
    done = epochs[: config.epochs] == list(range(1, config.epochs + 1))
    return "finished" if done else "missing"


def _loss_fn(task: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return F.cross_entropy if task == "classification" else F.mse_loss


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    task: str = "classification",
    batch_size: int = 2000,
) -> tuple[float, float]:
    """Mean loss and accuracy (``NaN`` for regression) of ``model`` in eval mode."""
    was_training = model.training
    model.eval()
    total, correct, n = 0.0, 0, x.shape[0]
    reduce = "sum"
    try:
        for lo in range(0, n, batch_size):
            xb, yb = x[lo : lo + batch_size], y[lo : lo + batch_size]
            out = model(xb)
            if task == "classification":
                total += F.cross_entropy(out, yb, reduction=reduce).item()
                correct += int((out.argmax(1) == yb).sum().item())
            else:
                total += F.mse_loss(out, yb, reduction=reduce).item() / max(1, out[0].numel())
    finally:
        model.train(was_training)
    acc = correct / n if task == "classification" else math.nan
    return total / n, acc


class _Stop:
    """Set by the SIGINT handler: stop at the next step boundary."""

    def __init__(self) -> None:
        self.requested = False


@contextmanager
def _graceful_sigint(stop: _Stop) -> Iterator[None]:
    """First Ctrl-C sets ``stop.requested``; a second one raises KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: Any) -> None:
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested = True

    try:
        signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main interpreter
        yield
        return
    try:
        yield
    finally:
        signal.signal(
            signal.SIGINT, previous if previous is not None else signal.default_int_handler
        )


class _StopRequested(Exception):
    pass


# ----------------------------------------------------------------------------- training


def train(
    config: TrainConfig,
    out_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    callback: TrainCallback | None = None,
    data: TensorData | None = None,
    optimizer_factory: OptimizerFactory | None = None,
) -> TrainResult:
    """Train ``config.model`` on ``config.dataset`` and record metrics and checkpoints.

    Args:
        config: the run's configuration.
        out_dir: run directory (created).
        resume: continue from ``out_dir/checkpoint.pt`` if present (a run that already
            reached ``config.epochs`` returns immediately); otherwise start from scratch,
            overwriting ``metrics.csv`` and the checkpoint.
        callback: progress hooks.
        data: pre-loaded data (otherwise :func:`~kldwrm.experiments.data.load_dataset`).
        optimizer_factory: ``(name, model, **kwargs) -> Optimizer``; default
            ``kldwrm.make_optimizer``.

    Returns:
        :class:`TrainResult`; ``interrupted`` is True when Ctrl-C (SIGINT) or a callback's
        KeyboardInterrupt stopped the run, after the checkpoint was saved.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cb = callback or TrainCallback()
    ckpt_path = out / CHECKPOINT_NAME
    metrics_path = out / METRICS_NAME
    device = resolve_device(config.device)
    world, rank = kdist.world_size(), kdist.rank()
    if world > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if config.batch_size % world:
        raise ValueError(
            f"batch_size {config.batch_size} is the global batch and must be a multiple of "
            f"the number of ranks ({world})"
        )
    lead = rank == 0  # the only rank that writes files
    factory = optimizer_factory or get_optimizer_factory()

    if data is None:
        data = load_dataset(
            config.dataset,
            config.data_dir,
            normalize=config.normalize,
            subset=config.subset,
        )
    elif config.subset is not None and data.x_train.shape[0] > config.subset:
        data = replace(data, x_train=data.x_train[: config.subset],
                       y_train=data.y_train[: config.subset])
    task = data.task
    loss_fn = _loss_fn(task)
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    x_raw = None if data.x_test_raw is None else data.x_test_raw.to(device)

    torch.manual_seed(config.seed)
    model = build_model(config.model, **config.model_kwargs).to(device)
    net: nn.Module = model  # what the batches go through (the DDP wrapper when distributed)
    if world > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )
    optimizer = factory(config.optimizer, net, **config.optimizer_kwargs)
    if world > 1:  # dropout masks differ between shards (every rank's state is checkpointed)
        torch.manual_seed(config.seed + 7919 * rank)
    data_gen = torch.Generator().manual_seed(config.seed)

    metrics: list[dict[str, float]] = []
    epoch_done, batch_pos = 0, 0
    running = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0, "step_s": 0.0, "steps": 0.0}
    wall_before = 0.0
    epoch_rng = data_gen.get_state()

    if resume and ckpt_path.is_file():
        state = load_checkpoint(ckpt_path)
        _check_same_run(state.get("config", {}), config, ckpt_path)
        saved_world = int(state.get("world_size", 1))
        if saved_world != world:
            raise ConfigMismatchError(
                f"{ckpt_path} was written by a run on {saved_world} rank(s); resume it with "
                f"the same number of ranks (this run has {world})"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(list(state["cuda_rng"]))
        if world > 1:
            torch.set_rng_state(state["torch_rng_ranks"][rank])
            if device.type == "cuda" and state.get("cuda_rng_ranks") is not None:
                torch.cuda.set_rng_state(state["cuda_rng_ranks"][rank], device)
        data_gen.set_state(state["data_rng"])
        epoch_rng = state["epoch_rng"]
        epoch_done, batch_pos = int(state["epoch"]), int(state["batch"])
        metrics = [dict(r) for r in state["metrics"]]
        running = {k: float(v) for k, v in state["running"].items()}
        wall_before = float(state["wall_time_s"])
    if lead:
        _write_metrics(metrics_path, metrics)
        (out / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True))

    n_train = x_train.shape[0]
    n_batches = num_batches(n_train, config.batch_size, config.drop_last)
    t0 = time.perf_counter()

    def save(finished_epoch: int, batch: int) -> None:
        rng_ranks = cuda_rng_ranks = None
        if world > 1:  # collective: every rank's RNG states, written by rank 0
            rng_ranks = _gather(torch.get_rng_state(), world)
            if device.type == "cuda":
                cuda_rng_ranks = _gather(torch.cuda.get_rng_state(device), world)
        if not lead:
            return
        state = {
            "format": _FORMAT,
            "config": config.to_dict(),
            "epoch": finished_epoch,
            "batch": batch,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
            "data_rng": data_gen.get_state(),
            "epoch_rng": epoch_rng,
            "metrics": metrics,
            "running": dict(running),
            "wall_time_s": wall_before + time.perf_counter() - t0,
            "world_size": world,
        }
        if world > 1:
            state["torch_rng_ranks"] = rng_ranks
            state["cuda_rng_ranks"] = cuda_rng_ranks
        _atomic_write_bytes(ckpt_path, lambda fh: torch.save(state, fh))

    stop = _Stop()
    agreed = [False]  # with several ranks: stop requested on some rank (all-reduced)

    def stopping() -> bool:
        return stop.requested if world == 1 else agreed[0]

    in_step = False
    epoch = epoch_done
    saved_ckpt: Path | None = ckpt_path if ckpt_path.is_file() and resume else None
    try:
        with _graceful_sigint(stop):
            for epoch in range(epoch_done + 1, config.epochs + 1):
                if batch_pos == 0:
                    epoch_rng = data_gen.get_state()
                    running = dict.fromkeys(running, 0.0)
                else:
                    data_gen.set_state(epoch_rng)
                cb.on_epoch_start(epoch, n_batches, batch_pos)
                model.train()
                batches = iterate_batches(
                    x_train,
                    y_train,
                    config.batch_size,
                    generator=data_gen,
                    drop_last=config.drop_last,
                    start=batch_pos,
                )
                for xb, yb in batches:
                    if world > 1:
                        xb, yb = _shard(xb, yb, rank, world)
                    in_step = True
                    ts = time.perf_counter()
                    optimizer.zero_grad(set_to_none=True)
                    output = net(xb)
                    loss = loss_fn(output, yb)
                    loss.backward()
                    optimizer.step()
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    running["step_s"] += time.perf_counter() - ts
                    running["steps"] += 1
                    nb = xb.shape[0]
                    batch_loss = loss.item() * nb
                    batch_correct = (
                        float((output.argmax(1) == yb).sum().item())
                        if task == "classification"
                        else 0.0
                    )
                    if world > 1:  # metrics of the whole batch; stop when any rank asks
                        batch_loss, batch_correct, nb, asked = _sum_over_ranks(
                            [batch_loss, batch_correct, nb, float(stop.requested)]
                        )
                        agreed[0] = asked > 0
                    running["loss_sum"] += batch_loss
                    running["count"] += nb
                    if task == "classification":
                        running["correct"] += batch_correct
                    batch_pos += 1
                    in_step = False
                    if stopping():
                        raise _StopRequested
                    cb.on_step(epoch, batch_pos, *_running_means(running, task))
                    if stopping():
                        raise _StopRequested
                views = []
                for xv in (x_test, x_raw):
                    if xv is None:
                        views.append((math.nan, math.nan))
                    elif world > 1:
                        views.append(_evaluate_sharded(
                            model, xv, y_test, task, config.eval_batch_size, rank, world, stop,
                            agreed,
                        ))
                    else:
                        views.append(evaluate(model, xv, y_test, task, config.eval_batch_size))
                (test_loss, test_acc), (raw_loss, raw_acc) = views
                train_loss, train_acc = _running_means(running, task)
                row = {
                    "epoch": epoch,
                    "train_loss": train_loss,
                    "train_acc": train_acc,
                    "test_loss": test_loss,
                    "test_acc": test_acc,
                    "raw_test_loss": raw_loss,
                    "raw_test_acc": raw_acc,
                    "wall_time_s": wall_before + time.perf_counter() - t0,
                    "mean_step_ms": 1000.0 * running["step_s"] / max(1.0, running["steps"]),
                }
                metrics.append(row)
                batch_pos = 0
                running = dict.fromkeys(running, 0.0)
                if lead:
                    _write_metrics(metrics_path, metrics)
                save(epoch, 0)
                saved_ckpt = ckpt_path
                cb.on_epoch_end(row)
                if stopping():
                    raise _StopRequested
    except (KeyboardInterrupt, _StopRequested) as exc:
        if world > 1 and isinstance(exc, KeyboardInterrupt):
            raise  # not agreed by every rank: saving (a collective) could not complete
        if not in_step:
            # State is consistent: everything up to the last finished step is recorded.
            if batch_pos == 0 and metrics and int(metrics[-1]["epoch"]) == epoch:
                finished_epoch = epoch
            else:
                finished_epoch = epoch - 1 if epoch > epoch_done else epoch_done
            save(finished_epoch, batch_pos)
            saved_ckpt = ckpt_path
        return TrainResult(out, metrics, True, False, saved_ckpt)
    finished = bool(metrics) and int(metrics[-1]["epoch"]) >= config.epochs
    if not metrics and config.epochs <= 0:
        finished = True
    return TrainResult(out, metrics, False, finished, saved_ckpt)


def _running_means(running: Mapping[str, float], task: str) -> tuple[float, float]:
    count = max(1.0, running["count"])
    acc = running["correct"] / count if task == "classification" else math.nan
    return running["loss_sum"] / count, acc


def _shard(
    xb: torch.Tensor, yb: torch.Tensor, rank: int, world: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's contiguous, equal share of a global batch (trimmed to a multiple)."""
    per = xb.shape[0] // world
    if per == 0:
        raise ValueError(f"a batch of {xb.shape[0]} examples cannot feed {world} ranks")
    return xb[rank * per : (rank + 1) * per], yb[rank * per : (rank + 1) * per]


def _sum_over_ranks(values: list[float]) -> list[float]:
    """Sum a few numbers over ranks (one small all-reduce, in float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=kdist.comm_device())
    dist.all_reduce(t)
    return t.tolist()


def _gather(t: torch.Tensor, world: int) -> list[torch.Tensor]:
    """Every rank's copy of ``t`` (same shape on every rank), on the CPU."""
    out: list[Any] = [None] * world
    dist.all_gather_object(out, t.cpu())
    return [o.cpu() for o in out]


def _evaluate_sharded(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    task: str,
    batch_size: int,
    rank: int,
    world: int,
    stop: _Stop,
    agreed: list[bool],
) -> tuple[float, float]:
    """:func:`evaluate` over the whole set, each rank on its contiguous share."""
    xs, ys = x.tensor_split(world)[rank], y.tensor_split(world)[rank]
    n = xs.shape[0]
    loss, acc = evaluate(model, xs, ys, task, batch_size) if n else (0.0, 0.0)
    correct = acc * n if task == "classification" and n else 0.0
    total, right, count, asked = _sum_over_ranks(
        [loss * n, correct, float(n), float(stop.requested)]
    )
    agreed[0] = agreed[0] or asked > 0
    return total / count, right / count if task == "classification" else math.nan
