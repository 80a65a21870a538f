"""KFC blocks of transposed convolutions (``nn.ConvTranspose1d/2d/3d``).

A transposed convolution is the adjoint of the convolution with the same kernel, stride,
padding and dilation: input position ``p`` adds ``x_p[c] W[c, o, k]`` to output position
``q = p·s + k·dil − pad``. So with ``δ`` the output gradient and ``u_p`` its patch at ``p``
(``u_p[o, k] = δ[o, p·s + k·dil − pad]``, zero outside the output: ``δ`` unfolded exactly
as a convolution with the layer's hyper-parameters unfolds its input), one example's
weight gradient, viewed as the matrix ``W`` of shape ``(C_in, C_out·Πk)``, is::

    ∂ℓ/∂W = Σ_p x_p u_pᵀ,          vec(x_p u_pᵀ) = u_p ⊗ x_p,

an ordinary KFC sum over positions with the roles swapped: the patches come from ``δ``
and the per-position vectors from the layer input. KFC's approximations (spatially
uncorrelated derivatives, spatial homogeneity; Grosse and Martens, 2016, section 3) give
``F ≈ A ⊗ Γ`` with::

    A = (1/N) Σ_{n,p} u uᵀ        (C_out·Πk square: the column side of W)
    Γ = (1/R) Σ_{n,p} x xᵀ        (C_in square: the row side, R = N·positions rows)

With an ``output_padding`` below the stride the patches are exactly one per input
position (the window count of that unfold is the input size), which is why
:func:`~kldwrm.curvature.layer.kronecker_supported` requires it.

The bias is not a homogeneous coordinate here: its gradient ``Σ_q δ_q`` counts each output
position once, while ``Σ_p Σ_k u_p[o, k]`` counts it once per ``(p, k)`` that reaches it
(``k`` times in the interior with stride 1), so no constant input row reproduces it.
It always gets its own :class:`~kldwrm.curvature.layer.BiasBlock`, the exact Fisher
block of the bias (``Γ`` of the per-example sums of ``δ``), whatever ``bias=`` says.
"""

from __future__ import annotations

from torch import Tensor, nn

from .layer import KroneckerBlock
from .statistics import conv_gram, gram


class TransposedConvBlock(KroneckerBlock):
    """KFC block ``Ā ⊗ Γ̄`` of the weight of an ``nn.ConvTranspose1d/2d/3d`` layer.

    The weight ``(C_in, C_out, *k)`` is the matrix ``W`` of shape ``(C_in, C_out·Πk)``
    (the layout of :class:`KroneckerBlock`, so ``_to_mat``/``_from_mat`` and the solves
    are shared); ``A`` comes from the output gradient's patches and ``Γ`` from the layer
    input (module docstring). The bias, if any, is left to a ``BiasBlock``.
    """

    kind = "kronecker-transposed"

    def __init__(self, module: nn.Module, name: str, *, bias: str = "homogeneous",
                 rank: int | None = None) -> None:
        # the bias is never a homogeneous coordinate of this block (module docstring)
        super().__init__(module, name, bias="separate", rank=rank)

    def _input_factor(self, capture) -> tuple[Tensor, float]:
        """``A = (1/N) Σ_{n,p} u uᵀ`` over the patches ``u`` of the per-example output
        gradients ``δ`` (im2col with the layer's kernel, stride, padding and dilation), and
        ``N``, the examples of the call each ``δ`` belongs to, once per recorded use."""
        m = self.module
        scale = capture.delta_scale() ** 2
        total = sum(conv_gram(d.to(self.dtype), m, False) for d in capture.deltas[m]) * scale
        n = sum(capture.examples[call] for call in capture.delta_calls[m])
        return total.div_(n), float(n)

    def _output_factor(self, capture) -> tuple[Tensor, float]:
        """``Γ = (1/R) Σ_{n,p} x xᵀ`` over the ``R`` input positions ``x_p`` (channel
        vectors) of every recorded use, and ``R``."""
        blocks = [(x.to(self.dtype).transpose(0, 1).reshape(x.shape[1], -1), 1.0)
                  for x in capture.inputs[self.module]]
        rows = sum(cols.shape[1] for cols, _ in blocks)
        return gram(blocks).div_(max(rows, 1)), float(rows)


__all__ = ["TransposedConvBlock"]
