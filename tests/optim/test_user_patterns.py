"""The probe: models and training loops as users write them, trained by every rule.

Each pattern is a small model with a learnable synthetic task (labels from a fixed random
teacher), a loop written the way a user writes it (schedulers, SWA, hooks,
parametrisations, odd batch sizes, ...), and a few dozen steps with the curvature refreshed
several times. Each must run without an exception, stay finite, and lower the loss (the
mean over the last six steps, one pass over the batches, below that over the first six).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrizations
from torch.optim import lr_scheduler, swa_utils

import kldwrm

RULES = {
    "kfac": {},
    "so": {},
    "q": {},
    "qe": dict(window=2, inner_steps=2, inner_lr=0.01),
}
STEPS = 30


@dataclass
class Pattern:
    """A model, its data and how the loop differs from the plain one."""

    model: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator, int], Tensor]
    classes: int = 3
    batch_sizes: tuple[int, ...] = (16,)
    likelihood: str = "categorical"
    output: Any = None
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None
    loop: str = "plain"
    options: dict[str, Any] = field(default_factory=dict)


def _vec(n: int) -> Callable[[torch.Generator, int], Tensor]:
    return lambda gen, b: torch.randn(b, n, generator=gen)


def _img(c: int, h: int, w: int | None = None) -> Callable[[torch.Generator, int], Tensor]:
    return lambda gen, b: torch.randn(b, c, h, w or h, generator=gen)


def _seq(t: int, n: int) -> Callable[[torch.Generator, int], Tensor]:
    return lambda gen, b: torch.randn(b, t, n, generator=gen)


def _tokens(t: int, vocab: int) -> Callable[[torch.Generator, int], Tensor]:
    return lambda gen, b: torch.randint(0, vocab, (b, t), generator=gen)


def _mlp(*mods: nn.Module, n_in: int = 6, classes: int = 3, bias: bool = True) -> nn.Module:
    return nn.Sequential(nn.Linear(n_in, 12, bias=bias), *mods, nn.Tanh(),
                         nn.Linear(12, classes, bias=bias))


class _Recurrent(nn.Module):
    """Sequence classifier on the last state of an RNN/GRU/LSTM."""

    def __init__(self, kind: type[nn.Module], **kw: Any) -> None:
        super().__init__()
        self.rnn = kind(4, 8, batch_first=True, **kw)
        self.head = nn.Linear(8 * (2 if kw.get("bidirectional") else 1), 3)

    def forward(self, x: Tensor) -> Tensor:
        out = self.rnn(x)[0]
        return self.head(out[:, -1])


class _Conv(nn.Module):
    """Convolutional classifier; ``conv`` builds the feature extractor."""

    def __init__(self, features: nn.Module, width: int) -> None:
        super().__init__()
        self.features = features
        self.head = nn.Linear(width, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))


class _Autoencoder(nn.Module):
    """Conv encoder, transposed-conv decoder, per-pixel classes (a segmentation head)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.dec = nn.ConvTranspose2d(4, 3, 4, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.dec(torch.tanh(self.enc(x))).permute(0, 2, 3, 1)  # classes last


class _Bag(nn.Module):
    def __init__(self, tied: bool = False, bag: bool = False) -> None:
        super().__init__()
        self.emb = nn.EmbeddingBag(11, 8) if bag else nn.Embedding(11, 8)
        self.bag = bag
        self.mid = nn.Linear(8, 8)
        self.out = nn.Linear(8, 11 if tied else 3)
        if tied:
            self.out.weight = self.emb.weight

    def forward(self, x: Tensor) -> Tensor:
        h = self.emb(x) if self.bag else self.emb(x).mean(1)
        return self.out(torch.tanh(self.mid(h)))


class _Attention(nn.Module):
    def __init__(self, layer: bool) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.attn = (nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
                     if layer else nn.MultiheadAttention(8, 2, batch_first=True))
        self.layer = layer
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        h = self.attn(h) if self.layer else self.attn(h, h, h, need_weights=False)[0]
        return self.head(h.mean(1))


class _Twice(nn.Module):
    """One layer applied twice (weight sharing across depth)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.shared = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(torch.tanh(self.shared(h))))
        return self.head(h)


class _DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp()

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        logits = self.net(x)
        return {"logits": logits, "aux": logits.sum()}


def _hooked() -> nn.Module:
    model = _mlp()
    model[0].register_forward_hook(lambda m, i, o: o * 0.9)
    model[2].register_full_backward_hook(lambda m, gi, go: None)
    model[0].weight.register_hook(lambda g: g * 1.0)
    return model


def _weight_norm() -> nn.Module:
    model = _mlp()
    parametrizations.weight_norm(model[0])
    return model


def _spectral_norm() -> nn.Module:
    model = _mlp()
    parametrizations.spectral_norm(model[2])
    return model


def _channels_last() -> nn.Module:
    return _Conv(nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU()),
                 4 * 6 * 6).to(memory_format=torch.channels_last)


def _conv(*layers: nn.Module, width: int) -> Callable[[], nn.Module]:
    return lambda: _Conv(nn.Sequential(*layers), width)


def _sched(factory: Callable[..., Any], **kw: Any) -> Callable[[torch.optim.Optimizer], Any]:
    return lambda opt: factory(opt, **kw)


def _warmup_then_cosine(opt: torch.optim.Optimizer) -> Any:
    warm = lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=5)
    cos = lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)
    return lr_scheduler.SequentialLR(opt, [warm, cos], milestones=[5])


def _chained(opt: torch.optim.Optimizer) -> Any:
    return lr_scheduler.ChainedScheduler([lr_scheduler.ConstantLR(opt, factor=0.5,
                                                                  total_iters=4),
                                          lr_scheduler.ExponentialLR(opt, gamma=0.98)])


PATTERNS: dict[str, Pattern] = {
    "rnn": Pattern(lambda: _Recurrent(nn.RNN), _seq(5, 4)),
    "gru": Pattern(lambda: _Recurrent(nn.GRU), _seq(5, 4)),
    "lstm-bidirectional": Pattern(lambda: _Recurrent(nn.LSTM, bidirectional=True), _seq(5, 4)),
    "conv1d-dilated": Pattern(_conv(nn.Conv1d(2, 4, 3, dilation=2), nn.Tanh(), width=4 * 6),
                              lambda gen, b: torch.randn(b, 2, 10, generator=gen)),
    "conv3d": Pattern(_conv(nn.Conv3d(1, 2, 3), nn.Tanh(), width=2 * 4),
                      lambda gen, b: torch.randn(b, 1, 4, 4, 3, generator=gen)),
    "depthwise-conv-no-bias": Pattern(
        _conv(nn.Conv2d(2, 4, 3, groups=2, bias=False), nn.Tanh(),
              nn.Conv2d(4, 4, 1, bias=False), width=4 * 6 * 6), _img(2, 8)),
    "conv-transpose-segmentation": Pattern(_Autoencoder, _img(1, 8)),
    "batchnorm-mlp": Pattern(lambda: _mlp(nn.BatchNorm1d(12)), _vec(6)),
    "groupnorm-cnn": Pattern(_conv(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(),
                                   width=4 * 6 * 6), _img(2, 8)),
    "instancenorm-cnn": Pattern(_conv(nn.Conv2d(2, 4, 3), nn.InstanceNorm2d(4, affine=True),
                                      nn.ReLU(), width=4 * 6 * 6), _img(2, 8)),
    "channels-last": Pattern(_channels_last, _img(2, 8), loop="channels-last"),
    "no-bias-mlp": Pattern(lambda: _mlp(bias=False), _vec(6)),
    "batch-of-one": Pattern(_mlp, _vec(6), batch_sizes=(1,)),
    "odd-batch-sizes": Pattern(_mlp, _vec(6), batch_sizes=(7, 1, 13, 2)),
    "dropout-prelu": Pattern(lambda: _mlp(nn.Dropout(0.1), nn.PReLU()), _vec(6)),
    "embedding-bag": Pattern(lambda: _Bag(bag=True), _tokens(5, 11)),
    "tied-embedding-lm": Pattern(lambda: _Bag(tied=True), _tokens(5, 11), classes=11),
    "multihead-attention": Pattern(lambda: _Attention(False), _seq(5, 4)),
    "transformer-encoder-layer": Pattern(lambda: _Attention(True), _seq(5, 4)),
    "layer-used-twice": Pattern(_Twice, _vec(6)),
    "dict-output": Pattern(_DictOut, _vec(6), output="logits"),
    "regression": Pattern(_mlp, _vec(6), likelihood="gaussian"),
    "user-hooks": Pattern(_hooked, _vec(6)),
    "weight-norm-parametrization": Pattern(_weight_norm, _vec(6)),
    "spectral-norm-parametrization": Pattern(_spectral_norm, _vec(6)),
    "step-lr": Pattern(_mlp, _vec(6), scheduler=_sched(lr_scheduler.StepLR, step_size=10,
                                                       gamma=0.5)),
    "multistep-lr": Pattern(_mlp, _vec(6), scheduler=_sched(lr_scheduler.MultiStepLR,
                                                            milestones=[10, 20])),
    "cosine-warm-restarts": Pattern(_mlp, _vec(6), scheduler=_sched(
        lr_scheduler.CosineAnnealingWarmRestarts, T_0=10)),
    "warmup-then-cosine": Pattern(_mlp, _vec(6), scheduler=_warmup_then_cosine),
    "chained-schedulers": Pattern(_mlp, _vec(6), scheduler=_chained),
    "polynomial-lr": Pattern(_mlp, _vec(6), scheduler=_sched(lr_scheduler.PolynomialLR,
                                                             total_iters=STEPS)),
    "lambda-lr": Pattern(_mlp, _vec(6), scheduler=_sched(lr_scheduler.LambdaLR,
                                                         lr_lambda=lambda k: 1 / (1 + k / 20))),
    "one-cycle-lr": Pattern(_mlp, _vec(6), scheduler=_sched(
        lr_scheduler.OneCycleLR, max_lr=0.05, total_steps=STEPS, cycle_momentum=False)),
    "one-cycle-lr-with-momentum": Pattern(_mlp, _vec(6), scheduler=_sched(  # μ 0.85-0.95
        lr_scheduler.OneCycleLR, max_lr=0.005, total_steps=STEPS)),
    "cyclic-lr": Pattern(_mlp, _vec(6), scheduler=_sched(
        lr_scheduler.CyclicLR, base_lr=0.01, max_lr=0.05, step_size_up=5,
        cycle_momentum=False)),
    "reduce-on-plateau": Pattern(_mlp, _vec(6), loop="plateau"),
    "swa": Pattern(_mlp, _vec(6), loop="swa"),
    "zero-grad-to-zeros": Pattern(_mlp, _vec(6), loop="zeros"),
    "grad-norm-clipping": Pattern(_mlp, _vec(6), loop="clip"),
    "closure": Pattern(_mlp, _vec(6), loop="closure"),
}


def _teacher(p: Pattern, gen: torch.Generator, x: Tensor, model: nn.Module) -> Tensor:
    """Targets from a fixed random function of the input (learnable, not memorised)."""
    with torch.no_grad():
        out = model(x)
        out = out["logits"] if isinstance(out, dict) else out
    if p.likelihood == "gaussian":
        return out + 0.1 * torch.randn(out.shape, generator=gen)
    return torch.distributions.Categorical(logits=3 * out).sample()


def _batches(p: Pattern, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed + 1)
    teacher = p.model()
    teacher.eval()
    out = []
    for k in range(6):
        x = p.inputs(gen, p.batch_sizes[k % len(p.batch_sizes)])
        if p.loop == "channels-last":
            x = x.to(memory_format=torch.channels_last)
        out.append((x, _teacher(p, gen, x, teacher)))
    return out


def _loss(p: Pattern, out: Any, y: Tensor) -> Tensor:
    out = out["logits"] if isinstance(out, dict) else out
    if p.likelihood == "gaussian":
        return 0.5 * F.mse_loss(out, y, reduction="none").sum(-1).mean()
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def _cycle(batches: list[tuple[Tensor, Tensor]]) -> Iterator[tuple[Tensor, Tensor]]:
    for k in range(STEPS):
        yield batches[k % len(batches)]


def _train(p: Pattern, rule: str) -> list[float]:
    torch.manual_seed(0)
    model = p.model()
    batches = _batches(p)
    opt = kldwrm.make_optimizer(rule, model, lr=0.02, update_freq=5, likelihood=p.likelihood,
                                output=p.output, **RULES[rule], **p.options)
    sched = p.scheduler(opt) if p.scheduler else None
    plateau = lr_scheduler.ReduceLROnPlateau(opt, patience=2) if p.loop == "plateau" else None
    swa = swa_utils.AveragedModel(model) if p.loop == "swa" else None
    swa_sched = swa_utils.SWALR(opt, swa_lr=0.01, anneal_epochs=3) if swa else None
    losses = []
    for k, (x, y) in enumerate(_cycle(batches)):
        if p.loop == "closure":
            def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
                opt.zero_grad()
                loss = _loss(p, model(x), y)
                loss.backward()
                return loss
            losses.append(float(opt.step(closure)))
        else:
            opt.zero_grad(set_to_none=p.loop != "zeros")
            loss = _loss(p, model(x), y)
            loss.backward()
            if p.loop == "clip":
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(float(loss))
        for s in (sched, swa_sched):
            if s is not None:
                s.step()
        if plateau is not None:
            plateau.step(losses[-1])
        if swa is not None and k >= STEPS // 2:
            swa.update_parameters(model)
    if swa is not None:
        swa_utils.update_bn([(x,) for x, _ in batches], swa)
        with torch.no_grad():
            assert all(torch.isfinite(t).all() for t in swa.parameters())
            assert torch.isfinite(_loss(p, swa(batches[0][0]), batches[0][1]))
    assert all(torch.isfinite(t).all() for t in model.parameters())
    return losses


def test_the_probe_has_at_least_25_patterns():
    assert len(PATTERNS) >= 25


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("name", list(PATTERNS))
def test_pattern_trains(name, rule):
    losses = _train(PATTERNS[name], rule)
    assert all(map(torch.isfinite, torch.tensor(losses)))
    first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6  # one pass over the batches
    assert last < first, f"{name}/{rule}: loss {first:.4f} -> {last:.4f}"
