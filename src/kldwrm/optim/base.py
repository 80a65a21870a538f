"""Shared machinery of every curvature-based step rule (DESIGN sections 1 and 3).

:class:`CurvatureOptimizer` owns the curvature engine, the refresh schedule (eq. 20), the
non-finite guard, weight decay, the KL and block clips (the :class:`~.clipping.Clipping`
mixin) and persistence. A step rule only
says which vector ``u`` it preconditions and with which system (:meth:`_direction`), and
what it remembers for the next step (:meth:`_after_step`).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .._validation import (
    caller_stacklevel,
    check_nonnegative,
    check_positive,
    check_unit_interval,
)
from ..curvature import (
    CurvatureEngine,
)
from ..curvature.capture import OutputSelector, widen
from ..curvature.linalg import all_finite
from ..distributed import (
    broadcast_generator_,
    full,
    is_sharded,
    shard_like,
)
from . import damping as lm
from .clipping import Clipping
from .membership import Membership, block_trainable
from .options import check_arguments, check_options, optimized
from .persistence import Persistent

logger = logging.getLogger(__name__)

#: (ea_scale e, fresh_scale f, damping γ) for one parameter group: the system e·F̄ + f·F + γI
Scales = tuple[float, float, float]

def _label_generator(device: torch.device, seed: int | None) -> torch.Generator:
    """The generator of the Monte-Carlo labels: one shared state on every rank (each rank
    derives its own labels' seed from it on refresh steps, see
    ``Capture.sampling_generator``), so rank 0's ``state_dict`` resumes every rank."""
    gen = torch.Generator(device=device)
    gen.manual_seed((torch.initial_seed() + 1) % (2**63) if seed is None else int(seed))
    broadcast_generator_(gen)
    return gen


class NonFiniteGradientWarning(RuntimeWarning):
    """Issued (once per optimizer) when a step is skipped for NaN/Inf gradients."""


class MissingCurvatureWarning(RuntimeWarning):
    """Issued (once per optimizer) when a refresh step finds layers that received no data."""


class CurvatureOptimizer(Persistent, Membership, Clipping, Optimizer):
    """Base class of :class:`KFAC`, :class:`SOKLDWRM`, :class:`QKLDWRM` and :class:`QEKLDWRM`.

    Args:
        model: the ``nn.Module`` being trained (a DDP wrapper is accepted); the curvature
            needs its layers.
        lr: learning rate ``1/λ``; any ``torch.optim.lr_scheduler`` may change it (the
            paper's variable step size ``λ^(k)``).
        rho: ρ in [0, 1), EA decay of the curvature (and of the wake, for KLD-WRM).
        damping: γ >= 0, Tikhonov damping added to the averaged curvature.
        weight_decay: L2 coefficient added to the gradient *before* preconditioning.
        kl_clip: K-FAC's KL-based step rescaling (``None`` turns it off).
        update_freq: ``N_u`` of eq. 20; the curvature is refreshed at steps 0, N_u, 2N_u...
        fisher: ``"mc"`` (labels sampled from the model, eq. 5), ``"empirical"`` (the
            training labels), or ``"exact"`` (closed form; ``curvature="dense"`` only).
        likelihood: ``"categorical"`` (softmax classification) or ``"gaussian"``
            (unit-variance regression, eq. 32).
        block_clip: per-tensor RMS clip of the preconditioned direction (``None`` off).
        curvature: ``"kron"`` (K-FAC blocks), ``"ekfac"`` (K-FAC's eigenbasis with the
            per-example second moments of the gradient as eigenvalues, refreshed with it;
            George et al. 2018), ``"adaptive"`` (that basis with the running second
            moments of the step's gradient, updated every step: SOAP's idea) or
            ``"dense"`` (full Fisher; small models). See :mod:`kldwrm.curvature.kronecker.eigen`.
        dense_scope: with ``curvature="dense"``, one block for the ``"model"`` or one per
            ``"layer"`` (module).
        bias: how a layer's bias enters its Kronecker block: ``"homogeneous"`` (an extra
            input coordinate, one joint block) or ``"separate"`` (the released code's own
            bias block, ``A = [1]`` and ``Γ`` from the output gradient summed over the
            positions sharing the bias; with ``curvature="dense", dense_scope="layer"``
            the bias gets its own dense block).
        rank: ``None`` (exact eigendecompositions) or the number of leading eigenpairs kept
            per Kronecker factor larger than it, from a randomized eigensolver; the
            discarded spectrum is replaced by its mean (cost quadratic, not cubic, in the
            width; a rank >= a factor's size is the exact step). See ``docs/theory.md``.
        output: where the likelihood's tensor (logits, or gaussian means) is in the model's
            output, when the model does not return it directly: an ``int`` (index of a
            tuple), a ``str`` (dict key or attribute, e.g. ``"logits"``) or a callable.
            Its last dimension holds the classes (features); every leading position is an
            example (a language model's ``(batch, time, vocab)`` logits are batch·time
            examples).
        params: optional parameters or parameter groups (default: every parameter of
            ``model``, frozen ones included: a tensor whose ``requires_grad`` is off is left
            alone, its block keeping its state, and is trained from its first gradient once
            it is turned on); each group may set its own ``lr``, ``weight_decay``,
            ``damping``; :meth:`add_param_group` adds groups later.
        momentum: μ in [0, 1), a param-group key (schedulers such as ``OneCycleLR``
            cycle it): the step taken is ``s_k = μ s_{k-1} + c_k``, ``c_k`` the rule's
            clipped step (Martens & Grosse 2015, section 7; ``docs/theory.md``).
        eigen_beta: β in [0, 1), the decay of ``"adaptive"``'s running second moments.
        eigen_power: p in (0, 1]: with ``"ekfac"``/``"adaptive"`` the metric is the measured
            diagonal to the power p (1: the Fisher; ½: Adam's and SOAP's, with ``damping``
            as their ε).
        embeddings: ``"diagonal"`` (each ``nn.Embedding`` weight a diagonal block) or
            ``"kron"`` (``diag(token counts) ⊗ Γ̄``, :mod:`kldwrm.curvature.embedding`).
        weight_sharing: a linear layer applied at every position of a sequence:
            ``"expand"`` (every position an example) or ``"reduce"`` (K-FAC-reduce, the
            inputs averaged and output gradients summed over the positions first;
            Eschenhagen et al. 2023).
        damping_split: ``"tikhonov"`` (``γI`` added to the curvature) or ``"pi"``
            (Martens & Grosse's π-split: Kronecker blocks use ``(Ā + π√γ I) ⊗ (Γ̄ + √γ/π
            I)``; ``curvature="kron"`` without ``rank`` only; ``docs/theory.md``).
        adaptive_damping: ``None`` (fixed ``damping``), an interval ``T_1`` or a
            :class:`~kldwrm.optim.damping.LevenbergMarquardt`: every ``T_1`` steps each
            group's ``damping`` follows the Levenberg-Marquardt rule (needs
            ``step(closure)``; :mod:`kldwrm.optim.damping`).
        decompositions: under ``torch.distributed``, who eigendecomposes the Kronecker
            factors on a refresh: ``"replicated"`` (every rank all of them),
            ``"sharded"`` (each block one rank, balanced by cost; the results are summed
            over ranks in one all-reduce, so every rank holds every decomposition, bit
            for bit the same), ``"auto"`` (sharded above a measured size,
            ``docs/distributed.md``) or ``"owned"`` (each block's factors held, decomposed
            and applied by one rank only, the results all-reduced: about 1/R of the
            curvature state per rank; :mod:`kldwrm.curvature.ownership`). No effect in one
            process.
        seed: seed of the generator used to sample Fisher labels (default derived from
            ``torch.initial_seed()``); its state is saved in :meth:`state_dict`.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.01,
        rho: float = 0.95,
        damping: float = 1e-2,
        weight_decay: float = 1e-3,
        kl_clip: float | None = 0.1,
        update_freq: int = 30,
        fisher: str = "mc",
        likelihood: str = "categorical",
        *,
        block_clip: float | None = None,
        curvature: str = "kron",
        dense_scope: str = "model",
        bias: str = "homogeneous",
        rank: int | None = None,
        output: OutputSelector = None,
        params: Iterable[Any] | None = None,
        seed: int | None = None,
        momentum: float = 0.0,
        eigen_beta: float = 0.95,
        eigen_power: float = 1.0,
        damping_split: str = "tikhonov",
        adaptive_damping: lm.LevenbergMarquardt | int | None = None,
        embeddings: str = "diagonal",
        weight_sharing: str = "expand",
        decompositions: str = "auto",
    ) -> None:
        check_options(momentum, eigen_beta, eigen_power, damping_split, curvature, rank,
                      embeddings, weight_sharing, decompositions)
        self.adaptive_damping = lm.as_schedule(adaptive_damping)
        check_arguments(model, lr=lr, rho=rho, damping=damping, weight_decay=weight_decay,
                        kl_clip=kl_clip, block_clip=block_clip, update_freq=update_freq,
                        fisher=fisher, likelihood=likelihood, curvature=curvature,
                        dense_scope=dense_scope, bias=bias, rank=rank, output=output)
        super().__init__(optimized(model, params),
                         dict(lr=lr, damping=damping, weight_decay=weight_decay,
                              momentum=momentum))
        self.rho, self.kl_clip, self.block_clip = rho, kl_clip, block_clip
        self.update_freq, self.fisher, self.likelihood = update_freq, fisher, likelihood
        self.bias, self.rank, self.output = bias, rank, output
        self._params: list[nn.Parameter] = [p for g in self.param_groups for p in g["params"]]
        self._group_of: list[int] = [
            gi for gi, g in enumerate(self.param_groups) for _ in g["params"]
        ]
        self.generator = _label_generator(self._params[0].device, seed)
        self.engine = CurvatureEngine(
            model, self._params, fisher=fisher, likelihood=likelihood, curvature=curvature,
            dense_scope=dense_scope, bias=bias, rank=rank, generator=self.generator,
            output=output, eigen_beta=eigen_beta, eigen_power=eigen_power,
            damping_split=damping_split, embeddings=embeddings,
            weight_sharing=weight_sharing,
        )
        self.engine.decompositions = decompositions
        for block, slot in zip(self.engine.blocks, self.engine.slots, strict=True):
            block.group = self._group_of[slot[0]]
        self._init_step_state()
        self._arm_next()

    def _init_step_state(self) -> None:
        """Counters, the last step's clip factors, warnings issued, and the tracking of
        tensors frozen or added later."""
        self.steps_taken = 0
        self.skipped_steps = 0
        #: ρ of the last Levenberg-Marquardt adjustment (``adaptive_damping``)
        self.last_reduction_ratio = math.nan
        self._clipped: list[Tensor] | None = None
        self._step_factors: list[float] = []
        self._left: dict[int, dict[str, Any]] = {}
        #: this step's gradients when their finite check is left to the KL clip
        self._unchecked: list[Tensor | None] | None = None
        self._warned_nonfinite = False
        self._warned_missing = False
        #: whether some parameter is in half precision (its gradient is widened to float32)
        self._narrow = any(p.dtype in (torch.float16, torch.bfloat16) for p in self._params)
        #: whether some parameter is an FSDP2 shard (``DTensor``): the step gathers whole
        #: gradients and values and applies this rank's shard of the step
        self._sharded = any(is_sharded(p) for p in self._params)
        self._gathered: list[Tensor] | None = None
        #: per block: whether some tensor of it required grad when last looked at
        self._trainable = [block_trainable(b) for b in self.engine.blocks]
        #: blocks without curvature that became trainable (unfrozen, or added): the next
        #: step's forward pass is captured to give them curvature (a catch-up refresh)
        self._pending: set[int] = set()
        self._watcher: torch.utils.hooks.RemovableHandle | None = None

    def _check_group(self, i: int, group: dict[str, Any]) -> None:
        check_positive(f"param_groups[{i}]['lr']", group["lr"])
        check_nonnegative(f"param_groups[{i}]['damping']", group["damping"])
        check_nonnegative(f"param_groups[{i}]['weight_decay']", group["weight_decay"])
        check_unit_interval(f"param_groups[{i}]['momentum']", group["momentum"])

    # -- the step ----------------------------------------------------------------------
    @property
    def is_refresh_step(self) -> bool:
        """Whether the next :meth:`step` refreshes the curvature (eq. 20)."""
        return self.steps_taken % self.update_freq == 0

    def _lr(self, i: int) -> float:
        return self.param_groups[self._group_of[i]]["lr"]

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Take one step; gradients must already be in ``p.grad`` (or use ``closure``;
        with ``adaptive_damping`` it is required, see :mod:`kldwrm.optim.damping`)."""
        adapt = self._damping_due(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        begun = self._begin_step()
        if begun is None:
            return loss
        g, refresh = begun
        clipped = self._compute_step(g, refresh)
        if clipped is None:  # non-finite gradients, found by the KL clip: skipped
            return loss
        steps = self._with_momentum(clipped)
        self._apply(steps, self._left)
        left = set(self._left)
        self._end_step(g, steps, refresh)
        if adapt:
            self._adapt_damping(closure, loss, g, steps, left)
        return loss

    def _damping_due(self, closure: Callable[[], Tensor] | None) -> bool:
        """Whether this step ends with a Levenberg-Marquardt adjustment (every ``T_1``-th
        step); raises before anything changes when it needs a closure and has none."""
        sched = self.adaptive_damping
        if sched is None or (self.steps_taken + 1) % sched.every:
            return False
        if closure is None:
            raise RuntimeError(
                "adaptive_damping needs the loss after the step: call step(closure) with a "
                "closure that returns the loss (see kldwrm.optim.damping)")
        return True

    def _adapt_damping(self, closure: Callable[[], Tensor], loss: Tensor,
                       g: list[Tensor], steps: list[Tensor], left: set[int]) -> None:
        """Each group's ``damping`` after the reduction ratio of the step just taken."""
        steps = [torch.zeros_like(s) if i in left else s for i, s in enumerate(steps)]
        g = [torch.zeros_like(x) if i in left else x for i, x in enumerate(g)]
        curv = self.engine.matvec(steps, [(1.0, 0.0, 0.0)] * len(self.param_groups))
        decays = [self.param_groups[gi]["weight_decay"] for gi in self._group_of]
        ratio = lm.reduction_ratio(
            lm.loss_change(closure, loss), g, steps, curv, decays,
            [widen(p.detach()) for p in self._values()])
        self.last_reduction_ratio = ratio
        for group in self.param_groups:
            group["damping"] = self.adaptive_damping.adjust(group["damping"], ratio)

    def _begin_step(self) -> tuple[list[Tensor], bool] | None:
        """The first half of a step, up to the gradient ``g_k`` the rule preconditions:
        the refresh (eq. 20) folded into the curvature, or ``None`` when the step is
        skipped (non-finite gradients or curvature: nothing changed). Returns ``(g_k,
        refresh)``; :meth:`_end_step` must follow with the step taken."""
        params = self._params
        self._gathered = None  # the parameters may have changed since the last step
        if all(p.grad is None for p in params):
            raise RuntimeError(
                "optimizer.step() found no gradients: call loss.backward() before step()"
            )
        grads = self._gradients()
        targets = self._refresh_targets(grads)
        refresh = targets is not None  # a scheduled refresh, or a catch-up (see _pending)
        # between refreshes the KL clip's dot products see a non-finite gradient (it makes
        # the direction and its dot with u non-finite) before anything changes: the check
        # is left to them, a pass over the gradients and a host synchronisation fewer
        late = (self._finite_from_clip and not refresh and self.kl_clip is not None
                and self.engine.curvature != "adaptive")
        finite = late or all_finite([gr for gr in grads if gr is not None])
        self._unchecked = grads if late else None
        estimates = None
        if finite and refresh:
            estimates = self.engine.fresh_estimates(grads, targets)
            finite = estimates is not None
        if not finite:
            self._skip()
            return None
        self.engine.capture.gen_snapshot = None
        left = self._left_out(grads)  # their state as it is before a refresh re-expresses it
        if refresh:
            self._warn_missing(estimates, targets)
            self._before_fold()
            self.engine.fold(estimates, self.rho)
            self._pending.clear()  # a block that still got no data waits for eq. 20's refresh
        g = self._full_gradient(grads)
        self._left = self._still_left_out(left, grads)
        self.engine.observe(g, list(self._left))
        return g, refresh

    def _gradients(self) -> list[Tensor | None]:
        """Each tensor's ``p.grad``; whole gradients of an FSDP2 model's shards (gathered
        in the parameters' order on every rank)."""
        if not self._sharded:
            return [p.grad for p in self._params]
        return [None if p.grad is None else full(p.grad) for p in self._params]

    def _values(self) -> list[Tensor]:
        """The tensors' current values as whole tensors: the parameters themselves, or
        for an FSDP2 model the shards gathered (once per step, until :meth:`_apply`)."""
        if not self._sharded:
            return self._params
        if self._gathered is None:
            self._gathered = [full(p.detach()) for p in self._params]
        return self._gathered

    def _end_step(self, g: list[Tensor], steps: list[Tensor], refresh: bool) -> None:
        """The second half: the rule's recursion given the step ``steps`` actually taken."""
        self._after_step(g, steps, refresh)
        self._restore_state(self._left)
        self._clipped = None
        self._left = {}
        self._unchecked = None
        if refresh:
            self.engine.end_refresh()
        self.steps_taken += 1
        self._arm_next()

    def _apply(self, steps: Sequence[Tensor], frozen: dict[int, dict[str, Any]]) -> None:
        """``θ ← θ + s`` in each parameter's own dtype; left-out tensors take no step."""
        params, steps = self._params, list(steps)
        for i in frozen:
            steps[i] = torch.zeros_like(steps[i])
        if any(s.dtype != p.dtype for s, p in zip(steps, params, strict=True)):
            steps = [s.to(p.dtype) for s, p in zip(steps, params, strict=True)]
        self._gathered = None
        if self._sharded:  # each rank adds its own shard of the (identical) whole step
            for p, s in zip(params, steps, strict=True):
                p.add_(shard_like(s, p))
            return
        torch._foreach_add_(params, steps)

    def _warn_missing(self, estimates: Sequence[dict[str, Tensor] | None],
                      targets: Sequence[int]) -> None:
        """One warning per optimizer when a scheduled refresh found trainable layers
        without data (a catch-up refresh and frozen layers do not warn)."""
        if not self.is_refresh_step:
            return
        missing = [self.engine.blocks[bi].name for bi in targets if estimates[bi] is None]
        if missing and not self._warned_missing:
            self._warned_missing = True
            warnings.warn(
                f"{type(self).__name__}: no data reached {missing} on a curvature refresh "
                "step (not used by the forward pass?): they keep their previous curvature, "
                "and a block that never had data is left out of the step (no further "
                "warnings)",
                MissingCurvatureWarning,
                stacklevel=caller_stacklevel(),
            )

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients, and forget the curvature statistics of batches whose backward
        has already run: a batch abandoned without ``step()`` (a ``GradScaler`` that found
        inf, a loop that discards a batch) leaves no trace, its sampled labels included. A
        forward pass run before ``zero_grad()`` and backpropagated after it
        (``loss = ...; opt.zero_grad(); loss.backward(); opt.step()``) still counts."""
        super().zero_grad(set_to_none=set_to_none)
        if self.engine.capture.abandoned():
            self._forget_captured()

    def _forget_captured(self) -> None:
        """Drop this step's captured statistics and undo the labels sampled for them."""
        cap = self.engine.capture
        if cap.gen_snapshot is not None:
            self.generator.set_state(cap.gen_snapshot)
            cap.gen_snapshot = None
        cap.clear()

    def _skip(self) -> None:
        """Leave parameters and state untouched; only the skip counter moves."""
        self.skipped_steps += 1
        self._forget_captured()
        if not self._warned_nonfinite:
            self._warned_nonfinite = True
            warnings.warn(
                f"{type(self).__name__}: skipped a step with non-finite gradients or curvature "
                "(parameters and optimizer state unchanged; further skips are counted in "
                "optimizer.skipped_steps without warning)",
                NonFiniteGradientWarning,
                stacklevel=caller_stacklevel(),
            )
        logger.debug("skipped step %d (non-finite)", self.steps_taken)

    def _full_gradient(self, grads: Sequence[Tensor | None]) -> list[Tensor]:
        """``g_k`` of DESIGN section 3: the gradient including the weight-decay term, in at
        least float32 (zero for a tensor without gradient).

        Without a term to add, ``g_k`` is ``p.grad`` itself (no copy, a pass over the
        parameters saved): the rules only read it, and one that keeps it past the step
        takes :meth:`_kept` (``tests/optim/test_gradients_untouched.py`` checks both)."""
        if self._narrow:
            params = [widen(p.detach()) for p in self._values()]
            grads = [widen(gr) if gr is not None else torch.zeros_like(p)
                     for gr, p in zip(grads, params, strict=True)]
        else:
            params = self._values()
            grads = [gr if gr is not None else torch.zeros_like(p)
                     for gr, p in zip(grads, params, strict=True)]
        wds = {g["weight_decay"] for g in self.param_groups}
        if len(wds) == 1:  # the usual case: one fused op over all tensors
            wd = wds.pop()
            if wd != 0:
                return torch._foreach_add(grads, params, alpha=wd)
            return list(grads)
        out = []
        for i, (p, gr) in enumerate(zip(params, grads, strict=True)):
            wd = self.param_groups[self._group_of[i]]["weight_decay"]
            out.append(gr.add(p, alpha=wd) if wd != 0 else gr)
        return out

    def _kept(self, i: int, g_i: Tensor) -> Tensor:
        """``g_i`` (tensor ``i``'s ``g_k``) as state that outlives the step: a copy where it
        is the parameter's ``p.grad``, which the next backward may overwrite in place."""
        return g_i.clone() if g_i is self._params[i].grad else g_i

    def _compute_step(self, g: list[Tensor], refresh: bool) -> list[Tensor] | None:
        """The step ``s = -lr·ν·c·d`` actually taken (DESIGN section 3, clipping); ``None``
        when the KL clip found the gradients non-finite (the step is skipped)."""
        d, u = self._direction(g, refresh)
        return self._clipped_step(d, u)

    def _scales(self, e_of_lr: Callable[[float], float] = lambda lr: 1.0,
                f_of_lr: Callable[[float], float] = lambda lr: 0.0) -> list[Scales]:
        return [(e_of_lr(g["lr"]), f_of_lr(g["lr"]), g["damping"]) for g in self.param_groups]

    # -- what a step rule defines -----------------------------------------------------------
    def _direction(self, g: list[Tensor], refresh: bool) -> tuple[list[Tensor], list[Tensor]]:
        """Return ``(d, u)``: the preconditioned direction and the vector preconditioned.

        ``d`` must be new tensors (as the engine's products are): the clip scales them in
        place into the step (:meth:`_clipped_step`)."""
        raise NotImplementedError

    def _after_step(self, g: list[Tensor], steps: list[Tensor], refresh: bool) -> None:
        """Update the rule's recursion state with the step actually taken."""

    def _kl_terms(
        self, d: Sequence[Tensor], u: Sequence[Tensor]
    ) -> tuple[Sequence[Tensor], Sequence[Tensor]]:
        """Two lists whose summed dot products equal ``dᵀu`` (the KL clip's ``vᵀu``).

        A rule that already holds ``d`` and ``u`` in other orthonormal coordinates may
        return those instead.
        """
        return d, u

    def _before_fold(self) -> None:
        """Called on refresh steps just before the curvature is re-decomposed."""

    def state_bytes(self) -> int:
        """Bytes of optimizer state: curvature plus per-parameter recursion vectors."""
        per_param = sum(
            v.numel() * v.element_size()
            for st in self.state.values()
            for v in st.values()
            if isinstance(v, Tensor)
        )
        return self.engine.state_bytes() + per_param
