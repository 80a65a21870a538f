"""Training loop with per-epoch metrics, atomic checkpoints and bit-exact resume.

One run lives in one directory::

    <out_dir>/config.json          the run's configuration (informational)
    <out_dir>/metrics.csv          one row per finished epoch (:data:`METRIC_FIELDS`)
    <out_dir>/checkpoint.pt        model, optimizer and RNG states after the last finished step
    <out_dir>/checkpoint.prev.pt   the checkpoint before it (see :mod:`.checkpoint`)

The checkpoint holds only tensors, dicts, lists, numbers and strings, so
``torch.load(path, weights_only=True)`` reads it. It is written atomically (temporary file +
``os.replace``) at the end of every epoch and when the run is interrupted (Ctrl-C or a
callback raising :class:`KeyboardInterrupt`), also in the middle of an epoch: it records the
position inside the epoch, the data-order generator state at the start of the epoch, the
global torch RNG state (dropout) and the optimizer state, so ``train(..., resume=True)``
continues exactly where the run stopped and reproduces the losses and accuracies of an
uninterrupted run (only the timings differ). A damaged ``checkpoint.pt`` is replaced by the
previous one (the callback's :meth:`TrainCallback.on_notice` says so).

Under ``torchrun`` (a process group initialised, e.g. by
:func:`kldwrm.distributed.init_from_env`) the model is wrapped in
``DistributedDataParallel``; ``config.batch_size`` is the *global* batch, each rank takes
its contiguous shard of every batch (a final batch whose size is not a multiple of the
number of ranks is trimmed to one, so shards are always equal), metrics are over the whole
batch, and only rank 0 writes ``metrics.csv``, ``config.json`` and the checkpoint, which
also holds every rank's RNG states; it resumes with the same number of ranks. See
``docs/distributed.md``.

The pieces: :class:`RunState` (where a run stands), ``_Session`` (one call of
:func:`train`: setup, restore, save, the epoch loop, the evaluation of both test views) and
:mod:`.checkpoint` (the files). The library never prints; progress is reported through
:class:`TrainCallback`.
"""

from __future__ import annotations

import csv
import json
import math
import numbers
import os
import re
import signal
import threading
import time
import warnings
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
from .checkpoint import (
    CHECKPOINT_NAME,
    PREVIOUS_CHECKPOINT_NAME,
    CheckpointError,
    CheckpointFiles,
    LoadedCheckpoint,
    atomic_write,
    load_checkpoint,
    load_latest,
)
from .data import ChecksumError, TensorData, iterate_batches, load_dataset, num_batches
from .models import build_model

__all__ = [
    "CHECKPOINT_NAME",
    "METRICS_NAME",
    "METRIC_FIELDS",
    "PREVIOUS_CHECKPOINT_NAME",
    "CheckpointError",
    "ConfigMismatchError",
    "EpochSums",
    "InvalidRunError",
    "RunState",
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
    "validate_config",
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
    """Progress hooks (no-ops by default). Raising KeyboardInterrupt stops the run."""

    def on_epoch_start(self, epoch: int, num_batches: int, start_batch: int) -> None:
        """Called before the first (or, when resuming, the next) batch of ``epoch``."""

    def on_step(self, epoch: int, batch: int, loss: float, acc: float) -> None:
        """Called after each step with the running mean train loss and accuracy."""

    def on_epoch_end(self, row: dict[str, float]) -> None:
        """Called with the epoch's metrics row once it is written."""

    def on_notice(self, message: str) -> None:
        """A one-line message for the user, e.g. that a damaged checkpoint was replaced by
        the previous one (default: a :class:`UserWarning`)."""
        warnings.warn(message, UserWarning, stacklevel=2)


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


class ConfigMismatchError(ValueError):
    """A run directory holds a run with different settings than the one requested."""


class InvalidRunError(ValueError):
    """A run cannot start: a bad setting, model specification or optimizer hyperparameter.

    The message is one line meant for the user (the library's own ``ValueError`` text).
    """


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


def _write_metrics(path: Path, rows: list[dict[str, float]]) -> None:
    def writer(fh: Any) -> None:
        w = csv.DictWriter(fh, fieldnames=list(METRIC_FIELDS))
        w.writeheader()
        for row in rows:
            w.writerow({k: repr(row[k]) if isinstance(row[k], float) else row[k] for k in row})

    atomic_write(path, writer, text=True)


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


def _is_finished(state: Mapping[str, Any], epochs: int) -> bool:
    return int(state.get("epoch", 0)) >= epochs and int(state.get("batch", 0)) == 0


def run_is_finished(out_dir: str | os.PathLike[str], epochs: int) -> bool:
    """Whether the run in ``out_dir`` has completed at least ``epochs`` epochs.

    Raises:
        CheckpointError: the checkpoint is damaged and there is no previous one.
    """
    loaded = load_latest(out_dir)
    return loaded is not None and _is_finished(loaded.state, epochs)


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

    A damaged ``checkpoint.pt`` counts through the previous checkpoint (which a resumed
    run falls back on). A run directory kept without its checkpoint (an archived study
    keeps only ``metrics.csv`` and ``config.json``) is ``"finished"`` when its
    ``config.json`` is this configuration and its metrics reach ``config.epochs``.

    Raises:
        ConfigMismatchError: the checkpoint (or the archived configuration) was written for
            different settings.
        CheckpointError: the checkpoint is damaged and there is no previous one.
    """
    loaded = load_latest(out_dir)
    if loaded is None:
        return _archived_status(Path(out_dir), config)
    _check_same_run(loaded.state.get("config", {}), config, loaded.path)
    return "finished" if _is_finished(loaded.state, config.epochs) else "partial"


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


# ----------------------------------------------------------------------------- setup


def _check_settings(config: TrainConfig) -> None:
    """The numeric settings that no model or optimizer could make sense of."""
    checks = (
        ("epochs", config.epochs, 0),
        ("batch_size", config.batch_size, 1),
        ("eval_batch_size", config.eval_batch_size, 1),
        ("subset", 1 if config.subset is None else config.subset, 1),
    )
    for name, value, least in checks:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
            raise InvalidRunError(f"{name} must be an integer >= {least}, got {value!r}")


def _build_model(config: TrainConfig) -> nn.Module:
    """``config.model`` built with ``config.model_kwargs`` (a bad specification raises
    :class:`InvalidRunError`)."""
    try:
        return build_model(config.model, **config.model_kwargs)
    except ValueError as exc:
        raise InvalidRunError(str(exc)) from exc


def _build_optimizer(
    config: TrainConfig, net: nn.Module, factory: OptimizerFactory
) -> torch.optim.Optimizer:
    """``config.optimizer`` for ``net`` (a bad hyperparameter raises
    :class:`InvalidRunError` with the optimizer's own message)."""
    name = config.optimizer
    try:
        return factory(name, net, **config.optimizer_kwargs)
    except ValueError as exc:
        raise InvalidRunError(f"optimizer {name!r}: {exc}") from exc
    except TypeError as exc:
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
        if unknown is None:
            raise
        raise InvalidRunError(
            f"optimizer {name!r} has no hyperparameter {unknown.group(1)!r}"
        ) from exc


def validate_config(config: TrainConfig, optimizer_factory: OptimizerFactory | None = None) -> None:
    """Check ``config`` without training: its settings, model and optimizer hyperparameters.

    Builds the model and the optimizer once on the CPU (the global RNG state is restored),
    so a bad run is refused in milliseconds, before any data is loaded.

    Raises:
        InvalidRunError: what is wrong, in one line.
    """
    _check_settings(config)
    factory = optimizer_factory or get_optimizer_factory()
    with torch.random.fork_rng(devices=[]):
        _build_optimizer(config, _build_model(config), factory)


def _load_data(config: TrainConfig) -> TensorData:
    """The run's data set (an unknown name raises :class:`InvalidRunError`)."""
    try:
        return load_dataset(
            config.dataset, config.data_dir, normalize=config.normalize, subset=config.subset
        )
    except ChecksumError:
        raise
    except ValueError as exc:
        raise InvalidRunError(str(exc)) from exc


@dataclass
class _Tensors:
    """The data of a run, on the run's device."""

    task: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_raw: torch.Tensor | None  # the test inputs on the files' own scale


def _prepare_data(config: TrainConfig, data: TensorData | None, device: torch.device) -> _Tensors:
    if data is None:
        data = _load_data(config)
    elif config.subset is not None and data.x_train.shape[0] > config.subset:
        data = replace(data, x_train=data.x_train[: config.subset],
                       y_train=data.y_train[: config.subset])
    return _Tensors(
        data.task,
        data.x_train.to(device),
        data.y_train.to(device),
        data.x_test.to(device),
        data.y_test.to(device),
        None if data.x_test_raw is None else data.x_test_raw.to(device),
    )


def _placement(config: TrainConfig) -> tuple[torch.device, int, int]:
    """``(device, world size, rank)`` of this process."""
    device = resolve_device(config.device)
    world, rank = kdist.world_size(), kdist.rank()
    if world > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if config.batch_size % world:
        raise InvalidRunError(
            f"batch_size {config.batch_size} is the global batch and must be a multiple of "
            f"the number of ranks ({world})"
        )
    return device, world, rank


def _build(
    config: TrainConfig, device: torch.device, world: int, rank: int, factory: OptimizerFactory
) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
    """``(model, net, optimizer)``; ``net`` is what batches go through (DDP when distributed)."""
    torch.manual_seed(config.seed)
    model = _build_model(config).to(device)
    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )
    optimizer = _build_optimizer(config, net, factory)
    if world > 1:  # dropout masks differ between shards (every rank's state is checkpointed)
        torch.manual_seed(config.seed + 7919 * rank)
    return model, net, optimizer


# ----------------------------------------------------------------------------- run state


@dataclass
class EpochSums:
    """Running sums over the steps taken so far in the current epoch."""

    loss_sum: float = 0.0
    correct: float = 0.0
    count: float = 0.0
    step_s: float = 0.0
    steps: float = 0.0

    def means(self, task: str) -> tuple[float, float]:
        """Mean train loss and accuracy (``NaN`` for regression) so far."""
        count = max(1.0, self.count)
        acc = self.correct / count if task == "classification" else math.nan
        return self.loss_sum / count, acc


@dataclass
class RunState:
    """Where a run stands; with the model, optimizer and RNG states it makes a checkpoint."""

    #: epochs finished
    epoch: int = 0
    #: steps taken in epoch ``epoch + 1``
    batch: int = 0
    sums: EpochSums = field(default_factory=EpochSums)
    #: one row per finished epoch (:data:`METRIC_FIELDS`)
    metrics: list[dict[str, float]] = field(default_factory=list)
    #: wall time of the earlier sessions of the run
    wall_before: float = 0.0
    #: data-order generator state at the start of epoch ``epoch + 1``
    epoch_rng: torch.Tensor | None = None

    @classmethod
    def from_checkpoint(cls, state: Mapping[str, Any]) -> RunState:
        """The run state recorded in a checkpoint dict."""
        return cls(
            epoch=int(state["epoch"]),
            batch=int(state["batch"]),
            sums=EpochSums(**{k: float(v) for k, v in state["running"].items()}),
            metrics=[dict(r) for r in state["metrics"]],
            wall_before=float(state["wall_time_s"]),
            epoch_rng=state["epoch_rng"],
        )


class _Stop:
    """Stop requests: ``requested`` is set by this process's SIGINT handler; ``agreed``,
    with several ranks, when any rank requested (all-reduced with each step's metrics)."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.requested = False
        self.agreed = False

    def __call__(self) -> bool:
        """Whether the run should stop at this step boundary."""
        return self.requested if self.world == 1 else self.agreed


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


class _Session:
    """One call of :func:`train`: the run's model, optimizer and data, its state, and the
    steps that advance and record it."""

    def __init__(
        self,
        config: TrainConfig,
        out: Path,
        callback: TrainCallback,
        data: TensorData | None,
        factory: OptimizerFactory,
    ) -> None:
        self.config, self.out, self.callback = config, out, callback
        self.device, self.world, self.rank = _placement(config)
        self.lead = self.rank == 0  # the only rank that writes files
        self.data = _prepare_data(config, data, self.device)
        self.loss_fn = _loss_fn(self.data.task)
        self.model, self.net, self.optimizer = _build(
            config, self.device, self.world, self.rank, factory
        )
        self.data_gen = torch.Generator().manual_seed(config.seed)
        self.state = RunState(epoch_rng=self.data_gen.get_state())
        self.n_batches = num_batches(
            self.data.x_train.shape[0], config.batch_size, config.drop_last
        )
        self.files = CheckpointFiles(out)
        self.stop = _Stop(self.world)
        self.in_step = False  # an interruption now leaves no consistent state to save
        self.saved: Path | None = None  # the checkpoint that holds the run
        self.t0 = time.perf_counter()

    # -- checkpoints

    def start(self, resume: bool) -> None:
        """Restore the newest good checkpoint (``resume``), then write metrics and config."""
        loaded = self.files.load() if resume else None
        if loaded is not None:
            self._restore(loaded)
            self.saved = loaded.path
            if loaded.problem and self.lead:
                st = self.state
                where = f"step {st.batch} of epoch {st.epoch + 1}" if st.batch else (
                    f"the end of epoch {st.epoch}")
                self.callback.on_notice(
                    f"{loaded.problem}; resuming from {loaded.path} instead ({where})"
                )
        if self.lead:
            _write_metrics(self.out / METRICS_NAME, self.state.metrics)
            text = json.dumps(self.config.to_dict(), indent=2, sort_keys=True)
            atomic_write(self.out / CONFIG_NAME, lambda fh: fh.write(text), text=True)
        self.t0 = time.perf_counter()

    def _restore(self, loaded: LoadedCheckpoint) -> None:
        state, path = loaded.state, loaded.path
        _check_same_run(state.get("config", {}), self.config, path)
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.world:
            raise ConfigMismatchError(
                f"{path} was written by a run on {saved_world} rank(s); resume it with "
                f"the same number of ranks (this run has {self.world})"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        cuda = self.device.type == "cuda"
        torch.set_rng_state(state["torch_rng"])
        if cuda and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(list(state["cuda_rng"]))
        if self.world > 1:
            torch.set_rng_state(state["torch_rng_ranks"][self.rank])
            if cuda and state.get("cuda_rng_ranks") is not None:
                torch.cuda.set_rng_state(state["cuda_rng_ranks"][self.rank], self.device)
        self.data_gen.set_state(state["data_rng"])
        self.state = RunState.from_checkpoint(state)

    def _wall_time(self) -> float:
        return self.state.wall_before + time.perf_counter() - self.t0

    def save(self) -> None:
        """Checkpoint the current state (with several ranks a collective: rank 0 writes
        every rank's RNG states)."""
        cuda = self.device.type == "cuda"
        rng_ranks = cuda_rng_ranks = None
        if self.world > 1:
            rng_ranks = _gather(torch.get_rng_state(), self.world)
            if cuda:
                cuda_rng_ranks = _gather(torch.cuda.get_rng_state(self.device), self.world)
        self.saved = self.files.path
        if not self.lead:
            return
        st = self.state
        state = {
            "format": _FORMAT,
            "config": self.config.to_dict(),
            "epoch": st.epoch,
            "batch": st.batch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if cuda else None,
            "data_rng": self.data_gen.get_state(),
            "epoch_rng": st.epoch_rng,
            "metrics": st.metrics,
            "running": asdict(st.sums),
            "wall_time_s": self._wall_time(),
            "world_size": self.world,
        }
        if self.world > 1:
            state["torch_rng_ranks"] = rng_ranks
            state["cuda_rng_ranks"] = cuda_rng_ranks
        self.files.save(state)

    # -- the loop

    def _check_stop(self) -> None:
        if self.stop():
            raise _StopRequested

    def run_epoch(self, epoch: int) -> None:
        """Run (the rest of) ``epoch``, evaluate, record and checkpoint it."""
        st, data = self.state, self.data
        if st.batch == 0:
            st.epoch_rng = self.data_gen.get_state()
            st.sums = EpochSums()
        else:  # resuming inside the epoch: redraw the same permutation
            self.data_gen.set_state(st.epoch_rng)
        self.callback.on_epoch_start(epoch, self.n_batches, st.batch)
        self.model.train()
        batches = iterate_batches(
            data.x_train,
            data.y_train,
            self.config.batch_size,
            generator=self.data_gen,
            drop_last=self.config.drop_last,
            start=st.batch,
        )
        for xb, yb in batches:
            self._step(xb, yb)
            self._check_stop()
            self.callback.on_step(epoch, st.batch, *st.sums.means(data.task))
            self._check_stop()
        self._finish_epoch(epoch)
        self._check_stop()

    def _step(self, xb: torch.Tensor, yb: torch.Tensor) -> None:
        """One optimizer step on a global batch, added to the epoch's sums."""
        if self.world > 1:
            xb, yb = _shard(xb, yb, self.rank, self.world)
        classification = self.data.task == "classification"
        sums = self.state.sums
        self.in_step = True
        ts = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        output = self.net(xb)
        loss = self.loss_fn(output, yb)
        loss.backward()
        self.optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        sums.step_s += time.perf_counter() - ts
        sums.steps += 1
        nb = xb.shape[0]
        batch_loss = loss.item() * nb
        batch_correct = float((output.argmax(1) == yb).sum().item()) if classification else 0.0
        if self.world > 1:  # metrics of the whole batch; stop when any rank asks
            batch_loss, batch_correct, nb, asked = _sum_over_ranks(
                [batch_loss, batch_correct, nb, float(self.stop.requested)]
            )
            self.stop.agreed = asked > 0
        sums.loss_sum += batch_loss
        sums.count += nb
        if classification:
            sums.correct += batch_correct
        self.state.batch += 1
        self.in_step = False

    def evaluate_views(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """``(loss, acc)`` on the standardised test inputs (``test_*``), then on the raw ones
        (``raw_test_*``; ``NaN`` where the data set has none)."""
        d, bs = self.data, self.config.eval_batch_size
        views = []
        for x in (d.x_test, d.x_raw):
            if x is None:
                views.append((math.nan, math.nan))
            elif self.world > 1:
                views.append(_evaluate_sharded(
                    self.model, x, d.y_test, d.task, bs, self.rank, self.world, self.stop
                ))
            else:
                views.append(evaluate(self.model, x, d.y_test, d.task, bs))
        return views[0], views[1]

    def _finish_epoch(self, epoch: int) -> None:
        (test_loss, test_acc), (raw_loss, raw_acc) = self.evaluate_views()
        st = self.state
        train_loss, train_acc = st.sums.means(self.data.task)
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_acc": train_acc,
            "test_loss": test_loss,
            "test_acc": test_acc,
            "raw_test_loss": raw_loss,
            "raw_test_acc": raw_acc,
            "wall_time_s": self._wall_time(),
            "mean_step_ms": 1000.0 * st.sums.step_s / max(1.0, st.sums.steps),
        }
        st.metrics.append(row)
        st.epoch, st.batch, st.sums = epoch, 0, EpochSums()
        if self.lead:
            _write_metrics(self.out / METRICS_NAME, st.metrics)
        self.save()
        self.callback.on_epoch_end(row)


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
        resume: continue from the newest good checkpoint in ``out_dir`` if there is one
            (a run that already reached ``config.epochs`` returns immediately); otherwise
            start from scratch, overwriting ``metrics.csv`` and the checkpoint.
        callback: progress hooks.
        data: pre-loaded data (otherwise :func:`~kldwrm.experiments.data.load_dataset`).
        optimizer_factory: ``(name, model, **kwargs) -> Optimizer``; default
            ``kldwrm.make_optimizer``.

    Returns:
        :class:`TrainResult`; ``interrupted`` is True when Ctrl-C (SIGINT) or a callback's
        KeyboardInterrupt stopped the run, after the checkpoint was saved.

    Raises:
        InvalidRunError: a bad setting, model or hyperparameter.
        ConfigMismatchError: ``out_dir`` holds a run with other settings (``resume``).
        CheckpointError: the checkpoint is damaged and there is no previous one (``resume``).
    """
    _check_settings(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    session = _Session(
        config, out, callback or TrainCallback(), data, optimizer_factory or get_optimizer_factory()
    )
    session.start(resume)
    try:
        with _graceful_sigint(session.stop):
            for epoch in range(session.state.epoch + 1, config.epochs + 1):
                session.run_epoch(epoch)
    except (KeyboardInterrupt, _StopRequested) as exc:
        if session.world > 1 and isinstance(exc, KeyboardInterrupt):
            raise  # not agreed by every rank: saving (a collective) could not complete
        if not session.in_step:  # everything up to the last finished step is recorded
            session.save()
        return TrainResult(out, session.state.metrics, True, False, session.saved)
    metrics = session.state.metrics
    finished = bool(metrics) and int(metrics[-1]["epoch"]) >= config.epochs
    if not metrics and config.epochs <= 0:
        finished = True
    return TrainResult(out, metrics, False, finished, session.saved)


# ----------------------------------------------------------------------------- distributed


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
) -> tuple[float, float]:
    """:func:`evaluate` over the whole set, each rank on its contiguous share."""
    xs, ys = x.tensor_split(world)[rank], y.tensor_split(world)[rank]
    n = xs.shape[0]
    loss, acc = evaluate(model, xs, ys, task, batch_size) if n else (0.0, 0.0)
    correct = acc * n if task == "classification" and n else 0.0
    total, right, count, asked = _sum_over_ranks(
        [loss * n, correct, float(n), float(stop.requested)]
    )
    stop.agreed = stop.agreed or asked > 0
    return total / count, right / count if task == "classification" else math.nan
