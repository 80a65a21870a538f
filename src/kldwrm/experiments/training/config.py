"""What defines a training run, and what is built from it.

:class:`TrainConfig` (the settings), :class:`TrainCallback` (progress hooks),
:class:`TrainResult` (the outcome), the errors that refuse a run
(:class:`InvalidRunError`, :class:`ConfigMismatchError`), and the builders of a run's
pieces from its configuration: the device and rank placement, the data on the device, the
model (wrapped in ``DistributedDataParallel`` under ``torchrun``) and the optimizer.
:func:`validate_config` builds the model and optimizer once to refuse a bad run early.
"""

from __future__ import annotations

import numbers
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ... import distributed as kdist
from ..data.datasets import ChecksumError, TensorData, load_dataset
from ..data.models import build_model
from .metrics import METRICS_NAME

__all__ = [
    "ConfigMismatchError",
    "InvalidRunError",
    "OptimizerFactory",
    "TrainCallback",
    "TrainConfig",
    "TrainResult",
    "build_run",
    "check_settings",
    "get_optimizer_factory",
    "placement",
    "prepare_data",
    "resolve_device",
    "validate_config",
]

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
    """Outcome of :func:`~kldwrm.experiments.training.train.train`."""

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


# ----------------------------------------------------------------------------- checks


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


def check_settings(config: TrainConfig) -> None:
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
    check_settings(config)
    factory = optimizer_factory or get_optimizer_factory()
    with torch.random.fork_rng(devices=[]):
        _build_optimizer(config, _build_model(config), factory)


# ----------------------------------------------------------------------------- building


def placement(config: TrainConfig) -> tuple[torch.device, int, int]:
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


def prepare_data(
    config: TrainConfig, data: TensorData | None, device: torch.device
) -> TensorData:
    """The run's data on ``device``: ``data`` (cut to ``config.subset`` training examples)
    or, without it, the data set ``config`` names."""
    if data is None:
        data = _load_data(config)
    elif config.subset is not None and data.x_train.shape[0] > config.subset:
        data = replace(data, x_train=data.x_train[: config.subset],
                       y_train=data.y_train[: config.subset])
    raw = data.x_test_raw
    return replace(
        data,
        x_train=data.x_train.to(device),
        y_train=data.y_train.to(device),
        x_test=data.x_test.to(device),
        y_test=data.y_test.to(device),
        x_test_raw=None if raw is None else raw.to(device),
    )


def build_run(
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
