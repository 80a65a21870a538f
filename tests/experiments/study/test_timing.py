"""The quick step-time check of ``kldwrm compare``: rotation, round sizes, medians, ratios.

The scheduling and statistics run on a fake clock that the fake step functions advance,
so every expected number is exact and nothing depends on this machine's speed.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kldwrm.experiments.study.timing import (
    StepTime,
    format_step_times,
    interleaved_step_times,
    optimizer_step_functions,
    rotation,
    run_rounds,
    steps_per_round,
    summarise,
    time_configs,
)
from kldwrm.experiments.training.train import TrainConfig, get_optimizer_factory


class FakeClock:
    """A clock that moves only when a fake step says so; logs which method stepped."""

    def __init__(self) -> None:
        self.now = 0.0
        self.calls: list[str] = []

    def __call__(self) -> float:
        return self.now

    def step_fn(self, name: str, cost: float):
        def step() -> None:
            self.calls.append(name)
            self.now += cost

        return step


def test_rotation_starts_each_round_one_method_later():
    names = ["sgd", "kfac", "qe"]
    assert rotation(names, 0) == ["sgd", "kfac", "qe"]
    assert rotation(names, 1) == ["kfac", "qe", "sgd"]
    assert rotation(names, 2) == ["qe", "sgd", "kfac"]
    assert rotation(names, 3) == names


@pytest.mark.parametrize(
    ("estimate", "expected"),
    [(0.017, 30), (0.1, 6), (0.33, 1), (5.0, 1), (0.0, 30), (float("nan"), 30)],
)
def test_steps_per_round_fill_the_budget_within_bounds(estimate, expected):
    assert steps_per_round(estimate, budget_s=0.6, max_steps=30) == expected


def test_run_rounds_rotates_and_measures_the_mean_step_of_each_round():
    clock = FakeClock()
    drifts = [1.0, 2.0, 4.0]  # the machine slows down from round to round

    def step_fn(name: str, cost: float):
        def step() -> None:
            r = len(clock.calls) // 5  # 3 + 2 steps per round
            clock.calls.append(name)
            clock.now += cost * drifts[r]

        return step

    fns = {"a": step_fn("a", 0.01), "b": step_fn("b", 0.04)}
    per_round = run_rounds(fns, {"a": 3, "b": 2}, rounds=3, clock=clock)
    # blocks of consecutive steps, the order rotating from round to round
    assert clock.calls == (["a"] * 3 + ["b"] * 2) + (["b"] * 2 + ["a"] * 3) + (
        ["a"] * 3 + ["b"] * 2
    )
    assert per_round["a"] == pytest.approx([0.01, 0.02, 0.04])
    assert per_round["b"] == pytest.approx([0.04, 0.08, 0.16])


def test_run_rounds_stops_at_the_deadline_after_the_minimum_rounds():
    clock = FakeClock()
    fns = {"a": clock.step_fn("a", 1.0), "b": clock.step_fn("b", 1.0)}
    per_round = run_rounds(fns, {"a": 1, "b": 1}, rounds=10, clock=clock, min_rounds=2,
                           deadline=0.5)
    assert [len(v) for v in per_round.values()] == [2, 2]
    per_round = run_rounds(fns, {"a": 1, "b": 1}, rounds=10, clock=clock, min_rounds=2,
                           deadline=clock.now + 5.0)  # rounds 1-3 start before it
    assert [len(v) for v in per_round.values()] == [3, 3]


def test_summarise_takes_medians_and_per_round_ratios():
    per_round = {
        "sgd": [0.010, 0.020, 0.100],  # the third round ran on a busy machine
        "kfac": [0.011, 0.022, 0.110],
        "qe": [0.150, 0.300, 0.500],
    }
    out = summarise(per_round, {"sgd": 30, "kfac": 30, "qe": 2}, baseline="sgd")
    assert [t.name for t in out] == ["sgd", "kfac", "qe"]
    by = {t.name: t for t in out}
    assert by["sgd"] == StepTime("sgd", pytest.approx(20.0), 1.0, 30, 3)
    assert by["kfac"].ms == pytest.approx(22.0)
    assert by["kfac"].ratio == pytest.approx(1.1)  # the same in every round
    assert by["qe"].ms == pytest.approx(300.0)
    assert by["qe"].ratio == pytest.approx(15.0)  # median of 15, 15 and 5
    assert by["qe"].steps == 2 and by["qe"].rounds == 3


def test_interleaved_step_times_on_a_fake_clock():
    clock = FakeClock()
    fns = {
        "sgd": clock.step_fn("sgd", 0.02),
        "kfac": clock.step_fn("kfac", 0.025),
        "qe": clock.step_fn("qe", 0.3),
    }
    out = interleaved_step_times(
        fns, rounds=3, warmup_steps=4, budget_s=0.6, max_steps=30, clock=clock
    )
    by = {t.name: t for t in out}
    # warm-up: 4 steps each in the given order; then 3 rotating rounds of 30, 24 and 2 steps
    assert clock.calls[:12] == ["sgd"] * 4 + ["kfac"] * 4 + ["qe"] * 4
    assert [by[n].steps for n in fns] == [30, 24, 2]
    assert len(clock.calls) == 12 + 3 * (30 + 24 + 2)
    assert by["sgd"].ms == pytest.approx(20.0) and by["sgd"].ratio == 1.0
    assert by["kfac"].ratio == pytest.approx(1.25) and by["qe"].ratio == pytest.approx(15.0)
    assert all(t.rounds == 3 for t in out)


def test_rounds_are_sized_by_the_slower_of_the_last_warm_up_steps():
    clock = FakeClock()
    qe_calls = []

    def qe() -> None:  # QE takes cheap Q steps until its window of 4 iterates is full
        qe_calls.append(1)
        clock.now += 0.02 if len(qe_calls) <= 3 else 0.3

    fns = {"sgd": clock.step_fn("sgd", 0.02), "qe": qe}
    out = interleaved_step_times(fns, rounds=2, warmup_steps=4, budget_s=0.6, clock=clock)
    assert [t.steps for t in out] == [30, 2]
    assert out[1].ratio == pytest.approx(15.0)


def test_interleaved_step_times_keeps_to_its_time_limit():
    clock = FakeClock()
    fns = {"sgd": clock.step_fn("sgd", 1.0), "qe": clock.step_fn("qe", 10.0)}
    out = interleaved_step_times(fns, rounds=10, min_rounds=2, warmup_steps=2,
                                 time_limit_s=30.0, clock=clock)
    assert all(t.rounds == 2 for t in out)  # the warm-up alone took 22 of the 30 s


def test_interleaved_step_times_needs_its_baseline():
    with pytest.raises(ValueError, match="baseline"):
        interleaved_step_times({"kfac": lambda: None}, baseline="sgd")


def test_format_step_times_says_what_it_is():
    times = [StepTime("sgd", 17.2, 1.0, 30, 4), StepTime("qe", 331.5, 15.04, 1, 4)]
    text = format_step_times(times, threads=2, what="paper-cnn, batch 512")
    assert "quick check" in text and "2 thread(s)" in text and "4 rotating rounds" in text
    assert "| sgd | 17.2 | 1.00x | 30 |" in text
    assert "| qe | 331.5 | 15.04x | 1 |" in text
    assert "python -m benchmarks.run" in text and "docs/benchmarks.md" in text


def test_each_step_function_trains_its_own_copy_of_the_model():
    built: list[nn.Module] = []

    def build() -> nn.Module:
        built.append(nn.Linear(4, 3))
        return built[-1]

    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    fns = optimizer_step_functions(
        {"sgd": ("sgd", {"lr": 0.1}), "adam": ("adam", {"lr": 0.1})},
        build, x, y, nn.functional.cross_entropy, get_optimizer_factory(),
    )
    _, sgd_model, adam_model = built  # the first one only provided the initial weights
    assert torch.equal(sgd_model.weight, adam_model.weight)
    before = adam_model.weight.detach().clone()
    fns["sgd"]()
    assert not torch.equal(sgd_model.weight, before)
    assert torch.equal(adam_model.weight, before)


def test_time_configs_times_real_optimizers_and_restores_the_threads():
    cfg = TrainConfig(model="mlp", model_kwargs={"sizes": [4, 3]}, optimizer="sgd",
                      optimizer_kwargs={"lr": 0.1})
    configs = {"sgd": cfg, "kfac": TrainConfig(**{**cfg.to_dict(), "optimizer": "kfac",
                                                  "optimizer_kwargs": {"lr": 0.01}})}
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    threads = torch.get_num_threads()
    out = time_configs(configs, x, y, threads=1, rounds=2, budget_s=0.001)
    assert torch.get_num_threads() == threads
    assert [t.name for t in out] == ["sgd", "kfac"]
    assert out[0].ratio == 1.0 and all(t.ms > 0 and t.rounds == 2 for t in out)
