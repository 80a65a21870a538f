"""The committed ``docs/lm_benchmark.md`` is exactly the render of the stored LM runs."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.lm import PAGE_RUNS, page

REPO = Path(__file__).resolve().parents[2]


def test_committed_page_is_the_render_of_the_stored_runs(monkeypatch):
    monkeypatch.chdir(REPO)  # the page names the files as the command line does
    groups = [(Path(p), json.loads(Path(p).read_text())) for p in PAGE_RUNS]
    assert (REPO / "docs" / "lm_benchmark.md").read_text() == page(groups), (
        "docs/lm_benchmark.md is stale: see benchmarks/lm.py's docstring to render it")
