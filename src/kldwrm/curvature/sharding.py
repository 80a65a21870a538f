"""Curvature work divided over ranks (``decompositions=``, docs/distributed.md).

**Sharded decompositions** (``"sharded"``, and ``"auto"`` above
:data:`SHARD_DECOMPOSITIONS_ABOVE`): every rank folds the same EA factors, each Kronecker
block is decomposed by one rank (:func:`decomposers`, balanced by ``n³``) and the results
reach every rank in one all-reduce (:func:`share_decompositions`).

**Owned curvature** (``"owned"``), under DDP or FSDP2: a Kronecker block's EA factors,
decomposition and fresh estimate live on one rank, its *owner*; the blocks are dealt
by their state size (``d_in² + d_out²``) with :func:`~kldwrm.distributed.assign_by_cost`,
so a rank holds about ``1/R`` of the curvature plus at most one block more. Every rank
still receives every block's refresh statistics (the same all-reduce as replicated
curvature) and drops those it does not own.

Every blockwise map of the engine (solve, matvec, eigenbasis changes, eigenvalues) is
computed by the owner and *received* by the others: the owner's result and the others'
zeros summed in one flattened all-reduce per map (:func:`~kldwrm.distributed.summed`), so
every rank holds the same vectors bit for bit, and the step rules above the engine run
unchanged on every rank. The price is one all-reduce of the mapped vectors (a gradient's
size) per map: K-FAC and SO one per step, Q two or three, QE one more per inner step.

:meth:`~kldwrm.curvature.engine.CurvatureEngine.state_dict` gathers the owners' blocks, so
any rank's ``state_dict()`` is the whole checkpoint (every rank must call it), and
``load_state_dict`` keeps only the blocks this rank owns: a run resumes at any number of
ranks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..distributed import assign_by_cost, summed, world_size
from .blocks import Block, FactoredBlock
from .kronecker import decomposition_cost

#: ``decompositions="auto"`` shards a refresh whose summed ``n³`` exceeds this: between the
#: break-even (width 64, 4.4e6) and a clear gain (width 128, 3.4e7) on 2 ranks
#: (docs/distributed.md)
SHARD_DECOMPOSITIONS_ABOVE = 1.0e7


def decomposers(blocks: Sequence[Block], estimates: Sequence[dict[str, Tensor] | None],
                rank: int | None, auto: bool) -> dict[int, int]:
    """The rank that decomposes each Kronecker block folded now, balanced by the cost of
    its decompositions (:func:`~kldwrm.curvature.kronecker.factors.decomposition_cost`); empty when
    ``auto`` and the refresh costs less than :data:`SHARD_DECOMPOSITIONS_ABOVE`."""
    folded = [bi for bi, (b, est) in enumerate(zip(blocks, estimates, strict=True))
              if est is not None and isinstance(b, FactoredBlock)]
    costs = [decomposition_cost((estimates[bi]["A"], estimates[bi]["G"]), rank)
             for bi in folded]
    if auto and sum(costs) < SHARD_DECOMPOSITIONS_ABOVE:
        return {}
    return dict(zip(folded, assign_by_cost(costs, world_size()), strict=True))


def share_decompositions(blocks: Sequence[FactoredBlock]) -> None:
    """Every rank receives each block's decomposition from its decomposer: the owners'
    tensors and the others' zeros summed in one all-reduce, every rank keeping the result
    in the same (contiguous) layout, so later products round alike on every rank."""
    parts = [b.factors.shared() for b in blocks]
    flat = summed([t for part in parts for t in part])
    i = 0
    for b, part in zip(blocks, parts, strict=True):
        b.factors.set_shared(flat[i : i + len(part)])
        i += len(part)


def owners(blocks: Sequence[Block]) -> dict[int, int]:
    """The rank holding each Kronecker block (by index), balanced by state size."""
    factored = [bi for bi, b in enumerate(blocks) if isinstance(b, FactoredBlock)]
    sizes = [float(blocks[bi].statistics_numel()) for bi in factored]
    return dict(zip(factored, assign_by_cost(sizes, world_size()), strict=True))


def exact_by_size(block: FactoredBlock) -> bool:
    """What ``block.exact`` is on its owner, from the sizes alone: no factor truncated
    (the block's ``rank`` is ``None`` or at least both factors' sizes)."""
    r = block.factors.rank
    return r is None or r >= max(block._factor_sizes())


def release(block: FactoredBlock) -> None:
    """Drop a block's state on a rank that does not own it (it stays ``initialized``)."""
    initialized = block.initialized
    block.factors.load_state_dict({}, torch.device("cpu"))
    block.moments = None
    block.initialized = initialized


def gather_states(states: dict[str, dict[str, Tensor]]) -> dict[str, dict[str, Tensor]]:
    """Every rank's owned block states merged (one ``all_gather_object``; tensors sent on
    the CPU): the whole curvature state, in this rank's key order."""
    mine = {k: {n: t.cpu() for n, t in st.items()} for k, st in states.items() if st}
    parts: list[dict[str, dict[str, Tensor]] | None] = [None] * world_size()
    dist.all_gather_object(parts, mine)
    merged: dict[str, dict[str, Tensor]] = {}
    for part in parts:
        merged.update(part or {})
    return {k: merged.get(k, st) for k, st in states.items()}
