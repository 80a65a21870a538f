"""Data parallelism on torch.distributed (gloo, CPU, processes started by the tests).

* 2 ranks × batch 128 equal 1 process × batch 256 for KFAC, SO, Q and QE (float64,
  empirical Fisher, refresh steps included), passing the DDP wrapper or the inner module;
* with "mc" Fisher the ranks stay bitwise identical to each other;
* decompositions dealt over the ranks ("sharded") or blocks held by one rank ("owned")
  take the replicated steps (bitwise alike on every rank; equal to 1 process);
* a state saved at another number of ranks loads, and says so where "mc" labels differ;
* a model run under activation checkpointing (``checkpoint_sequential``, non-reentrant) on
  2 ranks equals the plain model in 1 process;
* a checkpoint of a 2-rank ``kldwrm train`` run resumes bit-exactly in a 2-rank run;
* a rank killed mid-run makes the other exit non-zero within the configured timeout.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint_sequential

from kldwrm import KFAC, QKLDWRM, SOKLDWRM
from kldwrm.curvature.assembly import communication_bytes
from kldwrm.distributed import rank_seed
from kldwrm.optim.qe import QEKLDWRM

GLOBAL_BATCH = 256
STEPS = 16
UPDATE_FREQ = 4  # refreshes at steps 0, 4, 8, 12
ROOT = Path(__file__).resolve().parents[1]

#: name → (class, kwargs, pass the DDP wrapper to the optimizer?)
CASES = {
    "kfac": (KFAC, {}, True),
    "so": (SOKLDWRM, {}, False),
    "q": (QKLDWRM, {}, True),
    "qe": (QEKLDWRM, dict(window=3, inner_steps=3, inner_lr=0.05, inner_momentum=0.5), False),
    # the released code's separate bias blocks (conv and linear)
    "kfac-separate-bias": (KFAC, dict(bias="separate"), True),
    "q-separate-bias": (QKLDWRM, dict(bias="separate"), False),
    # truncated factors: the seeded sketches give every rank the same decomposition
    "kfac-rank": (KFAC, dict(rank=4), True),
    "q-rank": (QKLDWRM, dict(rank=4), False),
    # measured eigenvalues: EKFAC's per-example moments are averaged over ranks by
    # examples; the adaptive moments come from the already-reduced gradient
    "kfac-ekfac": (KFAC, dict(curvature="ekfac"), True),
    "q-adaptive": (QKLDWRM, dict(curvature="adaptive", eigen_power=0.5, momentum=0.5), False),
    # each block decomposed by one rank, the results all-reduced
    "kfac-sharded": (KFAC, dict(decompositions="sharded"), True),
    "q-sharded": (QKLDWRM, dict(decompositions="sharded"), False),
    "q-rank-sharded": (QKLDWRM, dict(rank=4, decompositions="sharded"), False),
    "kfac-ekfac-sharded": (KFAC, dict(curvature="ekfac", decompositions="sharded"), True),
    # each block's curvature held and applied by one rank
    "kfac-owned": (KFAC, dict(decompositions="owned"), True),
    "q-rank-owned": (QKLDWRM, dict(rank=4, decompositions="owned"), False),
    "so-owned": (SOKLDWRM, dict(decompositions="owned", momentum=0.5), False),
}
#: a sharded-decomposition case → its replicated counterpart (bitwise the same steps)
SHARDED = {"kfac-sharded": "kfac", "q-sharded": "q", "q-rank-sharded": "q-rank",
           "kfac-ekfac-sharded": "kfac-ekfac"}


#: a case run on a model under activation checkpointing → the case it must equal unwrapped
CHECKPOINTED = {"kfac-checkpointed": "kfac", "qe-checkpointed": "qe"}


class _CheckpointedSequential(nn.Module):
    """The same layers, run in 3 non-reentrant checkpointed segments."""

    def __init__(self, seq: nn.Sequential) -> None:
        super().__init__()
        self.seq = seq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint_sequential(self.seq, 3, x, use_reentrant=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model() -> nn.Module:
    """Conv (Kronecker, KFC), Linear (Kronecker) and LayerNorm (diagonal blocks)."""
    return nn.Sequential(
        nn.Conv2d(1, 3, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 6 * 6, 16),
        nn.LayerNorm(16),
        nn.Tanh(),
        nn.Linear(16, 4),
    )


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (GLOBAL_BATCH,), generator=g)
    return x, y


def _run(name: str, fisher: str, rank: int, world: int) -> list[torch.Tensor]:
    """Train ``STEPS`` steps on this rank's shard of every global batch; final parameters."""
    cls, kw, wrap = CASES[CHECKPOINTED.get(name, name)]
    torch.manual_seed(0)
    model = _model().double()
    if name in CHECKPOINTED:
        model = _CheckpointedSequential(model)
    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model)
    opt = cls(net if wrap else model, lr=0.05, update_freq=UPDATE_FREQ, fisher=fisher,
              seed=123, **kw)
    per = GLOBAL_BATCH // world
    for step in range(STEPS):
        x, y = _data(step)
        xs, ys = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
        opt.zero_grad()
        F.cross_entropy(net(xs), ys).backward()
        opt.step()
    assert opt.steps_taken == STEPS and opt.skipped_steps == 0
    return [p.detach().clone() for p in model.parameters()]


def _equivalence_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        result = {}
        for name in (*CASES, *CHECKPOINTED):
            result[name] = _run(name, "empirical", rank, world)
        for name in ("kfac", "q"):
            result[f"mc-{name}"] = _run(name, "mc", rank, world)
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()  # see _skipping_worker
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory) -> list[dict[str, list[torch.Tensor]]]:
    out = tmp_path_factory.mktemp("ddp")
    torch.multiprocessing.spawn(
        _equivalence_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True
    )
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def _rel_err(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(float((x - y).pow(2).sum()) for x, y in zip(a, b, strict=True)) ** 0.5
    den = sum(float(y.pow(2).sum()) for y in b) ** 0.5
    return num / den


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_equal_one_process_on_the_concatenated_batch(name, two_rank_results):
    torch.set_num_threads(1)
    single = _run(name, "empirical", 0, 1)
    start = [p.detach() for p in _model().double().parameters()]
    assert _rel_err(single, start) > 1e-3  # the run moved
    for r in range(2):
        assert _rel_err(two_rank_results[r][name], single) <= 1e-10


@pytest.mark.parametrize("name", list(CHECKPOINTED))
def test_two_ranks_of_a_checkpointed_model_equal_the_plain_model_in_one_process(
        name, two_rank_results):
    torch.set_num_threads(1)
    single = _run(CHECKPOINTED[name], "empirical", 0, 1)
    for r in range(2):
        assert _rel_err(two_rank_results[r][name], single) <= 1e-10


@pytest.mark.parametrize("name", list(SHARDED))
def test_sharded_decompositions_take_the_replicated_steps(name, two_rank_results):
    """One rank decomposes each block, the others add zeros: the ranks stay bitwise
    identical, and the steps are the replicated ones up to rounding (the received
    eigenvectors are laid out row-major, eigh's column-major, so products round apart)."""
    ours = [two_rank_results[r][name] for r in range(2)]
    for x, y in zip(*ours, strict=True):
        assert torch.equal(x, y)
    assert _rel_err(ours[0], two_rank_results[0][SHARDED[name]]) <= 1e-12


def test_decompositions_are_balanced_by_cost():
    from kldwrm.distributed import assign_by_cost

    # largest first to the least loaded rank: 8→0, 8→1, 2→0, 1→1, 1→1 (10 and 10)
    assert assign_by_cost([1.0, 8.0, 1.0, 8.0, 2.0], 2) == [1, 0, 1, 1, 0]
    assert assign_by_cost([5.0] * 8, 4) == [0, 1, 2, 3, 0, 1, 2, 3]
    assert assign_by_cost([3.0], 4) == [0]


@pytest.mark.parametrize("name", ["kfac", "q"])
def test_mc_fisher_ranks_stay_bitwise_identical(name, two_rank_results):
    a, b = (two_rank_results[r][f"mc-{name}"] for r in range(2))
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    emp = two_rank_results[0][name]
    assert _rel_err(a, emp) > 1e-8  # it really sampled


class _Branchy(nn.Module):
    """Rank 1 never runs ``skip`` (a branch taken by some ranks only, e.g. a routed expert)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.skip = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)
        self.use_skip = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        if self.use_skip:
            h = torch.tanh(self.norm(self.skip(h)))
        return self.head(h)


def _skipping_worker(rank: int, world: int, port: int, out: str, fisher: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        torch.manual_seed(0)
        model = _Branchy().double()
        model.use_skip = rank == 0
        opt = KFAC(model, lr=0.05, update_freq=2, fisher=fisher, seed=1)
        g = torch.Generator().manual_seed(10 + rank)
        for _ in range(5):
            x = torch.randn(16, 6, generator=g, dtype=torch.float64)
            opt.zero_grad()
            F.cross_entropy(model(x), torch.randint(0, 3, (16,), generator=g)).backward()
            opt.step()
        torch.save({"curvature": opt.engine.state_dict(), "steps": opt.steps_taken},
                   os.path.join(out, f"rank{rank}.pt"))
        # every rank done before gloo is torn down: a group destroyed while the other
        # rank's last collective is in flight can abort the process (std::terminate)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("fisher", ["mc", "empirical"])
def test_a_layer_skipped_on_one_rank_does_not_deadlock(tmp_path, fisher):
    """The rank without data sends zeros with weight 0 in the same all-reduce, so every rank
    folds the same curvature: the skipped layer's, and the norm's, from rank 0 alone."""
    torch.multiprocessing.spawn(
        _skipping_worker, args=(2, _free_port(), str(tmp_path), fisher), nprocs=2, join=True
    )
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["steps"] == r1["steps"] == 5
    assert r0["curvature"].keys() == r1["curvature"].keys()
    for key, block in r0["curvature"].items():
        assert block, key  # every block, the skipped layer's too, has curvature on both ranks
        for name, t in block.items():
            assert torch.equal(t, r1["curvature"][key][name]), (key, name)


@pytest.mark.parametrize("fisher", ["mc", "empirical"])
def test_a_state_from_another_rank_count_loads_and_says_so_for_mc(fisher):
    torch.manual_seed(0)
    model = _model().double()
    opt = KFAC(model, update_freq=2, fisher=fisher)
    x, y = _data(0)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    sd = opt.state_dict()
    assert sd["kldwrm"]["ranks"] == 1
    sd["kldwrm"]["ranks"] = 4  # as saved by a 4-rank run
    fresh = KFAC(model, update_freq=2, fisher=fisher)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fresh.load_state_dict(sd)
    said = [w for w in caught if "saved on 4 rank(s)" in str(w.message)]
    assert len(said) == (1 if fisher == "mc" else 0)
    assert fresh.steps_taken == 1


def test_rank_seeds_differ():
    seeds = {rank_seed(12345, r) for r in range(64)}
    assert len(seeds) == 64 and all(0 <= s < 2**63 for s in seeds)


def test_communication_bytes_of_an_mlp():
    from kldwrm.experiments.data.models import mlp

    rows = communication_bytes(mlp((784, 1024, 1024, 10)))
    assert [r.kind for r in rows] == ["kronecker"] * 3
    assert rows[0].refresh == (785**2 + 1024**2 + 2) * 4
    assert sum(r.step for r in rows) == 4 * sum(p.numel() for p in mlp().parameters())


# ----------------------------------------------------------------------------- torchrun CLI


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


#: paper CNN (dropout: per-rank RNG states) with Q and "mc" Fisher; 5 steps per epoch and
#: refreshes every 3 steps, so a resume at an epoch boundary falls between refreshes
TRAIN_ARGS = [
    "--dataset", "mnist", "--model", "paper-cnn", "--optimizer", "q",
    "--fisher", "mc", "--update-freq", "3", "--batch-size", "64", "--subset", "320",
    "--no-progress", "--threads", "1",
]


def _torchrun(out: Path, *extra: str, timeout: float = 120) -> subprocess.CompletedProcess:
    port = _free_port()
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        f"--master_port={port}", "--master_addr=127.0.0.1", "-m", "kldwrm", "train",
        *TRAIN_ARGS, "--out", str(out), *extra,
    ]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def test_two_rank_checkpoint_resumes_bit_exactly(tmp_path):
    full = _torchrun(tmp_path / "full", "--epochs", "2")
    assert full.returncode == 0, full.stderr
    assert full.stdout.count("metrics:") == 1  # only rank 0 prints
    first = _torchrun(tmp_path / "part", "--epochs", "1")
    assert first.returncode == 0, first.stderr
    second = _torchrun(tmp_path / "part", "--epochs", "2", "--resume")
    assert second.returncode == 0, second.stderr
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["world_size"] == b["world_size"] == 2
    ma = [{k: repr(v) for k, v in r.items() if k not in ("wall_time_s", "mean_step_ms")}
          for r in a["metrics"]]
    mb = [{k: repr(v) for k, v in r.items() if k not in ("wall_time_s", "mean_step_ms")}
          for r in b["metrics"]]
    assert ma == mb and len(ma) == 2


def test_killed_rank_makes_the_other_exit_nonzero(tmp_path):
    port = _free_port()
    timeout_s = 20
    procs = []
    for r in range(2):
        env = _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r),
                   LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
        cmd = [sys.executable, "-m", "kldwrm", "train", *TRAIN_ARGS, "--epochs", "1000",
               "--out", str(tmp_path / "run"), "--dist-timeout", str(timeout_s)]
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    try:
        metrics = tmp_path / "run" / "metrics.csv"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # wait until training is under way
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
                break
            assert procs[0].poll() is None, procs[0].communicate()
            time.sleep(0.2)
        else:
            pytest.fail("the 2-rank run did not start")
        procs[1].send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        _, err = procs[0].communicate(timeout=timeout_s + 30)
        elapsed = time.monotonic() - t0
        assert procs[0].returncode not in (0, None)
        assert elapsed < timeout_s + 30
        assert "rank" in err.lower()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
