"""Hooks that record what the curvature needs, registered only on refresh steps.

On the steps in between no hook is installed at all, so the model runs exactly as it
would under ``torch.optim.SGD`` (zero overhead, eq. 20).

While armed, each Kronecker layer's forward hook keeps its input ``a`` and output ``z``.
The output gradients ``δ`` then come from one of two places:

* ``fisher="empirical"``: a tensor hook on ``z`` during the user's own ``loss.backward()``
  (scaled by the batch size ``N``, since the user's loss is a batch mean);
* ``fisher="mc"`` (eq. 5): labels are sampled from the model's predictive distribution
  inside the root module's forward hook, and one extra backward of the summed
  sampled-label loss runs there, to the layer outputs only, with ``retain_graph=True``.
  The user's training loop is unchanged, no second forward pass runs (so BatchNorm
  running statistics and dropout masks are exactly those of the user's pass), and the
  user's ``loss.backward()`` then frees the graph as usual.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import rank, rank_seed, world_size

FISHER_TYPES = ("mc", "empirical", "exact")


def _is_functorch_tensor(t: Tensor) -> bool:
    check = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(check(t)) if check is not None else False
LIKELIHOODS = ("categorical", "gaussian")


def sample_output_grads(
    output: Tensor, likelihood: str, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Sample ``y ~ p(y | h)`` and return ``(loss_sum, y)`` for the sampled-label loss.

    ``loss_sum`` is the *summed* negative log-likelihood, so its gradient with respect to
    any per-example quantity is that example's own gradient (no ``N`` rescaling needed).
    """
    h = output.detach()
    if likelihood == "categorical":
        if output.dim() != 2:
            raise ValueError(
                "likelihood='categorical' needs model outputs of shape (batch, classes), "
                f"got {tuple(output.shape)}"
            )
        probs = torch.softmax(h.float(), dim=1)
        y = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        return F.cross_entropy(output, y, reduction="sum"), y
    noise = torch.randn(h.shape, generator=generator, device=h.device, dtype=h.dtype)
    y = h + noise
    return 0.5 * (output - y).square().sum(), y


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
    ) -> None:
        self.root = root
        self.kron_modules = list(kron_modules)
        self.diag_params = list(diag_params)
        self.fisher = fisher
        self.likelihood = likelihood
        self.generator = generator
        self.record_root = record_root
        self._handles: list = []
        self.armed = False
        self.paused = False
        #: generator state before this step's first label sample (restored on a skipped step)
        self.gen_snapshot: torch.Tensor | None = None
        self.clear()

    # -- arming -----------------------------------------------------------------------
    def arm(self) -> None:
        """Install the hooks (idempotent)."""
        if self.armed:
            return
        for m in self.kron_modules:
            self._handles.append(m.register_forward_hook(self._layer_hook))
        self._handles.append(self.root.register_forward_hook(self._root_hook, with_kwargs=True))
        if self.record_root:
            self._handles.append(
                self.root.register_forward_pre_hook(self._root_pre_hook, with_kwargs=True)
            )
        self.armed = True

    def disarm(self) -> None:
        """Remove every hook and drop what was recorded."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.armed = False
        self.clear()

    def clear(self) -> None:
        self.inputs: dict[nn.Module, list[Tensor]] = {}
        self.deltas: dict[nn.Module, list[Tensor]] = {}
        self._outputs: dict[nn.Module, Tensor] = {}
        self.diag_sq: dict[nn.Parameter, Tensor] = {}
        #: summed sampled-label gradients (unsquared), for the all-reduce over ranks
        self.diag_grad: dict[nn.Parameter, Tensor] = {}
        self.batch_sizes: list[int] = []
        self._rank_generator: torch.Generator | None = None
        self.root_inputs: list[Tensor] = []
        self.root_outputs: list[Tensor] = []
        self.root_output_grads: list[Tensor] = []

    def batch_size(self) -> int:
        if not self.batch_sizes:
            raise RuntimeError(
                "no forward pass was captured on a curvature refresh step: call the model "
                "(with grad enabled) and loss.backward() before optimizer.step()"
            )
        return sum(self.batch_sizes)

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
        if args and self._active(args[0]):
            self.root_inputs.append(args[0].detach())

    def _layer_hook(self, module: nn.Module, inputs, output: Tensor) -> None:
        if not isinstance(output, Tensor) or not self._active(output) or not output.requires_grad:
            return
        self.inputs.setdefault(module, []).append(inputs[0].detach())
        if self.fisher == "empirical":
            n = output.shape[0]
            output.register_hook(
                lambda g, m=module, n=n: self.deltas.setdefault(m, []).append(g.detach() * n)
            )
        else:
            self._outputs[module] = output

    def _root_hook(self, module, args, kwargs, output) -> None:
        if not isinstance(output, Tensor) or not self._active(output):
            return
        n = output.shape[0]
        self.batch_sizes.append(n)
        if self.record_root:
            self.root_outputs.append(output.detach())
            if self.fisher == "empirical" and output.requires_grad:
                output.register_hook(lambda g, n=n: self.root_output_grads.append(g.detach() * n))
        if self.fisher != "mc" or not output.requires_grad:
            self._outputs.clear()
            return
        mods = list(self._outputs)
        diag = [p for p in self.diag_params if p.requires_grad]
        targets = [self._outputs[m] for m in mods] + diag
        if targets:
            loss, _ = sample_output_grads(output, self.likelihood, self.sampling_generator())
            grads = torch.autograd.grad(loss, targets, retain_graph=True, allow_unused=True)
            for m, g in zip(mods, grads[: len(mods)], strict=True):
                if g is not None:
                    self.deltas.setdefault(m, []).append(g.detach())
            for p, g in zip(diag, grads[len(mods):], strict=True):
                if g is not None:
                    est = g.detach().square() / n
                    prev = self.diag_sq.get(p)
                    self.diag_sq[p] = est if prev is None else prev + est
                    prev = self.diag_grad.get(p)
                    self.diag_grad[p] = g.detach() if prev is None else prev + g
        self._outputs.clear()
