"""Layers whose linear maps run as modules, so that the curvature hooks see them.

``nn.MultiheadAttention`` calls its projections functionally
(``F.multi_head_attention_forward``): no forward hook sees the input projection's output,
so its packed ``in_proj_weight`` gets a diagonal block and ``out_proj`` too. The
:class:`MultiheadAttention` here is the same module (a subclass: the same parameters, the
same ``state_dict`` keys, the same outputs) whose self-attention forward runs the input
projection through :attr:`MultiheadAttention.in_projection`, an ``nn.Linear`` view of
``in_proj_weight``/``in_proj_bias`` with no tensors of its own, and ``out_proj`` as a
module. Each then gets a Kronecker block (one ``(E+1) × (E+1)`` input factor and a
``3E × 3E`` output factor for the packed q, k, v; Eschenhagen et al. 2023's "expand" over
the positions, or "reduce" with ``weight_sharing="reduce"``).

:func:`swap_attention` replaces every eligible ``nn.MultiheadAttention`` of a model in
place, sharing its tensors (build the optimizer afterwards). Eligible: query, key and value
of the same width (the packed weight) without ``add_bias_kv``/``add_zero_attn``. A call with
different query, key and value tensors (cross-attention) runs ``nn.MultiheadAttention``'s
own forward: correct outputs, but no Kronecker statistics for the input projection on that
call. Dropout on the attention weights draws other random numbers than
``nn.MultiheadAttention`` does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _PackedProjection(nn.Linear):
    """``x ↦ x W_inᵀ + b_in`` with the owner's ``in_proj_weight`` and ``in_proj_bias``
    (an ``nn.Linear`` for the hooks; it registers no tensor of its own)."""

    def __init__(self, owner: nn.MultiheadAttention) -> None:
        nn.Module.__init__(self)
        self.in_features = owner.embed_dim
        self.out_features = 3 * owner.embed_dim
        object.__setattr__(self, "_owner", owner)  # not a submodule: no cycle in the tree

    @property
    def weight(self) -> Tensor:  # type: ignore[override]
        return self._owner.in_proj_weight

    @property
    def bias(self) -> Tensor | None:  # type: ignore[override]
        return self._owner.in_proj_bias


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask (``True``: not attended) as ``-inf``/0, a float one as it is."""
    if mask is None or mask.dtype != torch.bool:
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, -math.inf)


class MultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with its projections run as modules (module docstring)."""

    #: read by the curvature engine: ``out_proj`` is called as a module here
    projections_are_modules = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.in_projection = _PackedProjection(self)

    def _hooked(self, query: Tensor, key: Tensor, value: Tensor, is_causal: bool,
                attn_mask: Tensor | None) -> bool:
        return (query is key and key is value and self._qkv_same_embed_dim
                and self.bias_k is None and not self.add_zero_attn
                and not (is_causal and attn_mask is None))

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Tensor | None = None, need_weights: bool = True,
                attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        """As ``nn.MultiheadAttention.forward`` (``is_causal`` is the hint that
        ``attn_mask`` is causal: the mask is applied)."""
        if not self._hooked(query, key, value, is_causal, attn_mask):
            return super().forward(query, key, value, key_padding_mask, need_weights,
                                   attn_mask, average_attn_weights, is_causal)
        unbatched = query.dim() == 2
        x = query.unsqueeze(1 if not self.batch_first else 0) if unbatched else query
        x = x if self.batch_first else x.transpose(0, 1)  # (N, L, E)
        n, length, e = x.shape
        heads, d = self.num_heads, self.head_dim
        q, k, v = (t.reshape(n, length, heads, d).transpose(1, 2)
                   for t in self.in_projection(x).chunk(3, dim=-1))
        mask = self._mask(attn_mask, key_padding_mask, n, length, q.dtype)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q / math.sqrt(d)) @ k.transpose(-2, -1)
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            out = F.dropout(weights, p) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = self.out_proj(out.transpose(1, 2).reshape(n, length, e))
        out = out if self.batch_first else out.transpose(0, 1)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if unbatched:
            out = out.squeeze(0 if self.batch_first else 1)
            weights = None if weights is None else weights.squeeze(0)
        return out, weights

    def _mask(self, attn_mask: Tensor | None, key_padding_mask: Tensor | None, n: int,
              length: int, dtype: torch.dtype) -> Tensor | None:
        """``attn_mask`` ((L, S) or (N·H, L, S)) and ``key_padding_mask`` ((N, S)) as one
        additive mask broadcast to (N, H, L, S)."""
        attn = _additive(attn_mask, dtype)
        if attn is not None and attn.dim() == 3:
            attn = attn.reshape(n, self.num_heads, length, length)
        pad = _additive(key_padding_mask, dtype)
        if pad is not None:
            pad = pad.reshape(n, 1, 1, length)
            attn = pad if attn is None else attn + pad
        return attn


def swap_attention(model: nn.Module) -> nn.Module:
    """Replace, in place, every eligible ``nn.MultiheadAttention`` of ``model`` by
    :class:`MultiheadAttention` with the same tensors (module docstring); returns
    ``model`` (itself swapped if it is one)."""
    if _eligible(model):
        return _swapped(model)
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if _eligible(child):
                setattr(parent, name, _swapped(child))
    return model


def _eligible(m: nn.Module) -> bool:
    return (type(m) is nn.MultiheadAttention and m._qkv_same_embed_dim and m.bias_k is None
            and not m.add_zero_attn)


def _swapped(old: nn.MultiheadAttention) -> MultiheadAttention:
    new = MultiheadAttention(old.embed_dim, old.num_heads, dropout=old.dropout,
                             bias=old.in_proj_bias is not None, batch_first=old.batch_first,
                             device="meta")
    new.in_proj_weight = old.in_proj_weight
    new.in_proj_bias = old.in_proj_bias
    new.out_proj = old.out_proj
    new.train(old.training)
    return new
