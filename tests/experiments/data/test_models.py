"""Models: the paper's CNN exactly as DESIGN section 4, the others and build_model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kldwrm.experiments.data.models import (
    MODELS,
    build_model,
    mlp,
    paper_cnn,
    regression_mlp,
    resnet_small,
)


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_paper_cnn_layers_exactly():
    m = paper_cnn()
    kinds = [type(layer) for layer in m]
    assert kinds == [
        nn.Conv2d,
        nn.MaxPool2d,
        nn.ReLU,
        nn.Conv2d,
        nn.MaxPool2d,
        nn.ReLU,
        nn.Flatten,
        nn.Linear,
        nn.ReLU,
        nn.Dropout,
        nn.Linear,
    ]
    c1, c2, f1, f2 = m[0], m[3], m[7], m[10]
    assert (c1.in_channels, c1.out_channels, c1.kernel_size) == (1, 5, (5, 5))
    assert (c2.in_channels, c2.out_channels, c2.kernel_size) == (5, 7, (5, 5))
    assert (f1.in_features, f1.out_features, f2.in_features, f2.out_features) == (112, 30, 30, 10)
    assert m[1].kernel_size == 2 and m[4].kernel_size == 2 and m[9].p == 0.5
    # 130 + 882 + 3390 + 310 parameters
    assert _n_params(m) == 4712
    assert m(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_paper_cnn_dropout_only_in_train_mode():
    torch.manual_seed(0)
    m = paper_cnn()
    x = torch.randn(4, 1, 28, 28)
    m.eval()
    assert torch.equal(m(x), m(x))
    m.train()
    assert not torch.equal(m(x), m(x))


def test_mlp_default_sizes():
    m = mlp()
    linears = [layer for layer in m if isinstance(layer, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [
        (784, 1024),
        (1024, 1024),
        (1024, 10),
    ]
    assert _n_params(m) == 784 * 1024 + 1024 + 1024 * 1024 + 1024 + 1024 * 10 + 10
    assert m(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert mlp((4, 3))(torch.zeros(5, 4)).shape == (5, 3)
    with pytest.raises(ValueError):
        mlp((4,))


def test_resnet_small_on_32x32_has_batchnorm_and_residuals():
    torch.manual_seed(0)
    m = resnet_small()
    assert any(isinstance(x, nn.BatchNorm2d) for x in m.modules())
    out = m(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    assert resnet_small(num_classes=4, in_channels=1, width=8)(torch.randn(2, 1, 28, 28)).shape == (
        2,
        4,
    )


def test_regression_mlp():
    m = regression_mlp()
    assert m(torch.zeros(7, 4)).shape == (7, 1)
    assert _n_params(m) == (4 * 64 + 64) + (64 * 64 + 64) + (64 + 1)


def test_build_model_names_and_module_factory():
    assert set(MODELS) == {"paper-cnn", "mlp", "resnet-small", "regression-mlp", "sincos-mlp"}
    assert _n_params(build_model("paper-cnn")) == 4712
    assert _n_params(build_model("paper_cnn")) == 4712
    assert isinstance(build_model("resnet-small"), nn.Module)
    m = build_model("kldwrm.experiments.data.models:mlp", sizes=(3, 2))
    assert [type(l) for l in m] == [nn.Flatten, nn.Linear]
    assert isinstance(build_model("torch.nn:Identity"), nn.Identity)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vgg19")
    with pytest.raises(ValueError, match="cannot import"):
        build_model("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="no attribute"):
        build_model("torch.nn:NoSuchLayer")
    with pytest.raises(TypeError, match="not a Module"):
        build_model("builtins:dict")
