"""Networks used by the experiments.

``paper_cnn`` is the network of the paper's MNIST experiment (DESIGN section 4); the others
are small models for trying the optimizers on other layer mixes (wide Linear layers,
BatchNorm + residual connections, regression).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

__all__ = ["MODELS", "build_model", "mlp", "paper_cnn", "regression_mlp", "resnet_small",
           "sincos_mlp"]


def paper_cnn(num_classes: int = 10, dropout: float = 0.5) -> nn.Sequential:
    """The paper's MNIST network for ``1x28x28`` inputs.

    Conv2d(1,5,5) → max-pool 2 → ReLU → Conv2d(5,7,5) → max-pool 2 → ReLU → flatten →
    Linear(112,30) → ReLU → dropout 0.5 → Linear(30,10). 4,712 parameters.
    """
    return nn.Sequential(
        nn.Conv2d(1, 5, kernel_size=5),
        nn.MaxPool2d(2),
        nn.ReLU(),
        nn.Conv2d(5, 7, kernel_size=5),
        nn.MaxPool2d(2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(112, 30),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(30, num_classes),
    )


def mlp(sizes: Sequence[int] = (784, 1024, 1024, 10)) -> nn.Sequential:
    """Fully connected ReLU network; the input is flattened first."""
    if len(sizes) < 2:
        raise ValueError("mlp needs at least an input and an output size")
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class _BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and an identity (or 1x1 projection) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetSmall(nn.Module):
    """A small residual CNN with BatchNorm (for ``3x32x32`` inputs, works for any size).

    Stem conv3x3(width) → three stages of one basic block each (width, 2·width, 4·width;
    stride 1, 2, 2) → global average pool → Linear.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        self.stages = nn.Sequential(
            _BasicBlock(width, width, 1),
            _BasicBlock(width, 2 * width, 2),
            _BasicBlock(2 * width, 4 * width, 2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.stages(self.stem(x))).flatten(1))


def resnet_small(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> ResNetSmall:
    """Build :class:`ResNetSmall`."""
    return ResNetSmall(num_classes=num_classes, in_channels=in_channels, width=width)


def regression_mlp(
    in_dim: int = 4, hidden: Sequence[int] = (64, 64), out_dim: int = 1
) -> nn.Sequential:
    """Tanh MLP for the synthetic regression data (``(N, in_dim)`` → ``(N, out_dim)``)."""
    layers: list[nn.Module] = []
    prev = in_dim
    for h in hidden:
        layers += [nn.Linear(prev, h), nn.Tanh()]
        prev = h
    layers.append(nn.Linear(prev, out_dim))
    return nn.Sequential(*layers)


def sincos_mlp() -> nn.Sequential:
    """The 2-32-32-1 tanh MLP of the QE regression test (data: ``sincos``)."""
    return regression_mlp(in_dim=2, hidden=(32, 32), out_dim=1)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "paper-cnn": paper_cnn,
    "mlp": mlp,
    "resnet-small": resnet_small,
    "regression-mlp": regression_mlp,
    "sincos-mlp": sincos_mlp,
}


def build_model(spec: str, **kwargs: Any) -> nn.Module:
    """Build a model from a name in :data:`MODELS` or a ``"package.module:factory"`` string.

    Keyword arguments are passed to the factory.
    """
    key = spec.strip()
    if key.lower().replace("_", "-") in MODELS:
        return MODELS[key.lower().replace("_", "-")](**kwargs)
    if ":" in key:
        module_name, _, attr = key.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(f"model {spec!r}: cannot import module {module_name!r}") from exc
        factory = module
        for part in attr.split("."):
            if not hasattr(factory, part):
                raise ValueError(f"model {spec!r}: {module_name!r} has no attribute {attr!r}")
            factory = getattr(factory, part)
        if not callable(factory):
            raise ValueError(f"model {spec!r}: {attr!r} is not callable")
        model = factory(**kwargs)
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"model {spec!r}: factory returned {type(model).__name__}, not a Module"
            )
        return model
    raise ValueError(
        f"unknown model {spec!r}; choose one of {', '.join(MODELS)} or 'module:factory'"
    )
