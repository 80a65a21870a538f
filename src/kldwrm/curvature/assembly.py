"""Which curvature block each tensor of a model gets (DESIGN section 1), and what each
block sends in data-parallel training (``docs/distributed.md``).

A supported layer (``nn.Linear``, ``nn.ConvNd``, ``nn.ConvTransposeNd``, and with
``embeddings="kron"`` ``nn.Embedding``) all of whose tensors are optimized gets a Kronecker
block (its bias inside it or beside it, ``bias=``); every other tensor a diagonal block; in
research mode (``curvature="dense"``) dense blocks over the model or each layer instead.
:class:`~kldwrm.curvature.engine.CurvatureEngine` builds its blocks here, as tensors are
added.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .blocks import Block, FactoredBlock
from .dense import DenseBlock
from .diagonal import DiagonalBlock
from .embedding import EmbeddingBlock, embedding_supported
from .layer import BiasBlock, KroneckerBlock, _ConvTransposeNd, kronecker_supported
from .transposed import TransposedConvBlock


def _warn_shared(module_name: str) -> None:
    """A layer whose weight an earlier Kronecker layer already holds (tied weights)."""
    warnings.warn(
        f"the weight of layer {module_name!r} is shared with an earlier layer, whose "
        "Kronecker block it keeps: its curvature comes from that layer's use only",
        UserWarning,
        stacklevel=6,
    )


def _kronecker_blocks(m: nn.Module, name: str, bias: str, rank: int | None
                      ) -> list[FactoredBlock]:
    """A Kronecker layer's blocks: its weight's (with the bias as a homogeneous coordinate
    where the block takes it) and, for a bias outside that block, the bias's own."""
    cls = TransposedConvBlock if isinstance(m, _ConvTransposeNd) else KroneckerBlock
    block = cls(m, name, bias=bias, rank=rank)
    if m.bias is None or block.has_bias:
        return [block]
    return [block, BiasBlock(m, f"{name}.bias", rank=rank)]


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module behind a ``DistributedDataParallel``/``DataParallel`` wrapper."""
    inner = getattr(model, "module", None)
    if isinstance(inner, nn.Module) and type(model).__name__ in (
        "DistributedDataParallel",
        "DataParallel",
    ):
        return inner
    return model


def _functionally_called(model: nn.Module) -> set[int]:
    """Linear layers whose weights their parent uses without calling them as modules, so no
    hook sees their inputs: ``nn.MultiheadAttention.out_proj`` (not that of
    :class:`kldwrm.layers.MultiheadAttention`, which calls it). They get diagonal blocks."""
    return {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)
            and not getattr(m, "projections_are_modules", False)}


def _dense_groups(
    module: nn.Module, params: list[nn.Parameter], name: str, bias: str
) -> list[tuple[list[nn.Parameter], str]]:
    """A module's dense blocks for ``dense_scope="layer"``: one, or with ``bias="separate"``
    the bias on its own (the exact counterpart of the released code's block structure)."""
    b = getattr(module, "bias", None)
    if bias != "separate" or not isinstance(b, nn.Parameter) or all(p is not b for p in params):
        return [(params, name)] if params else []
    rest = [p for p in params if p is not b]
    return ([(rest, name)] if rest else []) + [([b], f"{name}.bias")]


def build_blocks(model: nn.Module, params: Sequence[nn.Parameter], existing: Sequence[Block],
                 offset: int, *, curvature: str, bias: str, rank: int | None = None,
                 embeddings: str = "diagonal", dense_scope: str = "model") -> list[Block]:
    """The blocks of ``params``, tensors ``offset, offset + 1, ...`` of the flat list
    (``existing``: the blocks already built for the earlier tensors): Kronecker blocks
    (dense ones in research mode), then a diagonal block for each tensor left."""
    names = {id(p): n for n, p in model.named_parameters()}
    index = {id(p): offset + i for i, p in enumerate(params)}
    if curvature == "dense":
        first = offset == 0
        new = _dense_blocks(model, list(params), index, dense_scope, bias,
                            "model" if first else f"model.{len(existing)}")
    else:
        new = _kron_blocks(model, index, existing, bias, rank, embeddings)
    covered = {id(p) for b in new for p in b.params}
    return new + [DiagonalBlock(p, names[id(p)]) for p in params if id(p) not in covered]


def _dense_blocks(model: nn.Module, params: list[nn.Parameter], index: dict[int, int],
                  scope: str, bias: str, name: str) -> list[Block]:
    """Research mode: one block over ``params`` (``dense_scope="model"``), or one per
    module (``"layer"``). With ``"model"``, tensors frozen now (``requires_grad``
    off) get a block of their own, so that they do not enter the others' solve; so
    does a group added later (``name`` tells it apart)."""
    if scope == "model":
        live = [p for p in params if p.requires_grad]
        frozen = [p for p in params if not p.requires_grad]
        return ([DenseBlock(live, name)] if live else []) + (
            [DenseBlock(frozen, f"{name}.frozen")] if frozen else [])
    out: list[Block] = []
    for mname, m in model.named_modules():
        ps = [p for p in m.parameters(recurse=False) if id(p) in index]
        for group, gname in _dense_groups(m, ps, mname or "model", bias):
            out.append(DenseBlock(group, gname))
    return out


def _kron_blocks(model: nn.Module, index: dict[int, int], existing: Sequence[Block],
                 bias: str, rank: int | None, embeddings: str) -> list[Block]:
    """Kronecker blocks of the supported layers whose tensors are all in ``index``."""
    functional = _functionally_called(model)
    covered = {id(p) for b in existing if isinstance(b, FactoredBlock) for p in b.params}
    out: list[Block] = []
    for mname, m in model.named_modules():
        if not kronecker_supported(m) or id(m) in functional:
            continue
        own = [m.weight] + ([m.bias] if m.bias is not None else [])
        if id(m.weight) in covered:
            if id(m.weight) in index:  # tied to an earlier layer's weight
                _warn_shared(mname)  # its bias, if not shared too, gets a diagonal block
            continue
        if all(id(p) in index for p in own):
            out.extend(_kronecker_blocks(m, mname, bias, rank))
            covered.update(id(p) for p in own)
    if embeddings == "kron":  # after the layers: a tied weight keeps their block
        out += [EmbeddingBlock(m, mname) for mname, m in model.named_modules()
                if embedding_supported(m) and id(m.weight) in index
                and id(m.weight) not in covered]
    return out


# -- what data-parallel training sends -----------------------------------------------------
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
    params = [p for p in unwrap(model).parameters() if p.requires_grad]
    rows = []
    for b in build_blocks(unwrap(model), params, [], 0, curvature="kron", bias=bias):
        size = torch.empty((), dtype=dtype or b.params[0].dtype).element_size()
        numel = b.numel()
        refresh = b.statistics_numel() * size
        rows.append(LayerTraffic(b.name, b.kind, numel, numel * size, refresh, numel * size))
    return rows
