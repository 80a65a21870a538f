"""QE's own forward passes on a model sharded with FSDP2 (``fully_shard``).

QE evaluates the network at parameters other than the current ones: the stored iterates
``θ_{k-j}`` of its window and ``θ_k + s`` in its inner loop (eqs. 31, 35). On an unsharded
model it does so with ``torch.func.functional_call``. An FSDP2 module gathers its own
shards in its forward pre-hook and registers the gathered tensors in place of whatever
``functional_call`` substituted, so here the values are instead *written into the shards*
(each rank its own slice, no communication), the model is run as it is in training (FSDP
gathers them), and the shards and buffers are put back afterwards.

The gradient of the inner objective's SKL term is then the one FSDP itself produces:
reduce-scattered and averaged over ranks, i.e. the mean over the ranks' shards of the batch
(what :func:`kldwrm.distributed.all_reduce_mean_` computes under DDP), gathered whole.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ...curvature.capture import widen
from ...distributed import full, reshard, shard_like, zeros_full


@contextmanager
def parameters_at(model: nn.Module, params: Sequence[nn.Parameter],
                  values: Sequence[Tensor]) -> Iterator[None]:
    """Run the body with each ``params[i]`` holding the whole tensor ``values[i]`` (this
    rank's shard of it); parameters and the model's buffers are restored on exit."""
    with torch.no_grad():
        saved = [p.detach().clone() for p in params]
        buffers = [(b, b.detach().clone()) for b in model.buffers()]
        for p, v in zip(params, values, strict=True):
            p.copy_(shard_like(v.to(p.dtype), p))
    reshard(model)  # the next forward gathers the shards as they are now
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
            for b, s in buffers:
                b.copy_(s)
        reshard(model)  # the next forward gathers the shards as they are now


def gradient_at(model: nn.Module, params: Sequence[nn.Parameter], values: Sequence[Tensor],
                loss: Callable[[], Tensor]) -> list[Tensor]:
    """``∇ loss`` at ``values`` (whole tensors, at least float32), from one backward of the
    sharded model: FSDP's averaged, reduce-scattered gradient, gathered. The parameters'
    ``.grad`` (the user's gradients) are set aside and put back."""
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        with parameters_at(model, params, values), torch.enable_grad():
            loss().backward()
        return [widen(full(p.grad)) if p.grad is not None else zeros_full(p, widen(v).dtype)
                for p, v in zip(params, values, strict=True)]
    finally:
        for p, g in zip(params, saved, strict=True):
            p.grad = g
