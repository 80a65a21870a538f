"""Curvature blocks: how one layer's (or one tensor's) Fisher block is estimated and inverted.

Every block answers the same questions, so the step rules never look inside:

* :meth:`Block.fresh` turns what :class:`~kldwrm.curvature.capture.Capture` recorded on a
  refresh step into a fresh estimate ``F_k`` (eq. 11 for Kronecker blocks);
* :meth:`Block.fold` folds it into the exponential average ``F̄ ← ρ F̄ + (1-ρ) F_k``
  (eqs. 12-13, seeded with the first estimate) and re-decomposes;
* :meth:`Block.solve` returns ``(e·F̄ + f·F_k + γI)^{-1} u`` and :meth:`Block.matvec`
  returns ``(e·F̄ + f·F_k + γI) v``; ``e`` and ``f`` let the step rules express every
  system of DESIGN section 3 (``f`` is nonzero only on refresh steps, eq. 20).

Vectors are lists of tensors shaped like the block's parameters.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from .kronecker import EXACT_SOLVE_RTOL, EigenMoments, KroneckerFactors, example_moments
from .linalg import CurvatureError
from .statistics import conv_column_blocks, gram


class Block(ABC):
    """One diagonal block of the block-diagonal curvature."""

    kind: str = "block"

    def __init__(self, params: Sequence[nn.Parameter], name: str) -> None:
        self.params = list(params)
        self.name = name
        self.initialized = False
        #: index of the optimizer parameter group the block's tensors belong to
        self.group = 0
        #: relative residual of the last iterative solve (``q_solve="exact"``), for tests
        self.last_residual = 0.0

    @abstractmethod
    def fresh(self, capture, grads: Sequence[Tensor | None]) -> dict[str, Tensor] | None:
        """Fresh curvature estimate of this step from the captured statistics; ``None`` when
        the block received no data on this step (its tensors were not used)."""

    @abstractmethod
    def fold(self, fresh: dict[str, Tensor], rho: float) -> None:
        """EA update ``F̄ ← ρF̄ + (1-ρ)F`` (first call: ``F̄ = F``) and re-decomposition."""

    @abstractmethod
    def solve(
        self,
        vecs: Sequence[Tensor],
        damping: float,
        ea_scale: float = 1.0,
        fresh_scale: float = 0.0,
        method: str = "exact",
    ) -> list[Tensor]:
        """``(ea_scale·F̄ + fresh_scale·F + damping·I)^{-1} vecs``."""

    @abstractmethod
    def matvec(
        self,
        vecs: Sequence[Tensor],
        damping: float,
        ea_scale: float = 1.0,
        fresh_scale: float = 0.0,
    ) -> list[Tensor]:
        """``(ea_scale·F̄ + fresh_scale·F + damping·I) vecs``."""

    # -- the eigenbasis of F̄ (used by step rules that keep vectors in it) -----------------
    def to_eigenbasis(self, vecs: Sequence[Tensor]) -> list[Tensor]:
        """Coordinates of ``vecs`` in the orthonormal eigenbasis of ``F̄``, parameter-shaped.

        The basis changes only when :meth:`fold` re-decomposes, so a step rule may keep a
        vector in these coordinates between refreshes; there ``e·F̄ + γI`` is the diagonal
        :meth:`eigenvalues` and a solve is one division. Dot products are preserved.
        """
        raise NotImplementedError(f"{type(self).__name__} has no eigenbasis")

    def from_eigenbasis(self, coords: Sequence[Tensor]) -> list[Tensor]:
        """Inverse of :meth:`to_eigenbasis`."""
        raise NotImplementedError(f"{type(self).__name__} has no eigenbasis")

    def eigenvalues(self, ea_scale: float, damping: float) -> list[Tensor]:
        """The diagonal of ``ea_scale·F̄ + damping·I`` in the eigenbasis, parameter-shaped."""
        raise NotImplementedError(f"{type(self).__name__} has no eigenbasis")

    @abstractmethod
    def state_dict(self) -> dict[str, Tensor]:
        """Tensors needed to continue bit-exactly."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Inverse of :meth:`state_dict`."""

    def drop_fresh(self) -> None:
        """Forget the fresh estimate once the refresh step is over (saves memory)."""
        return None

    @abstractmethod
    def keep_average(self) -> None:
        """A refresh without data for this block: the average stays as it is and stands in
        for the fresh estimate of this step (a block never refreshed stays left out)."""

    # -- data parallelism (kldwrm.distributed) ---------------------------------------------
    def distributed_fresh(
        self, capture, grads: Sequence[Tensor | None]
    ) -> tuple[dict[str, Tensor], dict[str, float | None]]:
        """This rank's statistics for the all-reduce over ranks, and their weights.

        Each statistic ``t_r`` with weight ``w_r`` is combined as ``Σ w_r t_r / Σ w_r``
        (weight ``None``: summed), which must give the statistic of the concatenated
        batch; :meth:`finish_distributed` then turns the combined statistics into the
        fresh estimate. A rank where the block received no data sends zeros with weight 0
        (:meth:`empty_statistics`), so every rank joins the same all-reduce. Default: the
        fresh estimate, a mean over the examples.
        """
        est = self.fresh(capture, grads)
        if est is None:
            return self.empty_statistics()
        n = float(capture.num_examples())
        return est, dict.fromkeys(est, n)

    def empty_statistics(self) -> tuple[dict[str, Tensor], dict[str, float | None]]:
        """Zero statistics of the right shapes, with weight 0 (no data on this rank)."""
        raise NotImplementedError

    def finish_distributed(
        self, stats: dict[str, Tensor], totals: dict[str, float]
    ) -> dict[str, Tensor] | None:
        """Fresh estimate from the combined statistics (``totals``: the summed weights);
        ``None`` when no rank had data for the block (a total weight of 0)."""
        if any(t == 0 for t in totals.values()):
            return None
        return stats

    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    def statistics_numel(self) -> int:
        """Numbers this block all-reduces on a refresh step: its fresh statistics, plus
        one weight per statistic (:meth:`distributed_fresh`)."""
        return self.numel() + 1

    @property
    def exact(self) -> bool:
        """Whether the curvature has a complete eigenbasis (no truncation to a rank)."""
        return True

    def _check_ready(self) -> None:
        if not self.initialized:
            raise RuntimeError(f"curvature block {self.name!r} used before its first refresh")


#: how a layer's bias enters the curvature (DESIGN section 1)
BIAS_MODES = ("homogeneous", "separate")


class FactoredBlock(Block):
    """A block whose curvature is a Kronecker product ``Ā ⊗ Γ̄`` (:class:`KroneckerFactors`).

    Subclasses say which tensors form the matrix ``V`` (:meth:`_to_mat`, :meth:`_from_mat`)
    and how the fresh factors come from the captured statistics (:meth:`fresh`); solves,
    products, the eigenbasis and persistence are shared.
    """

    def __init__(self, module: nn.Module, params: Sequence[nn.Parameter], name: str,
                 rank: int | None = None) -> None:
        super().__init__(params, name)
        self.module = module
        self.factors = KroneckerFactors(name, rank)
        #: dtype of the factors: at least float32, whatever the activations' dtype
        self.dtype = torch.promote_types(module.weight.dtype, torch.float32)
        #: measured eigenvalues (``curvature="ekfac"``/``"adaptive"``, :mod:`.eigen`);
        #: ``None``: K-FAC's ``dΓ dAᵀ``
        self.moments: EigenMoments | None = None
        #: ``"adaptive"``: the tensors observed this step and their rotation (reused by a
        #: solve or rotation of the same tensors, e.g. K-FAC's of the gradient)
        self._observed: tuple[list[Tensor], Tensor] | None = None

    # the factor pair, for tests and step rules that inspect it
    A_bar = property(lambda self: self.factors.A_bar)
    G_bar = property(lambda self: self.factors.G_bar)
    A_fresh = property(lambda self: self.factors.A_fresh)
    G_fresh = property(lambda self: self.factors.G_fresh)

    @abstractmethod
    def _to_mat(self, vecs: Sequence[Tensor]) -> Tensor:
        """The block's tensors as the matrix ``V`` of the Kronecker algebra."""

    @abstractmethod
    def _from_mat(self, mat: Tensor) -> list[Tensor]:
        """Inverse of :meth:`_to_mat`."""

    def _columns(self, vecs: Sequence[Tensor]) -> list[Tensor]:
        """``V`` as column blocks (:meth:`_to_mat` without joining them): one by default."""
        return [self._to_mat(vecs)]

    def _from_columns(self, parts: Sequence[Tensor]) -> list[Tensor]:
        """Inverse of :meth:`_columns`."""
        return self._from_mat(parts[0])

    def _has_data(self, capture) -> bool:
        """Whether this step's capture holds both inputs and output gradients of the layer."""
        return bool(capture.inputs.get(self.module)) and bool(capture.deltas.get(self.module))

    def empty_statistics(self):
        d_in, d_out = self._factor_sizes()
        dev = self.module.weight.device

        def z(*shape: int) -> Tensor:  # plain zeros, also for an FSDP-sharded weight
            return torch.zeros(shape, dtype=self.dtype, device=dev)

        return ({"A": z(d_in, d_in), "G": z(d_out, d_out)},
                {"A": 0.0, "G": 0.0})

    def fold(self, fresh: dict[str, Tensor], rho: float, decompose: bool = True) -> None:
        self.factors.fold(fresh["A"], fresh["G"], rho, decompose)
        self._observed = None  # a new basis
        self.initialized = True

    def drop_fresh(self) -> None:
        self.factors.drop_fresh()
        if self.moments is not None:
            self.moments.drop_fresh()

    def keep_average(self) -> None:
        self.factors.keep_average()
        if self.moments is not None:
            self.moments.drop_fresh()

    # -- measured eigenvalues (curvature="ekfac" / "adaptive") -------------------------------
    def example_rows(self, capture) -> tuple[Tensor, Tensor, float] | None:
        """``(rows of ā, rows of δ, N)`` of the same examples, for EKFAC's per-example
        moments; ``None`` where the block cannot pair them (the default)."""
        return None

    def example_moments(self, capture) -> tuple[Tensor, float]:
        """EKFAC's ``S`` of this refresh in the new eigenbasis (:func:`.eigen.example_moments`)
        and its weight across ranks (the examples): K-FAC's ``dΓ dAᵀ`` (its value under
        independence) with weight 1 where rows cannot be paired, zeros with weight 0 where
        this rank has no data."""
        f = self.factors
        if not self._has_data(capture):
            return torch.zeros_like(torch.outer(f.evals_G, f.evals_A)), 0.0
        rows = self.example_rows(capture)
        if rows is None:
            return torch.outer(f.evals_G, f.evals_A).clamp_min_(0.0), 1.0
        return example_moments(rows[0], rows[1], f.evecs_A, f.evecs_G, rows[2]), rows[2]

    def fold_moments(self, S: Tensor, rho: float) -> None:
        self.moments.fold(S, rho)

    def observe(self, vecs: Sequence[Tensor]) -> None:
        """``"adaptive"``: fold this step's gradient, in the eigenbasis, into ``S̄``."""
        rotated = self.factors.rotate(self._to_mat(vecs))
        self.moments.observe(rotated)
        self._observed = (list(vecs), rotated)

    def _rotated(self, vecs: Sequence[Tensor]) -> Tensor:
        """``QΓᵀ V QA`` of ``vecs``, reusing :meth:`observe`'s when they are the same tensors."""
        seen = self._observed
        if seen is not None and len(seen[0]) == len(vecs) and all(
                a is b for a, b in zip(seen[0], vecs, strict=True)):
            return seen[1]
        return self.factors.rotate(self._to_mat(vecs))

    def _factor_sizes(self) -> tuple[int, int]:
        """``(in, out)``: the sizes of ``A`` and ``Γ``."""
        raise NotImplementedError

    def statistics_numel(self) -> int:
        d_in, d_out = self._factor_sizes()
        return d_in * d_in + d_out * d_out + 2

    def _grid(self, ea_scale: float, damping: float) -> tuple[Tensor, list[Tensor]]:
        """``e·dΓ dAᵀ + γ`` as a matrix and as parameter-shaped tensors (cached)."""
        def make() -> tuple[Tensor, list[Tensor]]:
            d = self.factors.eig_grid(ea_scale, damping)
            return d, self._from_mat(d)

        if self.moments is not None:  # measured eigenvalues change without a refresh
            d = self.moments.diag(ea_scale, 0.0, damping)
            return d, self._from_mat(d)
        return self.factors.cached(("grid-tensors", float(ea_scale), float(damping)), make)

    def _check_exact(self) -> None:
        self._check_ready()
        if not self.exact:
            raise RuntimeError(f"block {self.name!r} keeps a truncated eigenbasis (rank)")

    def to_eigenbasis(self, vecs):
        self._check_exact()
        return self._from_mat(self._rotated(vecs))

    def from_eigenbasis(self, coords):
        self._check_exact()
        return self._from_mat(self.factors.unrotate(self._to_mat(coords)))

    def eigenvalues(self, ea_scale, damping):
        self._check_exact()
        return list(self._grid(ea_scale, damping)[1])

    @property
    def exact(self) -> bool:
        return self.factors.exact

    def solve(self, vecs, damping, ea_scale=1.0, fresh_scale=0.0, method="exact"):
        self._check_ready()
        f = self.factors
        if self.moments is not None:  # every system is diagonal in the eigenbasis
            D = self.moments.diag(ea_scale, fresh_scale, damping)
            return self._from_mat(f.unrotate(self._rotated(vecs) / D))
        if fresh_scale == 0.0 and not self.exact:  # truncated factors (rank), eq. 19
            return self._from_columns(f.solve_columns(self._columns(vecs), damping, ea_scale))
        V = self._to_mat(vecs)
        if fresh_scale == 0.0 and self.exact:  # exact in the eigenbasis (eq. 19)
            return self._from_mat(f.unrotate(f.rotate(V) / self._grid(ea_scale, damping)[0]))
        out = self.factors.solve(V, damping, ea_scale, fresh_scale, method)
        self.last_residual = self.factors.last_residual
        return self._from_mat(out)

    def matvec(self, vecs, damping, ea_scale=1.0, fresh_scale=0.0):
        if self.moments is not None:
            f, D = self.factors, self.moments.diag(ea_scale, fresh_scale, damping)
            return self._from_mat(f.unrotate(f.rotate(self._to_mat(vecs)) * D))
        return self._from_mat(self.factors.matvec(self._to_mat(vecs), damping, ea_scale,
                                                  fresh_scale))

    def state_dict(self) -> dict[str, Tensor]:
        out = self.factors.state_dict()
        if self.moments is not None:
            out.update(self.moments.state_dict())
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.factors.load_state_dict(state, self.params[0].device)
        self._observed = None
        if self.moments is not None:
            self.moments.load_state_dict(state, self.params[0].device)
        self.initialized = self.factors.initialized


class KroneckerBlock(FactoredBlock):
    """K-FAC block ``Ā ⊗ Γ̄`` of an ``nn.Linear`` or ``nn.Conv1d/2d/3d`` (KFC) layer.

    The weight (and, with ``bias="homogeneous"``, the bias as a homogeneous coordinate
    ``ā = [a, 1]``) is viewed as the matrix ``W`` of shape ``(out, in_features [+1])``.
    Factors (eq. 11, DESIGN section 3)::

        A = (1/N) Σ_rows ā āᵀ          (rows: examples, and spatial positions for conv)
        Γ = (1/R) Σ_rows δ δᵀ          (R rows of per-example output gradients δ)

    so a 1x1 convolution on a 1x1 image gives exactly the Linear block, and for conv
    ``A ⊗ Γ`` is KFC's ``Ω ⊗ Γ`` (Grosse and Martens, 2016). With ``bias="separate"`` the
    bias is left to a :class:`BiasBlock` and this block covers the weight alone.
    """

    kind = "kronecker"

    def __init__(self, module: nn.Module, name: str, *, bias: str = "homogeneous",
                 rank: int | None = None) -> None:
        self.has_bias = module.bias is not None and bias == "homogeneous"
        params = [module.weight] + ([module.bias] if self.has_bias else [])
        super().__init__(module, params, name, rank)
        #: ``"expand"`` (every position an example) or ``"reduce"`` (K-FAC-reduce over a
        #: linear layer's positions), set by the engine (``weight_sharing``)
        self.weight_sharing = "expand"

    # -- statistics -------------------------------------------------------------------
    def _column_blocks(self, x: Tensor, rows: Tensor | None) -> Iterator[Tensor]:
        """Layer input → blocks of ``X̄ᵀ``: one column per row ``ā = [a, 1]`` of eq. 11
        (im2col for convolutions), with the homogeneous row of ones when the bias is in
        the block, so that one Gram product gives ``Σ ā āᵀ`` whole.

        ``rows``: the rows to keep (a linear layer's positions that are counted examples).
        A convolution's patches are copied a few examples at a time into a buffer of about
        2 MB that stays in cache while its Gram product reads it (each copy moves runs of a
        whole output row); the layout is feature-major, ``(in_features [+1], rows)``, with
        the long dimension inside the product, where matmul is fastest.
        """
        x = x.to(self.dtype)
        if isinstance(self.module, _ConvNd):
            yield from conv_column_blocks(x, self.module, self.has_bias)
            return
        cols = x.reshape(-1, x.shape[-1])
        if rows is not None:
            cols = cols[rows]
        if self.has_bias:
            cols = torch.cat([cols, cols.new_ones(cols.shape[0], 1)], dim=1)
        yield cols.T

    def _delta_columns(self, delta: Tensor, rows: Tensor | None) -> Tensor:
        """Output gradients → ``Δᵀ`` of shape ``(out_channels, rows)``."""
        delta = delta.to(self.dtype)
        if isinstance(self.module, _ConvNd):
            return delta.transpose(0, 1).reshape(delta.shape[1], -1)
        cols = delta.reshape(-1, delta.shape[-1])
        return (cols if rows is None else cols[rows]).T

    def _rows(self, capture, t: Tensor, call: int) -> Tensor | None:
        """The counted rows of a linear layer's tensor recorded in ``call`` (``None``: all)."""
        if isinstance(self.module, _ConvNd):
            return None
        return capture.row_mask(call, t.shape[:-1])

    def _reduces(self, t: Tensor) -> bool:
        """K-FAC-reduce for this tensor: a linear layer's input or output gradient with
        positions between the batch and the features, under ``weight_sharing="reduce"``."""
        return (self.weight_sharing == "reduce" and t.dim() >= 3
                and not isinstance(self.module, _ConvNd))

    def _input_factor(self, capture) -> tuple[Tensor, float]:
        """``A = (1/N) Σ ā āᵀ`` with ``ā = [a, 1]``, and ``N``.

        ``N`` counts the examples of the call each input belongs to (every leading position
        of the model output, DESIGN section 1), once per use of the layer. K-FAC-reduce
        (Eschenhagen et al. 2023; ``weight_sharing="reduce"``): ``A = (1/B) Σ_n ā_n ā_nᵀ``
        over the ``B`` sequences, ``ā_n`` the mean of sequence ``n``'s inputs over its
        positions (all of them: masks are not applied).
        """
        pairs = list(zip(capture.inputs[self.module], capture.input_calls[self.module],
                         strict=True))
        if any(self._reduces(x) for x, _ in pairs):
            means = [x.reshape(x.shape[0], -1, x.shape[-1]).mean(1) for x, _ in pairs]
            total = gram((cols, 1.0) for x in means for cols in self._column_blocks(x, None))
            n = sum(x.shape[0] for x in means)
            return total.div_(n), float(n)
        total = gram((cols, 1.0) for x, call in pairs
                     for cols in self._column_blocks(x, self._rows(capture, x, call)))
        n = sum(capture.examples[call] for _, call in pairs)
        return total.div_(n), float(n)

    def _output_factor(self, capture) -> tuple[Tensor, float]:
        """``Γ = (1/R) Σ δ δᵀ`` over the ``R`` counted rows of output gradients, and ``R``.
        K-FAC-reduce: ``Γ = (1/(B·T)) Σ_n δ̃_n δ̃_nᵀ``, ``δ̃_n`` the sum of sequence ``n``'s
        output gradients over its ``T`` positions (so that ``A ⊗ Γ`` is the Fisher of the
        mean loss over the ``B·T`` positions when the inputs do not vary along them)."""
        deltas = capture.deltas[self.module]
        if any(self._reduces(d) for d in deltas):
            scale = capture.delta_scale() ** 2
            sums = [d.reshape(d.shape[0], -1, d.shape[-1]).sum(1) for d in deltas]
            rows = sum(d[..., 0].numel() for d in deltas)
            return gram([(self._delta_columns(t, None), scale) for t in sums]).div_(rows), \
                float(rows)
        blocks = [(self._delta_columns(d, self._rows(capture, d, call)),
                   capture.delta_scale() ** 2)
                  for d, call in zip(capture.deltas[self.module],
                                     capture.delta_calls[self.module], strict=True)]
        rows = sum(cols.shape[1] for cols, _ in blocks)
        return gram(blocks).div_(max(rows, 1)), float(rows)

    def fresh(self, capture, grads):
        if not self._has_data(capture):
            return None
        return {"A": self._input_factor(capture)[0], "G": self._output_factor(capture)[0]}

    def example_rows(self, capture):
        """A linear layer's rows ``ā`` and ``δ`` of each use, paired by call (a call's
        output gradients arrive in the reverse order of its uses); ``None`` for a
        convolution (its examples sum over positions) or uses that cannot be paired."""
        if isinstance(self.module, _ConvNd) or self.weight_sharing == "reduce":
            return None
        ins = list(zip(capture.inputs[self.module], capture.input_calls[self.module],
                       strict=True))
        outs = list(zip(capture.deltas[self.module], capture.delta_calls[self.module],
                        strict=True))
        rows_A, rows_G, n = [], [], 0.0
        for call in sorted({c for _, c in ins}):
            xs = [x for x, c in ins if c == call]
            ds = [d for d, c in outs if c == call][::-1]
            if len(xs) != len(ds):
                return None
            for x, d in zip(xs, ds, strict=True):
                if x.shape[:-1] != d.shape[:-1]:
                    return None
                rows = self._rows(capture, x, call)
                rows_A.append(next(iter(self._column_blocks(x, rows))).T)
                rows_G.append(self._delta_columns(d, rows).T * capture.delta_scale())
                n += capture.examples[call]
        return torch.cat(rows_A), torch.cat(rows_G), n

    def distributed_fresh(self, capture, grads):
        """``A`` weighted by this rank's examples, ``Γ`` by its rows of ``δ``."""
        if not self._has_data(capture):
            return self.empty_statistics()
        (A, n), (G, rows) = self._input_factor(capture), self._output_factor(capture)
        return {"A": A, "G": G}, {"A": n, "G": rows}

    # -- vector layout ----------------------------------------------------------------
    def _factor_sizes(self) -> tuple[int, int]:
        w = self.module.weight
        return w[0].numel() + int(self.has_bias), w.shape[0]

    def _to_mat(self, vecs: Sequence[Tensor]) -> Tensor:
        w = vecs[0].reshape(vecs[0].shape[0], -1)
        if self.has_bias:
            return torch.cat([w, vecs[1].unsqueeze(1)], dim=1)
        return w

    def _from_mat(self, mat: Tensor) -> list[Tensor]:
        w = self.params[0]
        if self.has_bias:
            return [mat[:, :-1].reshape(w.shape), mat[:, -1].contiguous()]
        return [mat.reshape(w.shape)]

    def _columns(self, vecs: Sequence[Tensor]) -> list[Tensor]:
        w = vecs[0].reshape(vecs[0].shape[0], -1)
        return [w, vecs[1].unsqueeze(1)] if self.has_bias else [w]

    def _from_columns(self, parts: Sequence[Tensor]) -> list[Tensor]:
        shape = self.params[0].shape
        return [parts[0].reshape(shape)] + ([parts[1].squeeze(1)] if self.has_bias else [])


class BiasBlock(FactoredBlock):
    """The released code's own block for a layer's bias (``bias="separate"``).

    ``A = [1]`` and ``Γ = (1/N) Σ_n s_n s_nᵀ``, where ``s_n`` is example ``n``'s output
    gradient summed over the positions that share the bias (the spatial positions of a
    convolution, the non-batch leading dimensions of a linear layer's input), i.e. the
    per-example gradient of the bias itself: so this block is the exact (MC or empirical)
    Fisher block of the bias, with no Kronecker approximation. The released code built it
    with an ``AddBias`` module (A from a column of ones, Γ from the output gradient summed
    over spatial positions before the outer product).
    """

    kind = "kronecker-bias"

    def __init__(self, module: nn.Module, name: str, rank: int | None = None) -> None:
        super().__init__(module, [module.bias], name, rank)

    def _example_sums(self, capture, delta: Tensor, call: int) -> Tensor:
        """``s_n`` for every example, shape ``(N, out)``: a convolution's output gradient
        summed over its positions; a linear layer's rows when they are the model output's
        positions (each its own example, ignored ones dropped), else summed over the
        dimensions after the batch dimension."""
        delta = delta.to(self.dtype)
        if isinstance(self.module, _SPATIAL):
            return delta.reshape(delta.shape[0], delta.shape[1], -1).sum(-1)
        if capture.aligned(call, delta.shape[:-1]):
            rows = delta.reshape(-1, delta.shape[-1])
            mask = capture.row_mask(call, delta.shape[:-1])
            return rows if mask is None else rows[mask]
        return delta.reshape(delta.shape[0], -1, delta.shape[-1]).sum(1)

    def _sums(self, capture) -> tuple[Tensor, float]:
        blocks = [(self._example_sums(capture, d, call).T, capture.delta_scale() ** 2)
                  for d, call in zip(capture.deltas[self.module],
                                     capture.delta_calls[self.module], strict=True)]
        n = sum(sums.shape[1] for sums, _ in blocks)
        return gram(blocks).div_(max(n, 1)), float(n)

    def fresh(self, capture, grads):
        if not capture.deltas.get(self.module):
            return None
        G, _ = self._sums(capture)
        return {"A": torch.ones(1, 1, dtype=G.dtype, device=G.device), "G": G}

    def distributed_fresh(self, capture, grads):
        if not capture.deltas.get(self.module):
            return self.empty_statistics()
        G, n = self._sums(capture)
        return {"A": torch.ones(1, 1, dtype=G.dtype, device=G.device), "G": G}, {"A": n, "G": n}

    def _factor_sizes(self) -> tuple[int, int]:
        return 1, self.params[0].numel()

    def _to_mat(self, vecs: Sequence[Tensor]) -> Tensor:
        return vecs[0].unsqueeze(1)

    def _from_mat(self, mat: Tensor) -> list[Tensor]:
        return [mat[:, 0].contiguous()]


_ConvNd = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_ConvTransposeNd = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
#: layers whose bias is shared by every spatial position of their output
_SPATIAL = (*_ConvNd, *_ConvTransposeNd)


def kronecker_supported(module: nn.Module) -> bool:
    """Whether a module gets a Kronecker block (else its tensors get diagonal blocks).

    ``nn.Linear`` (inputs with any number of leading dimensions), ``nn.Conv1d/2d/3d``
    with ``groups == 1`` (any kernel, stride, dilation, padding and padding mode), and
    ``nn.ConvTranspose1d/2d/3d`` with ``groups == 1`` and ``output_padding < stride``
    (:class:`~kldwrm.curvature.transposed.TransposedConvBlock`).

    Grouped layers would need one Kronecker product per group (each group's input
    channels meet only its own output channels), which the block does not represent. An
    ``output_padding`` of at least the stride (allowed below the dilation) gives the
    output-gradient windows more positions than the input has, and which of them are the
    input's cannot be told from the output gradient's shape alone (``output_size`` in the
    forward call changes it), so such layers get diagonal blocks.
    """
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, _ConvTransposeNd):
        return module.groups == 1 and all(
            op < s for op, s in zip(module.output_padding, module.stride, strict=True))
    return isinstance(module, _ConvNd) and module.groups == 1


__all__ = [
    "BIAS_MODES",
    "BiasBlock",
    "Block",
    "CurvatureError",
    "EXACT_SOLVE_RTOL",
    "FactoredBlock",
    "KroneckerBlock",
    "kronecker_supported",
]
