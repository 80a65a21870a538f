"""Data-parallel figures: bytes per step/refresh, 1-rank vs 2-rank step time, decompositions.

1. ``kldwrm.curvature.assembly.communication_bytes`` for the paper's CNN and the 784-1024-1024-10
   MLP (float32): the all-reduce payload per step (gradients, DDP) and per refresh (the
   fresh Kronecker factors / diagonals, one flattened all-reduce).
2. Step time (forward + backward + ``step``) of the paper CNN at a global batch of 512, on
   one process (1 and 2 threads) and on 2 gloo ranks of 1 thread each (batch 256 per
   rank), ``update_freq=30`` so refreshes are included in the mean.
3. Replicated versus sharded decompositions on 2 ranks: every rank eigendecomposes all the
   EA factors (what kldwrm does), or each rank decomposes half of them (by layer) and
   broadcasts the eigenvalues/eigenvectors.

Run: ``python -m benchmarks.distributed_step_time`` (add ``--steps 90`` for more steps).
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from kldwrm.curvature.assembly import communication_bytes
from kldwrm.experiments.data.models import mlp, paper_cnn

from .common import make

GLOBAL_BATCH = 512


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def traffic_table() -> str:
    """Markdown table of the per-layer payloads for both models (float32)."""
    lines = ["| model | block | kind | params | per step (B) | per refresh (B) |",
             "|---|---|---|---:|---:|---:|"]
    for label, model in (("paper CNN", paper_cnn()), ("MLP 784-1024-1024-10", mlp())):
        rows = communication_bytes(model, torch.float32)
        for r in rows:
            lines.append(f"| {label} | {r.name} | {r.kind} | {r.numel:,} | {r.step:,} | "
                         f"{r.refresh:,} |")
        lines.append(f"| {label} | **total** | | {sum(r.numel for r in rows):,} | "
                     f"{sum(r.step for r in rows):,} | {sum(r.refresh for r in rows):,} |")
    return "\n".join(lines)


def _batches(n_steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(GLOBAL_BATCH, 1, 28, 28, generator=g),
             torch.randint(0, 10, (GLOBAL_BATCH,), generator=g)) for _ in range(n_steps)]


def _time_steps(name: str, steps: int, warmup: int, rank: int, world: int) -> list[float]:
    torch.manual_seed(0)
    model = paper_cnn()
    net: nn.Module = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = make(name, net, update_freq=30)
    per = GLOBAL_BATCH // world
    times = []
    for i, (x, y) in enumerate(_batches(warmup + steps)):
        xs, ys = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        t0 = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(net(xs), ys).backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def _eigh_timing(rank: int, world: int, reps: int = 3) -> dict[str, float]:
    """Seconds to obtain every factor's eigendecomposition: replicated vs sharded+broadcast."""
    out: dict[str, float] = {}
    for label, model in (("paper CNN", paper_cnn()), ("MLP", mlp())):
        g = torch.Generator().manual_seed(1)
        sizes = []
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                sizes += [m.weight[0].numel() + 1, m.weight.shape[0]]
        mats = []
        for d in sizes:
            a = torch.randn(d, d + 8, generator=g)
            mats.append(a @ a.T / d)
        rep, shard = [], []
        for _ in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            for m in mats:
                torch.linalg.eigh(m)
            dist.barrier()
            rep.append(time.perf_counter() - t0)
            dist.barrier()
            t0 = time.perf_counter()
            res = []
            for i, m in enumerate(mats):  # layer i decomposed by rank i % world
                if i % world == rank:
                    ev, q = torch.linalg.eigh(m)
                else:
                    ev, q = torch.empty(m.shape[0]), torch.empty_like(m)
                res.append((ev, q))
            for i, (ev, q) in enumerate(res):
                dist.broadcast(ev, i % world)
                dist.broadcast(q, i % world)
            dist.barrier()
            shard.append(time.perf_counter() - t0)
        out[f"{label} replicated"] = min(rep)
        out[f"{label} sharded"] = min(shard)
    return out


def _worker(rank: int, world: int, port: int, args: Any, queue: Any) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    try:
        res = {name: _time_steps(name, args.steps, args.warmup, rank, world)
               for name in args.optimizers}
        res["eigh"] = _eigh_timing(rank, world)
        if rank == 0:
            queue.put(res)
    finally:
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--optimizers", nargs="+", default=["kfac", "q"],
                   help="names as in kfac-r128 for a rank")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    print("## All-reduce payload per rank (float32)\n")
    print(traffic_table())

    print(f"\n## Step time, paper CNN, global batch {GLOBAL_BATCH} (mean / median ms)\n")
    single = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        single[threads] = {n: _time_steps(n, args.steps, args.warmup, 0, 1)
                           for n in args.optimizers}
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_worker, args=(2, _free_port(), args, queue), nprocs=2,
                       start_method="spawn", join=True)
    two = queue.get()
    print("| optimizer | 1 rank x 1 thread | 1 rank x 2 threads | 2 ranks x 1 thread |")
    print("|---|---|---|---|")
    for n in args.optimizers:
        cells = [single[1][n], single[2][n], two[n]]
        txt = " | ".join(f"{1e3 * statistics.mean(c):.1f} / {1e3 * statistics.median(c):.1f}"
                         for c in cells)
        print(f"| {n} | {txt} |")
    print("\n## Decompositions on 2 ranks (s, best of 3)\n")
    for k, v in two["eigh"].items():
        print(f"- {k}: {v:.4f}")


if __name__ == "__main__":
    main()
