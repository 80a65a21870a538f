"""Full-history reference solvers: the paper's step *definitions*, solved densely.

Every function here takes the recorded sequences of a run (gradients ``g_k``, Fisher matrices
``F_k``, model curvatures ``B_k``, ``λ_k = 1/lr_k``, ``ρ``) and, at each step ``k``, builds the
*whole* quadratic objective of the paper over every past iterate ``θ_0, ..., θ_k`` and minimises
it with a dense float64 solve (``torch.linalg.solve``). Nothing here uses the tractable
recursions of Propositions 3.1, 4.1 and 4.2; these functions exist to prove that the recursions
implemented in :mod:`kldwrm.optim` are right (see ``docs/theory.md``).

Notation (paper, sections 2-4). ``κ(0) = 1`` and ``κ(i) = 1 - ρ`` for ``i > 0``. The wake of a
step ``k`` is anchored at the past iterates through the partial sums

    S_i^(k) = Σ_{j=i}^{k-1} s_j        (S_k^(k) = 0),

so that ``θ_k + s - θ_i = s + S_i^(k)``. By default ``s_j`` are the solver's own previous
minimisers; when ``taken`` is given they are the steps actually taken by the run (after
clipping), i.e. the wake is anchored at the iterates actually visited (eq. 21 with the visited
``θ_i``).

Input conventions.

* ``grads``: ``K`` flat vectors ``g_k`` of shape ``(n,)`` (gradient of the whole objective at
  ``θ_k``, weight decay included).
* ``fishers``: ``K`` matrices of shape ``(n, n)``: the Fisher used in the wake, *already damped*
  (``F_k + γI``) and *already following eq. 20* for infrequent updates (on non-refresh steps the
  caller passes the current EA matrix). Since the weights ``κ(i) ρ^{k-i}`` sum to one, the EA of
  damped matrices is the damped EA.
* ``curvatures``: ``K`` matrices ``B_k`` of shape ``(n, n)``, used as given.
* ``lam``: a positive float (constant ``λ``) or a sequence of ``K`` positive floats (see each
  function for what a sequence means).
* ``taken``: optional sequence of ``K`` (or ``K - 1``; the last one never matters) flat steps.

Every solver returns a :class:`WakeSolution` holding the minimisers ``s_k`` and the linear term
of each step's quadratic (its gradient at ``s = 0``, the "effective gradient"), from which a
caller can compute K-FAC's KL clip factor with :func:`kl_clip_factor`.
"""

from .common import (
    WakeSolution,
    exponential_average,
    flatten,
    kappa,
    kl_clip_factor,
    unflatten,
    woqm_lambdas,
)
from .solvers import fisher_woqm, q_kldwrm, so_kldwrm, woqm

__all__ = [
    "WakeSolution",
    "flatten",
    "unflatten",
    "kappa",
    "exponential_average",
    "woqm_lambdas",
    "woqm",
    "fisher_woqm",
    "so_kldwrm",
    "q_kldwrm",
    "kl_clip_factor",
]
