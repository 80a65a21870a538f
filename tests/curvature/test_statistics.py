"""The convolution input Gram (``statistics.conv_gram``): the row-product path against
receptive fields cut out of the padded input one output position at a time (float64),
for strides, dilations, paddings and padding modes, with and without the ones row."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kldwrm.curvature import statistics
from kldwrm.curvature.statistics import conv_gram

pytestmark = pytest.mark.usefixtures("float64")

CONVS = [
    dict(in_channels=1, out_channels=5, kernel_size=5),
    dict(in_channels=3, out_channels=2, kernel_size=3, stride=2, padding=1),
    dict(in_channels=2, out_channels=3, kernel_size=(3, 2), dilation=(2, 1),
         padding=(2, 1), padding_mode="reflect"),
    dict(in_channels=2, out_channels=3, kernel_size=3, stride=(1, 2), bias=False),
    dict(in_channels=2, out_channels=2, kernel_size=(2, 4), stride=(3, 1), dilation=(1, 2),
         padding=2, padding_mode="circular"),
    dict(in_channels=4, out_channels=1, kernel_size=1),
]


def _fields_gram(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``Σ ū ūᵀ`` from explicit slices of the padded input, one output position at a time."""
    pad = conv._reversed_padding_repeated_twice
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = F.pad(x, pad, mode=mode)
    ho, wo = conv(x).shape[2:]
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    rows = []
    for i, j in itertools.product(range(ho), range(wo)):
        field = xp[:, :, sh * i : sh * i + dh * (kh - 1) + 1 : dh,
                   sw * j : sw * j + dw * (kw - 1) + 1 : dw]
        rows.append(field.reshape(x.shape[0], -1))
    u = torch.cat(rows)
    if conv.bias is not None:
        u = torch.cat([u, u.new_ones(u.shape[0], 1)], dim=1)
    return u.T @ u


@pytest.mark.parametrize("path", ["rows", "patches"])
@pytest.mark.parametrize("spec", CONVS)
def test_conv_gram_matches_the_fields(spec, path, monkeypatch):
    torch.manual_seed(0)
    # force one path or the other: the choice is by cost alone, both are exact
    monkeypatch.setattr(statistics, "BAND_GRAM_SHARE", 1e9 if path == "rows" else 0.0)
    conv = nn.Conv2d(**spec)
    x = torch.randn(3, conv.in_channels, 9, 11)
    got = conv_gram(x, conv, conv.bias is not None)
    ref = _fields_gram(conv, x)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-11)


def test_the_paper_cnn_takes_the_row_products_and_a_wide_one_the_patches():
    """The choice by multiply-adds: 5x5 kernels on 28x28 and 12x12 images save ~4x; 3x3
    kernels over 16 channels of a 32x32 image would cost more than the patches."""
    x1, x2 = torch.empty(512, 1, 28, 28), torch.empty(512, 5, 12, 12)
    assert statistics._band_is_cheaper(x1, nn.Conv2d(1, 5, 5), True)
    assert statistics._band_is_cheaper(x2, nn.Conv2d(5, 7, 5), True)
    wide = nn.Conv2d(16, 16, 3, padding=1, bias=False)
    assert not statistics._band_is_cheaper(torch.empty(128, 16, 32, 32), wide, False)


def test_the_row_products_stay_within_their_memory(monkeypatch):
    conv = nn.Conv2d(1, 5, 5)
    x = torch.empty(512, 1, 28, 28)
    monkeypatch.setattr(statistics, "BAND_GRAM_BYTES", 1 << 10)
    assert not statistics._band_is_cheaper(x, conv, True)


def test_a_kernel_larger_than_the_input_is_left_to_the_patches():
    conv = nn.Conv2d(1, 1, 5)
    assert not statistics._band_is_cheaper(torch.empty(2, 1, 3, 3), conv, True)
