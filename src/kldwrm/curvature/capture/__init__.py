"""Hooks that record what the curvature needs, registered only on refresh steps.

On the steps in between no hook is installed at all, so the model runs exactly as it
would under ``torch.optim.SGD`` (zero overhead, eq. 20).

While armed, each Kronecker layer's forward hook keeps its input ``a`` and output ``z``.
The output gradients ``δ`` then come from one of two places:

* ``fisher="empirical"``: a tensor hook on ``z`` during the user's own ``loss.backward()``
  (scaled by the number of examples ``N``, since the user's loss is a mean over them);
* ``fisher="mc"`` (eq. 5): labels are sampled from the model's predictive distribution
  inside the root module's forward hook, and one extra backward of the summed
  sampled-label loss runs there, to the layer outputs only, with ``retain_graph=True``.
  The user's training loop is unchanged, no second forward pass runs (so BatchNorm
  running statistics and dropout masks are exactly those of the user's pass), and the
  user's ``loss.backward()`` then frees the graph as usual.

Examples (DESIGN section 1): the model output's last dimension holds the classes (or the
regression features) and every leading position is an example, so a language model's
``(batch, time, vocab)`` logits are ``batch·time`` examples, each with its own sampled
label. With the empirical Fisher, positions whose output gradient is exactly zero, the
positions a loss's ``ignore_index`` left out, are not examples: they are not counted, and
layers whose rows are those positions (same leading shape as the output) drop them.

Every forward pass of the root module while armed is one *call* (several with gradient
accumulation); each recorded tensor remembers its call, so rows can be matched to the
examples of the output they produced. The step's gradient is taken to be that of the mean
loss over the examples of all its calls, which is what the usual accumulation loop
computes (each micro-batch's mean loss weighted by its share of the examples): the step on
accumulated micro-batches then equals the step on their concatenation
(:meth:`Capture.delta_scale`).

Activation checkpointing (``torch.utils.checkpoint``) runs parts of the forward pass again
during a backward pass. A recomputed layer is not a new use of it: with
``use_reentrant=False`` the first pass was recorded as usual and the recomputation is
ignored; with ``use_reentrant=True`` the first pass ran under ``no_grad`` (nothing to record
then), so the layer's input and output gradient are taken from its recomputation, once per
use (:meth:`Capture._recomputed`). ``torch.autograd.grad`` cannot cross a reentrant
checkpoint, so the "mc" labels' backward is then a plain backward with the parameters'
gradients set aside and restored (:meth:`Capture._sampled_backward_all`).
"""

from .hooks import Capture
from .outputs import (
    FISHER_TYPES,
    LIKELIHOODS,
    OutputSelector,
    in_backward,
    num_examples,
    sample_output_grads,
    select_output,
    widen,
)

__all__ = [
    "FISHER_TYPES",
    "LIKELIHOODS",
    "Capture",
    "OutputSelector",
    "in_backward",
    "num_examples",
    "sample_output_grads",
    "select_output",
    "widen",
]
