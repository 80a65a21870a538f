"""What data-parallel training sends per curvature block (see ``docs/distributed.md``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .engine import CurvatureEngine


@dataclass(frozen=True)
class LayerTraffic:
    """Bytes one rank contributes to the all-reduces for one curvature block.

    ``step``: the gradient (every step, DDP); ``refresh``: the fresh statistics (refresh
    steps only: ``A`` and ``Γ`` for a Kronecker block, the diagonal for others, plus one
    weight per statistic); ``qe_inner``: QE's inner SKL gradient (per inner step).
    """

    name: str
    kind: str
    numel: int
    step: int
    refresh: int
    qe_inner: int


def communication_bytes(
    model: nn.Module, dtype: torch.dtype | None = None, *, bias: str = "homogeneous"
) -> list[LayerTraffic]:
    """Per-block payload of the all-reduces of data-parallel training of ``model``.

    The payload is the size of the buffer each rank passes to ``all_reduce`` (what crosses
    the network per rank is about ``2 (R-1)/R`` times that with a ring algorithm). ``dtype``
    defaults to the parameters' dtype. The blocks are those the optimizers build with
    ``curvature="kron"`` and the given ``bias`` mode.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    engine = CurvatureEngine(model, params, fisher="empirical", likelihood="categorical",
                             bias=bias)
    rows = []
    for b in engine.blocks:
        size = torch.empty((), dtype=dtype or b.params[0].dtype).element_size()
        numel = b.numel()
        refresh = b.statistics_numel() * size
        rows.append(LayerTraffic(b.name, b.kind, numel, numel * size, refresh, numel * size))
    return rows
