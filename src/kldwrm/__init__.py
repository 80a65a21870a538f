"""kldwrm: KL-Divergence Wake-Regularized Models and EA-KFAC optimizers for PyTorch.

Implements Puiu, *Rethinking Exponential Averaging of the Fisher* (ECML PKDD 2022)::

    from kldwrm import KFAC, SOKLDWRM, QKLDWRM, QEKLDWRM
    opt = QKLDWRM(model, lr=0.01)
    ...  # the ordinary training loop: zero_grad, loss.backward(), opt.step()
"""

from .curvature import CurvatureError
from .factory import (
    OPTIMIZERS,
    PAIRINGS,
    PAPER_SETTINGS,
    PRESETS,
    TRANSFORMER_SETTINGS,
    make_optimizer,
)
from .optim import (
    KFAC,
    QKLDWRM,
    SOKLDWRM,
    CurvatureOptimizer,
    MissingCurvatureWarning,
    NonFiniteGradientWarning,
    Preconditioner,
    load_sharded_state,
    sharded_state,
)

__version__ = "0.2.0"

__all__ = [
    "KFAC",
    "OPTIMIZERS",
    "PAIRINGS",
    "PAPER_SETTINGS",
    "PRESETS",
    "TRANSFORMER_SETTINGS",
    "QKLDWRM",
    "SOKLDWRM",
    "CurvatureError",
    "CurvatureOptimizer",
    "MissingCurvatureWarning",
    "NonFiniteGradientWarning",
    "Preconditioner",
    "load_sharded_state",
    "make_optimizer",
    "sharded_state",
]


def __getattr__(name: str):  # QEKLDWRM lives in its own module (optional heavy import)
    if name == "QEKLDWRM":
        from .optim.qe import QEKLDWRM

        return QEKLDWRM
    raise AttributeError(f"module 'kldwrm' has no attribute {name!r}")
