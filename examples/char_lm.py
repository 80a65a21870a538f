"""Character-level transformer language model: SGD, Adam, K-FAC, SO, Q and QE side by side.

What it shows
-------------
The KLD-WRM optimizers (and EA-K-FAC) train a sequence model with the ordinary loop, with
nothing model-specific: the model returns ``(batch, time, vocab)`` logits, the loss is the
mean cross-entropy over every position, and the optimizers treat each of the batch·time
positions as one example of the Fisher (the MC labels are sampled per position). The
network is a small causal transformer (token + position embeddings, 2 pre-LayerNorm blocks
of masked multi-head self-attention and a GELU MLP, final LayerNorm, linear read-out).
Attention is written with plain ``nn.Linear`` query/key/value/output projections, so every
``nn.Linear`` (the four projections, the two MLP layers and the read-out) gets a Kronecker
block; the embeddings and LayerNorms get diagonal blocks.

It trains on the Book of Genesis (King James Version, ``examples/data/genesis_kjv.txt``, see
``examples/data/README.md``): the first 90% of the characters for training, the last 10%
for validation. Every optimizer starts from the same initialisation and sees the same
sequence of batches (a seeded sampler draws the window starts once). The script prints the
training and validation loss (nats per character, and bits per character) every
``--eval-every`` steps and a table at the end, and writes to ``--out``:

* ``curves.csv``: one row per optimizer and evaluation point (step, training seconds,
  loss and bits per character on fixed training and validation windows);
* ``train_loss.csv``: the training-batch loss of every step;
* ``val_loss.png``: validation loss against steps and against wall-clock seconds.

Seconds are training time only (batch, forward, backward, step), evaluation excluded. The
curvature optimizers are seeded (``seed=--seed``), so a run is repeatable bit for bit on
one machine with one thread.

Usage::

    python examples/char_lm.py --steps 300 --out runs/char_lm
    python examples/char_lm.py --optimizers adam,q --steps 1000 --device cuda

Cost
----
The default run (300 steps of 32 windows of 64 characters; d_model 64, 4 heads, 2 blocks,
112k parameters; the six optimizers one after the other, one CPU thread) took 3.5 minutes
of wall clock on the 2-core development machine while other jobs kept the load average at
4-5, and 5.4 minutes at a load average of 6.5 (0.5 GB of memory). Training time per step:
0.04-0.10 s for SGD, Adam, K-FAC, SO and Q, 0.37-0.57 s for QE, which alone takes half
of the run. ``--threads 1`` is the default because two threads on the two busy cores made
each step 5-15 times slower. The times in the printed table and the plot are training
only (evaluation excluded).

What it finds
-------------
With kldwrm's transformer preset (:data:`SETTINGS`, ``kldwrm.TRANSFORMER_SETTINGS``: K-FAC's
eigenbasis with Adam's metric measured in it every step, Kronecker blocks for the
embeddings, see the README), validation loss after 600 steps at seed 0 (the seed it was
tuned on), 1 and 2: AdamW (lr 3e-3) 1.607, 1.553, 1.532; SGD 2.159, 2.140, 2.115; K-FAC
1.397, 1.389, 1.389; SO 1.349, 1.356, 1.358; Q 1.425, 1.419, 1.418; SOAP's released code
1.367, 1.368, 1.373 (``python -m benchmarks.lm``, ``benchmarks/lm_peers.py``;
docs/lm_benchmark.md).

With kldwrm 0.2's settings (``--settings v0.2``, :data:`SETTINGS_V02`), validation loss
after 300 steps (nats per character; for scale, character n-gram models
counted on the training split, add-0.1 smoothed, score 3.04 (unigram), 2.28 (bigram) and
1.70 (trigram) on the validation split):
Adam 1.88, SGD 2.27, K-FAC 2.28, SO 2.31, Q 2.32, QE 2.33. Adam leaves the bigram-level
plateau (about 2.3) after about 125 steps; SGD and the four curvature optimizers stay on
it for the 300 steps, with every setting tried below. Longer runs leave it slowly (at 900
steps K-FAC reaches 2.07 and Q 2.22). A diagnostic run with Adam on the ``nn.Linear``
layers and K-FAC on the embeddings and LayerNorms reached 2.17 at step 300, one with K-FAC
on the ``nn.Linear`` layers and Adam on the rest 2.27: in this short budget the
Kronecker-preconditioned layers are what stays on the plateau. QE's curve lies on Q's
(see below), at five times the cost per step. This is a 300-step toy, not a verdict on
the methods.

Optimizer settings (kldwrm 0.2, ``--settings v0.2``)
----------------------------------------------------
``kldwrm.make_optimizer`` builds each optimizer with the paper's MNIST settings
(``kldwrm.PAPER_SETTINGS``), overridden by :data:`SETTINGS_V02` below, which spells out
everything that matters. Tuned lightly by hand on the default model and batches, by the
validation loss after 150 steps (in brackets):

* SGD (momentum 0.9): lr 0.03 (2.34), 0.1 (2.35), 0.3 (2.46), 1.0 (diverges): 0.1 kept,
  the MNIST default.
* Adam: lr 1e-3 (2.28), 3e-3 (2.20), 1e-2 (2.42): 3e-3 kept.
* K-FAC: the paper's lr 0.01 with damping 1e-2 is far too slow here (2.97). At lr 0.1:
  damping 1e-2 (2.89), 0.1 (2.33), 0.3 (2.39); lr 0.3 and 1.0 at damping 0.1 (2.35,
  2.40); ``kl_clip`` 1.0 instead of 0.1 (2.58; it sits at the unigram level, 3.05, for
  100 steps), 0.03 (2.33); ``update_freq`` 5 and 30 instead of 10 (2.37, 2.43); weight
  decay 1e-3 (2.33). Kept: lr 0.1, damping 0.1, ``kl_clip`` 0.1 (it is active for the
  first ~50 steps only), ``update_freq`` 10 (30 would leave 10 refreshes in 300 steps;
  10 costs little, the largest Kronecker factor being 257×257), weight decay 0 (as Adam).
  Ten more settings run for 300 steps (lr 0.03-1, damping 1e-3-0.3, ``kl_clip`` 0.01-0.1,
  ρ 0.5, ``update_freq`` 2) all ended between 2.25 and 2.36.
* SO, Q, QE: K-FAC's lr, damping, ``kl_clip`` and ``update_freq``, the paper's ρ for each
  rule (SO 0.33, Q and QE 0.5; K-FAC 0.95) and Q/QE's ``block_clip`` 2.0. lr 0.3 was worse
  for SO and Q (2.40, 2.39 against 2.34, 2.35).
* QE: one outer step costs a forward pass of the 4 stored iterates plus ``inner_steps``
  forward/backward passes at ``θ + s``, so ``inner_steps`` is 3 (paper: 10). ``inner_lr``
  is the paper's absolute ω/λ = 7e-4; with it and 3 inner steps the inner loop changes the
  Q step only slightly (QE 2.36 against Q 2.35 at step 150; ``inner_lr`` 1e-2: 2.36).
  ``window`` 4 and ``kl_weight`` 1/330 are the paper's.
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kldwrm

#: the text the example ships (public domain; see examples/data/README.md)
DEFAULT_TEXT = Path(__file__).resolve().parent / "data" / "genesis_kjv.txt"

#: the optimizers, in the order they run and are reported
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "kfac", "so", "q", "qe")

#: the settings each optimizer runs with: kldwrm's transformer preset
#: (``kldwrm.TRANSFORMER_SETTINGS``), so every entry builds with
#: ``kldwrm.make_optimizer(name, model, **SETTINGS[name])``
SETTINGS: dict[str, dict[str, Any]] = {
    name: dict(kldwrm.TRANSFORMER_SETTINGS[name]) for name in OPTIMIZERS
}

#: kldwrm 0.2's settings for this example (K-FAC eigenvalues, no momentum; see "Optimizer
#: settings" in the module docstring), kept to re-run the earlier figures (``--settings v0.2``)
SETTINGS_V02: dict[str, dict[str, Any]] = {
    "sgd": dict(lr=0.1, momentum=0.9, weight_decay=0.0),
    "adam": dict(lr=3e-3, weight_decay=0.0),
    "kfac": dict(lr=0.1, rho=0.95, damping=1e-1, weight_decay=0.0, kl_clip=0.1,
                 update_freq=10),
    "so": dict(lr=0.1, rho=0.33, damping=1e-1, weight_decay=0.0, kl_clip=0.1,
               update_freq=10),
    "q": dict(lr=0.1, rho=0.5, damping=1e-1, weight_decay=0.0, kl_clip=0.1,
              update_freq=10, block_clip=2.0),
    "qe": dict(lr=0.1, rho=0.5, damping=1e-1, weight_decay=0.0, kl_clip=0.1,
               update_freq=10, block_clip=2.0, window=4, inner_steps=3, inner_lr=7e-4,
               kl_weight=1.0 / 330),
}

#: legend names
LABELS = {"sgd": "SGD", "adam": "Adam", "kfac": "K-FAC", "so": "SO", "q": "Q", "qe": "QE"}

LN2 = math.log(2.0)


# -- data --------------------------------------------------------------------------------------
def load_text(path: str | Path = DEFAULT_TEXT) -> str:
    """The text at ``path`` (UTF-8)."""
    return Path(path).read_text(encoding="utf-8")


@dataclass(frozen=True)
class Vocab:
    """Characters of a text, sorted; ids are positions in :attr:`chars`."""

    chars: str

    @classmethod
    def from_text(cls, text: str) -> Vocab:
        """The vocabulary of every distinct character in ``text``."""
        return cls("".join(sorted(set(text))))

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> Tensor:
        """Character ids of ``text`` as a 1-D ``int64`` tensor."""
        index = {c: i for i, c in enumerate(self.chars)}
        return torch.tensor([index[c] for c in text], dtype=torch.long)

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        """The text of a sequence of ids."""
        return "".join(self.chars[int(i)] for i in ids)


def split_tokens(tokens: Tensor, val_fraction: float = 0.1) -> tuple[Tensor, Tensor]:
    """The first ``1 - val_fraction`` of the ids for training, the rest for validation."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    n_train = int(len(tokens) * (1.0 - val_fraction))
    return tokens[:n_train], tokens[n_train:]


def batch_starts(n_tokens: int, context: int, batch_size: int, steps: int,
                 seed: int) -> Tensor:
    """Window starts of every training batch, shape ``(steps, batch_size)``.

    Drawn uniformly (with replacement) from a generator seeded with ``seed``, once, so
    every optimizer sees the same batches in the same order.
    """
    high = n_tokens - context  # a window needs context + 1 ids (inputs and shifted targets)
    if high <= 0:
        raise ValueError(f"the training text ({n_tokens} ids) is shorter than context + 1")
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, (steps, batch_size), generator=gen)


def get_batch(tokens: Tensor, starts: Tensor, context: int) -> tuple[Tensor, Tensor]:
    """Inputs and next-character targets of the windows at ``starts``, each ``(B, context)``."""
    idx = starts[:, None] + torch.arange(context + 1, device=starts.device)
    chunk = tokens[idx]
    return chunk[:, :-1], chunk[:, 1:]


def eval_windows(tokens: Tensor, context: int, max_windows: int) -> tuple[Tensor, Tensor]:
    """Up to ``max_windows`` non-overlapping windows spread evenly over ``tokens``."""
    n = (len(tokens) - 1) // context
    if n < 1:
        raise ValueError(f"the text ({len(tokens)} ids) is shorter than context + 1")
    picks = torch.linspace(0, n - 1, min(n, max_windows)).round().long()
    return get_batch(tokens, picks * context, context)


# -- model -------------------------------------------------------------------------------------
class CausalSelfAttention(nn.Module):
    """Masked multi-head self-attention with ``nn.Linear`` projections (Kronecker blocks)."""

    def __init__(self, d_model: int, n_heads: int, context: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of n_heads ({n_heads})")
        self.n_heads = n_heads
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)
        mask = torch.ones(context, context, dtype=torch.bool).tril()
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        h = self.n_heads

        def heads(z: Tensor) -> Tensor:  # (B, T, D) -> (B, H, T, D/H)
            return z.view(b, t, h, d // h).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        att = (q @ k.transpose(-2, -1)) * (d // h) ** -0.5
        att = att.masked_fill(~self.mask[:t, :t], float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        return self.out(y)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, d_model: int, n_heads: int, context: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, context)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, mlp_ratio * d_model)
        self.fc2 = nn.Linear(mlp_ratio * d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class CharTransformer(nn.Module):
    """Causal character language model returning ``(batch, time, vocab)`` logits.

    The read-out is not tied to the token embedding: a tensor shared by an ``nn.Embedding``
    and an ``nn.Linear`` would sit in two curvature blocks.
    """

    def __init__(self, vocab_size: int, d_model: int = 64, n_heads: int = 4,
                 n_layers: int = 2, context: int = 64) -> None:
        super().__init__()
        self.context = context
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(
            [Block(d_model, n_heads, context) for _ in range(n_layers)]
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        self.register_buffer("positions", torch.arange(context), persistent=False)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[-1]
        if t > self.context:
            raise ValueError(f"sequence length {t} exceeds the context {self.context}")
        x = self.tok_emb(idx) + self.pos_emb(self.positions[:t])
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def build_model(vocab_size: int, *, d_model: int = 64, n_heads: int = 4, n_layers: int = 2,
                context: int = 64, seed: int = 0) -> CharTransformer:
    """A :class:`CharTransformer` with GPT-style initialisation drawn from ``seed``.

    Linear and embedding weights ~ N(0, 0.02²), biases 0, LayerNorm (1, 0); the output
    projection of each residual branch (``attn.out``, ``fc2``) is scaled by
    ``1/sqrt(2·n_layers)``.
    """
    gen = torch.Generator().manual_seed(seed)
    model = CharTransformer(vocab_size, d_model, n_heads, n_layers, context)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = 0.02
                if name.endswith(("attn.out", "fc2")):
                    std /= math.sqrt(2 * n_layers)
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.zero_()
    return model


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over every position (nats per character)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 64) -> float:
    """Mean loss of ``model`` over the windows ``(x, y)``, in eval mode."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True):
        total += float(lm_loss(model(xb), yb)) * yb.numel()
        count += yb.numel()
    model.train(was_training)
    return total / count


@torch.no_grad()
def generate(model: CharTransformer, vocab: Vocab, prompt: str, length: int) -> str:
    """Greedy continuation of ``prompt`` by ``length`` characters."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = vocab.encode(prompt).to(device)[None]
    for _ in range(length):
        logits = model(ids[:, -model.context:])
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    model.train(was_training)
    return vocab.decode(ids[0, len(prompt):].tolist())


# -- training ----------------------------------------------------------------------------------
#: the settings ``--settings`` chooses from
SETTING_SETS = {"transformer": SETTINGS, "v0.2": SETTINGS_V02}


def optimizer_settings(name: str, seed: int = 0, settings: str = "transformer"
                       ) -> dict[str, Any]:
    """Keyword arguments for ``kldwrm.make_optimizer(name, ...)``: :data:`SETTINGS` (or
    :data:`SETTINGS_V02` with ``settings="v0.2"``), plus the seed of the Fisher's label
    sampling for the curvature optimizers."""
    if name not in SETTINGS:
        raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    kw = dict(SETTING_SETS[settings][name])
    if name not in ("sgd", "adam"):
        kw["seed"] = seed
    return kw


@dataclass
class RunResult:
    """Curves of one optimizer's run."""

    name: str
    #: training-batch loss of every step (before that step's update)
    train_loss: list[float] = field(default_factory=list)
    #: evaluation points: (step, training seconds, train-window loss, validation loss)
    evals: list[tuple[int, float, float, float]] = field(default_factory=list)
    seconds: float = 0.0
    skipped_steps: int = 0

    @property
    def final(self) -> tuple[int, float, float, float]:
        """The last evaluation point."""
        return self.evals[-1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_one(
    name: str,
    model: nn.Module,
    train_tokens: Tensor,
    starts: Tensor,
    context: int,
    train_eval: tuple[Tensor, Tensor],
    val_eval: tuple[Tensor, Tensor],
    *,
    eval_every: int = 25,
    seed: int = 0,
    settings: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = print,
) -> RunResult:
    """Train ``model`` in place with optimizer ``name`` on the batches at ``starts``.

    The loop is the ordinary one: ``zero_grad``, forward, mean cross-entropy, ``backward``,
    ``step``. The model is evaluated (on the fixed windows ``train_eval`` and ``val_eval``)
    before the first step, every ``eval_every`` steps and after the last one.

    Args:
        settings: keyword arguments for ``kldwrm.make_optimizer`` (default
            :func:`optimizer_settings`).
        log: called with one progress line per evaluation (``None``: silent).
    """
    device = next(model.parameters()).device
    kw = optimizer_settings(name, seed) if settings is None else settings
    opt = kldwrm.make_optimizer(name, model, **kw)
    result = RunResult(name)
    steps = len(starts)
    engine = getattr(opt, "engine", None)
    if engine is not None and log is not None:
        kinds = [type(b).__name__ for b in engine.blocks]
        log(f"[{name:>4}] curvature blocks: "
            + ", ".join(f"{kinds.count(k)} {k}" for k in sorted(set(kinds))))

    def record(step: int) -> None:
        tr = evaluate(model, *train_eval)
        va = evaluate(model, *val_eval)
        result.evals.append((step, result.seconds, tr, va))
        if log is not None:
            log(f"[{name:>4}] step {step:4d}/{steps}  train {tr:.3f}  val {va:.3f} "
                f"({va / LN2:.2f} bpc)  {result.seconds:6.1f} s")

    model.train()
    record(0)
    for k in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        x, y = get_batch(train_tokens, starts[k], context)
        opt.zero_grad()
        loss = lm_loss(model(x), y)
        loss.backward()
        opt.step()
        _sync(device)
        result.seconds += time.perf_counter() - t0
        result.train_loss.append(loss.item())
        if (k + 1) % eval_every == 0 or k + 1 == steps:
            record(k + 1)
    result.skipped_steps = int(getattr(opt, "skipped_steps", 0))
    return result


# -- output ------------------------------------------------------------------------------------
def write_csv(results: dict[str, RunResult], out: Path) -> tuple[Path, Path]:
    """Write ``curves.csv`` (evaluation points) and ``train_loss.csv`` (every step)."""
    curves, steps = out / "curves.csv", out / "train_loss.csv"
    with curves.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["optimizer", "step", "seconds", "train_loss", "train_bpc", "val_loss",
                    "val_bpc"])
        for r in results.values():
            for step, sec, tr, va in r.evals:
                w.writerow([r.name, step, f"{sec:.3f}", f"{tr:.5f}", f"{tr / LN2:.5f}",
                            f"{va:.5f}", f"{va / LN2:.5f}"])
    with steps.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["optimizer", "step", "batch_loss"])
        for r in results.values():
            for k, loss in enumerate(r.train_loss):
                w.writerow([r.name, k, f"{loss:.5f}"])
    return curves, steps


def plot(results: dict[str, RunResult], path: Path, title: str = "") -> Path:
    """Validation loss against steps and against training seconds (matplotlib, Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    by_step, by_time = fig.subplots(1, 2, sharey=True)
    for r in results.values():
        steps = [e[0] for e in r.evals]
        secs = [e[1] for e in r.evals]
        val = [e[3] for e in r.evals]
        label = LABELS.get(r.name, r.name)
        by_step.plot(steps, val, marker=".", label=label)
        by_time.plot(secs, val, marker=".", label=label)
    by_step.set_xlabel("step")
    by_time.set_xlabel("training time (s)")
    by_step.set_ylabel("validation loss (nats per character)")
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
    by_step.legend()
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=110)
    return path


def format_table(results: dict[str, RunResult]) -> str:
    """Markdown table of the final losses (nats and bits per character) and times."""
    lines = [
        "| optimizer | train loss | train bpc | val loss | val bpc | s/step | total s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results.values():
        step, sec, tr, va = r.final
        per = sec / max(step, 1)
        lines.append(f"| {r.name} | {tr:.3f} | {tr / LN2:.3f} | {va:.3f} | {va / LN2:.3f} | "
                     f"{per:.3f} | {sec:.1f} |")
    return "\n".join(lines)


# -- command line ------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command-line arguments (see ``--help``)."""
    p = argparse.ArgumentParser(
        description="Train a character-level transformer on Genesis (KJV) with SGD, Adam, "
                    "K-FAC, SO, Q and QE from the same initialisation and batches.",
    )
    p.add_argument("--steps", type=int, default=300, help="training steps per optimizer")
    p.add_argument("--batch-size", type=int, default=32, help="windows per batch")
    p.add_argument("--context", type=int, default=64, help="characters per window")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                   help="comma-separated subset of " + ",".join(OPTIMIZERS))
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the initialisation, the batches and the Fisher sampling")
    p.add_argument("--out", type=Path, default=Path("runs/char_lm"),
                   help="directory for curves.csv, train_loss.csv and val_loss.png")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="where to train (default cpu)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: fastest for this small model on a "
                        "busy 2-core machine; 0 keeps torch's own choice)")
    p.add_argument("--d-model", type=int, default=64, help="model width")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--layers", type=int, default=2, help="transformer blocks")
    p.add_argument("--eval-every", type=int, default=25, help="steps between evaluations")
    p.add_argument("--eval-windows", type=int, default=128,
                   help="windows of the training and of the validation text evaluated")
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="UTF-8 text to train on")
    p.add_argument("--settings", default="transformer", choices=tuple(SETTING_SETS),
                   help="optimizer settings: kldwrm's transformer preset (default) or "
                        "kldwrm 0.2's (the earlier figures)")
    p.add_argument("--sample", type=int, default=80,
                   help="characters of greedy text printed per optimizer at the end (0: none)")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    bad = [n for n in names if n not in OPTIMIZERS]
    if bad or not names:
        p.error(f"--optimizers: unknown {bad or 'empty list'}; choose from "
                f"{','.join(OPTIMIZERS)}")
    args.optimizers = names
    for opt in ("steps", "batch_size", "context", "eval_every", "eval_windows"):
        if getattr(args, opt) < 1:
            p.error(f"--{opt.replace('_', '-')} must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, RunResult]:
    """Run the comparison; returns each optimizer's :class:`RunResult`."""
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    text = load_text(args.text)
    vocab = Vocab.from_text(text)
    train_tokens, val_tokens = split_tokens(vocab.encode(text))
    starts = batch_starts(len(train_tokens), args.context, args.batch_size, args.steps,
                          args.seed)
    train_tokens, val_tokens, starts = (t.to(device) for t in (train_tokens, val_tokens,
                                                                starts))
    train_eval = eval_windows(train_tokens, args.context, args.eval_windows)
    val_eval = eval_windows(val_tokens, args.context, args.eval_windows)
    init = build_model(len(vocab), d_model=args.d_model, n_heads=args.heads,
                       n_layers=args.layers, context=args.context, seed=args.seed)
    init_state = {k: v.clone() for k, v in init.state_dict().items()}
    n_params = sum(p.numel() for p in init.parameters())
    print(f"text {args.text.name}: {len(text)} characters, vocabulary {len(vocab)}; "
          f"train {len(train_tokens)}, validation {len(val_tokens)}")
    print(f"model: {n_params} parameters (d_model {args.d_model}, {args.heads} heads, "
          f"{args.layers} blocks, context {args.context}); {args.steps} steps of "
          f"{args.batch_size} windows; threads {torch.get_num_threads()}")
    print(f"uniform prediction: {math.log(len(vocab)):.3f} nats "
          f"({math.log2(len(vocab)):.2f} bits) per character")

    results: dict[str, RunResult] = {}
    models: dict[str, CharTransformer] = {}
    for name in args.optimizers:
        model = build_model(len(vocab), d_model=args.d_model, n_heads=args.heads,
                            n_layers=args.layers, context=args.context, seed=args.seed)
        model.load_state_dict(init_state)
        model.to(device)
        torch.manual_seed(args.seed)
        kw = optimizer_settings(name, args.seed, args.settings)
        print(f"-- {name}: {kw}")
        results[name] = train_one(name, model, train_tokens, starts, args.context,
                                  train_eval, val_eval, eval_every=args.eval_every,
                                  seed=args.seed, settings=kw)
        if results[name].skipped_steps:
            print(f"   ({results[name].skipped_steps} steps skipped: non-finite gradients)")
        models[name] = model

    args.out.mkdir(parents=True, exist_ok=True)
    curves, per_step = write_csv(results, args.out)
    png = plot(results, args.out / "val_loss.png",
               title=f"char-LM on {args.text.stem}: {n_params} parameters, batch "
                     f"{args.batch_size}×{args.context}")
    print(f"\nafter {args.steps} steps (losses in nats per character on "
          f"{len(train_eval[0])} fixed windows of each split):\n")
    print(format_table(results))
    if args.sample > 0:
        prompt = "And God said"
        if not set(prompt) <= set(vocab.chars):  # another --text
            prompt = text[:12]
        print(f"\ngreedy continuations of {prompt!r}:")
        for name, model in models.items():
            sample = generate(model, vocab, prompt, args.sample).replace("\n", " / ")
            print(f"  {name:>4}: {sample}")
    print(f"\nwrote {curves}, {per_step}, {png}")
    return results


if __name__ == "__main__":
    main()
