"""Kronecker blocks of ordinary layers: ``nn.Linear`` and ``nn.Conv1d/2d/3d`` (KFC), and
the separate bias blocks (DESIGN section 1).

:class:`KroneckerBlock` says how eq. 11's factors are measured from what
:class:`~kldwrm.curvature.capture.Capture` recorded: ``A`` from the layer's inputs (the
im2col patches of a convolution, with a homogeneous coordinate for the bias), ``Γ`` from
its output gradients; :class:`BiasBlock` is a bias kept apart (``bias="separate"``, and
transposed convolutions). What is done with the factors (the average, the
decompositions, the solves) is :class:`~kldwrm.curvature.blocks.FactoredBlock`'s.
:func:`kronecker_supported` says which modules get such a block.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from .blocks import FactoredBlock
from .statistics import conv_gram, gram

#: how a layer's bias enters the curvature (DESIGN section 1)
BIAS_MODES = ("homogeneous", "separate")


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
        """A linear layer's input → ``X̄ᵀ``: one column per row ``ā = [a, 1]`` of eq. 11,
        with the homogeneous row of ones when the bias is in the block, so that one Gram
        product gives ``Σ ā āᵀ`` whole (a convolution's is :func:`.statistics.conv_gram`).

        ``rows``: the rows to keep (the positions that are counted examples). The layout is
        feature-major, ``(in_features [+1], rows)``, with the long dimension inside the
        product, where matmul is fastest.
        """
        x = x.to(self.dtype)
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
        if isinstance(self.module, _ConvNd):
            total = sum(conv_gram(x.to(self.dtype), self.module, self.has_bias)
                        for x, _ in pairs)
        else:
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
        """The weight's matrix and the bias column, unjoined (a block without a bias, or
        a subclass with its own :meth:`_to_mat`, keeps the one matrix)."""
        if not self.has_bias:
            return super()._columns(vecs)
        return [vecs[0].reshape(vecs[0].shape[0], -1), vecs[1].unsqueeze(1)]

    def _from_columns(self, parts: Sequence[Tensor]) -> list[Tensor]:
        if not self.has_bias:
            return super()._from_columns(parts)
        return [parts[0].reshape(self.params[0].shape), parts[1].squeeze(1)]


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


__all__ = ["BIAS_MODES", "BiasBlock", "KroneckerBlock", "kronecker_supported"]
