"""Sums of outer products for the Kronecker factors: Gram products and convolution patches.

The fresh factors of a refresh step (eq. 11) are Gram products ``Σ x xᵀ`` of many columns:
layer inputs (im2col patches for a convolution) and output gradients. This module forms
them with as little memory traffic as it can: patches are copied a few examples at a time
into a buffer that stays in cache while its product is formed, and large Grams compute
their lower triangle only.

A 2-D convolution whose image rows are short next to its kernel (the paper CNN's 5x5
kernels on 28x28 and 12x12 images) gets its input Gram without patches
(:func:`conv_gram`): the products of whole image rows ``k`` apart, summed along the
kernel's diagonals, which is the same sum in up to ~5x fewer operations.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch
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


def _padded(x: Tensor, m: nn.Module) -> Tensor:
    """``x`` with the module's own padding (any ``padding_mode``), as ``nn.ConvNd`` pads."""
    pad = m._reversed_padding_repeated_twice  # what nn.ConvNd itself uses
    if not any(pad):
        return x
    mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
    return F.pad(x, pad, mode=mode)


def conv_column_blocks(x: Tensor, m: nn.Module, ones: bool) -> Iterator[Tensor]:
    """Receptive fields of the convolution ``m`` as blocks of ``Xᵀ`` (a few examples each),
    shape ``(C·Πk [+1], rows)``, the last row ones when ``ones``.

    Row order ``(C, k_1, ..., k_d)`` is ``F.unfold``'s (and the flattened weight's); columns
    ``(N, o_1, ..., o_d)`` are the output positions in order. The padding is the module's
    own (any ``padding_mode``, numeric or string padding), so the patches are exactly what
    the convolution saw.
    """
    d = x.dim() - 2
    x = _padded(x, m)
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


#: the row-product Gram (:func:`conv_gram`) is used when it takes at most this share of
#: the patches' multiply-adds (its batched products of short rows run somewhat slower)
BAND_GRAM_SHARE = 0.7
#: ... and its row products need at most this many bytes
BAND_GRAM_BYTES = 64 << 20


def conv_gram(x: Tensor, m: nn.Module, ones: bool) -> Tensor:
    """``Σ ū ūᵀ`` over the receptive fields ``u`` of the convolution ``m`` on ``x``
    (``ū = [u, 1]`` when ``ones``), in :func:`conv_column_blocks`' row order.

    A 2-D input whose rows are short next to the kernel takes :func:`_band_gram`; any
    other the patches' Gram. The two are the same sum in another order.
    """
    if x.dim() == 4 and _band_is_cheaper(x, m, ones):
        return _band_gram(_padded(x, m), m, ones)
    return gram((cols, 1.0) for cols in conv_column_blocks(x, m, ones))


def _band_shape(hp: int, wp: int, m: nn.Module) -> tuple[int, int]:
    """Output positions ``(H_o, W_o)`` of ``m`` on a padded ``hp x wp`` input."""
    (kh, kw), (sh, sw), (dh, dw) = m.kernel_size, m.stride, m.dilation
    return (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1


def _band_is_cheaper(x: Tensor, m: nn.Module, ones: bool) -> bool:
    """Whether the row products of the 2-D input ``x`` take at most ``BAND_GRAM_SHARE``
    of the patches' multiply-adds (the patches' Gram counts its lower triangle alone when
    it splits) and at most ``BAND_GRAM_BYTES``."""
    left, right, top, bottom = m._reversed_padding_repeated_twice
    n, c, hp, wp = x.shape[0], x.shape[1], x.shape[2] + top + bottom, x.shape[3] + left + right
    kh, dh = m.kernel_size[0], m.dilation[0]
    ho, wo = _band_shape(hp, wp, m)
    rows = c * math.prod(m.kernel_size) + ones
    patches = n * ho * wo * rows * rows * (0.75 if rows >= SPLIT_GRAM_ROWS else 1.0)
    width = c * wp
    band = sum(hp - dh * t for t in range(kh)) * width * width * n
    memory = (hp * width * width + hp * width * n) * x.element_size()
    return ho > 0 and wo > 0 and band <= BAND_GRAM_SHARE * patches \
        and memory <= BAND_GRAM_BYTES


def _band_gram(x: Tensor, m: nn.Module, ones: bool) -> Tensor:
    """:func:`conv_gram` of a padded 2-D input from products of whole image rows.

    With ``R_u`` the ``(N, C·W)`` matrix of image row ``u`` (every example, channel and
    column), the entry of the fields' Gram for kernel rows ``a ≤ a'`` is
    ``Σ_i Σ_j (R_{s·i+d·a}ᵀ R_{s·i+d·a'})[(c, s'·j+d'·b), (c', s'·j+d'·b')]``: one batched
    product per row offset ``d·(a'−a)``, then sums along the strided diagonals of its
    result (views, no copies); ``a > a'`` is the transpose. The ones row is the fields'
    sums of ``Σ_n x`` and the corner the number of fields.
    """
    n, c, hp, wp = x.shape
    (kh, kw), (sh, sw), (dh, dw) = m.kernel_size, m.stride, m.dilation
    ho, wo = _band_shape(hp, wp, m)
    width = c * wp
    rows_ = x.permute(2, 1, 3, 0).reshape(hp, width, n)  # (row u, (c, column), example)
    feats = c * kh * kw
    out = x.new_empty(feats + ones, feats + ones)
    # (a, a', c, b, c', b') view of the fields' Gram
    grid = out[:feats, :feats].view(c, kh, kw, c, kh, kw).permute(1, 4, 0, 2, 3, 5)
    for t in range(kh):
        gap = dh * t
        prods = torch.bmm(rows_[: hp - gap], rows_[gap:].transpose(1, 2))
        p0 = prods.stride(0)
        # Σ_i over output rows, for each first kernel row a < kh − t
        pair = prods.as_strided((kh - t, ho, width, width), (dh * p0, sh * p0, width, 1),
                                prods.storage_offset()).sum(1)
        # Σ_j along the column diagonals: entry (c, s'j + d'b), (c', s'j + d'b')
        fields = pair.as_strided((kh - t, c, kw, c, kw, wo),
                                 (width * width, wp * width, dw * width, wp, dw,
                                  sw * (width + 1))).sum(-1)
        a = torch.arange(kh - t)
        grid[a, a + t] = fields
        if t:
            grid[a + t, a] = fields.permute(0, 3, 4, 1, 2)
    if ones:
        s = x.sum(0)
        s0, s1, s2 = s.stride()
        sums = s.as_strided((c, kh, kw, ho, wo), (s0, dh * s1, dw * s2, sh * s1, sw * s2))
        out[feats, :feats] = out[:feats, feats] = sums.sum((-1, -2)).reshape(-1)
        out[feats, feats] = n * ho * wo
    return out
