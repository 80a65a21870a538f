"""The model's output as the likelihood sees it: which tensor (:func:`select_output`), how
many examples it holds (:func:`num_examples`), labels sampled from it (eq. 5,
:func:`sample_output_grads`), and the small predicates the hooks share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

FISHER_TYPES = ("mc", "empirical", "exact")
LIKELIHOODS = ("categorical", "gaussian")

#: how the likelihood finds its tensor in the model's output (DESIGN section 1)
OutputSelector = Callable[[Any], Tensor] | str | int | None


def in_backward() -> bool:
    """Whether autograd's engine is running a backward pass on this thread (where a
    checkpointed segment's forward is recomputed)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


def _is_functorch_tensor(t: Tensor) -> bool:
    check = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(check(t)) if check is not None else False


def widen(t: Tensor) -> Tensor:
    """``t`` in at least float32 (curvature statistics are never kept in half precision)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def select_output(output: Any, selector: OutputSelector) -> Any:
    """The tensor the likelihood is defined on, from whatever the model returned.

    ``selector`` is ``None`` (the output itself), an ``int`` (index of a tuple or list), a
    ``str`` (key of a dict, else attribute, e.g. ``"logits"`` of a Hugging Face output) or
    a callable ``output -> Tensor``.
    """
    if selector is None:
        return output
    if callable(selector):
        return selector(output)
    if isinstance(selector, int):
        return output[selector]
    if isinstance(output, dict) or hasattr(output, "keys"):
        try:
            return output[selector]
        except (KeyError, TypeError):
            pass
    return getattr(output, selector)


def num_examples(output: Tensor) -> int:
    """Examples in a model output: every leading position (the last dim is the class or
    feature dimension); a 1-D output holds one scalar per example."""
    if output.dim() <= 1:
        return int(output.shape[0]) if output.dim() == 1 else 1
    return output.numel() // output.shape[-1]


def sample_output_grads(
    output: Tensor, likelihood: str, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Sample ``y ~ p(y | h)`` and return ``(loss_sum, y)`` for the sampled-label loss.

    ``loss_sum`` is the *summed* negative log-likelihood over every example (every leading
    position of ``output``), so its gradient with respect to any per-example quantity is
    that example's own gradient (no ``N`` rescaling needed).
    """
    h = output.detach()
    if likelihood == "categorical":
        if output.dim() < 2:
            raise ValueError(
                "likelihood='categorical' needs model outputs of shape (..., classes) with the "
                f"classes on the last dimension, got {tuple(output.shape)}"
            )
        classes = output.shape[-1]
        probs = torch.softmax(h.float().reshape(-1, classes), dim=-1)
        y = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        return F.cross_entropy(output.reshape(-1, classes), y, reduction="sum"), y
    noise = torch.randn(h.shape, generator=generator, device=h.device, dtype=h.dtype)
    y = h + noise
    return 0.5 * (output - y).square().sum(), y
