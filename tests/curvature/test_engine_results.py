"""The engine's products return the caller's own tensors (``CurvatureEngine._map_blocks``):
no result shares storage with its input, for every kind of block (Kronecker with and
without a bias, convolution, embedding, diagonal, truncated, dense) and for a block that
never got data (the identity's copy). The step's clip relies on it: it scales the
direction in place."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kldwrm import KFAC

pytestmark = pytest.mark.usefixtures("float64")


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.conv = nn.Conv1d(4, 5, 2)
        self.lin = nn.Linear(5, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3, bias=False)
        self.unused = nn.Linear(3, 3)  # never called: its block gets no curvature

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.emb(idx).transpose(1, 2)).mean(2)
        return self.head(self.norm(torch.tanh(self.lin(h))))


def _storages(ts):
    return {t.untyped_storage().data_ptr() for t in ts}


@pytest.mark.parametrize("kw", [{}, {"rank": 2}, {"curvature": "dense"}],
                         ids=["kronecker", "rank", "dense"])
def test_products_share_no_storage_with_their_inputs(kw):
    torch.manual_seed(0)
    model = _Net()
    opt = KFAC(model, lr=0.01, update_freq=1, fisher="empirical", **kw)
    idx, y = torch.randint(0, 7, (8, 5)), torch.randint(0, 3, (8,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unused layer's missing statistics
        F.cross_entropy(model(idx), y).backward()
        opt.step()
    eng = opt.engine
    idle = [i for bi, b in enumerate(eng.blocks) if not b.initialized for i in eng.slots[bi]]
    assert idle or kw.get("curvature") == "dense"  # the unused layer's block (dense: one)
    vecs = [torch.randn(p.shape, dtype=torch.float64) for p in model.parameters()]
    copies = [v.clone() for v in vecs]
    scales = opt._scales()
    products = {"solve": eng.solve(vecs, scales), "matvec": eng.matvec(vecs, scales)}
    if eng.diagonalizable():
        products["to_eigenbasis"] = eng.to_eigenbasis(vecs)
        products["from_eigenbasis"] = eng.from_eigenbasis(vecs)
    for name, out in products.items():
        assert not _storages(out) & _storages(vecs), name
        for i in idle:  # no curvature: the identity
            assert torch.equal(out[i], vecs[i]), name
    for v, c in zip(vecs, copies, strict=True):
        assert torch.equal(v, c)  # and the inputs are as they were
