"""Step rules: what each algorithm does with the shared curvature engine."""

from .base import CurvatureOptimizer, MissingCurvatureWarning, NonFiniteGradientWarning
from .kfac import KFAC
from .preconditioner import RULES, Preconditioner
from .q import Q_SOLVES, QKLDWRM
from .qe import QEKLDWRM
from .sharded.checkpoint import load_sharded_state, sharded_state
from .so import SOKLDWRM

__all__ = [
    "KFAC",
    "QEKLDWRM",
    "QKLDWRM",
    "RULES",
    "Q_SOLVES",
    "SOKLDWRM",
    "CurvatureOptimizer",
    "MissingCurvatureWarning",
    "NonFiniteGradientWarning",
    "Preconditioner",
    "load_sharded_state",
    "sharded_state",
]
