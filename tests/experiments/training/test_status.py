"""Where a run stands: :class:`RunState` and the status of a run directory
(:mod:`kldwrm.experiments.training.status`). Whole training runs are in ``test_train.py``."""

from __future__ import annotations

import pytest
import torch

from kldwrm.experiments.training.checkpoint import CHECKPOINT_NAME, CheckpointFiles
from kldwrm.experiments.training.config import ConfigMismatchError, TrainConfig
from kldwrm.experiments.training.metrics import METRIC_FIELDS, METRICS_NAME, write_metrics
from kldwrm.experiments.training.status import (
    CONFIG_NAME,
    EpochSums,
    RunState,
    check_same_run,
    checkpoint_status,
    is_finished,
    run_is_finished,
    write_config,
)


def _checkpoint(config: TrainConfig, epoch: int, batch: int) -> dict:
    return {
        "config": config.to_dict(),
        "epoch": epoch,
        "batch": batch,
        "model": {},
        "optimizer": {},
        "running": {"loss_sum": 2.5, "correct": 3, "count": 4, "step_s": 0.5, "steps": 2},
        "metrics": [{"epoch": 1, "test_acc": 0.5}] * epoch,
        "wall_time_s": 7,
        "epoch_rng": torch.Generator().manual_seed(1).get_state(),
    }


def test_run_state_from_a_checkpoint():
    state = RunState.from_checkpoint(_checkpoint(TrainConfig(), 1, 2))
    assert (state.epoch, state.batch, state.wall_before) == (1, 2, 7.0)
    assert state.sums == EpochSums(2.5, 3.0, 4.0, 0.5, 2.0)
    assert state.sums.means("classification") == (2.5 / 4, 3 / 4)
    assert state.metrics == [{"epoch": 1, "test_acc": 0.5}]


def test_status_of_a_checkpointed_run(tmp_path):
    config = TrainConfig(epochs=2)
    assert checkpoint_status(tmp_path, config) == "missing"
    files = CheckpointFiles(tmp_path)
    files.save(_checkpoint(config, 1, 3))
    assert checkpoint_status(tmp_path, config) == "partial"
    assert run_is_finished(tmp_path, 1) is False  # mid-epoch 2
    files.save(_checkpoint(config, 2, 0))
    assert checkpoint_status(tmp_path, config) == "finished"
    assert run_is_finished(tmp_path, 2) and not run_is_finished(tmp_path, 3)
    # the settings a resumed run may change do not count
    free = TrainConfig(epochs=2, device="auto", data_dir="x", eval_batch_size=7)
    assert checkpoint_status(tmp_path, free) == "finished"
    with pytest.raises(ConfigMismatchError, match=f"{CHECKPOINT_NAME}.*batch_size"):
        checkpoint_status(tmp_path, TrainConfig(epochs=2, batch_size=3))


def test_status_of_an_archived_run(tmp_path):
    config = TrainConfig(epochs=2)
    write_config(tmp_path, config)
    assert checkpoint_status(tmp_path, config) == "missing"  # no metrics.csv
    rows = [{k: 0.5 for k in METRIC_FIELDS} | {"epoch": e} for e in (1, 2)]
    write_metrics(tmp_path / METRICS_NAME, rows)
    assert checkpoint_status(tmp_path, config) == "finished"
    assert checkpoint_status(tmp_path, TrainConfig(epochs=3)) == "missing"
    with pytest.raises(ConfigMismatchError, match=f"{CONFIG_NAME}.*seed"):
        checkpoint_status(tmp_path, TrainConfig(epochs=2, seed=1))


def test_is_finished_and_check_same_run(tmp_path):
    assert is_finished({"epoch": 3, "batch": 0}, 3) and not is_finished({"epoch": 3}, 4)
    assert not is_finished({"epoch": 3, "batch": 1}, 3) and is_finished({}, 0)
    check_same_run(TrainConfig(epochs=9).to_dict(), TrainConfig(), tmp_path)
    with pytest.raises(ConfigMismatchError, match="optimizer: 'kfac' .* vs 'sgd'"):
        check_same_run(TrainConfig().to_dict(), TrainConfig(optimizer="sgd"), tmp_path)


def test_a_setting_added_after_a_run_was_saved_counts_as_its_default(tmp_path):
    """An archived run's config.json from before a new setting existed still matches."""
    saved = TrainConfig().to_dict()
    saved.pop("drop_last")  # as if written before `drop_last` existed
    check_same_run(saved, TrainConfig(), tmp_path)
    with pytest.raises(ConfigMismatchError, match="drop_last"):
        check_same_run(saved, TrainConfig(drop_last=True), tmp_path)
