"""The collectives of a training run over several ranks (``torchrun``).

Each rank takes its contiguous, equal shard of every global batch (:func:`shard`); the
step's metrics and stop requests are summed over ranks in one small all-reduce
(:func:`sum_over_ranks`), and a checkpoint gathers every rank's RNG states to rank 0
(:func:`gather`). With one process none of these is called.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ... import distributed as kdist

__all__ = ["gather", "shard", "sum_over_ranks"]


def shard(
    xb: torch.Tensor, yb: torch.Tensor, rank: int, world: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's contiguous, equal share of a global batch (trimmed to a multiple)."""
    per = xb.shape[0] // world
    if per == 0:
        raise ValueError(f"a batch of {xb.shape[0]} examples cannot feed {world} ranks")
    return xb[rank * per : (rank + 1) * per], yb[rank * per : (rank + 1) * per]


def sum_over_ranks(values: list[float]) -> list[float]:
    """Sum a few numbers over ranks (one small all-reduce, in float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=kdist.comm_device())
    dist.all_reduce(t)
    return t.tolist()


def gather(t: torch.Tensor, world: int) -> list[torch.Tensor]:
    """Every rank's copy of ``t`` (same shape on every rank), on the CPU."""
    out: list[Any] = [None] * world
    dist.all_gather_object(out, t.cpu())
    return [o.cpu() for o in out]
