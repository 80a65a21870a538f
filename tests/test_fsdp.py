"""FSDP2 (``fully_shard``): gloo on the CPU, processes started by the tests.

* 2 and 4 ranks equal 1 process on the concatenated batch for K-FAC, SO, Q and QE (float64,
  empirical Fisher, refresh steps included), with ``fully_shard`` on every layer and the
  root ("nested") or on the root only, and on a 2 × 2 (replicate × shard) mesh (HSDP);
* with "mc" Fisher (each rank samples its own labels) FSDP equals DDP at the same ranks;
* every rank ends with the same curvature (the whole step is computed on every rank and
  each applies its own shard of it), and the shards are uneven (5 rows on 4 ranks);
* the preconditioner mode drives a torch optimizer (AdamW) over the DTensor parameters;
* a state saved on 2 ranks resumes in one process exactly (``state_dict()`` is whole);
* with ``decompositions="owned"`` each rank holds at most 1/R of the curvature state plus
  the largest block, and the steps are the same.
"""

from __future__ import annotations

import copy
import datetime
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kldwrm
from kldwrm import KFAC, QKLDWRM, SOKLDWRM
from kldwrm.optim.qe import QEKLDWRM

from .test_distributed import _free_port, _rel_err

BATCH = 64
STEPS = 9
UPDATE_FREQ = 4  # refreshes at steps 0, 4, 8
SAVE_AT = 5  # the resume case's state is saved after this many steps

#: name → (optimizer builder, arguments)
CASES = {
    "kfac": (KFAC, {}),
    "so": (SOKLDWRM, {}),
    "q": (QKLDWRM, dict(momentum=0.5)),
    "qe": (QEKLDWRM, dict(window=3, inner_steps=3, inner_lr=0.05, inner_momentum=0.5)),
    "q+adamw": (lambda m, **kw: kldwrm.make_optimizer("q+adamw", m, lr=3e-3, **kw), {}),
    # each block's curvature held and applied by one rank
    "kfac-owned": (KFAC, dict(decompositions="owned")),
    "q-owned": (QKLDWRM, dict(momentum=0.5, decompositions="owned")),
    "qe-owned": (QEKLDWRM, dict(window=3, inner_steps=3, inner_lr=0.05, inner_momentum=0.5,
                                decompositions="owned")),
}
#: the "mc" cases, compared with DDP at the same number of ranks
MC = ("kfac", "q")


def _model() -> nn.Module:
    """Conv and Linear (Kronecker) and LayerNorm (diagonal) blocks; 5 output rows."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 16),
        nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 5),
    ).double()


def _shard(model: nn.Module, layout: str) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = (init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
            if layout == "hsdp" else None)
    if layout in ("nested", "hsdp"):
        for sub in model:
            if any(True for _ in sub.parameters()):
                fully_shard(sub, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _build(name: str, model: nn.Module, fisher: str):
    make, kw = CASES[name]
    kw = {"update_freq": UPDATE_FREQ, "fisher": fisher, "seed": 1, **kw}
    if name != "q+adamw":
        kw["lr"] = 0.05
    return make(model, **kw)


def _batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(BATCH, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (BATCH,), generator=g)
    per = BATCH // world
    return x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]


def _whole(model: nn.Module) -> list[torch.Tensor]:
    return [p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone()
            for p in model.parameters()]


def _train(name: str, fisher: str, rank: int, world: int, layout: str,
           first: int = 0, opt_state=None, model=None):
    """Steps ``first..STEPS-1`` on this rank's shard of each batch; (model, optimizer,
    the optimizer's state after ``SAVE_AT`` steps)."""
    model = _model() if model is None else model
    net = model
    if layout == "ddp":
        net = nn.parallel.DistributedDataParallel(model)
    elif world > 1:
        _shard(model, layout)
    opt = _build(name, model, fisher)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    saved = None
    for step in range(first, STEPS):
        x, y = _batch(step, rank, world)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
        if step + 1 == SAVE_AT:
            saved = copy.deepcopy(opt.state_dict())  # torch.optim hands out references
    assert opt.skipped_steps == 0
    return model, opt, saved


def _curvature(opt) -> dict:
    rule = getattr(opt, "rule", opt)
    return rule.engine.state_dict()


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        result: dict = {}
        layouts = ("nested", "root", "hsdp") if world == 4 else ("nested", "root")
        for layout in layouts:
            for name in CASES if layout != "hsdp" else ("kfac", "q"):
                model, opt, saved = _train(name, "empirical", rank, world, layout)
                rule = getattr(opt, "rule", opt)
                result[name, layout] = (_whole(model), _curvature(opt),
                                        rule.engine.state_bytes())
                if name == "q" and layout == "nested":
                    result["saved"] = saved
        for name in MC:
            for layout in ("nested", "ddp"):
                model, opt, _ = _train(name, "mc", rank, world, layout)
                result[f"mc-{name}", layout] = (_whole(model), _curvature(opt))
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()  # every rank done before gloo is torn down
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path_factory, world: int) -> list[dict]:
    out = tmp_path_factory.mktemp(f"fsdp{world}")
    torch.multiprocessing.spawn(_worker, args=(world, _free_port(), str(out)), nprocs=world,
                                join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory) -> list[dict]:
    return _spawn(tmp_path_factory, 2)


@pytest.fixture(scope="module")
def fsdp4(tmp_path_factory) -> list[dict]:
    return _spawn(tmp_path_factory, 4)


@pytest.fixture(scope="module")
def single() -> dict[str, list[torch.Tensor]]:
    torch.set_num_threads(1)
    return {name: _whole(_train(name, "empirical", 0, 1, "single")[0]) for name in CASES}


def _same_curvature(results: list[dict], key) -> None:
    first = results[0][key][1]
    for other in results[1:]:
        assert other[key][1].keys() == first.keys()
        for block, state in first.items():
            assert state, block
            for k, t in state.items():
                assert torch.equal(t, other[key][1][block][k]), (key, block, k)


@pytest.mark.parametrize("layout", ["nested", "root"])
@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_equal_one_process(name, layout, fsdp2, single):
    start = [p.detach() for p in _model().parameters()]
    assert _rel_err(single[name], start) > 1e-3  # the run moved
    assert _rel_err(fsdp2[0][name, layout][0], single[name]) <= 1e-10
    _same_curvature(fsdp2, (name, layout))


@pytest.mark.parametrize("layout", ["nested", "root", "hsdp"])
@pytest.mark.parametrize("name", list(CASES))
def test_four_ranks_equal_one_process(name, layout, fsdp4, single):
    if layout == "hsdp" and name not in ("kfac", "q"):
        pytest.skip("the 2 x 2 mesh is run for K-FAC and Q")
    assert _rel_err(fsdp4[0][name, layout][0], single[name]) <= 1e-10
    _same_curvature(fsdp4, (name, layout))


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", ["kfac", "q", "qe"])
def test_owned_curvature_divides_the_state(name, world, fsdp2, fsdp4):
    """Per rank at most 1/R of the whole curvature state plus the largest block, and the
    gathered state equal to the replicated run's (same steps: see the tests above)."""
    results = fsdp2 if world == 2 else fsdp4
    whole = results[0][name, "nested"][2]  # replicated: every rank holds all of it
    opt = _build(name, _model(), "empirical")
    x, y = _batch(0, 0, 1)
    F.cross_entropy(opt.engine.model(x), y).backward()  # one step sizes every block's state
    opt.step()
    blocks = [sum(t.numel() * t.element_size() for t in b.state_dict().values())
              for b in opt.engine.blocks]
    assert sum(blocks) == whole
    per_rank = [r[f"{name}-owned", "nested"][2] for r in results]
    assert max(per_rank) <= whole / world + max(blocks)
    assert max(per_rank) < whole  # really divided
    for block, state in results[0][f"{name}-owned", "nested"][1].items():
        for k, t in state.items():
            assert torch.allclose(t, results[0][name, "nested"][1][block][k], rtol=1e-9,
                                  atol=1e-12), (block, k)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", MC)
def test_mc_fisher_under_fsdp_equals_ddp(name, world, fsdp2, fsdp4):
    results = fsdp2 if world == 2 else fsdp4
    fsdp, ddp = (results[0][f"mc-{name}", layout][0] for layout in ("nested", "ddp"))
    assert _rel_err(fsdp, ddp) <= 1e-12
    _same_curvature(results, (f"mc-{name}", "nested"))
    emp = results[0][name, "nested"][0]
    assert _rel_err(fsdp, emp) > 1e-8  # it really sampled


def test_a_two_rank_state_resumes_in_one_process(fsdp2, single):
    """The optimizer state is whole on every rank, so rank 0's resumes another rank count."""
    torch.set_num_threads(1)
    model = _model()
    ref_model = _model()
    ref_opt = _build("q", ref_model, "empirical")
    for step in range(SAVE_AT):
        x, y = _batch(step, 0, 1)
        ref_opt.zero_grad()
        F.cross_entropy(ref_model(x), y).backward()
        ref_opt.step()
    model.load_state_dict(ref_model.state_dict())  # the 2-rank run's weights (to 1e-15)
    resumed, _, _ = _train("q", "empirical", 0, 1, "single", first=SAVE_AT,
                           opt_state=fsdp2[0]["saved"], model=model)
    assert _rel_err(_whole(resumed), single["q"]) <= 1e-10


def _dcp_worker(rank: int, world: int, port: int, out: str, phase: str) -> None:
    """``save``: Q with owned curvature, ``SAVE_AT`` steps, saved with DCP (model and
    optimizer); ``resume``: loaded at this number of ranks and run to the end."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        set_model_state_dict,
    )

    from kldwrm.optim.sharded.checkpoint import load_sharded_state, sharded_state

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        model = _shard(_model(), "nested")
        opt = _build("q-owned", model, "empirical")
        path = os.path.join(out, "ckpt")
        first = 0
        if phase == "resume":
            msd = {"model": get_model_state_dict(model)}
            dcp.load(msd, checkpoint_id=path)
            set_model_state_dict(model, msd["model"])
            load_sharded_state(opt, path, key="optim")
            first = SAVE_AT
        for step in range(first, SAVE_AT if phase == "save" else STEPS):
            x, y = _batch(step, rank, world)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        if phase == "save":
            held = sharded_state(opt)
            dcp.save({"model": get_model_state_dict(model), "optim": held}, checkpoint_id=path)
            torch.save(sorted(k for k in held if k.startswith("curvature/")),
                       os.path.join(out, f"keys{rank}.pt"))
        else:
            whole = _whole(model)
            if rank == 0:
                torch.save(whole, os.path.join(out, "resumed.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_a_dcp_checkpoint_saved_at_two_ranks_resumes_at_four(tmp_path, single):
    """Owned curvature: each rank saves only its own blocks; 4 ranks load their new
    shares and continue exactly as the uninterrupted run."""
    for world, phase in ((2, "save"), (4, "resume")):
        torch.multiprocessing.spawn(_dcp_worker, args=(world, _free_port(), str(tmp_path),
                                                       phase), nprocs=world, join=True)
    held = [{int(k.split("/")[1]) for k in torch.load(tmp_path / f"keys{r}.pt")}
            for r in range(2)]
    # the Kronecker blocks (0-2: conv, linear, linear) each saved by one rank; the
    # diagonal ones (3-4: the LayerNorm's) are whole on both
    assert held[0] & held[1] == {3, 4} and held[0] | held[1] == {0, 1, 2, 3, 4}
    assert held[0] != {3, 4} and held[1] != {3, 4}
    resumed = torch.load(tmp_path / "resumed.pt")
    assert _rel_err(resumed, single["q"]) <= 1e-10


def _dying_worker(rank: int, world: int, port: int, out: str) -> None:
    """Rank 1 dies inside its second refresh (in the fold, before the decompositions'
    all-reduce); rank 0 records what it saw and how long after the death."""
    import time

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=30))
    model = _shard(_model(), "nested")
    opt = KFAC(model, lr=0.05, update_freq=2, fisher="empirical", decompositions="sharded")
    fold, folds = opt.engine.fold, []

    def dying_fold(*args, **kwargs):
        folds.append(1)
        if rank == 1 and len(folds) == 2:
            with open(os.path.join(out, "died"), "w") as f:
                f.write(repr(time.time()))
            os._exit(3)
        return fold(*args, **kwargs)

    opt.engine.fold = dying_fold
    try:
        for step in range(6):
            x, y = _batch(step, rank, world)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    except Exception as e:  # noqa: BLE001 (what a training script's error handler sees)
        with open(os.path.join(out, f"error{rank}"), "w") as f:
            f.write(f"{time.time()!r}\n{type(e).__name__}: {e}")
        os._exit(1)


def test_a_rank_dying_in_a_refresh_stops_the_other_within_seconds(tmp_path):
    ctx = torch.multiprocessing.start_processes(
        _dying_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False,
        start_method="spawn")
    for p in ctx.processes:
        p.join(timeout=90)
    codes = [p.exitcode for p in ctx.processes]
    for p in ctx.processes:
        if p.is_alive():
            p.kill()
    assert codes == [1, 3], codes
    died = float((tmp_path / "died").read_text())
    when, message = (tmp_path / "error0").read_text().split("\n", 1)
    assert float(when) - died < 10.0  # the group's timeout is 30 s: seen well before it
    assert message.startswith(("RuntimeError", "DistBackendError")), message
