"""A quick step-time check of several optimizers, measured in one process, interleaved.

``kldwrm compare`` trains its runs in parallel workers that share the CPUs, so the
per-epoch step times in their metrics say more about what else was running than about
the optimizers. After the sweep, this module times every compared optimizer again in the
calling process, on one fixed batch of the compared model and batch size:

- a warm-up of ``warmup_steps`` steps per method (lazy allocations, the first curvature
  refresh, QE's window filling up: its first steps are Q steps), the slower of whose last
  two steps estimates each method's step time;
- then ``rounds`` rounds (fewer, but at least ``min_rounds``, once ``time_limit_s`` has
  passed); in each round every method takes ``steps[m]`` consecutive steps,
  enough to fill about ``budget_s`` seconds but at most ``max_steps`` (30 = one curvature
  refresh period at the paper's ``update_freq``, so a cheap method's round holds exactly
  one refresh), and the order of the methods rotates from round to round, so drift and
  other processes' load hit every method alike;
- per method the median over rounds of the mean step time of a round, and the median over
  rounds of the ratio to the baseline's (SGD's) step time in the same round.

It is a quick check (seconds, a few dozen steps per method); the full benchmark, with
interquartile ranges, several workloads and stored runs, is ``python -m benchmarks.run``
(``docs/benchmarks.md``). The scheduling and statistics take a ``clock`` and plain step
functions, so they are tested without timing anything.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data.models import build_model as _build_model
from ..training.train import TrainConfig, get_optimizer_factory

__all__ = [
    "StepTime",
    "format_step_times",
    "interleaved_step_times",
    "optimizer_step_functions",
    "rotation",
    "run_rounds",
    "steps_per_round",
    "summarise",
    "time_configs",
]

Clock = Callable[[], float]
StepFn = Callable[[], None]


@dataclass(frozen=True)
class StepTime:
    """The measured step time of one method."""

    name: str
    #: median over rounds of the round's mean step time, in milliseconds
    ms: float
    #: median over rounds of the per-round ratio to the baseline's step time
    ratio: float
    #: consecutive steps per round
    steps: int
    rounds: int


def rotation(names: Sequence[str], round_index: int) -> list[str]:
    """The order of the methods in round ``round_index``: ``names`` rotated by it."""
    k = len(names)
    return [names[(round_index + i) % k] for i in range(k)]


def steps_per_round(estimate_s: float, budget_s: float, max_steps: int) -> int:
    """Steps that fill about ``budget_s`` at ``estimate_s`` each, in ``[1, max_steps]``."""
    if not estimate_s > 0:
        return max_steps
    fits = math.floor(budget_s / estimate_s * (1 + 1e-9))  # 0.6 / 0.1 fits 6, not 5.999...
    return max(1, min(max_steps, fits))


def run_rounds(
    step_fns: Mapping[str, StepFn],
    steps: Mapping[str, int],
    rounds: int,
    clock: Clock = time.perf_counter,
    *,
    min_rounds: int = 1,
    deadline: float = math.inf,
) -> dict[str, list[float]]:
    """Per method, the mean step time (seconds) of each rotating round.

    Runs ``rounds`` rounds, or fewer (but at least ``min_rounds``) when ``clock()`` has
    passed ``deadline`` at the start of a round.
    """
    names = list(step_fns)
    per_round: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        if r >= min_rounds and clock() >= deadline:
            break
        for name in rotation(names, r):
            fn, k = step_fns[name], steps[name]
            t0 = clock()
            for _ in range(k):
                fn()
            per_round[name].append((clock() - t0) / k)
    return per_round


def summarise(
    per_round: Mapping[str, Sequence[float]],
    steps: Mapping[str, int],
    baseline: str,
) -> list[StepTime]:
    """Medians over rounds of each method's step time and of its ratio to ``baseline``."""
    base = per_round[baseline]
    out = []
    for name, times in per_round.items():
        ratios = [t / b for t, b in zip(times, base, strict=True)]
        out.append(
            StepTime(
                name,
                1000.0 * statistics.median(times),
                statistics.median(ratios),
                steps[name],
                len(times),
            )
        )
    return out


def interleaved_step_times(
    step_fns: Mapping[str, StepFn],
    *,
    baseline: str = "sgd",
    rounds: int = 4,
    min_rounds: int = 2,
    warmup_steps: int = 4,
    budget_s: float = 0.6,
    max_steps: int = 30,
    time_limit_s: float = 25.0,
    clock: Clock = time.perf_counter,
) -> list[StepTime]:
    """Warm up, size the rounds, run them interleaved and summarise (see the module doc).

    ``step_fns`` maps method names to functions taking one training step; ``baseline``
    must be one of them. Rounds after the first ``min_rounds`` are skipped once
    ``time_limit_s`` (counted from the start of the warm-up) has passed, which bounds the
    check on a busy machine.
    """
    if baseline not in step_fns:
        raise ValueError(f"baseline {baseline!r} is not among the timed methods")
    deadline = clock() + time_limit_s
    steps: dict[str, int] = {}
    for name, fn in step_fns.items():
        last: list[float] = []
        for _ in range(warmup_steps):
            t0 = clock()
            fn()
            last.append(clock() - t0)
        estimate = max(last[-2:], default=0.0)  # the slower: QE's first steps are Q steps
        steps[name] = steps_per_round(estimate, budget_s, max_steps)
    per_round = run_rounds(
        step_fns, steps, rounds, clock, min_rounds=min_rounds, deadline=deadline
    )
    return summarise(per_round, steps, baseline)


def optimizer_step_functions(
    optimizers: Mapping[str, tuple[str, Mapping[str, object]]],
    build_model: Callable[[], nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    make_optimizer: Callable[..., torch.optim.Optimizer],
    seed: int = 0,
) -> dict[str, StepFn]:
    """One training-step function per entry of ``optimizers`` (label → (name, kwargs)).

    Every method gets its own copy of the model (the same initial weights) and trains it on
    the same fixed batch ``(x, y)``; on CUDA each step ends with a synchronisation.
    """
    torch.manual_seed(seed)
    initial = build_model().to(x.device).state_dict()
    fns: dict[str, StepFn] = {}
    for label, (name, kwargs) in optimizers.items():
        model = build_model().to(x.device)
        model.load_state_dict(initial)
        model.train()
        opt = make_optimizer(name, model, **kwargs)
        fns[label] = _step_function(model, opt, x, y, loss_fn)
    return fns


def _step_function(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> StepFn:
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)

    return step


def time_configs(
    configs: Mapping[str, TrainConfig],
    x: torch.Tensor,
    y: torch.Tensor,
    task: str = "classification",
    *,
    baseline: str = "sgd",
    threads: int | None = None,
    rounds: int = 4,
    budget_s: float = 0.6,
) -> list[StepTime]:
    """:func:`interleaved_step_times` of the optimizers of ``configs`` (label → run
    configuration: model, model and optimizer settings, seed) on the batch ``(x, y)``.

    ``threads`` sets torch's thread count for the measurement (restored afterwards).
    """
    first = next(iter(configs.values()))
    loss_fn = F.cross_entropy if task == "classification" else F.mse_loss
    fns = optimizer_step_functions(
        {label: (c.optimizer, c.optimizer_kwargs) for label, c in configs.items()},
        lambda: _build_model(first.model, **first.model_kwargs),
        x,
        y,
        loss_fn,
        get_optimizer_factory(),
        seed=first.seed,
    )
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return interleaved_step_times(fns, baseline=baseline, rounds=rounds, budget_s=budget_s)
    finally:
        torch.set_num_threads(before)


def format_step_times(
    times: Sequence[StepTime], *, threads: int, what: str, baseline: str = "sgd"
) -> str:
    """A small Markdown table of :func:`interleaved_step_times`, with its caveats."""
    lines = [
        f"Step time, quick check: one process, {threads} thread(s), {what}; methods "
        f"interleaved in {times[0].rounds if times else 0} rotating rounds, median per method.",
        "",
        f"| optimizer | step (ms) | ratio to {baseline} | steps per round |",
        "|---|---|---|---|",
    ]
    for t in times:
        lines.append(f"| {t.name} | {t.ms:.1f} | {t.ratio:.2f}x | {t.steps} |")
    lines += [
        "",
        "A few dozen steps on a machine that may be busy: for step time and memory, use the "
        "full benchmark, `python -m benchmarks.run` (docs/benchmarks.md).",
    ]
    return "\n".join(lines)
