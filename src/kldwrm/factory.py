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

#: the curvature settings shared by the transformer preset (:data:`TRANSFORMER_SETTINGS`)
_ADAPTIVE = dict(curvature="adaptive", eigen_power=0.5, eigen_beta=0.95, damping=1e-8,
                 kl_clip=None, weight_decay=0.0, update_freq=10)

#: recommended settings for transformers (README "Transformers"): K-FAC's eigenbasis with
#: Adam's metric measured in it every step (``curvature="adaptive"``, ``eigen_power=0.5``,
#: the damping as Adam's ε), no KL clip. Tuned on ``examples/char_lm.py`` at seed 0 only
#: (600 steps; docs/lm_benchmark.md): K-FAC and SO with momentum 0.9, Q without (its wake
#: uses the step taken, so momentum's overshoot is pulled back: 2.03 with 0.9 against
#: 1.44 without), each rule's ρ as the paper's except Q's (0.33 beat 0.5: 1.71 against
#: 1.84 at step 300).
TRANSFORMER_SETTINGS: dict[str, dict[str, Any]] = {
    "sgd": dict(lr=0.1, momentum=0.9, weight_decay=0.0),
    "adam": dict(lr=3e-3, weight_decay=0.0),
    "kfac": dict(lr=3e-4, momentum=0.9, rho=0.95, **_ADAPTIVE),
    "so": dict(lr=3e-4, momentum=0.9, rho=0.33, **_ADAPTIVE),
    "q": dict(lr=3e-3, momentum=0.0, rho=0.33, block_clip=None, **_ADAPTIVE),
    "qe": dict(lr=3e-3, momentum=0.0, rho=0.33, block_clip=None, window=4, inner_steps=3,
               inner_lr=7e-4, kl_weight=1.0 / 330, **_ADAPTIVE),
}

#: named presets for :func:`make_optimizer`
PRESETS = {"paper": PAPER_SETTINGS, "transformer": TRANSFORMER_SETTINGS}

_CLASSES = {
    "kfac": ("kldwrm.optim", "KFAC"),
    "so": ("kldwrm.optim", "SOKLDWRM"),
    "q": ("kldwrm.optim", "QKLDWRM"),
    "qe": ("kldwrm.optim", "QEKLDWRM"),
}

OPTIMIZERS = ("sgd", "adam", "kfac", "so", "q", "qe")


def make_optimizer(name: str, model: nn.Module, *, preset: str = "paper",
                   **kwargs: Any) -> torch.optim.Optimizer:
    """Build optimizer ``name`` for ``model``; ``kwargs`` override the ``preset``'s settings
    (``"paper"``: :data:`PAPER_SETTINGS`, the MNIST study's; ``"transformer"``:
    :data:`TRANSFORMER_SETTINGS`).

    ``sgd`` and ``adam`` are ``torch.optim.SGD``/``Adam`` on the model's trainable
    parameters; ``kfac``, ``so``, ``q`` and ``qe`` are this library's optimizers.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"name must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    settings = {**PRESETS[preset][name], **kwargs}
    if name in ("sgd", "adam"):
        params = [p for p in model.parameters() if p.requires_grad]
        if name == "sgd":
            return torch.optim.SGD(params, **settings)
        return torch.optim.Adam(params, **settings)
    module, cls = _CLASSES[name]
    return getattr(importlib.import_module(module), cls)(model, **settings)
