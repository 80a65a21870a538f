"""The command line answers bad input like a command-line tool, keeps damaged runs, and
``kldwrm compare`` reports step times measured in one process.

Errors found after parsing: exit status 2 and one ``kldwrm: error:`` line on stderr, no
traceback. argparse's own errors: usage, then its ``error:`` line, exit status 2.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kldwrm.experiments.cli import main
from kldwrm.experiments.study import timing
from kldwrm.experiments.study.report import protocol_comparison
from kldwrm.experiments.training.checkpoint import atomic_write
from kldwrm.experiments.training.train import read_metrics

from ..report_fixture import write_runs

ROOT = Path(__file__).resolve().parents[3]


def _one_error_line(capsys, argv: list[str]) -> str:
    """Run ``main(argv)``; assert status 2 and a single ``kldwrm: error:`` line; return it."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kldwrm: error: "), err
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["train", "--lr", "-1"], "lr must be > 0"),  # the optimizer's own message
        (["train", "--optimizer", "sgd", "--lr", "-1"], "learning rate"),
        (["train", "--model", "nosuch:thing"], "nosuch"),
        (["train", "--optimizer", "kfac", "--window", "3"], "'window'"),
        (["train", "--dataset", "nosuch"], "unknown data set"),
        (["reproduce", "--seeds", "abc"], "--seeds"),
        (["reproduce", "--lr", "-1"], "lr must be > 0"),
        (["compare", "--seeds", "5-3"], "--seeds"),
        (["compare", "--model", "nosuch:thing"], "nosuch"),
    ],
)
def test_bad_input_is_one_error_line(capsys, tmp_path, argv, says):
    line = _one_error_line(capsys, [*argv, "--out", str(tmp_path / "run"), "--no-progress"])
    assert says in line
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # refused before training


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--epochs", "0"],
        ["train", "--epochs", "-3"],
        ["train", "--batch-size", "-5"],
        ["train", "--batch-size", "0"],
        ["train", "--subset", "0"],
        ["train", "--threads", "0"],
        ["train", "--seed", "-1"],
        ["train", "--dist-timeout", "0"],
        ["compare", "--workers", "0"],
        ["reproduce", "--epochs", "0"],
        ["report", "somewhere", "--epoch", "0"],
        ["report", "somewhere", "--epoch", "x"],
    ],
)
def test_invalid_numbers_are_usage_errors(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    option, value = argv[-2:]
    last = err.strip().splitlines()[-1]
    assert f"error: argument {option}: " in last and last.endswith(f"got {value}")


def test_python_m_prints_one_line_and_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "kldwrm", "train", "--lr", "-1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "kldwrm: error: optimizer 'kfac': lr must be > 0, got -1.0"
    ]
    assert proc.stdout == ""


# ----------------------------------------------------------------------------- checkpoints


def _train_args(out: Path, mnist_dir: Path, epochs: int) -> list[str]:
    return [
        "train", "--optimizer", "kfac", "--update-freq", "3", "--subset", "512",
        "--batch-size", "128", "--epochs", str(epochs), "--seed", "5", "--out", str(out),
        "--data-dir", str(mnist_dir), "--no-progress", "--threads", "1",
    ]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


EXACT = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "raw_test_loss",
         "raw_test_acc")


def _exact(rows: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: r[k] for k in EXACT} for r in rows]


def test_a_truncated_checkpoint_falls_back_on_the_previous_one(tmp_path, capsys, mnist_dir):
    out = tmp_path / "run"
    assert main(_train_args(out, mnist_dir, 2)) == 0
    reference = read_metrics(out / "metrics.csv")
    assert torch.load(out / "checkpoint.prev.pt", weights_only=True)["epoch"] == 1
    _truncate(out / "checkpoint.pt")
    capsys.readouterr()

    assert main([*_train_args(out, mnist_dir, 2), "--resume"]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("kldwrm: warning:")]
    assert len(warnings) == 1 and "Traceback" not in err
    assert "checkpoint.pt is damaged" in warnings[0] and "checkpoint.prev.pt" in warnings[0]
    assert "end of epoch 1" in warnings[0]
    # epoch 2 was trained again from the end of epoch 1: the same numbers, a good file
    assert _exact(read_metrics(out / "metrics.csv")) == _exact(reference)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["batch"]) == (2, 0)
    # the damaged file was not kept as the previous checkpoint
    assert torch.load(out / "checkpoint.prev.pt", weights_only=True)["epoch"] == 1


def test_a_damaged_checkpoint_without_a_previous_one_is_kept_and_named(
    tmp_path, capsys, mnist_dir
):
    out = tmp_path / "run"
    assert main(_train_args(out, mnist_dir, 1)) == 0
    assert not (out / "checkpoint.prev.pt").exists()  # one checkpoint written so far
    _truncate(out / "checkpoint.pt")
    damaged = (out / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    line = _one_error_line(capsys, [*_train_args(out, mnist_dir, 2), "--resume"])
    assert f"{out / 'checkpoint.pt'} is damaged" in line
    assert "delete it to start the run over" in line and "restore" in line
    assert (out / "checkpoint.pt").read_bytes() == damaged  # left for the user to restore

    (out / "checkpoint.pt").unlink()  # as the message says: a fresh start
    assert main([*_train_args(out, mnist_dir, 1), "--resume"]) == 0
    assert [r["epoch"] for r in read_metrics(out / "metrics.csv")] == [1]


# ----------------------------------------------------------------------------- file modes


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_writes_get_the_ordinary_file_mode(tmp_path, umask):
    target = tmp_path / "metrics.csv"
    atomic_write(target, lambda fh: fh.write("a,b\n"), text=True)
    assert _mode(target) == 0o666 & ~umask
    atomic_write(target, lambda fh: fh.write(b"new"), keep_previous=tmp_path / "prev")
    assert target.read_bytes() == b"new" and (tmp_path / "prev").read_text() == "a,b\n"
    assert _mode(target) == _mode(tmp_path / "prev") == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv", "prev"]  # no .tmp


def test_run_files_get_the_ordinary_file_mode(tmp_path, capsys, mnist_dir, umask):
    out = tmp_path / "run"
    assert main(_train_args(out, mnist_dir, 2)) == 0
    names = ["checkpoint.prev.pt", "checkpoint.pt", "config.json", "metrics.csv"]
    assert sorted(p.name for p in out.iterdir()) == names
    for name in names:
        assert _mode(out / name) == 0o666 & ~umask, name


# ----------------------------------------------------------------------------- compare


def test_compare_prints_an_interleaved_step_time_check(tmp_path, capsys, mnist_dir, monkeypatch):
    calls = []
    real = timing.time_configs

    def quick(configs, x, y, task="classification", **kw):
        calls.append((list(configs), x.shape[0], kw["threads"]))
        return real(configs, x, y, task, **{**kw, "rounds": 2, "budget_s": 0.001})

    monkeypatch.setattr(timing, "time_configs", quick)
    argv = ["compare", "--optimizers", "adam", "kfac", "--subset", "256", "--batch-size",
            "128", "--epochs", "1", "--workers", "1", "--threads", "1", "--out",
            str(tmp_path), "--data-dir", str(mnist_dir), "--no-progress"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    # SGD is timed as the baseline of the ratios even when it is not compared
    assert calls == [(["sgd", "adam", "kfac"], 128, 1)]
    table = text[text.index("Step time, quick check"):]
    assert "1 thread(s)" in table and "paper-cnn" in table and "2 rotating rounds" in table
    assert "| sgd |" in table and "| adam |" in table and "| kfac |" in table
    assert "| sgd | " in table and "| 1.00x |" in table
    assert "python -m benchmarks.run" in table

    assert main([*argv, "--no-timing"]) == 0  # the runs are finished: skipped
    assert "Step time" not in capsys.readouterr().out
    assert len(calls) == 1


# ----------------------------------------------------------------------------- report --protocols


@pytest.fixture()
def two_protocols(tmp_path) -> dict[str, Path]:
    roots = {name: write_runs(tmp_path / name) for name in ("corrected", "released")}
    (roots["released"] / "mnist" / "qe" / "seed1" / "metrics.csv").unlink()
    return roots


def test_report_protocols_prints_and_writes_the_comparison(capsys, tmp_path, two_protocols):
    argv = ["report", "--protocols", *(f"{k}={v}" for k, v in two_protocols.items())]
    expected = protocol_comparison(two_protocols, 2)
    out = tmp_path / "new" / "comparison.md"
    assert main([*argv, "--epoch", "2", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out == expected + "\n" and out.read_text() == expected
    assert "| corrected | K-FAC | 2 | 4 |" in expected and "| released | QE | 2 | 1 |" in expected
    assert main([*argv, "--no-paper"]) == 0  # printed only; the paper's rows left out
    printed = capsys.readouterr().out
    assert printed == protocol_comparison(two_protocols, paper=False) + "\n"
    assert "| paper |" not in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrected", "new", "released"]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        ([], "give a run directory, or --protocols"),
        (["--protocols", "corrected"], "argument --protocols: expected NAME=DIR, got 'corrected'"),
        (["--protocols", "=x"], "expected NAME=DIR"),
        (["--protocols", "a="], "expected NAME=DIR"),
        (["--protocols", "a={c}", "a={r}"], "protocol 'a' given twice"),
        (["{c}", "--protocols", "a={c}"], "either a run directory or --protocols, not both"),
        (["--protocols", "a={c}", "--out", "{c}"], "is a directory"),
        (["--protocols", "a={c}", "b={c}/nothing"], "no runs for protocol 'b'"),
    ],
)
def test_report_protocols_bad_input_is_one_error_line(capsys, two_protocols, args, says):
    dirs = {"c": two_protocols["corrected"], "r": two_protocols["released"]}
    line = _one_error_line(capsys, ["report", *(a.format(**dirs) for a in args)])
    assert says in line


def test_report_of_a_directory_is_unchanged(capsys, tmp_path, two_protocols):
    assert main(["report", str(two_protocols["corrected"]), "--out", str(tmp_path / "r")]) == 0
    text = capsys.readouterr().out
    assert text.startswith("## Table 1 — mnist") and (tmp_path / "r" / "mnist_table1.md").is_file()


def _metrics_rows(path: Path) -> int:
    try:
        return max(0, len(path.read_text().splitlines()) - 1)
    except FileNotFoundError:
        return 0


def test_sigterm_stops_a_background_sweep_like_ctrl_c(tmp_path, mnist_dir):
    """``kill PID`` on a sweep started in the background (where the shell makes it ignore
    SIGINT) stops every worker at a step boundary with its checkpoint saved."""
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "kldwrm", "reproduce", "--solvers", "kfac", "so",
           "--seeds", "0", "--epochs", "200", "--subset", "1024", "--workers", "2",
           "--threads", "1", "--no-progress", "--data-dir", str(mnist_dir), "--out", str(out)]
    ignore_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)  # noqa: E731
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=ignore_sigint)
    runs = [out / "mnist" / s / "seed0" for s in ("kfac", "so")]
    deadline = time.monotonic() + 120
    while min(_metrics_rows(r / "metrics.csv") for r in runs) < 1:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    for r in runs:
        assert 1 <= _metrics_rows(r / "metrics.csv") < 200
        assert (r / "checkpoint.pt").is_file()


def _children(pid: int) -> set[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    out = set()
    for path in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = path.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.add(int(path.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_workers_of_a_sweep_killed_outright_stop_with_their_checkpoints(tmp_path, mnist_dir):
    """SIGKILL (or the OOM killer) on the sweep leaves its pool workers re-parented: each
    stops at its next step with its checkpoint saved instead of training on, orphaned."""
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "kldwrm", "reproduce", "--solvers", "kfac", "so",
           "--seeds", "0", "--epochs", "200", "--subset", "1024", "--workers", "2",
           "--threads", "1", "--no-progress", "--data-dir", str(mnist_dir), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs = [out / "mnist" / s / "seed0" for s in ("kfac", "so")]
    deadline = time.monotonic() + 120
    while min(_metrics_rows(r / "metrics.csv") for r in runs) < 1:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    workers = _children(proc.pid)
    assert workers
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 60
    while any(_alive(w) for w in workers):
        assert time.monotonic() < deadline, "orphaned workers still running"
        time.sleep(0.2)
    for r in runs:
        assert 1 <= _metrics_rows(r / "metrics.csv") < 200
        assert (r / "checkpoint.pt").is_file()
