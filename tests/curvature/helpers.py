"""Helpers shared by the curvature tests: one refresh step, and an independent record of
layer inputs and per-example output gradients."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kldwrm import KFAC


def one_refresh(model: nn.Module, x: Tensor, y: Tensor, fisher: str = "empirical",
                **kw) -> KFAC:
    """One (refresh) K-FAC step; the factors are then the first estimate (F̄_0 = F_0)."""
    opt = KFAC(model, lr=1e-3, fisher=fisher, kl_clip=None, update_freq=1, rho=0.5, **kw)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    return opt


def record(model: nn.Module, modules: Sequence[nn.Module], x: Tensor, y: Tensor
           ) -> tuple[dict[nn.Module, Tensor], dict[nn.Module, Tensor]]:
    """Layer inputs and the gradients of the summed loss w.r.t. the layer outputs (the
    per-example output gradients), by plain hooks and autograd."""
    ins, outs = {}, {}

    def hook(m, i, o):
        ins[m], outs[m] = i[0], o

    handles = [m.register_forward_hook(hook) for m in modules]
    loss = F.cross_entropy(model(x), y, reduction="sum")
    for h in handles:
        h.remove()
    grads = torch.autograd.grad(loss, [outs[m] for m in modules])
    return {m: ins[m].detach() for m in modules}, dict(zip(modules, grads, strict=True))


def train_losses(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor,
                 steps: int) -> list[float]:
    """``steps`` full-batch steps of the ordinary loop; the loss before each step."""
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
