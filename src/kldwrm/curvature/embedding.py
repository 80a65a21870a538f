"""Kronecker blocks of token embeddings (``nn.Embedding``, ``embeddings="kron"``).

An embedding is a linear layer applied to one-hot inputs: row ``t`` of the output is
``Wᵀ e_{x_t}`` for the weight ``W`` of shape ``(V, d)``. Viewed as :class:`KroneckerBlock`
views a linear layer (the matrix ``Wᵀ`` of shape ``(out, in) = (d, V)``), one row's weight
gradient is ``δ_t e_{x_t}ᵀ`` and eq. 11's factors are::

    A = (1/N) Σ_rows e_x e_xᵀ = diag(c) / N      (c: how often each token occurs)
    Γ = (1/R) Σ_rows δ δᵀ                          (d × d, as for a linear layer)

so ``A`` is diagonal and is kept as the vector ``c / N`` (:class:`KroneckerFactors` with a
diagonal input factor): ``O(V + d²)`` state instead of the diagonal block's ``O(V·d)``
second moments, and the preconditioner couples the ``d`` coordinates of each embedding
vector through ``Γ̄⁻¹`` while each token row is scaled by its own frequency. Rows and
examples are counted as for a linear layer on inputs with leading dimensions (K-FAC
"expand", Eschenhagen et al. 2023: every position is an example); an embedding called on
positions that are not the output's (a positional table looked up with ``arange(T)`` and
broadcast over the batch) counts its own rows, as a linear layer on such inputs does. This
block equals :class:`KroneckerBlock` on one-hot inputs exactly
(``tests/curvature/test_embedding.py``).

A token that never occurred has ``A`` zero: its row is damped only (``γ``), as is any
direction without curvature. ``padding_idx`` rows get no gradient and so no step.
EKFAC's per-example moments are not formed for this block (its rows would be
``V``-wide); with ``curvature="ekfac"`` it keeps K-FAC's eigenvalues ``dΓ dAᵀ``, and
``"adaptive"`` works as for every block.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .blocks import FactoredBlock
from .layer import KroneckerBlock


class EmbeddingBlock(KroneckerBlock):
    """``diag(c/N) ⊗ Γ̄`` for the weight of an ``nn.Embedding`` (module docstring)."""

    kind = "kronecker-embedding"

    def __init__(self, module: nn.Embedding, name: str) -> None:
        # no bias; Γ is d × d (the model width) and A diagonal: nothing to truncate
        FactoredBlock.__init__(self, module, [module.weight], name, rank=None)
        self.has_bias = False

    def _input_factor(self, capture) -> tuple[Tensor, float]:
        """``A = c / N``: the token counts of every recorded use (the counted rows only)
        over ``N``, the examples of the calls they belong to."""
        m = self.module
        counts = torch.zeros(m.num_embeddings, dtype=self.dtype, device=m.weight.device)
        for x, call in zip(capture.inputs[m], capture.input_calls[m], strict=True):
            rows = capture.row_mask(call, x.shape)
            ids = x.reshape(-1) if rows is None else x.reshape(-1)[rows]
            counts += torch.bincount(ids, minlength=m.num_embeddings).to(self.dtype)
        n = sum(capture.examples[call] for call in capture.input_calls[m])
        return counts.div_(n), float(n)

    def _reduces(self, t: Tensor) -> bool:
        return False  # token counts are per position: always K-FAC-expand

    def example_rows(self, capture):
        return None  # one-hot rows V wide: K-FAC's eigenvalues instead (module docstring)

    def empty_statistics(self):
        stats, weights = super().empty_statistics()
        stats["A"] = stats["A"].new_zeros(self.module.num_embeddings)
        return stats, weights

    def statistics_numel(self) -> int:
        d_in, d_out = self._factor_sizes()
        return d_in + d_out * d_out + 2

    def _factor_sizes(self) -> tuple[int, int]:
        return self.module.num_embeddings, self.module.embedding_dim

    def _to_mat(self, vecs: Sequence[Tensor]) -> Tensor:
        return vecs[0].T

    def _from_mat(self, mat: Tensor) -> list[Tensor]:
        return [mat.T.contiguous()]


def embedding_supported(module: nn.Module) -> bool:
    """Dense ``nn.Embedding`` (a sparse one's gradients are sparse tensors)."""
    return isinstance(module, nn.Embedding) and not module.sparse


__all__ = ["EmbeddingBlock", "embedding_supported"]
