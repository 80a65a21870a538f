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
                 kl_clip=None, weight_decay=0.0, update_freq=10, embeddings="kron")

#: recommended settings for transformers (README "Transformers"): K-FAC's eigenbasis with
#: Adam's metric measured in it every step (``curvature="adaptive"``, ``eigen_power=0.5``,
#: the damping as Adam's ε), no KL clip. Tuned on ``examples/char_lm.py`` at seed 0 only
#: (600 steps; docs/lm_benchmark.md): K-FAC and SO with momentum 0.9, Q without (its wake
#: uses the step taken, so momentum's overshoot is pulled back: 2.03 with 0.9 against
#: 1.44 without), each rule's ρ as the paper's except Q's (0.33 beat 0.5: 1.71 against
#: 1.84 at step 300). Embeddings get Kronecker blocks (``embeddings="kron"``; seed 0, 600
#: steps: K-FAC 1.402 → 1.397, SO 1.367 → 1.349, Q 1.437 → 1.425); K-FAC-reduce
#: (``weight_sharing="reduce"``) was worse there (K-FAC 1.419, SO 1.408) and is not used.
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

#: the optimizers a rule can be paired with in preconditioner mode (``"q+adamw"``)
BASES = ("sgd", "adamw", "adam")

#: preconditioner-mode names: a rule's direction applied by a torch optimizer
PAIRINGS = tuple(f"{rule}+{base}" for rule in _CLASSES for base in BASES)

#: arguments of a pairing that go to the torch optimizer (the rest go to the rule);
#: ``base_weight_decay`` is its own (decoupled, for AdamW) weight decay
_BASE_KEYS = {
    "sgd": ("lr", "momentum", "nesterov", "dampening", "foreach", "fused"),
    "adamw": ("lr", "betas", "eps", "amsgrad", "foreach", "fused"),
    "adam": ("lr", "betas", "eps", "amsgrad", "foreach", "fused"),
}


def make_optimizer(name: str, model: nn.Module, *, preset: str = "paper",
                   **kwargs: Any) -> torch.optim.Optimizer:
    """Build optimizer ``name`` for ``model``; ``kwargs`` override the ``preset``'s settings
    (``"paper"``: :data:`PAPER_SETTINGS`, the MNIST study's; ``"transformer"``:
    :data:`TRANSFORMER_SETTINGS`).

    ``sgd`` and ``adam`` are ``torch.optim.SGD``/``Adam`` on the model's trainable
    parameters; ``kfac``, ``so``, ``q`` and ``qe`` are this library's optimizers; a pairing
    ``"<rule>+<base>"`` (:data:`PAIRINGS`, e.g. ``"q+adamw"``) is the rule in
    preconditioner mode (:class:`~kldwrm.optim.preconditioner.Preconditioner`) with
    ``torch.optim.SGD``/``AdamW``/``Adam`` applying its direction: see :func:`_pairing`.
    """
    if name not in OPTIMIZERS and name not in PAIRINGS:
        raise ValueError(f"name must be one of {', '.join(OPTIMIZERS + PAIRINGS)}, "
                         f"got {name!r}")
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    if name in PAIRINGS:
        return _pairing(name, model, PRESETS[preset], kwargs)
    settings = {**PRESETS[preset][name], **kwargs}
    if name in ("sgd", "adam"):
        params = [p for p in model.parameters() if p.requires_grad]
        if name == "sgd":
            return torch.optim.SGD(params, **settings)
        return torch.optim.Adam(params, **settings)
    module, cls = _CLASSES[name]
    return getattr(importlib.import_module(module), cls)(model, **settings)


def _pairing(name: str, model: nn.Module, preset: dict[str, dict[str, Any]],
             kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    """``"<rule>+<base>"``: the rule's preset settings and the base's keys split off.

    With SGD the rule's ``lr`` and ``momentum`` go to SGD (so ``"kfac+sgd"`` takes the
    steps of ``"kfac"``); with Adam(W) its ``lr`` and ``betas`` come from the preset's
    ``adam`` entry and the KL clip is off by default (Adam's normalisation undoes a
    rescaling of the direction). The rule keeps ``weight_decay`` (L2 before
    preconditioning); ``base_weight_decay`` (default 0) is the base optimizer's own.
    """
    from .optim.preconditioner import Preconditioner

    rule, base = name.split("+")
    settings = dict(preset[rule])
    momentum = settings.pop("momentum", 0.0)
    if base == "sgd":
        settings["momentum"] = momentum
    else:
        settings.update(lr=preset["adam"]["lr"], kl_clip=None)
    settings.update(kwargs)
    base_kwargs = {k: settings.pop(k) for k in _BASE_KEYS[base] if k in settings}
    base_kwargs["weight_decay"] = settings.pop("base_weight_decay", 0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    cls = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW, "adam": torch.optim.Adam}[base]
    return Preconditioner(model, cls(params, **base_kwargs), rule, **settings)
