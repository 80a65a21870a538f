"""torch.distributed helpers: the curvature statistics and QE's inner gradients are averaged
over ranks so that every rank holds the same F̄ and takes the same step.

All collective helpers are no-ops when ``torch.distributed`` is not initialised (or has one
rank). See ``docs/distributed.md`` for launching with ``torchrun`` and for what is sent.

* :func:`all_reduce_weighted_` is how the fresh curvature statistics of a refresh step are
  combined (one flattened all-reduce, weighted by each rank's number of examples/rows);
* :func:`all_reduce_mean_` averages QE's inner gradients;
* :func:`rank_seed` and :func:`broadcast_generator_` keep the "mc" label sampling
  decorrelated between ranks but reproducible from one shared generator state;
* :func:`init_from_env` starts the process group under ``torchrun`` (timeout and
  start-up barrier included);
* :func:`full`, :func:`zeros_full` and :func:`shard_like` are the boundary with a model
  sharded by FSDP2 (``fully_shard``): its parameters and gradients are ``DTensor`` shards,
  gathered to whole tensors before the step's arithmetic and sliced back to this rank's
  shard for the update.

What crosses the network per block is tabulated by
:func:`kldwrm.curvature.assembly.communication_bytes`. This module knows nothing of the
curvature (the curvature imports it, never the reverse).
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


def _loaded(module: str, name: str) -> Any:
    """``module.name`` if the user's program has imported ``module``, else ``None``: a
    ``DTensor`` or an FSDP module cannot exist before, and importing them eagerly would
    load sympy with ``import kldwrm``."""
    mod = sys.modules.get(module)
    return None if mod is None else getattr(mod, name, None)


def world_size() -> int:
    """Number of ranks, 1 when not running distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    """This process's rank, 0 when not running distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def is_distributed() -> bool:
    """Whether a process group with more than one rank is initialised."""
    return world_size() > 1


def all_reduce_mean_(tensors: Sequence[Tensor]) -> None:
    """In-place mean over ranks of every tensor (one flattened all-reduce)."""
    all_reduce_sum_(tensors, mean=True)


def all_reduce_sum_(tensors: Sequence[Tensor], mean: bool = False) -> None:
    """In-place sum (or mean) over ranks of every tensor (see :func:`summed`)."""
    for t, r in zip(tensors, summed(tensors, mean), strict=True):
        if r is not t:
            t.copy_(r)


def summed(tensors: Sequence[Tensor], mean: bool = False) -> list[Tensor]:
    """The sums (or means) over ranks of ``tensors``, as contiguous views of one flattened
    all-reduce per dtype and device (``tensors`` itself in one process). A tensor that one
    rank fills and the others leave at zero arrives bit for bit as that rank computed it
    (``x + 0 = x``), in the same memory layout on every rank."""
    if not is_distributed() or not tensors:
        return list(tensors)
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for j, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(j)
    out: list[Tensor] = list(tensors)
    for group in groups.values():
        flat = torch.cat([tensors[j].reshape(-1) for j in group])
        dist.all_reduce(flat)
        if mean:
            flat /= world_size()
        i = 0
        for j in group:
            n = tensors[j].numel()
            out[j] = flat[i : i + n].view(tensors[j].shape)
            i += n
    return out


def assign_by_cost(costs: Sequence[float], ranks: int) -> list[int]:
    """The rank that does each of ``costs``' jobs, balanced greedily (the largest job first,
    to the least loaded rank; ties to the lower rank): the same answer on every rank."""
    load = [0.0] * ranks
    owner = [0] * len(costs)
    for j in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        r = min(range(ranks), key=lambda r: (load[r], r))
        owner[j] = r
        load[r] += costs[j]
    return owner


def _reduce_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision statistics (and their counts) are reduced in float32."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def all_reduce_weighted_(
    stats: Sequence[dict[str, Tensor]], weights: Sequence[dict[str, float | None]]
) -> list[dict[str, float]]:
    """Combine per-rank statistics in place: weighted means, or plain sums.

    For every block ``b`` and key ``k``, ``weights[b][k]`` is this rank's weight ``w_r``
    (its number of examples or rows) and ``stats[b][k]`` becomes ``Σ_r w_r t_r / Σ_r w_r``,
    the statistic of the concatenated batch; a weight of ``None`` means the statistic is
    already scaled to the global batch and is summed over ranks. The weights travel in the
    same buffer as the statistics, so this is one flattened all-reduce per dtype and device
    (normally exactly one). Returns ``Σ_r w_r`` per block and key (``nan`` for sums). Every
    rank must pass the same blocks and keys, in the same order and shapes: a rank without
    data for a block sends zeros with weight 0 (a total of 0 then means no rank had data).
    """
    totals: list[dict[str, float]] = [{k: float("nan") for k in st} for st in stats]
    if not is_distributed():
        for st, ws, tot in zip(stats, weights, totals, strict=True):
            for k in st:
                if ws[k] is not None:
                    tot[k] = float(ws[k])
        return totals
    groups: dict[tuple[torch.dtype, torch.device], list[tuple[int, str]]] = {}
    for b, st in enumerate(stats):
        for k, t in st.items():
            groups.setdefault((_reduce_dtype(t.dtype), t.device), []).append((b, k))
    for (dtype, device), items in groups.items():
        parts = []
        ws = []
        for b, k in items:
            t, w = stats[b][k], weights[b][k]
            flat = t.reshape(-1).to(dtype)
            parts.append(flat if w is None else flat * w)
            ws.append(0.0 if w is None else float(w))
        parts.append(torch.tensor(ws, dtype=dtype, device=device))
        buf = torch.cat(parts)
        dist.all_reduce(buf)
        wsum = buf[-len(items):].tolist()
        i = 0
        for (b, k), total in zip(items, wsum, strict=True):
            t = stats[b][k]
            n = t.numel()
            red = buf[i : i + n].view_as(t)
            if weights[b][k] is not None:
                red = red / total if total != 0 else red  # 0: no rank had data (all zeros)
                totals[b][k] = total
            stats[b][k] = red.to(t.dtype)
            i += n
    return totals


def rank_seed(seed: int, rank_: int) -> int:
    """A 63-bit seed for ``rank_``, decorrelated from ``seed`` and from other ranks.

    Used for "mc" Fisher sampling: on a refresh step every rank draws the same ``seed``
    from the shared sampling generator (whose state stays identical on all ranks and is
    what the optimizer's ``state_dict`` saves), then samples its own shard's labels with a
    generator seeded by ``rank_seed(seed, rank)`` (splitmix64 finaliser).
    """
    z = (seed + 0x9E3779B97F4A7C15 * (rank_ + 1)) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


def comm_device() -> torch.device:
    """Where tensors must live for collectives of the default group."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_generator_(generator: torch.Generator, src: int = 0) -> None:
    """Make ``generator``'s state that of rank ``src`` on every rank (no-op on one rank)."""
    if not is_distributed():
        return
    state = generator.get_state()
    buf = state.to(comm_device())
    dist.broadcast(buf, src)
    generator.set_state(buf.cpu())


def init_from_env(
    device: str | torch.device = "cpu",
    timeout_s: float = 300.0,
    backend: str | None = None,
) -> bool:
    """Initialise the default process group from ``torchrun``'s environment variables.

    Returns whether a process group is in use: ``False`` (nothing done) unless
    ``WORLD_SIZE`` > 1 is set; ``True`` if a group was already initialised. The backend
    is ``nccl`` for CUDA devices and ``gloo`` otherwise. ``timeout_s`` bounds every
    collective (gloo; NCCL with async error handling, which torch enables by default), so
    a rank that dies or hangs makes the others fail with an error instead of waiting
    forever; a start-up barrier (``monitored_barrier`` with gloo, which names the missing
    ranks) checks that every rank joined.
    """
    if dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    dev = torch.device(device)
    if backend is None:
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend=backend, timeout=timeout)
    if backend == "gloo":
        dist.monitored_barrier(timeout=timeout, wait_all_ranks=True)
    else:
        dist.barrier()
    return True


def is_sharded(t: Tensor | None) -> bool:
    """Whether ``t`` is a ``DTensor`` (a parameter or gradient of an FSDP2 model)."""
    cls = _loaded("torch.distributed.tensor", "DTensor")
    return cls is not None and isinstance(t, cls)


def full(t: Tensor) -> Tensor:
    """The whole tensor behind ``t``: a ``DTensor`` is gathered (a collective: every rank
    must call it for the same tensors in the same order), anything else is returned as is."""
    return t.full_tensor() if is_sharded(t) else t


def zeros_full(p: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Zeros of ``p``'s whole shape on its device (a plain tensor even for a ``DTensor``)."""
    return torch.zeros(p.shape, dtype=p.dtype if dtype is None else dtype, device=p.device)


def shard_like(whole: Tensor, p: Tensor) -> Tensor:
    """``whole`` (the same on every rank) laid out as ``p``: for a ``DTensor`` parameter,
    this rank's shard of it, cut locally without communication; otherwise ``whole``."""
    if not is_sharded(p):
        return whole
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole, p.device_mesh, p.placements, src_data_rank=None)


def reshard(model: nn.Module) -> None:
    """Free the gathered parameters of every FSDP2 module in ``model`` (``reshard()``), so
    that its next forward gathers its shards as they are then (FSDP keeps the root's
    parameters gathered after a forward pass)."""
    cls = _loaded("torch.distributed.fsdp", "FSDPModule")
    if cls is None:
        return
    for m in model.modules():
        if isinstance(m, cls):
            m.reshard()


def shutdown() -> None:
    """Destroy the default process group if one is initialised."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
