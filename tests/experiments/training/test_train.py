"""Training loop, checkpoints, bit-exact resume, the sweep runner and the CLI."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import kldwrm
from kldwrm.experiments.cli import main
from kldwrm.experiments.study.reproduce import (
    ReproduceOptions,
    plan_runs,
    released,
    reproduce,
    solver_hyperparameters,
)
from kldwrm.experiments.training.train import (
    METRIC_FIELDS,
    CheckpointError,
    ConfigMismatchError,
    InvalidRunError,
    TrainCallback,
    TrainConfig,
    checkpoint_status,
    read_metrics,
    run_is_finished,
    train,
    validate_config,
)

HAS_KFAC = hasattr(kldwrm, "make_optimizer") and "kfac" in getattr(kldwrm, "OPTIMIZERS", ())
CURV = "kfac" if HAS_KFAC else "sgd"
EXACT = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "raw_test_loss",
         "raw_test_acc")


def _config(epochs: int, **kw) -> TrainConfig:
    opt_kw = dict(lr=0.01, update_freq=3) if CURV == "kfac" else dict(lr=0.05)
    base = dict(
        dataset="mnist",
        optimizer=CURV,
        optimizer_kwargs=opt_kw,
        epochs=epochs,
        batch_size=256,
        subset=1024,
        seed=7,
    )
    base.update(kw)
    return TrainConfig(**base)


def _exact(rows):
    return [{k: r[k] for k in EXACT} for r in rows]


@pytest.fixture(scope="module")
def small(mnist):
    """MNIST with the first 2,000 test images (keeps the per-epoch evaluation cheap)."""
    return replace(mnist, x_test=mnist.x_test[:2000], y_test=mnist.y_test[:2000],
                   x_test_raw=mnist.x_test_raw[:2000])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, small):
    """Reference: 2 epochs without interruption."""
    out = tmp_path_factory.mktemp("ref")
    res = train(_config(2), out, data=small)
    assert res.finished and not res.interrupted
    return res


def test_metrics_file_and_values(uninterrupted):
    rows = read_metrics(uninterrupted.metrics_path)
    with open(uninterrupted.metrics_path) as fh:
        assert next(csv.reader(fh)) == list(METRIC_FIELDS)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows == uninterrupted.metrics  # the file holds exactly what train returned
    for r in rows:
        assert 0.0 < r["train_acc"] <= 1.0 and 0.0 < r["test_acc"] <= 1.0
        assert 0.0 < r["test_loss"] < 2.5 and r["mean_step_ms"] > 0
    assert rows[1]["wall_time_s"] > rows[0]["wall_time_s"] > 0
    # learning happens: 1,024 images, 8 steps, better than chance by far
    assert rows[1]["test_acc"] > 0.3
    # test accuracy is a count over the 2,000 test images
    assert rows[1]["test_acc"] * 2000 == pytest.approx(round(rows[1]["test_acc"] * 2000))


def test_both_test_views_are_evaluated_every_epoch(uninterrupted, small):
    """``test_*`` on standardised inputs and ``raw_test_*`` on the raw pixels, recomputed
    here from the saved model on each view."""
    from kldwrm.experiments.data.models import build_model
    from kldwrm.experiments.training.train import evaluate

    state = torch.load(uninterrupted.out_dir / "checkpoint.pt", weights_only=True)
    model = build_model("paper-cnn")
    model.load_state_dict(state["model"])
    last = read_metrics(uninterrupted.metrics_path)[-1]
    assert torch.allclose(small.x_test, (small.x_test_raw - 0.1307) / 0.3081)
    for x, prefix in ((small.x_test, "test"), (small.x_test_raw, "raw_test")):
        loss, acc = evaluate(model, x, small.y_test)
        assert last[f"{prefix}_loss"] == pytest.approx(loss, rel=1e-6)
        assert last[f"{prefix}_acc"] == acc
    assert last["raw_test_loss"] != last["test_loss"]


def test_checkpoint_loads_with_weights_only(uninterrupted):
    state = torch.load(uninterrupted.out_dir / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2 and state["batch"] == 0
    assert set(state) >= {
        "model",
        "optimizer",
        "torch_rng",
        "data_rng",
        "epoch_rng",
        "metrics",
        "config",
    }
    assert state["config"]["optimizer"] == CURV
    assert [m["epoch"] for m in state["metrics"]] == [1, 2]
    if CURV == "kfac":
        assert "kldwrm" in state["optimizer"]
    assert checkpoint_status(uninterrupted.out_dir, _config(2)) == "finished"
    assert checkpoint_status(uninterrupted.out_dir, _config(3)) == "partial"


def test_an_archived_run_without_its_checkpoint_counts_as_finished(tmp_path, uninterrupted):
    """A study kept in git has metrics.csv and config.json only (checkpoints are large)."""
    import shutil

    for name in ("metrics.csv", "config.json"):
        shutil.copy(uninterrupted.out_dir / name, tmp_path / name)
    assert checkpoint_status(tmp_path, _config(2)) == "finished"
    assert checkpoint_status(tmp_path, _config(1)) == "finished"
    assert checkpoint_status(tmp_path, _config(3)) == "missing"  # rerun from scratch
    with pytest.raises(ConfigMismatchError, match="seed"):
        checkpoint_status(tmp_path, _config(2, seed=8))
    (tmp_path / "config.json").unlink()
    assert checkpoint_status(tmp_path, _config(2)) == "missing"


def test_resume_after_epoch_1_is_bit_exact(tmp_path, small, uninterrupted):
    first = train(_config(1), tmp_path, data=small)
    assert first.finished and len(first.metrics) == 1
    resumed = train(_config(2), tmp_path, data=small, resume=True)
    assert _exact(resumed.metrics) == _exact(uninterrupted.metrics)
    assert _exact(read_metrics(tmp_path / "metrics.csv")) == _exact(uninterrupted.metrics)
    a = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(uninterrupted.out_dir / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_records_the_devices_it_trained_on_across_a_resume(tmp_path, small):
    first = train(_config(1), tmp_path, data=small)
    assert json.loads((tmp_path / "config.json").read_text())["devices"] == ["cpu"]
    # as if epoch 1 had run on a GPU before the history was kept: the resume on the CPU
    # adds the CPU after it (the device is a setting a resume may change)
    path = first.out_dir / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    assert state["devices"] == ["cpu"]
    del state["devices"]
    state["config"]["device"] = "cuda:0"
    torch.save(state, path)
    (tmp_path / "checkpoint.prev.pt").unlink(missing_ok=True)
    train(_config(2), tmp_path, data=small, resume=True)
    assert json.loads((tmp_path / "config.json").read_text())["devices"] == ["cuda", "cpu"]
    assert torch.load(path, weights_only=True)["devices"] == ["cuda", "cpu"]
    train(_config(3), tmp_path, data=small, resume=True)  # same device: nothing to add
    assert torch.load(path, weights_only=True)["devices"] == ["cuda", "cpu"]


class _StopAt(TrainCallback):
    def __init__(self, epoch: int, batch: int, how: str = "raise") -> None:
        self.epoch, self.batch, self.how = epoch, batch, how

    def on_step(self, epoch: int, batch: int, loss: float, acc: float) -> None:
        if (epoch, batch) == (self.epoch, self.batch):
            if self.how == "raise":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C


@pytest.mark.parametrize("how", ["raise", "sigint"])
def test_interrupt_mid_epoch_saves_and_resumes_exactly(tmp_path, small, uninterrupted, how):
    handler_before = signal.getsignal(signal.SIGINT)
    res = train(_config(2), tmp_path, data=small, callback=_StopAt(2, 2, how))
    assert signal.getsignal(signal.SIGINT) is handler_before  # handler restored
    assert res.interrupted and not res.finished
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["batch"]) == (1, 2)
    assert len(read_metrics(tmp_path / "metrics.csv")) == 1
    assert checkpoint_status(tmp_path, _config(2)) == "partial"
    resumed = train(_config(2), tmp_path, data=small, resume=True)
    assert resumed.finished
    assert _exact(resumed.metrics) == _exact(uninterrupted.metrics)


def test_resume_with_other_settings_is_refused(tmp_path, small):
    train(_config(1, subset=512), tmp_path, data=small)
    other = _config(1, subset=512, seed=8)
    with pytest.raises(ConfigMismatchError, match="seed"):
        train(other, tmp_path, data=small, resume=True)
    with pytest.raises(ConfigMismatchError):
        checkpoint_status(tmp_path, other)


class _Notices(TrainCallback):
    def __init__(self) -> None:
        self.notices: list[str] = []

    def on_notice(self, message: str) -> None:
        self.notices.append(message)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_damaged_checkpoint_is_replaced_by_the_previous_one(tmp_path, small, uninterrupted):
    train(_config(2), tmp_path, data=small)
    prev = torch.load(tmp_path / "checkpoint.prev.pt", weights_only=True)
    assert (prev["epoch"], prev["batch"]) == (1, 0)  # kept when epoch 2 was saved
    _truncate(tmp_path / "checkpoint.pt")
    assert checkpoint_status(tmp_path, _config(2)) == "partial"  # through the previous one
    assert run_is_finished(tmp_path, 1) and not run_is_finished(tmp_path, 2)
    cb = _Notices()
    resumed = train(_config(2), tmp_path, data=small, resume=True, callback=cb)
    assert len(cb.notices) == 1
    assert "checkpoint.pt is damaged" in cb.notices[0]
    assert f"resuming from {tmp_path / 'checkpoint.prev.pt'}" in cb.notices[0]
    assert resumed.finished and resumed.checkpoint == tmp_path / "checkpoint.pt"
    assert _exact(resumed.metrics) == _exact(uninterrupted.metrics)
    a = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(uninterrupted.out_dir / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_damaged_checkpoint_without_a_previous_one_stops_the_resume(tmp_path, small):
    train(_config(1, subset=512), tmp_path, data=small)
    assert not (tmp_path / "checkpoint.prev.pt").exists()
    _truncate(tmp_path / "checkpoint.pt")
    damaged = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(CheckpointError, match="no previous checkpoint") as exc:
        train(_config(1, subset=512), tmp_path, data=small, resume=True)
    assert exc.value.path == tmp_path / "checkpoint.pt"
    with pytest.raises(CheckpointError, match="delete it to start the run over"):
        checkpoint_status(tmp_path, _config(1, subset=512))
    assert (tmp_path / "checkpoint.pt").read_bytes() == damaged
    # starting over replaces the damaged file without keeping it as the previous one
    res = train(_config(1, subset=512), tmp_path, data=small)
    assert res.finished and not (tmp_path / "checkpoint.prev.pt").exists()
    torch.save({"not": "a checkpoint"}, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="not a kldwrm training checkpoint"):
        checkpoint_status(tmp_path, _config(1, subset=512))


def test_the_default_notice_is_a_warning():
    with pytest.warns(UserWarning, match="resuming"):
        TrainCallback().on_notice("checkpoint.pt is damaged; resuming from ...")


def test_a_second_ctrl_c_inside_a_step_stops_without_saving(tmp_path, small):
    from kldwrm import make_optimizer

    def factory(name, model, **kw):
        opt = make_optimizer(name, model, **kw)
        real_step, calls = opt.step, [0]

        def step(*args, **kwargs):
            calls[0] += 1
            if calls[0] == 3:  # Ctrl-C twice while the third step runs
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)
            return real_step(*args, **kwargs)

        opt.step = step
        return opt

    handler_before = signal.getsignal(signal.SIGINT)
    res = train(_config(2), tmp_path, data=small, optimizer_factory=factory)
    assert signal.getsignal(signal.SIGINT) is handler_before
    assert res.interrupted and not res.finished and res.checkpoint is None
    assert not (tmp_path / "checkpoint.pt").exists()  # a half-done step is not saved
    assert read_metrics(tmp_path / "metrics.csv") == []


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (dict(optimizer_kwargs=dict(lr=-1.0)), "lr"),
        (dict(optimizer_kwargs=dict(window=3)), "'window'"),
        (dict(model="nosuch:thing"), "nosuch"),
        (dict(batch_size=0), "batch_size"),
        (dict(epochs=-1), "epochs"),
        (dict(subset=0), "subset"),
    ],
)
def test_invalid_runs_are_refused_before_they_start(tmp_path, change, says):
    config = replace(_config(1), **change)
    rng = torch.get_rng_state()
    with pytest.raises(InvalidRunError, match=says):
        validate_config(config)
    assert torch.equal(torch.get_rng_state(), rng)
    with pytest.raises(InvalidRunError, match=says):
        train(config, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_validate_config_leaves_the_global_rng_alone():
    rng = torch.get_rng_state()
    validate_config(_config(1))
    assert torch.equal(torch.get_rng_state(), rng)


def test_regression_training(tmp_path):
    opt = "kfac" if HAS_KFAC else "sgd"
    kw = dict(lr=0.01, likelihood="gaussian") if HAS_KFAC else dict(lr=0.05)
    cfg = TrainConfig(
        dataset="regression",
        model="regression-mlp",
        optimizer=opt,
        optimizer_kwargs=kw,
        epochs=2,
        batch_size=100,
    )
    res = train(cfg, tmp_path)
    assert [r["epoch"] for r in res.metrics] == [1, 2]
    assert all(math.isnan(r["test_acc"]) and math.isnan(r["train_acc"]) for r in res.metrics)
    assert all(math.isfinite(r["test_loss"]) for r in res.metrics)
    # the test MSE of a zero prediction is about Var(y) ≈ 0.34; training lowers it
    assert res.metrics[-1]["test_loss"] < 0.34


def test_solver_hyperparameters_follow_design():
    kfac = solver_hyperparameters("kfac")
    assert kfac == dict(
        lr=0.01, rho=0.95, damping=1e-2, weight_decay=1e-3, kl_clip=0.1, update_freq=30,
        fisher="mc", bias="homogeneous",
    )
    assert solver_hyperparameters("so")["rho"] == 0.33
    q = solver_hyperparameters("q")
    assert (q["rho"], q["block_clip"], q["q_solve"]) == (0.5, 2.0, "exact")
    qe = solver_hyperparameters("qe")
    assert (qe["window"], qe["inner_steps"], qe["kl_weight"]) == (4, 10, 1 / 330)
    assert qe["inner_lr"] == 7e-4  # paper: ω/λ = 7e-4, the inner SGD's learning rate
    assert qe["inner_momentum"] == 0.0
    assert "kl_train_mode" not in qe
    rel = released(ReproduceOptions())
    qr = solver_hyperparameters("qe", rel)
    assert (qr["window"], qr["inner_steps"], qr["inner_momentum"]) == (3, 7, 0.5)
    assert qr["kl_weight"] == 1 / 660 and qr["inner_lr"] == pytest.approx(0.1 * 0.01)
    assert qr["fisher"] == "empirical" and qr["q_solve"] == "augmented" and qr["kl_train_mode"]
    specs = plan_runs(ReproduceOptions(out="o"))
    assert len(specs) == 40 and specs[0].out_dir == Path("o/mnist/kfac/seed0")
    assert all(s.config.batch_size == 512 and s.config.epochs == 50 for s in specs)
    assert qr["bias"] == "separate" and qr["damping"] == pytest.approx(0.011)
    kr = solver_hyperparameters("kfac", ReproduceOptions())
    assert kr["bias"] == "homogeneous" and kr["damping"] == 0.01


def test_reproduce_end_to_end_pool_skip_and_resume(tmp_path):
    opts = ReproduceOptions(
        out=tmp_path,
        solvers=("sgd", CURV if CURV != "sgd" else "adam"),
        seeds=(0,),
        epochs=1,
        subset=512,
        workers=2,
        threads=1,
    )
    events = []
    res = reproduce(opts, progress=events.append)
    assert not res.interrupted and [r.status for r in res.runs] == ["finished", "finished"]
    assert {e["kind"] for e in events} >= {"start", "epoch_end", "done"}
    report_dir = tmp_path / "report"
    for name in (
        "mnist_table1.md",
        "mnist_table1.csv",
        "mnist_figure1_test_loss.png",
        "mnist_figure2_test_accuracy.png",
        "mnist_time_to_98.csv",
    ):
        assert (report_dir / name).stat().st_size > 0
    assert (report_dir / "mnist_figure1_test_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(report_dir / "mnist_table1.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["view"] for r in rows} == {"normalised", "raw"}
    table = {(r["solver"], r["source"]): r for r in rows if r["view"] == "normalised"}
    raw = {(r["solver"], r["source"]): r for r in rows if r["view"] == "raw"}
    for solver in opts.solvers:
        run = tmp_path / "mnist" / solver / "seed0"
        last = read_metrics(run / "metrics.csv")[-1]
        row = table[(solver, "this run")]
        assert float(row["acc_mean"]) == pytest.approx(100 * last["test_acc"], abs=1e-9)
        assert float(row["loss_mean"]) == pytest.approx(last["test_loss"], abs=1e-12)
        assert int(row["runs"]) == 1 and int(row["epoch"]) == 1
        assert int(row["n_acc_ge_98"]) == int(last["test_acc"] >= 0.98)
        assert row["acc_sd"] == "nan"  # one run: no sample SD
        assert f"{100 * last['test_acc']:.2f}" in res.report
        assert float(raw[(solver, "this run")]["loss_mean"]) == pytest.approx(
            last["raw_test_loss"], abs=1e-12)
    if CURV == "kfac":  # the paper's rows sit beside the raw view, where they come from
        assert raw[("kfac", "paper")]["acc_mean"] == "96.19"
        assert ("kfac", "paper") not in table

    ckpts = sorted(tmp_path.glob("mnist/*/seed0/checkpoint.pt"))
    mtimes = [p.stat().st_mtime_ns for p in ckpts]
    again = reproduce(ReproduceOptions(**{**opts.__dict__, "workers": 1}))
    assert [r.status for r in again.runs] == ["skipped", "skipped"]
    assert [p.stat().st_mtime_ns for p in ckpts] == mtimes
    more = reproduce(ReproduceOptions(**{**opts.__dict__, "workers": 1, "epochs": 2}))
    assert [r.status for r in more.runs] == ["finished", "finished"]
    assert all(len(read_metrics(p.parent / "metrics.csv")) == 2 for p in ckpts)


def test_cli_train_and_report(tmp_path, capsys):
    out = tmp_path / "mnist" / "adam" / "seed3"
    rc = main(
        [
            "train",
            "--optimizer",
            "adam",
            "--lr",
            "0.002",
            "--subset",
            "600",
            "--epochs",
            "1",
            "--batch-size",
            "200",
            "--seed",
            "3",
            "--out",
            str(out),
            "--no-progress",
            "--threads",
            str(torch.get_num_threads()),
        ]
    )
    assert rc == 0
    rows = read_metrics(out / "metrics.csv")
    assert len(rows) == 1
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["config"]["optimizer_kwargs"] == {"lr": 0.002}
    assert state["optimizer"]["param_groups"][0]["lr"] == 0.002
    capsys.readouterr()
    assert main(["report", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "| Adam | this run (epoch 1) | 1 |" in text
    assert f"{100 * rows[0]['test_acc']:.2f}" in text
    assert (tmp_path / "report" / "mnist_figure2_test_accuracy.png").is_file()


def test_cli_errors_and_python_m(tmp_path, capsys):
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no runs" in capsys.readouterr().err
    proc = subprocess.run(
        [sys.executable, "-m", "kldwrm", "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0
    for cmd in ("train", "compare", "reproduce", "report"):
        assert cmd in proc.stdout
