"""Kronecker blocks of ``nn.Embedding`` (``embeddings="kron"``).

An embedding is a bias-free linear layer on one-hot inputs, so its block must equal the
Kronecker block of that linear layer exactly: factors, steps, every rule. The factors are
also checked against a dense construction from per-position output gradients.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kldwrm import KFAC, QKLDWRM, SOKLDWRM
from kldwrm.curvature import EmbeddingBlock, KroneckerBlock

V, D, T, CLASSES = 13, 6, 5, 7


class Emb(nn.Module):
    """Token and positional embeddings, a nonlinearity and a read-out."""

    def __init__(self, padding_idx: int | None = None) -> None:
        super().__init__()
        self.tok = nn.Embedding(V, D, padding_idx=padding_idx)
        self.pos = nn.Embedding(T, D)
        self.head = nn.Linear(D, CLASSES)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[-1]))
        return self.head(torch.tanh(x))


class OneHot(nn.Module):
    """The same network with each embedding as a bias-free linear layer on one-hot rows."""

    def __init__(self, emb: Emb) -> None:
        super().__init__()
        self.tok = nn.Linear(V, D, bias=False)
        self.pos = nn.Linear(T, D, bias=False)
        self.head = copy.deepcopy(emb.head)
        with torch.no_grad():
            self.tok.weight.copy_(emb.tok.weight.T)
            self.pos.weight.copy_(emb.pos.weight.T)

    def forward(self, idx):
        t = idx.shape[-1]
        x = self.tok(F.one_hot(idx, V).to(self.tok.weight.dtype))
        x = x + self.pos(torch.eye(T, dtype=x.dtype)[:t])
        return self.head(torch.tanh(x))


def _data(steps: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, V - 3, (8, T), generator=g),  # tokens V-3.. never occur
             torch.randint(0, CLASSES, (8, T), generator=g)) for _ in range(steps)]


def _loss(model, x, y):
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


@pytest.mark.parametrize("cls,kwargs", [
    (KFAC, {}),
    (SOKLDWRM, {}),
    (QKLDWRM, {"update_freq": 2}),
    (KFAC, {"curvature": "adaptive", "eigen_power": 0.5, "damping": 1e-6}),
    (KFAC, {"damping_split": "pi"}),
])
def test_embedding_block_equals_the_linear_block_on_one_hot_inputs(cls, kwargs):
    torch.manual_seed(0)
    emb = Emb().double()
    lin = OneHot(emb).double()
    opts = [cls(m, lr=0.1, embeddings="kron", seed=3, fisher="mc", **kwargs)
            for m in (emb, lin)]
    kinds = [b.kind for b in opts[0].engine.blocks]
    assert kinds.count("kronecker-embedding") == 2
    for x, y in _data(5):
        for model, opt in zip((emb, lin), opts, strict=True):
            opt.zero_grad()
            _loss(model, x, y).backward()
            opt.step()
    eb = {b.name: b for b in opts[0].engine.blocks if isinstance(b, EmbeddingBlock)}
    lb = {b.name: b for b in opts[1].engine.blocks if isinstance(b, KroneckerBlock)}
    for name in ("tok", "pos"):
        torch.testing.assert_close(torch.diag(eb[name].A_bar), lb[name].A_bar,
                                   rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(eb[name].G_bar, lb[name].G_bar, rtol=1e-12, atol=1e-15)
    for name in ("tok", "pos"):
        torch.testing.assert_close(getattr(emb, name).weight, getattr(lin, name).weight.T,
                                   rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(emb.head.weight, lin.head.weight, rtol=1e-10, atol=1e-12)


def test_embedding_factors_against_a_dense_construction():
    """Empirical Fisher: ``A = diag(counts)/N`` and ``Γ = (1/N) Σ_t δ_t δ_tᵀ`` with ``δ_t``
    the per-position gradient of the summed loss at the embedding's output, by autograd on
    a hook-free copy of the model."""
    torch.manual_seed(1)
    model = Emb().double()
    ref = copy.deepcopy(model)
    opt = KFAC(model, embeddings="kron", fisher="empirical")
    x, y = _data(1)[0]
    opt.zero_grad()
    _loss(model, x, y).backward()
    opt.step()
    block = next(b for b in opt.engine.blocks if b.name == "tok")
    n = x.numel()
    counts = torch.bincount(x.reshape(-1), minlength=V).double()
    torch.testing.assert_close(block.A_bar, counts / n, rtol=1e-14, atol=0.0)
    assert (block.A_bar[V - 3:] == 0).all()  # tokens that never occurred
    out = {}
    ref.tok.register_forward_hook(lambda m, a, o: out.setdefault("tok", o))
    logits = ref(x).flatten(0, 1)
    (delta,) = torch.autograd.grad(F.cross_entropy(logits, y.flatten(), reduction="sum"),
                                   out["tok"])
    rows = delta.reshape(-1, D)
    torch.testing.assert_close(block.G_bar, rows.T @ rows / n, rtol=1e-12, atol=1e-15)


def test_padding_row_takes_no_step_and_state_resumes_bit_exactly():
    torch.manual_seed(2)
    model = Emb(padding_idx=0).double()
    opt = QKLDWRM(model, embeddings="kron", update_freq=2)
    data = _data(6, seed=4)
    pad_row = model.tok.weight[0].detach().clone()
    for k, (x, y) in enumerate(data):
        if k == 3:
            saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()
    assert torch.equal(model.tok.weight[0], pad_row)
    twin = Emb(padding_idx=0).double()
    twin.load_state_dict(saved[0])
    opt2 = QKLDWRM(twin, embeddings="kron", update_freq=2)
    opt2.load_state_dict(saved[1])
    for x, y in data[3:]:
        opt2.zero_grad()
        _loss(twin, x, y).backward()
        opt2.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters(),
                                                 strict=True))


def test_tied_embedding_keeps_the_read_out_block_and_default_is_diagonal():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(V, D)
            self.head = nn.Linear(D, V, bias=False)
            self.head.weight = self.tok.weight

        def forward(self, idx):
            return self.head(torch.tanh(self.tok(idx)))

    kinds = [b.kind for b in KFAC(Tied(), embeddings="kron").engine.blocks]
    assert kinds == ["kronecker"]
    kinds = [b.kind for b in KFAC(Emb()).engine.blocks]
    assert "kronecker-embedding" not in kinds and kinds.count("diagonal") == 2
    with pytest.raises(ValueError, match="embeddings"):
        KFAC(Emb(), embeddings="dense")
