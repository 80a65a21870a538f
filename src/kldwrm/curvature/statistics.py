"""Sums of outer products for the Kronecker factors: Gram products and convolution patches.

The fresh factors of a refresh step (eq. 11) are Gram products ``Σ x xᵀ`` of many columns:
layer inputs (im2col patches for a convolution) and output gradients. This module forms
them with as little memory traffic as it can: patches are copied a few examples at a time
into a buffer that stays in cache while its product is formed, and large Grams compute
their lower triangle only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch.nn.functional as F
from torch import Tensor, nn

#: Gram products of this many rows or more compute their lower triangle in two halves
SPLIT_GRAM_ROWS = 96


def add_gram_(acc: Tensor, cols: Tensor, alpha: float = 1.0) -> None:
    """``acc += alpha · cols colsᵀ`` on and below the diagonal only (then :func:`mirror_`):
    for a large factor the two diagonal blocks and one off-diagonal block are 3/4 of the
    work of the whole product."""
    k = cols.shape[0]
    if k < SPLIT_GRAM_ROWS:
        acc.addmm_(cols, cols.T, alpha=alpha)
        return
    h = k // 2
    top, bottom = cols[:h], cols[h:]
    acc[:h, :h].addmm_(top, top.T, alpha=alpha)
    acc[h:, :h].addmm_(bottom, top.T, alpha=alpha)
    acc[h:, h:].addmm_(bottom, bottom.T, alpha=alpha)


def gram(blocks: Iterable[tuple[Tensor, float]]) -> Tensor:
    """``Σ alpha · cols colsᵀ`` over ``(cols, alpha)`` blocks of equal row count."""
    acc = None
    for cols, alpha in blocks:
        if acc is None:
            acc = cols.new_zeros(cols.shape[0], cols.shape[0])
        add_gram_(acc, cols, alpha)
    return mirror_(acc)


def mirror_(gram: Tensor) -> Tensor:
    """The symmetric matrix whose lower triangle :func:`add_gram_` accumulated."""
    k = gram.shape[0]
    if k >= SPLIT_GRAM_ROWS:
        h = k // 2
        gram[:h, h:] = gram[h:, :h].T
    return gram


#: bytes of one block of convolution patches (kept in cache while its Gram is formed)
PATCH_BLOCK_BYTES = 2 << 20


def conv_column_blocks(x: Tensor, m: nn.Module, ones: bool) -> Iterator[Tensor]:
    """Receptive fields of the convolution ``m`` as blocks of ``Xᵀ`` (a few examples each),
    shape ``(C·Πk [+1], rows)``, the last row ones when ``ones``.

    Row order ``(C, k_1, ..., k_d)`` is ``F.unfold``'s (and the flattened weight's); columns
    ``(N, o_1, ..., o_d)`` are the output positions in order. The padding is the module's
    own (any ``padding_mode``, numeric or string padding), so the patches are exactly what
    the convolution saw.
    """
    d = x.dim() - 2
    pad = m._reversed_padding_repeated_twice  # what nn.ConvNd itself uses
    if any(pad):
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        x = F.pad(x, pad, mode=mode)
    v = x
    for i in range(d):
        k, s, dil = m.kernel_size[i], m.stride[i], m.dilation[i]
        v = v.unfold(2 + i, (k - 1) * dil + 1, s)  # the window goes to the last dimension
        if dil > 1:
            v = v[..., ::dil]
    # v: (N, C, o_1..o_d, k_1..k_d) → (C, k_1..k_d, N, o_1..o_d)
    perm = [1, *range(2 + d, 2 + 2 * d), 0, *range(2, 2 + d)]
    features = v.shape[1] * math.prod(m.kernel_size)
    positions = math.prod(v.shape[2 : 2 + d])
    rows = features + ones
    chunk = max(1, PATCH_BLOCK_BYTES // (rows * positions * x.element_size()))
    storage = x.new_empty(rows * min(chunk, v.shape[0]) * positions)
    for lo in range(0, v.shape[0], chunk):
        part = v[lo : lo + chunk].permute(perm)  # (C, k_1..k_d, count, o_1..o_d)
        count = part.shape[1 + d]
        cols = storage[: rows * count * positions].view(rows, count * positions)
        cols[:features].view(part.shape).copy_(part)
        if ones:
            cols[features].fill_(1.0)
        yield cols
