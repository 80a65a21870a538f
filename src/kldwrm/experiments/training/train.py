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

This module holds ``_Session`` (one call of :func:`train`: restore, save, the epoch loop)
and :func:`train`, and re-exports the public names of the pieces it is built from:

- :mod:`.config`: :class:`TrainConfig`, :class:`TrainCallback`, :class:`TrainResult`, the
  errors, :func:`validate_config` and the builders of device, data, model and optimizer;
- :mod:`.metrics`: the metrics CSV and the evaluation of both test views;
- :mod:`.status`: :class:`RunState` (where a run stands) and :func:`checkpoint_status`;
- :mod:`.checkpoint`: the checkpoint files;
- :mod:`.interrupt` (Ctrl-C) and :mod:`.ranks` (the collectives of a distributed run).

The library never prints; progress is reported through :class:`TrainCallback`.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..data.datasets import TensorData, iterate_batches, num_batches
from .checkpoint import (
    CHECKPOINT_NAME,
    PREVIOUS_CHECKPOINT_NAME,
    CheckpointError,
    CheckpointFiles,
    LoadedCheckpoint,
    load_checkpoint,
)
from .config import (
    ConfigMismatchError,
    InvalidRunError,
    OptimizerFactory,
    TrainCallback,
    TrainConfig,
    TrainResult,
    build_run,
    check_settings,
    get_optimizer_factory,
    placement,
    prepare_data,
    resolve_device,
    validate_config,
)
from .interrupt import StopFlags, StopRequested, graceful_sigint
from .metrics import (
    METRIC_FIELDS,
    METRICS_NAME,
    count_correct,
    evaluate,
    evaluate_views,
    loss_fn,
    read_metrics,
    write_metrics,
)
from .ranks import gather, shard, sum_over_ranks
from .status import CONFIG_NAME as CONFIG_NAME
from .status import (
    EpochSums,
    RunState,
    check_same_run,
    checkpoint_status,
    device_history,
    run_is_finished,
    write_config,
)

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

#: version of the checkpoint dict's layout
_FORMAT = 1


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
        self.device, self.world, self.rank = placement(config)
        self.lead = self.rank == 0  # the only rank that writes files
        self.data = prepare_data(config, data, self.device)
        self.loss_fn = loss_fn(self.data.task)
        self.model, self.net, self.optimizer = build_run(
            config, self.device, self.world, self.rank, factory
        )
        self.data_gen = torch.Generator().manual_seed(config.seed)
        self.state = RunState(epoch_rng=self.data_gen.get_state())
        self.n_batches = num_batches(
            self.data.x_train.shape[0], config.batch_size, config.drop_last
        )
        self.files = CheckpointFiles(out)
        self.stop = StopFlags(self.world)
        self.in_step = False  # an interruption now leaves no consistent state to save
        self.saved: Path | None = None  # the checkpoint that holds the run
        self.devices = [self.device.type]  # the device types this run has trained on
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
            write_metrics(self.out / METRICS_NAME, self.state.metrics)
            write_config(self.out, self.config, self.devices)
        self.t0 = time.perf_counter()

    def _restore(self, loaded: LoadedCheckpoint) -> None:
        state, path = loaded.state, loaded.path
        check_same_run(state.get("config", {}), self.config, path)
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
        self.devices = device_history(state)
        if self.devices[-1] != self.device.type:  # resumed on another device type
            self.devices.append(self.device.type)

    def _wall_time(self) -> float:
        return self.state.wall_before + time.perf_counter() - self.t0

    def save(self) -> None:
        """Checkpoint the current state (with several ranks a collective: rank 0 writes
        every rank's RNG states)."""
        rng_ranks = self._gather_rng_states()
        self.saved = self.files.path
        if self.lead:
            self.files.save(self._checkpoint(rng_ranks))

    def _gather_rng_states(self) -> dict[str, list[torch.Tensor] | None]:
        """Every rank's torch (and CUDA) RNG state, with several ranks (a collective)."""
        if self.world == 1:
            return {}
        cuda = self.device.type == "cuda"
        return {
            "torch_rng_ranks": gather(torch.get_rng_state(), self.world),
            "cuda_rng_ranks": (
                gather(torch.cuda.get_rng_state(self.device), self.world) if cuda else None
            ),
        }

    def _checkpoint(self, rng_ranks: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint dict of the current state (``rng_ranks`` from
        :meth:`_gather_rng_states`)."""
        cuda = self.device.type == "cuda"
        st = self.state
        return {
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
            "devices": list(self.devices),
            **rng_ranks,
        }

    # -- the loop

    def _check_stop(self) -> None:
        if self.stop():
            raise StopRequested

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
            xb, yb = shard(xb, yb, self.rank, self.world)
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
        batch_correct = float(count_correct(output, yb)) if classification else 0.0
        if self.world > 1:  # metrics of the whole batch; stop when any rank asks
            batch_loss, batch_correct, nb, asked = sum_over_ranks(
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
        """:func:`~.metrics.evaluate_views` of the model on this run's test set."""
        return evaluate_views(
            self.model, self.data, self.config.eval_batch_size, self.rank, self.world, self.stop
        )

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
            write_metrics(self.out / METRICS_NAME, st.metrics)
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
        data: pre-loaded data (otherwise :func:`~kldwrm.experiments.data.datasets.load_dataset`).
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
    check_settings(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    session = _Session(
        config, out, callback or TrainCallback(), data, optimizer_factory or get_optimizer_factory()
    )
    session.start(resume)
    try:
        with graceful_sigint(session.stop):
            for epoch in range(session.state.epoch + 1, config.epochs + 1):
                session.run_epoch(epoch)
    except (KeyboardInterrupt, StopRequested) as exc:
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
