"""Dense curvature: the full Fisher of a whole model or of each layer (research mode).

For small models this is the exact object the paper's propositions are about, so the
step rules run on it unchanged and can be compared with :mod:`kldwrm.reference`. With
``J_n`` the Jacobian of the model output ``h_n`` with respect to the block's parameters,

    F = (1/N) Σ_n J_nᵀ Λ_n J_n,

where ``Λ_n`` is ``diag(p_n) - p_n p_nᵀ`` (categorical) or ``I`` (gaussian) for
``fisher="exact"`` (eq. 5 in closed form), ``e_n e_nᵀ`` with ``e_n = ∂ℓ_n/∂h_n`` at labels
sampled from the model for ``"mc"``, and at the training labels for ``"empirical"``
(``e_n`` is read from the user's backward pass). Vectors are the parameter tensors
flattened row-major and concatenated in the block's parameter order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from .blocks import Block
from .capture import Capture, select_output
from .kronecker import ea_update
from .linalg import sym_eig


class DenseBlock(Block):
    """A full (dense) Fisher block over a set of parameter tensors."""

    kind = "dense"

    def __init__(self, params: Sequence[nn.Parameter], name: str) -> None:
        super().__init__(params, name)
        self.F_bar: Tensor | None = None
        self.F_fresh: Tensor | None = None
        self.evals: Tensor | None = None
        self.evecs: Tensor | None = None
        #: set by :func:`dense_fishers` before :meth:`fresh` is called
        self.pending: Tensor | None = None

    def fresh(self, capture, grads):
        if self.pending is None:
            raise RuntimeError(f"dense Fisher of {self.name!r} was not computed this step")
        est, self.pending = self.pending, None
        return {"F": est}

    def fold(self, fresh, rho):
        self.F_fresh = fresh["F"]
        self.F_bar = ea_update(self.F_bar, fresh["F"], rho)
        self.evals, self.evecs = sym_eig(self.F_bar, f"dense Fisher of {self.name}")
        self.initialized = True

    def drop_fresh(self) -> None:
        self.F_fresh = None

    def keep_average(self) -> None:
        self.F_fresh = self.F_bar

    def _flat(self, vecs: Sequence[Tensor]) -> Tensor:
        return torch.cat([v.reshape(-1) for v in vecs])

    def _unflat(self, flat: Tensor) -> list[Tensor]:
        out, i = [], 0
        for p in self.params:
            out.append(flat[i : i + p.numel()].view_as(p))
            i += p.numel()
        return out

    def solve(self, vecs, damping, ea_scale=1.0, fresh_scale=0.0, method="exact"):
        self._check_ready()
        u = self._flat(vecs)
        if fresh_scale == 0.0:
            Q = self.evecs
            return self._unflat(Q @ ((Q.T @ u) / (self.evals * ea_scale + damping)))
        eye = torch.eye(u.numel(), dtype=u.dtype, device=u.device)
        mat = ea_scale * self.F_bar + fresh_scale * self.F_fresh + damping * eye
        return self._unflat(torch.linalg.solve(mat, u))

    def to_eigenbasis(self, vecs):
        self._check_ready()
        return self._unflat(self.evecs.T @ self._flat(vecs))

    def from_eigenbasis(self, coords):
        self._check_ready()
        return self._unflat(self.evecs @ self._flat(coords))

    def eigenvalues(self, ea_scale, damping):
        self._check_ready()
        return self._unflat(self.evals * ea_scale + damping)

    def matvec(self, vecs, damping, ea_scale=1.0, fresh_scale=0.0):
        u = self._flat(vecs)
        out = ea_scale * (self.F_bar @ u) + damping * u
        if fresh_scale != 0.0:
            out = out + fresh_scale * (self.F_fresh @ u)
        return self._unflat(out)

    def state_dict(self):
        keys = ("F_bar", "evals", "evecs")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}

    def load_state_dict(self, state):
        for k in ("F_bar", "evals", "evecs"):
            setattr(self, k, state.get(k))
        self.initialized = self.F_bar is not None
        self.F_fresh = None


def _output_metric(
    out: Tensor, capture: Capture, fisher: str, likelihood: str, call: int
) -> Tensor:
    """The per-example output-space matrix Λ_n of the module docstring, shape (E, C, C),
    for the ``E`` examples (rows) of ``out`` of shape ``(E, C)``."""
    n, c = out.shape
    if fisher == "exact":
        if likelihood == "gaussian":
            return torch.eye(c, dtype=out.dtype, device=out.device).expand(n, c, c)
        p = torch.softmax(out, dim=1)
        return torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    if fisher == "empirical":
        e = capture.root_output_grads[call].reshape(n, c) * capture.delta_scale()  # per example
    else:
        if likelihood == "categorical":
            p = torch.softmax(out, dim=1)
            y = torch.multinomial(p.float(), 1, generator=capture.sampling_generator()).squeeze(1)
            e = p - torch.nn.functional.one_hot(y, c).to(p.dtype)
        else:
            noise = torch.randn(out.shape, generator=capture.sampling_generator(),
                                dtype=out.dtype, device=out.device)
            e = -noise  # ∂/∂h ½‖h - y‖² at y = h + noise
    return e.unsqueeze(2) * e.unsqueeze(1)


def dense_fishers(
    model: nn.Module, blocks: Sequence[DenseBlock], capture: Capture, fisher: str, likelihood: str
) -> None:
    """Compute every dense block's fresh Fisher from the captured batch (sets ``pending``).

    Per-example Jacobians come from ``torch.func`` (``vmap(jacrev(...))``) on a copy of the
    buffers, so BatchNorm running statistics are not touched.
    """
    if not capture.root_inputs:
        raise RuntimeError(
            "dense curvature needs the model's input: no forward pass with grad enabled was "
            "captured before optimizer.step() on a refresh step"
        )
    output = capture.output
    names = {id(p): n for n, p in model.named_parameters()}
    block_names = [[names[id(p)] for p in b.params] for b in blocks]
    all_params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    wanted = {n: all_params[n] for names_b in block_names for n in names_b}

    def f(sub: dict[str, Tensor], x: Tensor) -> Tensor:
        merged = dict(all_params)
        merged.update(sub)
        out = functional_call(model, (merged, buffers), (x.unsqueeze(0),))
        return select_output(out, output).squeeze(0)

    totals: list[Tensor | None] = [None] * len(blocks)
    count = 0
    for call, x in enumerate(capture.root_inputs):
        jac = vmap(jacrev(f), in_dims=(None, 0), randomness="different")(wanted, x)
        out = capture.root_outputs[call]
        out = out.unsqueeze(1) if out.dim() == 1 else out.reshape(-1, out.shape[-1])
        lam = _output_metric(out, capture, fisher, likelihood, call)
        for i, names_b in enumerate(block_names):
            J = torch.cat([jac[n].reshape(out.shape[0], out.shape[1], -1) for n in names_b],
                          dim=2)
            fb = torch.einsum("nci,ncd,ndj->ij", J, lam, J)
            totals[i] = fb if totals[i] is None else totals[i] + fb
        count += capture.examples[call]
    for b, t in zip(blocks, totals, strict=True):
        b.pending = t / count
