"""Curvature blocks: how one layer's (or one tensor's) Fisher block is estimated and inverted.

Every block answers the same questions, so the step rules never look inside:

* :meth:`Block.fresh` turns what :class:`~kldwrm.curvature.capture.Capture` recorded on a
  refresh step into a fresh estimate ``F_k`` (eq. 11 for Kronecker blocks);
* :meth:`Block.fold` folds it into the exponential average ``F̄ ← ρ F̄ + (1-ρ) F_k``
  (eqs. 12-13, seeded with the first estimate) and re-decomposes;
* :meth:`Block.solve` returns ``(e·F̄ + f·F_k + γI)^{-1} u`` and :meth:`Block.matvec`
  returns ``(e·F̄ + f·F_k + γI) v``; ``e`` and ``f`` let the step rules express every
  system of DESIGN section 3 (``f`` is nonzero only on refresh steps, eq. 20).

Vectors are lists of tensors shaped like the block's parameters.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .linalg import CurvatureError, conjugate_gradient, sym_eig

#: relative residual that ``q_solve="exact"`` guarantees on refresh steps (DESIGN section 3)
EXACT_SOLVE_RTOL = 1e-6


class Block(ABC):
    """One diagonal block of the block-diagonal curvature."""

    kind: str = "block"

    def __init__(self, params: Sequence[nn.Parameter], name: str) -> None:
        self.params = list(params)
        self.name = name
        self.initialized = False
        #: index of the optimizer parameter group the block's tensors belong to
        self.group = 0
        #: relative residual of the last iterative solve (``q_solve="exact"``), for tests
        self.last_residual = 0.0

    @abstractmethod
    def fresh(self, capture, grads: Sequence[Tensor]) -> dict[str, Tensor]:
        """Fresh curvature estimate of this step from the captured statistics."""

    @abstractmethod
    def fold(self, fresh: dict[str, Tensor], rho: float) -> None:
        """EA update ``F̄ ← ρF̄ + (1-ρ)F`` (first call: ``F̄ = F``) and re-decomposition."""

    @abstractmethod
    def solve(
        self,
        vecs: Sequence[Tensor],
        damping: float,
        ea_scale: float = 1.0,
        fresh_scale: float = 0.0,
        method: str = "exact",
    ) -> list[Tensor]:
        """``(ea_scale·F̄ + fresh_scale·F + damping·I)^{-1} vecs``."""

    @abstractmethod
    def matvec(
        self,
        vecs: Sequence[Tensor],
        damping: float,
        ea_scale: float = 1.0,
        fresh_scale: float = 0.0,
    ) -> list[Tensor]:
        """``(ea_scale·F̄ + fresh_scale·F + damping·I) vecs``."""

    # -- the eigenbasis of F̄ (used by step rules that keep vectors in it) -----------------
    def to_eigenbasis(self, vecs: Sequence[Tensor]) -> list[Tensor]:
        """Coordinates of ``vecs`` in the orthonormal eigenbasis of ``F̄``, parameter-shaped.

        The basis changes only when :meth:`fold` re-decomposes, so a step rule may keep a
        vector in these coordinates between refreshes; there ``e·F̄ + γI`` is the diagonal
        :meth:`eigenvalues` and a solve is one division. Dot products are preserved.
        """
        raise NotImplementedError(f"{type(self).__name__} has no eigenbasis")

    def from_eigenbasis(self, coords: Sequence[Tensor]) -> list[Tensor]:
        """Inverse of :meth:`to_eigenbasis`."""
        raise NotImplementedError(f"{type(self).__name__} has no eigenbasis")

    def eigenvalues(self, ea_scale: float, damping: float) -> list[Tensor]:
        """The diagonal of ``ea_scale·F̄ + damping·I`` in the eigenbasis, parameter-shaped."""
        raise NotImplementedError(f"{type(self).__name__} has no eigenbasis")

    @abstractmethod
    def state_dict(self) -> dict[str, Tensor]:
        """Tensors needed to continue bit-exactly."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Inverse of :meth:`state_dict`."""

    def drop_fresh(self) -> None:
        """Forget the fresh estimate once the refresh step is over (saves memory)."""
        return None

    # -- data parallelism (kldwrm.distributed) ---------------------------------------------
    def distributed_fresh(
        self, capture, grads: Sequence[Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, float | None]]:
        """This rank's statistics for the all-reduce over ranks, and their weights.

        Each statistic ``t_r`` with weight ``w_r`` is combined as ``Σ w_r t_r / Σ w_r``
        (weight ``None``: summed), which must give the statistic of the concatenated
        batch; :meth:`finish_distributed` then turns the combined statistics into the
        fresh estimate. Default: the fresh estimate, a mean over the examples.
        """
        est = self.fresh(capture, grads)
        n = float(capture.batch_size())
        return est, dict.fromkeys(est, n)

    def finish_distributed(
        self, stats: dict[str, Tensor], totals: dict[str, float]
    ) -> dict[str, Tensor]:
        """Fresh estimate from the combined statistics (``totals``: the summed weights)."""
        return stats

    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    def _check_ready(self) -> None:
        if not self.initialized:
            raise RuntimeError(f"curvature block {self.name!r} used before its first refresh")


def _ea(old: Tensor | None, new: Tensor, rho: float) -> Tensor:
    """Eq. 12/13 update; the first estimate seeds the average (F̄_0 = F_0)."""
    if old is None:
        return new.clone()
    return old.mul(rho).add_(new, alpha=1.0 - rho)


class KroneckerBlock(Block):
    """K-FAC block ``Ā ⊗ Γ̄`` of an ``nn.Linear`` or ``nn.Conv2d`` (KFC) layer.

    The weight (and bias, as a homogeneous coordinate ``ā = [a, 1]``) is viewed as the
    matrix ``W`` of shape ``(out, in_features [+1])``; with column-major ``vec``,
    ``(A ⊗ Γ) vec(V) = vec(Γ V A)``. Factors (eq. 11, DESIGN section 3)::

        A = (1/N) Σ_rows ā ā^T          (rows: examples, and spatial positions for conv)
        Γ = (1/R) Σ_rows δ δ^T          (R rows of per-example output gradients δ)

    so a 1x1 convolution on a 1x1 image gives exactly the Linear block, and for conv
    ``A ⊗ Γ`` is KFC's ``Ω ⊗ Γ`` (Grosse and Martens, 2016).
    """

    kind = "kronecker"

    def __init__(self, module: nn.Module, name: str) -> None:
        params = [module.weight] + ([module.bias] if module.bias is not None else [])
        super().__init__(params, name)
        self.module = module
        self.has_bias = module.bias is not None
        self.A_bar: Tensor | None = None
        self.G_bar: Tensor | None = None
        self.A_fresh: Tensor | None = None
        self.G_fresh: Tensor | None = None
        self.evals_A: Tensor | None = None
        self.evecs_A: Tensor | None = None
        self.evals_G: Tensor | None = None
        self.evecs_G: Tensor | None = None
        # cache for the "augmented" Q solve of the current refresh step
        self._aug: tuple[float, Tensor, Tensor, Tensor, Tensor] | None = None
        # e·dΓ dAᵀ + γ for the last few (e, γ), valid until the next decomposition
        self._diag_cache: dict[tuple[float, float], tuple[Tensor, list[Tensor]]] = {}

    # -- statistics -------------------------------------------------------------------
    def _columns(self, x: Tensor) -> Tensor:
        """Layer input → ``Xᵀ``: one column per row ``a`` of eq. 11 (im2col for convolutions).

        The layout is feature-major, ``(in_features, rows)``: for a convolution the copy out
        of the strided patch view then moves runs of a whole output row at a time instead
        of ``kw`` numbers (5-7x faster for narrow convolutions), and the Gram product
        ``X Xᵀ`` has its long dimension inside, where matmul is fastest.
        """
        if isinstance(self.module, nn.Conv2d):
            patches = _conv_patches(x, self.module)  # view (N, oh, ow, C, kh, kw)
            k = patches.shape[3] * patches.shape[4] * patches.shape[5]
            return patches.permute(3, 4, 5, 0, 1, 2).reshape(k, -1)
        return x.reshape(-1, x.shape[-1]).T

    def _delta_columns(self, delta: Tensor) -> Tensor:
        """Output gradients → ``Δᵀ`` of shape ``(out_channels, rows)``."""
        if isinstance(self.module, nn.Conv2d):
            return delta.transpose(0, 1).reshape(delta.shape[1], -1)
        return delta.reshape(-1, delta.shape[-1]).T

    def _input_factor(self, inputs: Sequence[Tensor]) -> Tensor:
        """``A = (1/N) Σ ā āᵀ`` with ``ā = [a, 1]``: the homogeneous coordinate's row and
        column are the sums of ``a`` and the row count, so no column of ones is built."""
        gram = total = None
        count = 0
        for x in inputs:
            cols = self._columns(x)
            g = cols @ cols.T
            gram = g if gram is None else gram.add_(g)
            if self.has_bias:
                t = cols.sum(dim=1)
                total = t if total is None else total.add_(t)
                count += cols.shape[1]
        n = sum(x.shape[0] for x in inputs)
        if not self.has_bias:
            return gram.div_(n)
        k = gram.shape[0]
        A = gram.new_empty(k + 1, k + 1)
        A[:k, :k] = gram
        A[:k, k] = total
        A[k, :k] = total
        A[k, k] = count
        return A.div_(n)

    def fresh(self, capture, grads: Sequence[Tensor]) -> dict[str, Tensor]:
        inputs = capture.inputs.get(self.module, [])
        deltas = capture.deltas.get(self.module, [])
        if not inputs or not deltas:
            raise RuntimeError(
                f"no activations/gradients were captured for layer {self.name!r} on a curvature "
                "refresh step: run a forward pass (with grad enabled) and loss.backward() "
                "through this layer before optimizer.step()"
            )
        A = self._input_factor(inputs)
        dcols = [self._delta_columns(d) for d in deltas]
        G = sum(c @ c.T for c in dcols) / sum(c.shape[1] for c in dcols)
        return {"A": A, "G": G}

    def distributed_fresh(self, capture, grads):
        """``A`` weighted by this rank's examples, ``Γ`` by its rows of ``δ``."""
        est = self.fresh(capture, grads)
        n = sum(x.shape[0] for x in capture.inputs[self.module])
        channel = 1 if isinstance(self.module, nn.Conv2d) else -1  # as in _delta_columns
        rows = sum(d.numel() // d.shape[channel] for d in capture.deltas[self.module])
        return est, {"A": float(n), "G": float(rows)}

    def fold(self, fresh: dict[str, Tensor], rho: float) -> None:
        self.A_fresh, self.G_fresh = fresh["A"], fresh["G"]
        self.A_bar = _ea(self.A_bar, fresh["A"], rho)
        self.G_bar = _ea(self.G_bar, fresh["G"], rho)
        self.initialized = True
        self.evals_A, self.evecs_A = sym_eig(self.A_bar, f"A of {self.name}")
        self.evals_G, self.evecs_G = sym_eig(self.G_bar, f"Gamma of {self.name}")
        self._aug = None
        self._diag_cache = {}

    def drop_fresh(self) -> None:
        self.A_fresh = self.G_fresh = None
        self._aug = None

    # -- vector layout ----------------------------------------------------------------
    def _to_mat(self, vecs: Sequence[Tensor]) -> Tensor:
        w = vecs[0].reshape(vecs[0].shape[0], -1)
        if self.has_bias:
            return torch.cat([w, vecs[1].unsqueeze(1)], dim=1)
        return w

    def _from_mat(self, mat: Tensor) -> list[Tensor]:
        w = self.params[0]
        if self.has_bias:
            return [mat[:, :-1].reshape(w.shape), mat[:, -1].contiguous()]
        return [mat.reshape(w.shape)]

    # -- solves -----------------------------------------------------------------------
    def _eig_diag(self, ea_scale: float, damping: float) -> Tensor:
        """``e·dΓ dAᵀ + γ``: the eigenvalues of ``e Ā⊗Γ̄ + γI`` (cached per decomposition)."""
        return self._eig_diag_entry(ea_scale, damping)[0]

    def _eig_diag_entry(self, ea_scale: float, damping: float) -> tuple[Tensor, list[Tensor]]:
        key = (float(ea_scale), float(damping))
        entry = self._diag_cache.get(key)
        if entry is None:
            if len(self._diag_cache) >= 4:  # a schedule changing e every step: keep it small
                self._diag_cache.clear()
            d = torch.outer(self.evals_G, self.evals_A).mul_(ea_scale).add_(damping)
            entry = self._diag_cache[key] = (d, self._from_mat(d))
        return entry

    def _rotate(self, V: Tensor) -> Tensor:
        """``QΓᵀ V QA``: a weight-shaped matrix in the eigenbasis of ``Ā⊗Γ̄``."""
        return self.evecs_G.T @ V @ self.evecs_A

    def _unrotate(self, X: Tensor) -> Tensor:
        """``QΓ X QAᵀ``, the inverse of :meth:`_rotate`."""
        return self.evecs_G @ X @ self.evecs_A.T

    def to_eigenbasis(self, vecs):
        self._check_ready()
        return self._from_mat(self._rotate(self._to_mat(vecs)))

    def from_eigenbasis(self, coords):
        self._check_ready()
        return self._from_mat(self._unrotate(self._to_mat(coords)))

    def eigenvalues(self, ea_scale, damping):
        self._check_ready()
        return list(self._eig_diag_entry(ea_scale, damping)[1])

    def solve(self, vecs, damping, ea_scale=1.0, fresh_scale=0.0, method="exact"):
        self._check_ready()
        V = self._to_mat(vecs)
        if fresh_scale == 0.0:
            # exact in the eigenbasis: (e Ā⊗Γ̄ + γI)^{-1} = (QA⊗QG) (e dA⊗dG + γ)^{-1} (QA⊗QG)^T
            D = self._eig_diag(ea_scale, damping)
            return self._from_mat(self._unrotate(self._rotate(V) / D))
        if self.A_fresh is None:
            raise RuntimeError(f"fresh factors of {self.name!r} are only kept on refresh steps")
        if method == "augmented":
            return self._from_mat(self._solve_augmented(V, damping, ea_scale, fresh_scale))
        return self._from_mat(self._solve_cg(V, damping, ea_scale, fresh_scale))

    def _solve_augmented(self, V: Tensor, damping: float, e: float, f: float) -> Tensor:
        """The released code's ``(eĀ + fA) ⊗ (Γ̄ + fΓ) + γI`` (not the exact Kronecker sum)."""
        if self._aug is None or self._aug[0] != f:
            dA, QA = sym_eig(e * self.A_bar + f * self.A_fresh, f"augmented A of {self.name}")
            dG, QG = sym_eig(self.G_bar + f * self.G_fresh, f"augmented Gamma of {self.name}")
            self._aug = (f, dA, QA, dG, QG)
        _, dA, QA, dG, QG = self._aug
        Vt = QG.T @ V @ QA
        return QG @ (Vt / (torch.outer(dG, dA) + damping)) @ QA.T

    def _solve_cg(self, V: Tensor, damping: float, e: float, f: float) -> Tensor:
        """Exact solve of ``e Ā⊗Γ̄ + f A⊗Γ + γI`` by CG in the eigenbasis of ``Ā, Γ̄``.

        In that basis the first term is diagonal, ``A⊗Γ`` becomes ``Â⊗Γ̂`` with
        ``Â = QAᵀ A QA``; the Jacobi preconditioner uses the exact diagonal
        ``e·dΓ dAᵀ + f·diag(Γ̂) diag(Â)ᵀ + γ``. Runs in float64 so that the residual bound
        of DESIGN section 3 (1e-6) is reachable from float32 factors.
        """
        dt = V.dtype
        QA, QG = self.evecs_A.double(), self.evecs_G.double()
        Ah = QA.T @ self.A_fresh.double() @ QA
        Gh = QG.T @ self.G_fresh.double() @ QG
        D = torch.outer(self.evals_G.double(), self.evals_A.double()) * e + damping
        # the right-hand side and the way back need only the input's precision (the result is
        # returned in it): the operator, where the 1e-6 residual is certified, is float64
        Vt = self._rotate(V).double()

        def op(X: Tensor) -> Tensor:
            return D * X + f * (Gh @ X @ Ah)

        precond = 1.0 / (D + f * torch.outer(torch.diagonal(Gh), torch.diagonal(Ah)))
        X, rel, _ = conjugate_gradient(op, Vt, precond, rtol=EXACT_SOLVE_RTOL * 0.5)
        self.last_residual = rel
        if rel > EXACT_SOLVE_RTOL:
            raise CurvatureError(
                f"q_solve='exact' did not reach relative residual {EXACT_SOLVE_RTOL:g} for "
                f"{self.name!r} (got {rel:.2e}); use q_solve='augmented' or more damping"
            )
        return self._unrotate(X.to(dt))

    def matvec(self, vecs, damping, ea_scale=1.0, fresh_scale=0.0):
        V = self._to_mat(vecs)
        if ea_scale == 0.0:  # fresh term only (QE's B_k on refresh steps)
            out = V * damping
        else:
            # straight from the factors, (Ā⊗Γ̄) vec(V) = vec(Γ̄ V Ā): two products, half of
            # the round trip through the eigenbasis
            out = torch.addmm(V, self.G_bar @ V, self.A_bar, beta=damping, alpha=ea_scale)
        if fresh_scale != 0.0:
            out = out + fresh_scale * (self.G_fresh @ V @ self.A_fresh)
        return self._from_mat(out)

    # -- persistence --------------------------------------------------------------------
    _KEYS = ("A_bar", "G_bar", "evals_A", "evecs_A", "evals_G", "evecs_G")

    def state_dict(self) -> dict[str, Tensor]:
        return {k: getattr(self, k) for k in self._KEYS if getattr(self, k) is not None}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for k in self._KEYS:
            ref = self.params[0]
            setattr(self, k, state[k].to(ref.device) if k in state else None)
        self.initialized = self.A_bar is not None
        self._diag_cache = {}
        self.drop_fresh()


class DiagonalBlock(Block):
    """Diagonal block for any other tensor (BatchNorm, LayerNorm, embeddings, ...).

    The fresh estimate is ``N·ḡ²`` with ``ḡ`` the batch-mean gradient (of the sampled-label
    loss for ``fisher="mc"``, of the training loss for ``"empirical"``): for zero-mean
    per-example scores ``E[N ḡ²] = diag(F)``, so it estimates the Fisher diagonal without
    per-example gradients.
    """

    kind = "diagonal"

    def __init__(self, param: nn.Parameter, name: str) -> None:
        super().__init__([param], name)
        self.F_bar: Tensor | None = None
        self.F_fresh: Tensor | None = None

    def fresh(self, capture, grads: Sequence[Tensor]) -> dict[str, Tensor]:
        p = self.params[0]
        if capture.fisher == "mc":
            est = capture.diag_sq.get(p)
            if est is None:
                raise RuntimeError(
                    f"no sampled-label gradient was captured for {self.name!r} on a curvature "
                    "refresh step: run a forward pass with grad enabled before optimizer.step()"
                )
            return {"F": est}
        n = capture.batch_size()
        return {"F": grads[0].square() * n}

    def distributed_fresh(self, capture, grads):
        """The estimate ``N·ḡ²`` of the concatenated batch (``N`` the global batch size).

        ``"empirical"``: ``ḡ`` is the gradient DDP already averaged over ranks, so the
        ranks' ``N_r·ḡ²`` are summed. ``"mc"``: each rank's mean sampled-label gradient
        ``ḡ_r`` is averaged with weight ``N_r`` and squared afterwards
        (:meth:`finish_distributed`), not the ranks' squares averaged.
        """
        if capture.fisher != "mc":
            return self.fresh(capture, grads), {"F": None}
        p = self.params[0]
        g = capture.diag_grad.get(p)
        if g is None:
            self.fresh(capture, grads)  # raises the usual error
        n = float(capture.batch_size())
        return {"gbar": g / n}, {"gbar": n}

    def finish_distributed(self, stats, totals):
        if "gbar" in stats:
            return {"F": stats["gbar"].square() * totals["gbar"]}
        return stats

    def fold(self, fresh: dict[str, Tensor], rho: float) -> None:
        self.F_fresh = fresh["F"]
        self.F_bar = _ea(self.F_bar, fresh["F"], rho)
        self.initialized = True

    def drop_fresh(self) -> None:
        self.F_fresh = None

    def _diag(self, damping: float, e: float, f: float) -> Tensor:
        d = self.F_bar * e + damping
        if f != 0.0:
            d = d + f * self.F_fresh
        return d

    def solve(self, vecs, damping, ea_scale=1.0, fresh_scale=0.0, method="exact"):
        self._check_ready()
        return [vecs[0] / self._diag(damping, ea_scale, fresh_scale)]

    def matvec(self, vecs, damping, ea_scale=1.0, fresh_scale=0.0):
        return [vecs[0] * self._diag(damping, ea_scale, fresh_scale)]

    # the standard basis is the eigenbasis of a diagonal matrix
    def to_eigenbasis(self, vecs):
        return [vecs[0]]

    def from_eigenbasis(self, coords):
        return [coords[0]]

    def eigenvalues(self, ea_scale, damping):
        self._check_ready()
        return [self._diag(damping, ea_scale, 0.0)]

    def state_dict(self) -> dict[str, Tensor]:
        return {} if self.F_bar is None else {"F_bar": self.F_bar}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.F_bar = state.get("F_bar")
        if self.F_bar is not None:
            self.F_bar = self.F_bar.to(self.params[0].device)
        self.initialized = self.F_bar is not None
        self.F_fresh = None


def _conv_patches(x: Tensor, m: nn.Conv2d) -> Tensor:
    """Receptive fields of ``m`` as a view ``(N, oh, ow, C, kh, kw)`` of the padded input.

    Column order ``(C, kh, kw)`` is ``F.unfold``'s (and the weight's); rows ``(N, oh, ow)``
    are its positions in the same order. Only the padding (if any) copies the input.
    """
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = m.kernel_size, m.stride, m.dilation, m.padding
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    v = x.unfold(2, (kh - 1) * dh + 1, sh)[..., ::dh]  # (N, C, oh, W, kh)
    v = v.unfold(3, (kw - 1) * dw + 1, sw)[..., ::dw]  # (N, C, oh, ow, kh, kw)
    return v.permute(0, 2, 3, 1, 4, 5)


def kronecker_supported(module: nn.Module) -> bool:
    """Whether a module gets a Kronecker block (else its tensors get diagonal blocks)."""
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and module.padding_mode == "zeros" and not isinstance(
            module.padding, str
        )
    return False


__all__ = [
    "Block",
    "CurvatureError",
    "DiagonalBlock",
    "EXACT_SOLVE_RTOL",
    "KroneckerBlock",
    "kronecker_supported",
]
