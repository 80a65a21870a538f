"""The step profiler: its phases profile the steps they say (refresh or not)."""

from __future__ import annotations

import re

from benchmarks import profile_step


def test_report_profiles_ordinary_and_refresh_steps_apart():
    text = profile_step.report("cnn", "kfac", update_freq=2, rows=40)
    sections = re.split(r"^### ", text, flags=re.M)[1:]
    assert [s.split("\n")[0] for s in sections] == [
        "ordinary steps", "the refresh step (3 of them)", "SGD"]
    ordinary, refresh, sgd = sections
    assert "| Optimizer.step#KFAC.step |" in ordinary and "#SGD.step" in sgd
    # only a refresh step decomposes its factors (eigh)
    assert "_linalg_eigh" in refresh and "_linalg_eigh" not in ordinary
    assert "1 steps" in ordinary and "3 steps" in refresh  # N_u 2: one ordinary step between
