"""torch.distributed helpers: the curvature statistics and QE's inner gradients are averaged
over ranks so that every rank holds the same F̄ and takes the same step.

All functions are no-ops when ``torch.distributed`` is not initialised (or has one rank).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    """Number of ranks, 1 when not running distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def is_distributed() -> bool:
    return world_size() > 1


def all_reduce_mean_(tensors: Sequence[Tensor]) -> None:
    """In-place mean over ranks of every tensor (one flattened all-reduce)."""
    if not is_distributed() or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world_size()
    i = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[i : i + n].view_as(t))
        i += n
