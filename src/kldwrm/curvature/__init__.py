"""Curvature machinery: how the Fisher is measured (capture, blocks), averaged and inverted.

The step rules in :mod:`kldwrm.optim` use only :class:`CurvatureEngine`.
"""

from .assembly import unwrap
from .blocks import Block, FactoredBlock
from .capture import FISHER_TYPES, LIKELIHOODS, Capture
from .dense import DenseBlock
from .diagonal import DiagonalBlock
from .embedding import EmbeddingBlock
from .engine import (
    CURVATURES,
    DECOMPOSITIONS,
    DENSE_SCOPES,
    EMBEDDINGS,
    WEIGHT_SHARING,
    CurvatureEngine,
)
from .layer import BIAS_MODES, BiasBlock, KroneckerBlock, kronecker_supported
from .linalg import CurvatureError, sym_eig
from .transposed import TransposedConvBlock

__all__ = [
    "BIAS_MODES",
    "BiasBlock",
    "Block",
    "CURVATURES",
    "DECOMPOSITIONS",
    "Capture",
    "CurvatureEngine",
    "CurvatureError",
    "DENSE_SCOPES",
    "DenseBlock",
    "DiagonalBlock",
    "EMBEDDINGS",
    "EmbeddingBlock",
    "FactoredBlock",
    "FISHER_TYPES",
    "KroneckerBlock",
    "LIKELIHOODS",
    "TransposedConvBlock",
    "WEIGHT_SHARING",
    "kronecker_supported",
    "sym_eig",
    "unwrap",
]
