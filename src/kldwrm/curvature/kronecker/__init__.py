"""The Kronecker factor pair of one block, ``Ā ⊗ Γ̄``: what is kept and how it is inverted.

* :mod:`.factors`: :class:`KroneckerFactors`, the averaged factors (eqs. 12-13), their
  decompositions and the solves and products of DESIGN section 3;
* :mod:`.randomized`: the randomized eigensolver behind ``rank=r``;
* :mod:`.lowrank`: the algebra of truncated factors (kept pairs plus a constant), Q's
  refresh solve on them included;
* :mod:`.eigen`: eigenvalue-corrected moments in the Kronecker eigenbasis (EKFAC).

Nothing here knows about layers: :mod:`kldwrm.curvature.blocks` turns activations and
output gradients into factors.
"""

from .eigen import CORRECTED, EigenMoments, example_moments
from .factors import EXACT_SOLVE_RTOL, KroneckerFactors, decomposition_cost, ea_update

__all__ = ["CORRECTED", "EXACT_SOLVE_RTOL", "EigenMoments", "KroneckerFactors",
           "decomposition_cost", "ea_update", "example_moments"]
