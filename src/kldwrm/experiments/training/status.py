"""Where a run stands: in memory during a session (:class:`RunState`), and on disk.

A run directory is ``"missing"``, ``"partial"`` or ``"finished"``
(:func:`checkpoint_status`), judged from its newest good checkpoint (:mod:`.checkpoint`),
or, for a run archived without its checkpoint, from ``config.json`` and ``metrics.csv``.
A checkpoint or an archived configuration written for other settings is refused
(:func:`check_same_run`, :class:`~.config.ConfigMismatchError`); only the settings in
:data:`RESUME_FREE` may change when a run is resumed. The device is one of them, so a run
records the device types it trained on (:func:`device_history`): its seconds are comparable
only with runs on the same hardware.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import atomic_write, load_latest
from .config import ConfigMismatchError, TrainConfig
from .metrics import METRICS_NAME, read_metrics

__all__ = [
    "CONFIG_NAME",
    "RESUME_FREE",
    "EpochSums",
    "RunState",
    "check_same_run",
    "device_history",
    "checkpoint_status",
    "is_finished",
    "run_is_finished",
    "write_config",
]

CONFIG_NAME = "config.json"

#: Settings that may differ between a checkpoint and a resumed run.
RESUME_FREE = ("epochs", "device", "data_dir", "eval_batch_size")


# ----------------------------------------------------------------------------- in memory


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
    #: one row per finished epoch (:data:`~.metrics.METRIC_FIELDS`)
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


# ----------------------------------------------------------------------------- on disk


def write_config(
    out_dir: Path, config: TrainConfig, devices: Sequence[str] | None = None
) -> None:
    """Write ``config.json`` (informational; an archived run is judged by it). ``devices``:
    the device types the run has trained on, in order (a run resumed elsewhere has two);
    written as ``"devices"`` beside the configuration's fields."""
    record: dict[str, Any] = config.to_dict()
    if devices is not None:
        record["devices"] = list(devices)
    text = json.dumps(record, indent=2, sort_keys=True)
    atomic_write(out_dir / CONFIG_NAME, lambda fh: fh.write(text), text=True)


def device_history(saved: Mapping[str, Any]) -> list[str]:
    """The device types a run has trained on, from its saved ``config.json`` record or its
    checkpoint dict: the ``"devices"`` it lists, else the type of its configuration's
    ``"device"`` (a run written before the history was kept); ``"auto"`` stays ``"auto"``
    (the device it resolved to was not recorded)."""
    if saved.get("devices"):
        return [str(d) for d in saved["devices"]]
    config = saved.get("config", saved)
    device = str(config.get("device", TrainConfig().device))
    return [device if device == "auto" else torch.device(device).type]


def is_finished(state: Mapping[str, Any], epochs: int) -> bool:
    """Whether the checkpoint dict ``state`` was saved at the end of epoch ``epochs`` or
    later."""
    return int(state.get("epoch", 0)) >= epochs and int(state.get("batch", 0)) == 0


def run_is_finished(out_dir: str | os.PathLike[str], epochs: int) -> bool:
    """Whether the run in ``out_dir`` has completed at least ``epochs`` epochs.

    Raises:
        CheckpointError: the checkpoint is damaged and there is no previous one.
    """
    loaded = load_latest(out_dir)
    return loaded is not None and is_finished(loaded.state, epochs)


def check_same_run(saved: Mapping[str, Any], config: TrainConfig, where: Path) -> None:
    """Refuse ``config`` when the configuration ``saved`` in ``where`` differs from it in a
    setting outside :data:`RESUME_FREE`. A setting the saved configuration lacks (written
    before the setting existed) counts as its default.

    Raises:
        ConfigMismatchError: naming every difference.
    """
    current = config.to_dict()
    defaults = TrainConfig().to_dict()
    diffs = [
        f"{k}: {saved.get(k, defaults[k])!r} (saved) vs {current[k]!r} (requested)"
        for k in current
        if k not in RESUME_FREE and saved.get(k, defaults[k]) != current[k]
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
    check_same_run(loaded.state.get("config", {}), config, loaded.path)
    return "finished" if is_finished(loaded.state, config.epochs) else "partial"


def _archived_status(out_dir: Path, config: TrainConfig) -> str:
    cfg, metrics = out_dir / CONFIG_NAME, out_dir / METRICS_NAME
    if not (cfg.is_file() and metrics.is_file()):
        return "missing"
    check_same_run(json.loads(cfg.read_text()), config, cfg)
    epochs = [int(r["epoch"]) for r in read_metrics(metrics)]
    done = epochs[: config.epochs] == list(range(1, config.epochs + 1))
    return "finished" if done else "missing"
