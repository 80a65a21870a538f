"""Which tensors a curvature optimizer trains, step by step: groups added after
construction (``add_param_group``), blocks frozen and later unfrozen (a catch-up refresh
gives them curvature, eq. 20's schedule otherwise), and the tensors a step leaves out
(no gradient, or no curvature yet), whose rule state is kept as it was.

:class:`Membership` is a mixin of :class:`~kldwrm.optim.base.CurvatureOptimizer`: it reads
the optimizer's engine, parameters and per-block flags (``_trainable``, ``_pending``,
``_watcher``), its ``_check_group`` and its refresh schedule (``is_refresh_step``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..curvature.capture import in_backward
from ..distributed import is_sharded


def block_trainable(block: Any) -> bool:
    """Whether some tensor of ``block`` requires grad."""
    return any(p.requires_grad for p in block.params)


def _unfreeze_watch(ref: weakref.ref) -> Callable[..., None]:
    """The forward pre-hook of :meth:`Membership._track_trainable`."""
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        opt = ref()
        if opt is None or not torch.is_grad_enabled() or in_backward():
            return
        opt._track_trainable()
        if opt._pending:
            opt.engine.capture.arm_in_forward(module, args, kwargs)

    return hook


class Membership:
    """``add_param_group``, the tracking of blocks that become trainable, and the tensors a
    step leaves out (see the methods)."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, as ``torch.optim`` does (a tensor already in a group is a
        ``ValueError``; unset hyperparameters take the constructor's values).

        Its tensors get curvature blocks built as at construction (Kronecker for a layer
        whose tensors are all in the group) and are trained from the next step, whose
        forward pass is captured for their first curvature estimate. Under
        ``torch.distributed`` every rank must add the same group before the same step;
        to resume, add the same groups before ``load_state_dict``.
        """
        super().add_param_group(param_group)
        if not hasattr(self, "engine"):  # torch.optim's constructor adding the first groups
            self._check_group(len(self.param_groups) - 1, self.param_groups[-1])
            return
        gi = len(self.param_groups) - 1
        group = self.param_groups[gi]
        try:
            self._check_group(gi, group)
            blocks = self.engine.add_params(group["params"])
        except ValueError:
            self.param_groups.pop()
            raise
        first = len(self._params)
        self._params.extend(group["params"])
        self._group_of.extend(gi for _ in group["params"])
        for bi in blocks:
            self.engine.blocks[bi].group = gi
        self._trainable.extend(False for _ in blocks)  # pending once they require grad
        self._narrow = self._narrow or any(
            p.dtype in (torch.float16, torch.bfloat16) for p in group["params"])
        self._sharded = self._sharded or any(is_sharded(p) for p in group["params"])
        self._params_added(first)
        self._arm_next()

    def _params_added(self, first: int) -> None:
        """Tensors ``self._params[first:]`` were just added (a subclass extends its own
        per-tensor bookkeeping)."""

    # -- blocks that become trainable ----------------------------------------------------
    def _track_trainable(self) -> None:
        """Note blocks without curvature whose tensors now require grad (unfrozen, or in
        a group just added): they wait for a catch-up refresh. While some block is frozen
        without curvature, a forward pre-hook on the model looks again at each
        grad-enabled pass, so a layer unfrozen just before a forward pass is captured in
        it (no hook otherwise: nothing to watch)."""
        dormant = False
        for bi, b in enumerate(self.engine.blocks):
            now = block_trainable(b)
            if now and not self._trainable[bi] and not b.initialized:
                self._pending.add(bi)
            self._trainable[bi] = now
            dormant = dormant or (not now and not b.initialized)
        watcher = self._watcher
        if dormant and watcher is None:
            self._watcher = self.engine.capture.root.register_forward_pre_hook(
                _unfreeze_watch(weakref.ref(self)), with_kwargs=True)
        elif not dormant and watcher is not None:
            watcher.remove()
            self._watcher = None

    def _arm_next(self) -> None:
        """Arm the capture for the next step when it refreshes (eq. 20) or catches up."""
        self._track_trainable()
        self.engine.arm(self.is_refresh_step or bool(self._pending))

    def _refresh_targets(self, grads: Sequence[Tensor | None]) -> list[int] | None:
        """Blocks this step estimates: on a scheduled refresh every block with a tensor
        that requires grad (a frozen block keeps its state); otherwise the pending blocks
        with gradients, when this step's forward pass was captured; ``None``: none."""
        blocks = self.engine.blocks
        if self.is_refresh_step:
            return [bi for bi, b in enumerate(blocks) if block_trainable(b)]
        cap = self.engine.capture
        if not (self._pending and cap.armed and cap.examples):
            return None
        slots = self.engine.slots
        targets = [bi for bi in sorted(self._pending)
                   if any(grads[i] is not None for i in slots[bi])]
        return targets or None

    # -- tensors a step leaves out -----------------------------------------------------------
    def _left_out(self, grads: Sequence[Tensor | None]) -> dict[int, dict[str, Any]]:
        """Tensors this step leaves alone, with their rule state (restored afterwards):
        those without a gradient (as ``torch.optim`` skips them) and those whose curvature
        block has not received data yet."""
        ready = self.engine.ready()
        out: dict[int, dict[str, Any]] = {}
        if all(ready) and all(gr is not None for gr in grads):
            return out  # the usual case
        for bi, slot in enumerate(self.engine.slots):
            for i in slot:
                if grads[i] is None or not ready[bi]:
                    out[i] = dict(self.state.get(self._params[i], {}))
        return out

    def _still_left_out(self, left: dict[int, dict[str, Any]],
                        grads: Sequence[Tensor | None]) -> dict[int, dict[str, Any]]:
        """``left`` less the tensors whose block this step's refresh gave curvature."""
        if not left:
            return left
        ready = self.engine.ready()
        block_of = {i: bi for bi, slot in enumerate(self.engine.slots) for i in slot}
        return {i: st for i, st in left.items() if grads[i] is None or not ready[block_of[i]]}

    def _restore_state(self, frozen: dict[int, dict[str, Any]]) -> None:
        for i, st in frozen.items():
            p = self._params[i]
            if st:
                self.state[p] = st
            else:
                self.state.pop(p, None)
