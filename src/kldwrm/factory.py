"""Name → optimizer, for the CLI and experiment scripts (DESIGN section 1)."""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn

#: the paper's settings (DESIGN section 4); SGD/Adam have sensible MNIST defaults
PAPER_SETTINGS: dict[str, dict[str, Any]] = {
    "sgd": dict(lr=0.1, momentum=0.9, weight_decay=1e-3),
    "adam": dict(lr=1e-3, weight_decay=0.0),
    "kfac": dict(lr=0.01, rho=0.95, damping=1e-2, weight_decay=1e-3, kl_clip=0.1,
                 update_freq=30),
    "so": dict(lr=0.01, rho=0.33, damping=1e-2, weight_decay=1e-3, kl_clip=0.1,
               update_freq=30),
    "q": dict(lr=0.01, rho=0.5, damping=1e-2, weight_decay=1e-3, kl_clip=0.1, update_freq=30,
              block_clip=2.0),
    "qe": dict(lr=0.01, rho=0.5, damping=1e-2, weight_decay=1e-3, kl_clip=0.1, update_freq=30,
               block_clip=2.0, window=4, inner_steps=10, inner_lr=7e-4,  # ω/λ, absolute
               kl_weight=1.0 / 330),
}

_CLASSES = {
    "kfac": ("kldwrm.optim", "KFAC"),
    "so": ("kldwrm.optim", "SOKLDWRM"),
    "q": ("kldwrm.optim", "QKLDWRM"),
    "qe": ("kldwrm.optim", "QEKLDWRM"),
}

OPTIMIZERS = ("sgd", "adam", "kfac", "so", "q", "qe")


def make_optimizer(name: str, model: nn.Module, **kwargs: Any) -> torch.optim.Optimizer:
    """Build optimizer ``name`` for ``model``; ``kwargs`` override :data:`PAPER_SETTINGS`.

    ``sgd`` and ``adam`` are ``torch.optim.SGD``/``Adam`` on the model's trainable
    parameters; ``kfac``, ``so``, ``q`` and ``qe`` are this library's optimizers.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"name must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    settings = {**PAPER_SETTINGS[name], **kwargs}
    if name in ("sgd", "adam"):
        params = [p for p in model.parameters() if p.requires_grad]
        if name == "sgd":
            return torch.optim.SGD(params, **settings)
        return torch.optim.Adam(params, **settings)
    module, cls = _CLASSES[name]
    return getattr(importlib.import_module(module), cls)(model, **settings)
