"""The curvature engine: one object that every step rule shares.

It builds the block-diagonal curvature of a model (Kronecker blocks for ``nn.Linear``,
``nn.ConvNd`` and ``nn.ConvTransposeNd``, diagonal blocks for every other tensor, or dense
blocks in research mode), arms the capture hooks on refresh steps only, folds fresh estimates into
the exponential average (eqs. 12-13, with infrequent updates as in eq. 20), and maps
parameter-shaped vectors through the damped solves and matrix-vector products.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..distributed import (
    all_reduce_weighted_,
    is_distributed,
    summed,
)
from ..distributed import rank as this_rank
from . import sharding
from .assembly import build_blocks, unwrap
from .blocks import Block, FactoredBlock
from .capture import Capture, OutputSelector
from .dense import DenseBlock, dense_fishers
from .diagonal import DiagonalBlock
from .kronecker import CORRECTED, EigenMoments
from .layer import KroneckerBlock
from .linalg import all_finite

#: ``"kron"``: K-FAC's eigenvalues; ``"ekfac"``/``"adaptive"``: measured in K-FAC's
#: eigenbasis (:mod:`.eigen`); ``"dense"``: the full Fisher (research mode)
CURVATURES = ("kron", "ekfac", "adaptive", "dense")

#: how an ``nn.Embedding``'s weight is blocked (``embeddings``)
EMBEDDINGS = ("diagonal", "kron")

#: how a linear layer shared over positions is approximated (Eschenhagen et al. 2023)
WEIGHT_SHARING = ("expand", "reduce")

#: who decomposes the Kronecker factors on a refresh under ``torch.distributed``: every
#: rank every block, one rank each (results all-reduced), the latter above a measured
#: cost, or one rank each that also holds and applies the block (:mod:`.sharding`)
DECOMPOSITIONS = ("auto", "replicated", "sharded", "owned")



def _wide(p: Tensor) -> torch.dtype:
    return torch.promote_types(p.dtype, torch.float32)


DENSE_SCOPES = ("model", "layer")


class CurvatureEngine:
    """Block-diagonal curvature over ``params`` (a flat, ordered list of tensors).

    Tensors may be added later (:meth:`add_params`, behind ``Optimizer.add_param_group``):
    they are appended to the flat list and get blocks of their own, built as at
    construction.
    """

    def __init__(
        self,
        model: nn.Module,
        params: Sequence[nn.Parameter],
        *,
        fisher: str,
        likelihood: str,
        curvature: str = "kron",
        dense_scope: str = "model",
        bias: str = "homogeneous",
        rank: int | None = None,
        generator: torch.Generator | None = None,
        output: OutputSelector = None,
        eigen_beta: float = 0.95,
        eigen_power: float = 1.0,
        damping_split: str = "tikhonov",
        embeddings: str = "diagonal",
        weight_sharing: str = "expand",
    ) -> None:
        self.root = model
        #: ``"pi"``: Kronecker blocks damp with π-split factors (``KroneckerFactors.split``)
        self.damping_split = damping_split
        #: ``"kron"``: ``nn.Embedding`` weights get :class:`EmbeddingBlock` (else diagonal)
        self.embeddings = embeddings
        #: ``"reduce"``: linear layers on sequences use K-FAC-reduce (else "expand")
        self.weight_sharing = weight_sharing
        #: decay and power of the measured eigenvalues (``curvature`` in ``CORRECTED``)
        self.eigen_beta = eigen_beta
        self.eigen_power = eigen_power
        self.model = unwrap(model)
        self.fisher = fisher
        self.likelihood = likelihood
        self.curvature = curvature
        self.dense_scope = dense_scope
        self.bias = bias
        self.rank = rank
        #: how a refresh's decompositions are divided over ranks (:data:`DECOMPOSITIONS`)
        self.decompositions = "replicated"
        self._owners: tuple[dict[int, int], int] | None = None  # see :meth:`owners`
        self.params: list[nn.Parameter] = []
        self.blocks: list[Block] = []
        #: positions of each block's tensors in the flat parameter list
        self.slots: list[list[int]] = []
        self.capture = Capture(
            self.root, [], [], fisher=fisher, likelihood=likelihood, generator=generator,
            record_root=curvature == "dense", output=output,
        )
        self.add_params(params)

    def add_params(self, params: Sequence[nn.Parameter]) -> list[int]:
        """Append ``params`` to the flat list and build their blocks; returns the indices
        of the new blocks. A layer gets a Kronecker block when all of its own tensors are
        among ``params``, every other tensor a diagonal one (dense blocks in research
        mode); the capture hooks of the new layers are installed if it is armed."""
        params = list(params)
        names = {id(p) for p in self.model.parameters()}
        unknown = [i for i, p in enumerate(params) if id(p) not in names]
        if unknown:
            raise ValueError(
                "every optimized tensor must be a parameter of the model passed as the first "
                f"argument; parameters at positions {unknown} are not"
            )
        offset = len(self.params)
        self.params.extend(params)
        index = {id(p): offset + i for i, p in enumerate(params)}
        new = build_blocks(self.model, params, self.blocks, offset, curvature=self.curvature,
                           bias=self.bias, rank=self.rank, embeddings=self.embeddings,
                           dense_scope=self.dense_scope)
        for b in new:
            if isinstance(b, FactoredBlock):
                b.factors.split = self.damping_split == "pi"
            if isinstance(b, KroneckerBlock):
                b.weight_sharing = self.weight_sharing
        if self.curvature in CORRECTED:
            for b in new:
                b.moments = EigenMoments(self.curvature, self.eigen_beta, self.eigen_power)
        first = len(self.blocks)
        self.blocks.extend(new)
        self.slots.extend([index[id(p)] for p in b.params] for b in new)
        held = {id(m) for m in self.capture.kron_modules}
        kron = list({id(b.module): b.module for b in new if isinstance(b, FactoredBlock)
                     and id(b.module) not in held}.values())
        self.capture.add(kron, [b.params[0] for b in new if isinstance(b, DiagonalBlock)])
        return list(range(first, len(self.blocks)))

    # -- refresh ----------------------------------------------------------------------
    def arm(self, on: bool) -> None:
        """Install (``on``) or remove the capture hooks for the next forward pass."""
        if on:
            self.capture.arm()
        else:
            self.capture.disarm()

    def fresh_estimates(
        self, grads: Sequence[Tensor | None], blocks: Sequence[int] | None = None
    ) -> list[dict[str, Tensor] | None] | None:
        """Fresh estimates of ``blocks`` (default: all) from this step's capture; ``None``
        if non-finite.

        A block that received no data on this step (a layer the forward pass did not use),
        or that is not in ``blocks``, has the estimate ``None``. Nothing is modified, so a
        step with non-finite statistics can be skipped cleanly. Under ``torch.distributed``
        every rank must pass the same ``blocks``.
        """
        wanted = set(range(len(self.blocks)) if blocks is None else blocks)
        dense = [b for i, b in enumerate(self.blocks) if isinstance(b, DenseBlock) and i in wanted]
        if dense:
            self.capture.snapshot_generator()
            self.capture.paused = True  # functional re-evaluation must not be captured
            try:
                dense_fishers(self.model, dense, self.capture, self.fisher, self.likelihood)
            finally:
                self.capture.paused = False
        self.capture.num_examples()  # raises a clear error when no forward pass was captured
        chosen = [(i, b, [grads[j] for j in self.slots[i]])
                  for i, b in enumerate(self.blocks) if i in wanted]
        out: list[dict[str, Tensor] | None] = [None] * len(self.blocks)
        if is_distributed():
            # every rank's statistics, combined in one flattened all-reduce (weighted by
            # examples/rows), so that every rank folds the same estimate of the whole batch;
            # a block without data on this rank takes part with zeros of weight 0
            parts = [b.distributed_fresh(self.capture, gs) for _, b, gs in chosen]
            totals = all_reduce_weighted_([st for st, _ in parts], [w for _, w in parts])
            for (i, b, _), (st, _), tot in zip(chosen, parts, totals, strict=True):
                out[i] = b.finish_distributed(st, tot)
        else:
            for i, b, gs in chosen:
                out[i] = b.fresh(self.capture, gs)
        if not all_finite([t for est in out if est is not None for t in est.values()]):
            return None
        return out

    def fold(self, estimates: Sequence[dict[str, Tensor] | None], rho: float) -> None:
        """EA update and re-decomposition of every block (eqs. 12-13); a block without an
        estimate keeps its average, which also stands in for its fresh estimate.

        Under ``torch.distributed`` with sharded decompositions (:meth:`decomposers`) each
        Kronecker block is decomposed by one rank only and the results are summed over
        ranks in one flattened all-reduce (the other ranks contribute zeros), so every rank
        ends with the same decomposition bit for bit."""
        owners = self.decomposers(estimates)
        me = this_rank()
        for bi, (b, est) in enumerate(zip(self.blocks, estimates, strict=True)):
            if self._remote(bi):  # held by its owner ("owned"): only the flag is kept here
                b.initialized = b.initialized or est is not None
            elif est is None:
                b.keep_average()
            elif bi in owners:
                b.fold(est, rho, decompose=owners[bi] == me)
            else:
                b.fold(est, rho)
        if owners:
            sharding.share_decompositions([self.blocks[bi] for bi in owners])
        if self.curvature == "ekfac":
            self._fold_example_moments(estimates, rho)

    def decomposers(self, estimates: Sequence[dict[str, Tensor] | None]) -> dict[int, int]:
        """The rank that decomposes each Kronecker block folded now (empty: every rank
        decomposes every block; :func:`.sharding.decomposers`)."""
        if not is_distributed() or self.decompositions in ("replicated", "owned"):
            return {}
        return sharding.decomposers(self.blocks, estimates, self.rank,
                                    auto=self.decompositions == "auto")

    def owners(self) -> dict[int, int]:
        """``decompositions="owned"`` under ``torch.distributed``: the rank holding each
        Kronecker block (:mod:`.sharding`); empty otherwise."""
        if self.decompositions != "owned" or not is_distributed():
            return {}
        if self._owners is None or self._owners[1] != len(self.blocks):
            self._owners = (sharding.owners(self.blocks), len(self.blocks))
        return self._owners[0]

    def _remote(self, bi: int) -> bool:
        """Whether block ``bi`` is held by another rank."""
        return self.owners().get(bi, this_rank()) != this_rank()

    def _fold_example_moments(self, estimates: Sequence[dict[str, Tensor] | None],
                              rho: float) -> None:
        """EKFAC: per-example second moments in the new eigenbasis of each Kronecker block
        with data (:meth:`FactoredBlock.example_moments`), averaged over ranks by examples."""
        chosen = [b for b, est in zip(self.blocks, estimates, strict=True)
                  if est is not None and isinstance(b, FactoredBlock)]
        stats, weights = [], []
        for b in chosen:
            S, weight = b.example_moments(self.capture)
            stats.append({"S": S})
            weights.append({"S": weight})
        if is_distributed():
            all_reduce_weighted_(stats, weights)
        for b, st in zip(chosen, stats, strict=True):
            b.fold_moments(st["S"], rho)

    def observe(self, grads: Sequence[Tensor], skip: Sequence[int] = ()) -> None:
        """``curvature="adaptive"``: fold this step's gradient into each block's running
        second moments in its eigenbasis (blocks with curvature, none of whose tensors is in
        ``skip``, the positions of tensors the step leaves out)."""
        if self.curvature != "adaptive":
            return
        left = set(skip)
        for b, slot in zip(self.blocks, self.slots, strict=True):
            if b.initialized and not left.intersection(slot):
                b.observe([grads[i] for i in slot])

    def diagonalizable(self) -> bool:
        """Whether every block with curvature has a complete eigenbasis (no rank truncation),
        so that vectors can live in eigenbasis coordinates (:meth:`to_eigenbasis`)."""
        return all(sharding.exact_by_size(b) if self._remote(bi) else b.exact
                   for bi, b in enumerate(self.blocks) if b.initialized)

    def ready(self) -> list[bool]:
        """Per block: whether it has curvature (it has received data on some refresh)."""
        return [b.initialized for b in self.blocks]

    def end_refresh(self) -> None:
        """Drop fresh estimates and captured tensors once the refresh step is done."""
        for b in self.blocks:
            b.drop_fresh()
        self.capture.clear()

    # -- linear algebra on parameter-shaped vectors --------------------------------------
    def _map_blocks(
        self,
        fn: Callable[[Block, list[Tensor] | None], list[Tensor]],
        vecs: Sequence[Tensor] | None,
        blocks: Sequence[int] | None = None,
    ) -> list[Tensor]:
        """``fn(block, its slice of vecs)`` over ``blocks``, reassembled into a flat
        parameter-ordered list (ones for the others when ``vecs`` is None).

        By default ``blocks`` is every block that has curvature, and the result is the
        caller's own: no tensor shares storage with ``vecs`` (the tensors of a block
        without curvature, the identity's, are copies), so a step rule may scale it in
        place. With ``blocks`` given, the other tensors pass through unchanged (the
        caller reads only those blocks' entries)."""
        if vecs is None:
            out: list[Tensor] = [torch.ones(p.shape, dtype=_wide(p), device=p.device)
                                 for p in self.params]
        else:
            out = list(vecs)
        if blocks is None:
            blocks = [i for i, b in enumerate(self.blocks) if b.initialized]
            if vecs is not None and len(blocks) < len(self.blocks):  # (every tensor has
                # a block, so only a block without curvature passes its tensors through)
                mapped = {i for bi in blocks for i in self.slots[bi]}
                out = [v if i in mapped else v.clone() for i, v in enumerate(out)]
        owners = self.owners()
        for bi in blocks:
            slot = self.slots[bi]
            if self._remote(bi):  # computed by the owner, received below
                part = [torch.zeros(self.params[i].shape, dtype=_wide(self.params[i]),
                                    device=self.params[i].device) for i in slot]
            else:
                part = fn(self.blocks[bi], None if vecs is None else [vecs[i] for i in slot])
            for i, r in zip(slot, part, strict=True):
                out[i] = r.to(_wide(self.params[i])) if bi in owners else r
        if owners:
            held = [i for bi in blocks if bi in owners for i in self.slots[bi]]
            for i, r in zip(held, summed([out[i] for i in held]), strict=True):
                out[i] = r
        return out

    def solve(
        self,
        vecs: Sequence[Tensor],
        scales: Sequence[tuple[float, float, float]],
        method: str = "exact",
    ) -> list[Tensor]:
        """Blockwise ``(e·F̄ + f·F + γI)^{-1} v``; ``scales[group] = (e, f, γ)``."""
        def one(b: Block, v: list[Tensor] | None) -> list[Tensor]:
            e, f, damping = scales[b.group]
            return b.solve(v, damping, e, f, method)

        return self._map_blocks(one, vecs)

    def matvec(
        self, vecs: Sequence[Tensor], scales: Sequence[tuple[float, float, float]],
        blocks: Sequence[int] | None = None,
    ) -> list[Tensor]:
        """Blockwise ``(e·F̄ + f·F + γI) v``; ``scales[group] = (e, f, γ)``; ``blocks``: the
        blocks to multiply (default: all with curvature), the other tensors pass through."""
        def one(b: Block, v: list[Tensor] | None) -> list[Tensor]:
            e, f, damping = scales[b.group]
            return b.matvec(v, damping, e, f)

        return self._map_blocks(one, vecs, blocks)

    # -- the eigenbasis of F̄ ---------------------------------------------------------------
    def to_eigenbasis(
        self, vecs: Sequence[Tensor], blocks: Sequence[int] | None = None
    ) -> list[Tensor]:
        """Blockwise coordinates in the eigenbasis of ``F̄`` (see :meth:`Block.to_eigenbasis`).

        ``blocks``: indices of the blocks to transform; the other tensors pass through.
        """
        return self._map_blocks(lambda b, v: b.to_eigenbasis(v), vecs, blocks)

    def from_eigenbasis(
        self, coords: Sequence[Tensor], blocks: Sequence[int] | None = None
    ) -> list[Tensor]:
        """Inverse of :meth:`to_eigenbasis`."""
        return self._map_blocks(lambda b, v: b.from_eigenbasis(v), coords, blocks)

    def eigenvalues(self, scales: Sequence[tuple[float, float, float]]) -> list[Tensor]:
        """Blockwise diagonal of ``e·F̄ + γI`` in the eigenbasis (``f`` must be 0)."""
        def one(b: Block, _: list[Tensor] | None) -> list[Tensor]:
            e, f, damping = scales[b.group]
            if f != 0.0:
                raise ValueError("the fresh estimate is not diagonal in the eigenbasis of F̄")
            return b.eigenvalues(e, damping)

        return self._map_blocks(one, None)

    # -- persistence --------------------------------------------------------------------
    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        """Every block's state; with ``"owned"`` curvature gathered from the owners (a
        collective: every rank must call it)."""
        states = dict(zip(self.block_keys(), (b.state_dict() for b in self.blocks),
                          strict=True))
        return sharding.gather_states(states) if self.owners() else states

    def block_keys(self) -> list[str]:
        """Each block's key in :meth:`state_dict` (``index:kind:name``)."""
        return [f"{i}:{b.kind}:{b.name}" for i, b in enumerate(self.blocks)]

    def load_state_dict(self, state: dict[str, dict[str, Tensor]]) -> None:
        keys = list(state)
        if len(keys) != len(self.blocks):
            raise ValueError(
                f"curvature state has {len(keys)} blocks but this model has {len(self.blocks)}"
            )
        for i, (b, k) in enumerate(zip(self.blocks, keys, strict=True)):
            if k != f"{i}:{b.kind}:{b.name}":
                raise ValueError(f"curvature state block {k!r} does not match {b.kind}:{b.name}")
            b.load_state_dict(state[k])
            if self._remote(i):
                sharding.release(b)  # the owner keeps it

    def describe(self) -> list[tuple[str, str, int]]:
        """``(name, kind, numel)`` for each block, e.g. to show which layers are Kronecker."""
        return [(b.name, b.kind, b.numel()) for b in self.blocks]

    def state_bytes(self) -> int:
        """Bytes held by the curvature (factors and decompositions)."""
        return sum(
            t.numel() * t.element_size() for b in self.blocks for t in b.state_dict().values()
        )
