"""The :class:`Capture` hooks (see :mod:`kldwrm.curvature.capture`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ...distributed import is_sharded, rank, rank_seed, world_size
from .outputs import (
    OutputSelector,
    _is_functorch_tensor,
    in_backward,
    num_examples,
    sample_output_grads,
    select_output,
    widen,
)


class Capture:
    """Records layer inputs and output gradients of the armed (refresh) forward passes."""

    def __init__(
        self,
        root: nn.Module,
        kron_modules: Sequence[nn.Module],
        diag_params: Sequence[nn.Parameter],
        *,
        fisher: str,
        likelihood: str,
        generator: torch.Generator | None,
        record_root: bool = False,
        output: OutputSelector = None,
    ) -> None:
        self.root = root
        self.kron_modules = list(kron_modules)
        self.diag_params = list(diag_params)
        self.fisher = fisher
        self.likelihood = likelihood
        self.generator = generator
        self.record_root = record_root
        #: set while the "mc" labels' own backward runs inside the forward pass, so that
        #: gradient hooks can tell it from the user's backward
        self.in_sampled_backward = False
        self.output = output
        self._handles: list = []
        #: FSDP2: per sharded diagonal tensor, the unsharded tensor its forward used
        self._live: dict[nn.Parameter, Tensor] = {}
        self.armed = False
        self.paused = False
        #: generator state before this step's first label sample (restored on a skipped step)
        self.gen_snapshot: torch.Generator | None = None
        self.clear()

    # -- arming -----------------------------------------------------------------------
    def arm(self) -> None:
        """Install the hooks (idempotent)."""
        if self.armed:
            return
        for m in self.kron_modules:
            self._handles.append(m.register_forward_hook(self._layer_hook))
        self._handles.append(self.root.register_forward_hook(self._root_hook, with_kwargs=True))
        self._handles.append(
            self.root.register_forward_pre_hook(self._root_pre_hook, with_kwargs=True)
        )
        self._watch_sharded(self.diag_params)
        self.armed = True

    def _watch_sharded(self, diag_params: Sequence[nn.Parameter]) -> None:
        """Under FSDP2 a diagonal block's tensor is a ``DTensor`` shard, and its module's
        forward uses the gathered (unsharded) parameter that FSDP registers in its place:
        a forward pre-hook (after FSDP's own) notes that tensor, the one the "mc" labels'
        gradient is taken with respect to."""
        owners: dict[nn.Module, list[tuple[str, nn.Parameter]]] = {}
        wanted = {id(p): p for p in diag_params if is_sharded(p)}
        if not wanted:
            return
        for m in self.root.modules():
            for name, q in m._parameters.items():
                if q is not None and id(q) in wanted:
                    owners.setdefault(m, []).append((name, wanted[id(q)]))

        def note(module: nn.Module, args: tuple) -> None:
            for name, p in owners[module]:
                self._live[p] = module._parameters[name]

        for m in owners:
            self._handles.append(m.register_forward_pre_hook(note))

    def arm_in_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Arm from inside the root module's forward pre-hooks, for the pass now starting
        (the hooks installed now run from the next call on, so the root's is run here)."""
        if not self.armed:
            self.arm()
            self._root_pre_hook(module, args, kwargs)

    def add(self, kron_modules: Sequence[nn.Module], diag_params: Sequence[nn.Parameter]
            ) -> None:
        """Record these layers and diagonal tensors too (a parameter group added later);
        their hooks are installed at once if the capture is armed."""
        self.kron_modules.extend(kron_modules)
        self.diag_params.extend(diag_params)
        if self.armed:
            for m in kron_modules:
                self._handles.append(m.register_forward_hook(self._layer_hook))
            self._watch_sharded(diag_params)

    def disarm(self) -> None:
        """Remove every hook and drop what was recorded."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.armed = False
        self.clear()

    def clear(self) -> None:
        #: per module: the layer inputs, and the call each came from
        self.inputs: dict[nn.Module, list[Tensor]] = {}
        self.input_calls: dict[nn.Module, list[int]] = {}
        #: per module: the output gradients (times :meth:`delta_scale`: δ), and their calls
        self.deltas: dict[nn.Module, list[Tensor]] = {}
        self.delta_calls: dict[nn.Module, list[int]] = {}
        self._outputs: dict[nn.Module, Tensor] = {}
        self.diag_sq: dict[nn.Parameter, Tensor] = {}
        #: summed sampled-label gradients (unsquared), for the all-reduce over ranks
        self.diag_grad: dict[nn.Parameter, Tensor] = {}
        #: per call: examples (leading positions of the output, ignored ones left out)
        self.examples: list[int] = []
        #: per call: leading shape of the output and the mask of its counted positions
        #: (``None``: all of them)
        self.output_shapes: list[tuple[int, ...]] = []
        self.masks: list[Tensor | None] = []
        self._rank_generator: torch.Generator | None = None
        #: calls whose output the user's backward has reached
        self.backpropagated: set[int] = set()
        self.root_inputs: list[Tensor] = []
        self.root_outputs: list[Tensor] = []
        #: per call: the gradient of the user's loss w.r.t. the output (empirical Fisher)
        self.root_output_grads: dict[int, Tensor] = {}
        #: per module: calls whose use of it ran under ``no_grad`` inside a grad-enabled
        #: forward pass (a reentrant checkpoint), to be recorded when backward recomputes it
        self.pending: dict[nn.Module, list[int]] = {}
        #: whether a grad-enabled forward pass of the root module is running
        self._root_running = False

    def num_examples(self) -> int:
        """Examples of every call of this step (the ``N`` of the factors' averages)."""
        if not self.examples:
            raise RuntimeError(
                "no forward pass was captured on a curvature refresh step: call the model "
                "(with grad enabled) and loss.backward() before optimizer.step() (a model "
                "checkpointed as a whole with use_reentrant=True runs without grad: "
                "checkpoint its blocks, or pass use_reentrant=False)"
            )
        return sum(self.examples)

    def row_mask(self, call: int, lead: Sequence[int]) -> Tensor | None:
        """Which rows of a tensor with leading shape ``lead``, recorded in ``call``, are
        counted examples: ``None`` if all are, or if its rows are not the output's
        positions (a different leading shape, e.g. a convolution's)."""
        mask = self.masks[call] if call < len(self.masks) else None
        if mask is None or tuple(lead) != self.output_shapes[call]:
            return None
        return mask.reshape(-1)

    def aligned(self, call: int, lead: Sequence[int]) -> bool:
        """Whether rows with leading shape ``lead`` are the output's positions (examples)."""
        return call < len(self.output_shapes) and tuple(lead) == self.output_shapes[call]

    def snapshot_generator(self) -> None:
        """Remember the sampling generator's state before the first sample of this step."""
        if self.gen_snapshot is None and self.generator is not None:
            self.gen_snapshot = self.generator.get_state()

    def sampling_generator(self) -> torch.Generator | None:
        """The generator that samples this step's "mc" labels (state snapshotted first).

        On one process this is the optimizer's generator. Under ``torch.distributed`` with
        several ranks, the first sample of a step draws one seed from that generator (the
        same on every rank, so its state, which ``state_dict`` saves, stays identical) and
        this rank samples its shard with a generator seeded by
        :func:`kldwrm.distributed.rank_seed`: shards never reuse the same noise.
        """
        self.snapshot_generator()
        gen = self.generator
        if gen is None:
            return None
        if world_size() == 1:
            return gen
        if self._rank_generator is None:
            seed = int(torch.randint(2**62, (1,), generator=gen, device=gen.device))
            self._rank_generator = torch.Generator(device=gen.device)
            self._rank_generator.manual_seed(rank_seed(seed, rank()))
        return self._rank_generator

    def _active(self, t: object = None) -> bool:
        """Capture only ordinary grad-enabled passes: not under ``no_grad``, not while paused,
        and not inside ``torch.func`` transforms (their tensors must not escape)."""
        if not (self.armed and not self.paused and torch.is_grad_enabled()):
            return False
        return not (isinstance(t, Tensor) and _is_functorch_tensor(t))

    # -- hooks ------------------------------------------------------------------------
    def _root_pre_hook(self, module, args, kwargs):
        if in_backward():  # the whole model checkpointed: its recomputation is no new call
            return
        self._root_running = torch.is_grad_enabled()
        if self.record_root and args and self._active(args[0]):
            self.root_inputs.append(args[0].detach())

    def _layer_hook(self, module: nn.Module, inputs, output: Tensor) -> None:
        if not isinstance(output, Tensor) or not self.armed or self.paused:
            return
        if _is_functorch_tensor(output):
            return
        if in_backward():
            self._recomputed(module, inputs, output)
            return
        call = len(self.examples)  # the root hook of this call has not run yet
        if not torch.is_grad_enabled():
            if self._root_running:  # a reentrant checkpoint's first pass
                self.pending.setdefault(module, []).append(call)
            return
        if not output.requires_grad:
            return
        self._record_use(module, inputs[0], output, call)

    def _record_use(self, module: nn.Module, x: Tensor, output: Tensor, call: int) -> None:
        """Keep the layer input of ``call`` and arrange for its output gradient."""
        self.inputs.setdefault(module, []).append(x.detach())
        self.input_calls.setdefault(module, []).append(call)
        if self.fisher == "empirical":
            output.register_hook(lambda g, m=module, c=call: self._record_delta(m, c, g))
        else:
            self._outputs[module] = output

    def _recomputed(self, module: nn.Module, inputs, output: Tensor) -> None:
        """A forward run again by a backward pass (activation checkpointing).

        Only a use whose first pass ran under ``no_grad`` (a reentrant checkpoint) is
        recorded here, once: its input, and the output gradient of the backward that
        recomputed it (the "mc" labels' own backward, or the user's for the empirical
        Fisher). Any other recomputation (``use_reentrant=False``, whose first pass was
        recorded; a second recomputation) is ignored.
        """
        calls = self.pending.get(module)
        if not calls or not output.requires_grad:
            return
        if self.fisher == "mc" and not self.in_sampled_backward:
            return  # the user's backward: the sampled one has recorded this use already
        call = calls.pop(0)
        self.inputs.setdefault(module, []).append(inputs[0].detach())
        self.input_calls.setdefault(module, []).append(call)
        output.register_hook(lambda g, m=module, c=call: self._record_delta(m, c, g))

    def _record_delta(self, module: nn.Module, call: int, grad: Tensor) -> None:
        """A layer's output gradient: for the empirical Fisher that of the user's mean loss
        (times the step's examples once they are known, :meth:`delta_scale`); for "mc"
        (a reentrant checkpoint's recomputation) that of the sampled-label loss."""
        self.deltas.setdefault(module, []).append(grad.detach())
        self.delta_calls.setdefault(module, []).append(call)

    def delta_scale(self) -> float:
        """Factor that turns a recorded output gradient into per-example gradients: 1 for
        "mc"; for the empirical Fisher the step's examples ``N``, summed over its calls.

        The gradient a step uses is taken to be that of the mean loss over all ``N``
        examples of the step, as with gradient accumulation done the usual way (each
        micro-batch's mean loss divided by the number of micro-batches): the step then
        equals the step on the concatenated batch, and the Kronecker blocks agree with the
        diagonal blocks' ``N·ḡ²``. Known only once every backward has run.
        """
        return float(sum(self.examples)) if self.fisher == "empirical" else 1.0

    def _root_hook(self, module, args, kwargs, output: Any) -> None:
        if in_backward():
            return
        self._root_running = False
        try:
            output = select_output(output, self.output)
        except (KeyError, IndexError, AttributeError, TypeError) as exc:
            raise ValueError(
                f"the optimizer's output={self.output!r} does not select a tensor from the "
                f"model's output of type {type(output).__name__}: {exc}"
            ) from exc
        if not isinstance(output, Tensor) or not self._active(output):
            self._outputs.clear()
            return
        call = len(self.examples)
        self.examples.append(num_examples(output))
        self.output_shapes.append(tuple(output.shape[:-1]) if output.dim() > 1 else
                                  tuple(output.shape))
        self.masks.append(None)
        if self.record_root:
            self.root_outputs.append(output.detach())
        if self.fisher == "empirical" and output.requires_grad:
            output.register_hook(lambda g, c=call: self._count_examples(c, g))
        if self.fisher == "mc" and output.requires_grad:
            self._sampled_backward(output, call)
        self._outputs.clear()
        if output.requires_grad:  # after the sampled backward, so only the user's counts
            output.register_hook(lambda g, c=call: self.backpropagated.add(c))

    def abandoned(self) -> bool:
        """Whether this step's statistics all belong to batches already backpropagated:
        at ``zero_grad()`` their gradients are discarded, so they must go too. A forward
        pass run before ``zero_grad()`` and backpropagated after it is not abandoned."""
        return bool(self.examples) and self.backpropagated >= set(range(len(self.examples)))

    def _count_examples(self, call: int, grad: Tensor) -> None:
        """Empirical Fisher, first hook of the backward: the positions with a nonzero loss
        gradient are this call's examples (those an ``ignore_index`` removed have none)."""
        g = grad.detach()
        if g.dim() > 1:
            counted = (g.reshape(-1, g.shape[-1]) != 0).any(dim=1)
            n = int(counted.sum())
            if n < counted.numel():
                self.masks[call] = counted.reshape(self.output_shapes[call])
                self.examples[call] = max(n, 1)
        if self.record_root:  # scaled to per-example gradients when used (delta_scale)
            self.root_output_grads[call] = g

    def _sampled_backward(self, output: Tensor, call: int) -> None:
        """Fisher "mc" (eq. 5): one backward of the summed sampled-label loss, to the layer
        outputs and the diagonal blocks' tensors only, inside the forward pass."""
        mods = list(self._outputs)
        diag = [p for p in self.diag_params if p.requires_grad]
        outputs = [self._outputs[m] for m in mods]
        self._outputs.clear()
        reentrant = any(call in calls for calls in self.pending.values())
        if not (outputs or diag or reentrant):
            return
        loss, _ = sample_output_grads(output, self.likelihood, self.sampling_generator())
        self.in_sampled_backward = True
        try:
            if reentrant:
                grads = self._sampled_backward_all(loss, outputs, diag)
            else:
                live = [self._live.get(p, p) for p in diag]  # FSDP2: the unsharded tensors
                grads = torch.autograd.grad(loss, outputs + live, retain_graph=True,
                                            allow_unused=True)
        finally:
            self.in_sampled_backward = False
        for m, g in zip(mods, grads[: len(mods)], strict=True):
            if g is not None:
                self._record_delta(m, call, g)
        self._add_diagonal(diag, grads[len(mods):], self.examples[call])

    def _add_diagonal(self, diag: Sequence[nn.Parameter], grads: Sequence[Tensor | None],
                      n: int) -> None:
        """Add a call's summed sampled-label gradients to the diagonal blocks' statistics."""
        for p, g in zip(diag, grads, strict=True):
            if g is not None:
                g = widen(g.detach())
                est = g.square() / n
                prev = self.diag_sq.get(p)
                self.diag_sq[p] = est if prev is None else prev + est
                prev = self.diag_grad.get(p)
                self.diag_grad[p] = g if prev is None else prev + g

    def _sampled_backward_all(self, loss: Tensor, outputs: Sequence[Tensor],
                              diag: Sequence[nn.Parameter]) -> list[Tensor | None]:
        """The sampled-label gradients when a reentrant checkpoint lies on the way, which
        ``torch.autograd.grad`` cannot cross: a plain backward, the layer outputs' gradients
        taken by hooks, the parameters' gradients (the diagonal blocks' statistics) read
        and every parameter's ``.grad`` restored to what it was."""
        if type(self.root).__name__ == "DistributedDataParallel":
            raise ValueError(
                "fisher='mc' cannot sample labels through a reentrant activation checkpoint "
                "(torch.utils.checkpoint with use_reentrant=True) under "
                "DistributedDataParallel: pass use_reentrant=False to checkpoint"
            )
        params = [p for p in self.root.parameters() if p.requires_grad]
        saved = [p.grad for p in params]
        got: list[Tensor | None] = [None] * len(outputs)

        def keep(i: int) -> Callable[[Tensor], None]:
            def hook(g: Tensor) -> None:
                got[i] = g
            return hook

        handles = [o.register_hook(keep(i)) for i, o in enumerate(outputs)]
        for p in params:
            p.grad = None
        try:
            torch.autograd.backward(loss, retain_graph=True)
            diag_grads = [p.grad for p in diag]
        finally:
            for h in handles:
                h.remove()
            for p, g in zip(params, saved, strict=True):
                p.grad = g
        return [*got, *diag_grads]
