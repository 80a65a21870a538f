"""Outputs with extra dimensions (DESIGN section 1): every leading position is an example.

* A per-position model on ``(B, T, d)`` has exactly the curvature, and takes exactly the
  step, of the same model on the flattened ``(B·T, d)`` batch (MC labels sampled per
  position, Γ scaled per example), for every optimizer.
* The dense Fisher of a tiny sequence model whose positions interact equals an
  independent per-position Jacobian computation.
* Positions labelled with the loss's ``ignore_index`` stay out of the empirical Fisher.
* The likelihood can be pointed at the logits inside a tuple, a dict or an output object.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jacrev

from kldwrm import KFAC, QKLDWRM, SOKLDWRM
from kldwrm.curvature import DiagonalBlock, FactoredBlock
from kldwrm.optim.qe import QEKLDWRM

B, T, D, H, C = 3, 5, 4, 6, 7


pytestmark = pytest.mark.usefixtures("float64")


def _per_position(seed: int = 0) -> nn.Sequential:
    """Linear → LayerNorm → tanh → Linear, applied to each position alone."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, H), nn.LayerNorm(H), nn.Tanh(), nn.Linear(H, C))


def _data(seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, D, generator=g), torch.randint(0, C, (B, T), generator=g)


def _ce(logits: Tensor, y: Tensor, **kw) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, C), y.reshape(-1), **kw)


CASES = [(KFAC, {}), (SOKLDWRM, {}), (QKLDWRM, {}),
         (QEKLDWRM, dict(window=2, inner_steps=3, inner_lr=0.05))]


@pytest.mark.parametrize("fisher", ["mc", "empirical"])
@pytest.mark.parametrize(("cls", "kw"), CASES)
def test_sequence_model_equals_the_flattened_batch(cls, kw, fisher):
    seq, flat = _per_position(), _per_position()
    x, y = _data()
    opts = [cls(m, lr=0.05, update_freq=2, fisher=fisher, seed=5, **kw) for m in (seq, flat)]
    for _ in range(4):  # refresh, plain, refresh, plain
        for model, opt, xb in ((seq, opts[0], x), (flat, opts[1], x.reshape(-1, D))):
            opt.zero_grad()
            _ce(model(xb), y).backward()
            opt.step()
    for a, b in zip(opts[0].engine.blocks, opts[1].engine.blocks, strict=True):
        for k, t in a.state_dict().items():
            torch.testing.assert_close(t, b.state_dict()[k], rtol=1e-10, atol=1e-12)
    for p, q in zip(seq.parameters(), flat.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_linear_factors_with_leading_dimensions_equal_per_position_statistics():
    """A = (1/E) Σ ā āᵀ and Γ = (1/E) Σ δ δᵀ over the E = B·T positions, δ from autograd
    on each position's own loss (positions do not interact here)."""
    model, (x, y) = _per_position(), _data()
    opt = KFAC(model, fisher="empirical", update_freq=1, kl_clip=None)
    opt.zero_grad()
    _ce(model(x), y).backward()
    opt.step()
    rec = {}
    model0 = _per_position()  # θ_0: the factors were taken before the step
    hook = model0[3].register_forward_hook(lambda m, i, o: rec.update(a=i[0], z=o))
    loss = _ce(model0(x), y, reduction="sum")
    hook.remove()
    (delta,) = torch.autograd.grad(loss, rec["z"])
    a = torch.cat([rec["a"].reshape(-1, H), torch.ones(B * T, 1)], dim=1).detach()
    d = delta.reshape(-1, C)
    block = next(b for b in opt.engine.blocks if getattr(b, "module", None) is model[3])
    torch.testing.assert_close(block.A_bar, a.T @ a / (B * T), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(block.G_bar, d.T @ d / (B * T), rtol=1e-12, atol=1e-14)


class Mixer(nn.Module):
    """A tiny causal sequence model: each position sees the running mean of the inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(D, H)
        self.mix = nn.Linear(D, H, bias=False)
        self.out = nn.Linear(H, C)

    def forward(self, x: Tensor) -> Tensor:
        steps = torch.arange(1, x.shape[1] + 1, dtype=x.dtype).reshape(1, -1, 1)
        running = x.cumsum(1) / steps
        return self.out(torch.tanh(self.inp(x) + self.mix(running)))


def _dense_fisher_by_hand(model: nn.Module, x: Tensor) -> Tensor:
    """(1/E) Σ_(b,t) J_btᵀ (diag p - p pᵀ) J_bt with per-position Jacobians (eq. 5)."""
    names = [n for n, _ in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(v: Tensor) -> Tensor:
        params, i = {}, 0
        for n, p in model.named_parameters():
            params[n] = v[i : i + p.numel()].view_as(p)
            i += p.numel()
        return functional_call(model, params, (x,))

    assert names
    J = jacrev(f)(theta).reshape(B * T, C, -1)
    p = f(theta).softmax(-1).reshape(B * T, C).detach()
    total = torch.zeros(theta.numel(), theta.numel())
    for e in range(B * T):
        lam = torch.diag(p[e]) - torch.outer(p[e], p[e])
        total += J[e].T @ lam @ J[e]
    return total / (B * T)


def test_dense_fisher_of_an_interacting_sequence_model():
    torch.manual_seed(2)
    model = Mixer()
    x, y = _data()
    expected = _dense_fisher_by_hand(model, x)
    opt = KFAC(model, curvature="dense", fisher="exact", update_freq=1, lr=1e-3)
    opt.zero_grad()
    _ce(model(x), y).backward()
    opt.step()
    torch.testing.assert_close(opt.engine.blocks[0].F_bar, expected, rtol=1e-10, atol=1e-12)


def test_mc_labels_are_sampled_per_position():
    """Γ of the last layer from labels drawn independently at each of the B·T positions."""
    model, (x, y) = _per_position(), _data()
    opt = KFAC(model, fisher="mc", update_freq=1, seed=11)
    opt.zero_grad()
    _ce(model(x), y).backward()
    opt.step()
    model0 = _per_position()
    rec = {}
    hook = model0[3].register_forward_hook(lambda m, i, o: rec.update(z=o))
    logits = model0(x)
    hook.remove()
    probs = logits.detach().softmax(-1).reshape(-1, C).float()
    sampled = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(11))
    (delta,) = torch.autograd.grad(_ce(logits, sampled.reshape(B, T), reduction="sum"),
                                   rec["z"])
    d = delta.reshape(-1, C)
    block = next(b for b in opt.engine.blocks if getattr(b, "module", None) is model[3])
    torch.testing.assert_close(block.G_bar, d.T @ d / (B * T), rtol=1e-12, atol=1e-14)


def test_ignored_positions_stay_out_of_the_empirical_fisher():
    """With ignore_index, the factors are those of the flattened batch's valid rows alone."""
    x, y = _data()
    y = y.clone()
    y[0, :2] = -100
    y[2, 4] = -100
    valid = (y != -100).reshape(-1)
    seq, flat = _per_position(), _per_position()
    opt_s = KFAC(seq, fisher="empirical", update_freq=1, lr=0.05)
    opt_f = KFAC(flat, fisher="empirical", update_freq=1, lr=0.05)
    for model, opt, xb, yb in ((seq, opt_s, x, y),
                               (flat, opt_f, x.reshape(-1, D)[valid], y.reshape(-1)[valid])):
        opt.zero_grad()
        _ce(model(xb), yb, ignore_index=-100).backward()
        opt.step()
    for a, b in zip(opt_s.engine.blocks, opt_f.engine.blocks, strict=True):
        for k, t in a.state_dict().items():
            torch.testing.assert_close(t, b.state_dict()[k], rtol=1e-10, atol=1e-12)
    for p, q in zip(seq.parameters(), flat.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


class TupleOut(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.net, self.kind = _per_position(), kind

    def forward(self, x: Tensor):
        logits = self.net(x)
        if self.kind == "tuple":
            return logits.sum(), logits
        if self.kind == "dict":
            return {"logits": logits, "aux": logits.mean()}
        return type("Out", (), {"logits": logits})()


@pytest.mark.parametrize(("kind", "output"), [("tuple", 1), ("dict", "logits"),
                                                ("object", "logits"),
                                                ("object", lambda o: o.logits)])
def test_output_selector_points_the_likelihood_at_the_logits(kind, output):
    x, y = _data()
    wrapped, plain = TupleOut(kind), _per_position()
    ow = QKLDWRM(wrapped, lr=0.05, update_freq=1, seed=3, output=output)
    op = QKLDWRM(plain, lr=0.05, update_freq=1, seed=3)
    for _ in range(2):
        ow.zero_grad()
        out = wrapped(x)
        logits = out[1] if kind == "tuple" else out["logits"] if kind == "dict" else out.logits
        _ce(logits, y).backward()
        ow.step()
        op.zero_grad()
        _ce(plain(x), y).backward()
        op.step()
    for p, q in zip(wrapped.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_output_selector_errors_name_the_argument():
    with pytest.raises(ValueError, match="output"):
        KFAC(_per_position(), output=3.5)
    model = TupleOut("dict")
    opt = KFAC(model, output="nope")
    assert opt.output == "nope"
    x, y = _data()
    with pytest.raises(ValueError, match="output='nope'"):
        model(x)


class Branchy(nn.Module):
    """A model whose forward skips its ``unused`` head (and sometimes ``b``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(D, H)
        self.b = nn.Linear(H, H)
        self.norm = nn.LayerNorm(H)
        self.unused = nn.Linear(H, C)
        self.head = nn.Linear(H, C)
        self.use_b = False

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        if self.use_b:
            h = torch.tanh(self.norm(self.b(h)))
        return self.head(h)


@pytest.mark.parametrize(("cls", "kw"), CASES)
def test_layers_without_data_are_skipped_with_one_warning(cls, kw):
    from kldwrm import MissingCurvatureWarning

    torch.manual_seed(4)
    model = Branchy()
    x, y = _data()
    x, y = x.reshape(-1, D), y.reshape(-1)
    opt = cls(model, lr=0.05, update_freq=2, **kw)
    unused = [p.detach().clone() for p in model.unused.parameters()]
    b_before = [p.detach().clone() for p in model.b.parameters()]
    losses = []
    with pytest.warns(MissingCurvatureWarning, match="unused") as rec:
        for k in range(10):
            model.use_b = k >= 5  # b, norm: no data on the first refreshes, then data
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert len([w for w in rec if issubclass(w.category, MissingCurvatureWarning)]) == 1
    for p, q in zip(model.unused.parameters(), unused, strict=True):
        assert torch.equal(p, q)  # no gradient: no step, as torch.optim does
    assert all(p.grad is None for p in model.unused.parameters())
    blocks = {b.name: b for b in opt.engine.blocks}
    assert not blocks["unused"].initialized
    assert blocks["b"].initialized  # its first data arrived at step 6
    assert any(not torch.equal(p, q) for p, q in zip(model.b.parameters(), b_before,
                                                      strict=True))
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0]


@pytest.mark.filterwarnings("ignore::kldwrm.MissingCurvatureWarning")
def test_a_layer_that_drops_out_keeps_its_average():
    torch.manual_seed(5)
    model = Branchy()
    model.use_b = True
    x, y = _data()
    x, y = x.reshape(-1, D), y.reshape(-1)
    opt = KFAC(model, lr=0.05, update_freq=1)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    block = next(b for b in opt.engine.blocks if b.name == "b")
    kept = {k: v.clone() for k, v in block.state_dict().items()}
    model.use_b = False
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    for k, v in block.state_dict().items():
        assert torch.equal(v, kept[k])


def test_multihead_attention_trains_its_output_projection():
    """``nn.MultiheadAttention`` uses ``out_proj``'s weight without calling the module: it
    gets diagonal blocks (no Kronecker block waiting for data that never comes)."""
    torch.manual_seed(6)
    model = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0,
                                       batch_first=True)
    opt = KFAC(model, lr=0.05, update_freq=1)
    kinds = {b.name: type(b) for b in opt.engine.blocks}
    assert kinds["self_attn.out_proj.weight"] is DiagonalBlock
    assert kinds["linear1"] is not DiagonalBlock and issubclass(kinds["linear1"], FactoredBlock)
    x = torch.randn(2, 5, 8)
    before = model.self_attn.out_proj.weight.detach().clone()
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()
    assert not torch.equal(before, model.self_attn.out_proj.weight)


class TinyLM(nn.Module):
    """Embedding → causal running mean → MLP, returning a dict (a model output object)."""

    def __init__(self, vocab: int = 11, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: Tensor) -> dict[str, Tensor]:
        h = self.embed(tokens)
        steps = torch.arange(1, tokens.shape[1] + 1, dtype=h.dtype).reshape(1, -1, 1)
        h = torch.tanh(self.norm(self.mix(h.cumsum(1) / steps)))
        return {"logits": self.head(h)}


@pytest.mark.parametrize("fisher", ["mc", "empirical"])
@pytest.mark.parametrize(("cls", "kw"), CASES)
def test_a_padded_sequence_model_with_dict_outputs_trains(cls, kw, fisher):
    """Next-token prediction on sequences padded with ignore_index: the loss falls."""
    torch.manual_seed(7)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(1, 11, (32, 9), generator=g)
    tokens[:, 1::2] = (tokens[:, 0::2][:, : tokens[:, 1::2].shape[1]] + 1) % 11  # learnable
    targets = tokens[:, 1:].clone()
    targets[:8, 5:] = -100  # padding
    model = TinyLM()
    opt = cls(model, lr=0.05, update_freq=3, fisher=fisher, output="logits", **kw)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = _ce_vocab(model(tokens[:, :-1])["logits"], targets)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(map(math.isfinite, losses)) and losses[-1] < 0.8 * losses[0], losses


def _ce_vocab(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=-100)


# --------------------------------------------------------------------------------------------
# K-FAC-reduce (weight_sharing="reduce", Eschenhagen et al. 2023)


def _reduce_net():
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def test_reduce_factors_against_a_dense_construction():
    """A = (1/B) Σ_n ā_n ā_nᵀ (ā_n: the mean input of sequence n, with the homogeneous 1),
    Γ = (1/(B·T)) Σ_n δ̃_n δ̃_nᵀ (δ̃_n: its summed output gradients of the summed loss)."""
    net = _reduce_net()
    ref = copy.deepcopy(net)
    opt = KFAC(net, fisher="empirical", weight_sharing="reduce")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (5, 7), generator=g)
    opt.zero_grad()
    F.cross_entropy(net(x).flatten(0, 1), y.flatten()).backward()
    opt.step()
    h = torch.tanh(ref[0](x))
    out = ref[2](h)
    (delta,) = torch.autograd.grad(F.cross_entropy(out.flatten(0, 1), y.flatten(),
                                                   reduction="sum"), out)
    a = torch.cat([h.mean(1), torch.ones(5, 1, dtype=torch.float64)], 1)
    b = opt.engine.blocks[1]
    torch.testing.assert_close(b.A_bar, a.T @ a / 5, rtol=1e-12, atol=1e-15)
    s = delta.sum(1)
    torch.testing.assert_close(b.G_bar, s.T @ s / 35, rtol=1e-12, atol=1e-15)


def test_reduce_is_the_exact_fisher_of_one_sequence_with_constant_inputs():
    """One sequence whose inputs do not vary along it: A⊗Γ is the (empirical) Fisher of
    the mean loss over its T positions, (1/T) vec(G) vec(G)ᵀ with G the summed-loss
    gradient of the weight, which expand does not reproduce."""
    lin = nn.Linear(4, 3, bias=False).double()
    torch.manual_seed(0)
    x = torch.randn(1, 1, 4, dtype=torch.float64).expand(1, 6, 4)
    y = torch.randint(0, 3, (1, 6))
    (G,) = torch.autograd.grad(F.cross_entropy(lin(x).flatten(0, 1), y.flatten(),
                                               reduction="sum"), lin.weight)
    dense = torch.outer(G.T.reshape(-1), G.T.reshape(-1)) / 6
    for sharing, exact in (("reduce", True), ("expand", False)):
        model = copy.deepcopy(lin)
        opt = KFAC(model, fisher="empirical", weight_sharing=sharing)
        opt.zero_grad()
        F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        opt.step()
        b = opt.engine.blocks[0]
        close = torch.allclose(torch.kron(b.A_bar, b.G_bar), dense, rtol=1e-10, atol=1e-14)
        assert close is exact, sharing
