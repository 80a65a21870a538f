"""Per-rank refresh work and state: replicated versus sharded decompositions (issue 24).

On ``R`` gloo ranks (1 thread each), an MLP of ``--layers`` equal hidden layers (``--width``
wide: that many similar Kronecker blocks) trains with ``update_freq=1``, so every step
refreshes (``--update-freq 1000``: only the untimed first step does, for the cost of the
other steps). Per rank it reports the process CPU seconds of a refresh step's ``opt.step()``
(``time.process_time``: the cores are shared, so wall time would measure the neighbours)
and of the fold alone (EA update, decompositions, their all-reduce), median over the timed
steps, and the curvature state bytes, for ``decompositions="replicated"``, ``"sharded"``
and ``"owned"``, plus the bytes the sharded fold all-reduces (the busiest rank's figures).

Run: ``python -m benchmarks.sharded_refresh --ranks 1,2,4`` (``--json out.json`` keeps
the rows; ``--from-json`` prints them again as the markdown table of docs/distributed.md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from kldwrm import KFAC
from kldwrm.curvature import FactoredBlock

from .distributed_step_time import _free_port

MODES = ("replicated", "sharded", "owned")


def _model(width: int, layers: int) -> nn.Module:
    mods: list[nn.Module] = [nn.Linear(64, width), nn.Tanh()]
    for _ in range(layers - 1):
        mods += [nn.Linear(width, width), nn.Tanh()]
    mods.append(nn.Linear(width, 10))
    return nn.Sequential(*mods)


def _shared_bytes(opt: KFAC) -> int:
    return sum(t.numel() * t.element_size() for b in opt.engine.blocks
               if isinstance(b, FactoredBlock) for t in b.factors.shared())


def _measure(mode: str, args: Any, rank: int, world: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = _model(args.width, args.layers)
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = KFAC(net, lr=0.01, update_freq=args.update_freq, fisher="empirical",
               decompositions=mode)
    fold_cpu: list[float] = []
    inner = opt.engine.fold

    def timed_fold(*a: Any, **kw: Any) -> None:
        t0 = time.process_time()
        inner(*a, **kw)
        fold_cpu.append(time.process_time() - t0)

    opt.engine.fold = timed_fold  # type: ignore[method-assign]
    g = torch.Generator().manual_seed(rank)
    step_cpu = []
    per = args.batch // world
    for _ in range(args.warmup + args.steps):
        x = torch.randn(per, 64, generator=g)
        y = torch.randint(0, 10, (per,), generator=g)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        t0 = time.process_time()
        opt.step()
        step_cpu.append(time.process_time() - t0)
    n = args.warmup
    fold = statistics.median(fold_cpu[n:]) if len(fold_cpu) > n else float("nan")
    return {"step_cpu": statistics.median(step_cpu[n:]), "fold_cpu": fold,
            "state_bytes": opt.engine.state_bytes(),
            "shared_bytes": _shared_bytes(opt) if mode == "sharded" and world > 1 else 0}


def _worker(rank: int, world: int, port: int, args: Any, out: str) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=300))
    rows = {mode: _measure(mode, args, rank, world) for mode in MODES}
    with open(os.path.join(out, f"{world}-{rank}.json"), "w") as f:
        json.dump(rows, f)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def run(args: Any) -> list[dict[str, Any]]:
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as out:
        for world in [int(r) for r in args.ranks.split(",")]:
            mp.spawn(_worker, args=(world, _free_port(), args, out), nprocs=world, join=True)
            per_rank = []
            for r in range(world):
                with open(os.path.join(out, f"{world}-{r}.json")) as f:
                    per_rank.append(json.load(f))
            for mode in MODES:
                vals = [p[mode] for p in per_rank]
                rows.append({"ranks": world, "mode": mode, **{
                    k: max(v[k] for v in vals) for k in vals[0]}})  # the busiest rank
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    base = {r["ranks"]: r for r in rows if r["mode"] == "replicated"}
    lines = ["| ranks | decompositions | refresh step CPU s | fold CPU s | fold vs replicated | "
             "all-reduced by the fold (B) | curvature state per rank (B) |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = r["fold_cpu"] / base[r["ranks"]]["fold_cpu"]
        lines.append(f"| {r['ranks']} | {r['mode']} | {r['step_cpu']:.3f} | "
                     f"{r['fold_cpu']:.3f} | {ratio:.2f} | {r['shared_bytes']:,} | "
                     f"{r['state_bytes']:,} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="1,2,4")
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=9)
    ap.add_argument("--update-freq", type=int, default=1,
                    help="1: every step refreshes; large (with --warmup 1): none timed does")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--from-json", default=None)
    args = ap.parse_args()
    if args.from_json:
        with open(args.from_json) as f:
            rows = json.load(f)["rows"]
    else:
        rows = run(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    print(table(rows))


if __name__ == "__main__":
    main()
