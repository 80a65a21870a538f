"""Persistence of a curvature optimizer: ``state_dict`` / ``load_state_dict`` for bit-exact
continuation (tensors and plain values only), at any number of ranks.

:class:`Persistent` is a mixin of :class:`~kldwrm.optim.base.CurvatureOptimizer`: it reads
the optimizer's engine, generator, counters and rule state and writes them back.
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Any

from torch import Tensor

from ..distributed import world_size


class Persistent:
    """``state_dict()['kldwrm']`` and its loading (see the methods)."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed for bit-exact continuation (tensors and plain values only)."""
        sd = super().state_dict()
        sd["kldwrm"] = self._extra_state(self.engine.state_dict())
        return sd

    def _extra_state(self, curvature: dict[str, dict[str, Tensor]] | None) -> dict[str, Any]:
        """``state_dict()['kldwrm']``: what ``torch.optim`` does not keep."""
        return {
            "version": 2,  # 2: QKLDWRM keeps its wake in the eigenbasis of F̄
            "steps_taken": self.steps_taken,
            "skipped_steps": self.skipped_steps,
            "generator": self.generator.get_state(),
            "curvature": curvature,
            "rule": self._rule_state(),
            "trainable": list(self._trainable),
            "pending": sorted(self._pending),
            "ranks": world_size(),  # the state is whole; see _check_ranks
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("kldwrm", None)
        if extra is None:
            raise ValueError(
                f"this state_dict was not saved by a kldwrm optimizer ({type(self).__name__})"
            )
        super().load_state_dict(state_dict)
        self.steps_taken = int(extra["steps_taken"])
        self.skipped_steps = int(extra["skipped_steps"])
        self._load_generator(extra["generator"])
        self._check_ranks(int(extra.get("ranks", world_size())))
        self.engine.load_state_dict(extra["curvature"])
        self._load_rule_state(extra.get("rule", {}))
        self._trainable = list(extra.get("trainable", [
            any(p.requires_grad for p in b.params) for b in self.engine.blocks]))
        self._pending = set(extra.get("pending", []))
        self.engine.arm(False)
        self._arm_next()

    def _check_ranks(self, saved: int) -> None:
        """The state is whole at any number of ranks (every rank folds the same curvature,
        ``"owned"`` blocks are gathered by ``state_dict``), so it resumes anywhere; with
        "mc" Fisher the ranks then sample other labels than the saved run would have: said
        once, not left silent."""
        if saved != world_size() and self.fisher == "mc":
            warnings.warn(
                f"this state was saved on {saved} rank(s) and is loaded on {world_size()}: "
                "the curvature and recursions continue exactly, but each rank's Monte-Carlo "
                "labels are drawn for its own shard, so the run is not bit-exact with one "
                f"that stayed on {saved}", stacklevel=3)

    def _load_generator(self, saved: Tensor) -> None:
        """Restore the label generator's state. A state saved by another device type's
        generator (a run resumed elsewhere: a CUDA generator's state is 16 bytes, a CPU one's
        5056) cannot be restored: the stream then restarts from a seed derived from that
        state, which is deterministic but not the stream the other device would have drawn."""
        saved = saved.cpu()
        if saved.numel() == self.generator.get_state().numel():
            self.generator.set_state(saved)
            return
        digest = hashlib.sha256(saved.numpy().tobytes()).digest()
        self.generator.manual_seed(int.from_bytes(digest[:8], "little"))
        if self.fisher == "mc":
            warnings.warn(
                f"the state_dict's label generator was saved on another device type than "
                f"{self.generator.device.type!r}; the Monte-Carlo labels continue from a seed "
                "derived from it, so this run is not bit-exact with one that stayed there",
                stacklevel=3,
            )

    def _rule_state(self) -> dict[str, Any]:
        """Rule state that is not per-parameter (kept in ``state_dict()['kldwrm']['rule']``)."""
        return {}

    def _load_rule_state(self, state: dict[str, Any]) -> None:
        pass
