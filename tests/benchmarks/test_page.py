"""The benchmark store and page: rows replace rows by key, merged runs are renumbered, and
the committed ``docs/benchmarks.md`` is exactly the render of ``docs/benchmarks.json``."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.page import render
from benchmarks.store import load_store, merge, merge_store

REPO = Path(__file__).resolve().parents[2]


def test_committed_page_is_the_render_of_the_committed_store(tmp_path):
    out = tmp_path / "benchmarks.md"
    render(load_store(REPO / "docs" / "benchmarks.json"), out)
    assert out.read_text() == (REPO / "docs" / "benchmarks.md").read_text(), (
        "docs/benchmarks.md is stale: python -m benchmarks.run --render-only")


def test_merge_replaces_only_rows_with_the_same_key():
    old = [{"method": "sgd", "dataset": "mnist", "s": 1.0},
           {"method": "kfac", "s": 2.0},  # stored before rows had a data set: MNIST's
           {"method": "kfac", "dataset": "fashion-mnist", "s": 3.0}]
    new = [{"method": "kfac", "dataset": "mnist", "s": 4.0}]
    got = merge(old, new, ("dataset", "method"))
    assert got == [old[0], old[2], new[0]]
    assert merge(old, [], ("dataset", "method")) == old


def test_merge_store_renumbers_the_other_runs_and_names_their_source():
    store = {"runs": [{"note": "a"}, {"note": "b"}],
             "stages": {"memory": {"rows": [
                 {"workload": "cnn", "method": "kfac", "device": "cpu", "mb": 1.0, "run": 0},
                 {"workload": "cnn", "method": "sgd", "device": "cpu", "mb": 0.5, "run": 1}]}}}
    other = {"runs": [{"note": "gpu"}],
             "stages": {"memory": {"rows": [
                 {"workload": "cnn", "method": "kfac", "device": "cpu", "mb": 9.0, "run": 0},
                 {"workload": "cnn", "method": "kfac", "device": "cuda", "mb": 2.0, "run": 0}]},
                 "kfac_vs_sgd": {"run": 0, "rows": []}}}
    merge_store(store, json.loads(json.dumps(other)), "x.json")
    assert [r["note"] for r in store["runs"]] == ["a", "b", "gpu (merged from x.json)"]
    rows = store["stages"]["memory"]["rows"]
    assert [(r["method"], r["device"], r["mb"], r["run"]) for r in rows] == [
        ("sgd", "cpu", 0.5, 1), ("kfac", "cpu", 9.0, 2), ("kfac", "cuda", 2.0, 2)]
    assert store["stages"]["kfac_vs_sgd"] == {"run": 2, "rows": []}


def test_an_empty_store_renders_every_figure_as_not_measured(tmp_path):
    out = tmp_path / "page.md"
    render({"runs": [], "stages": {}}, out)
    text = out.read_text()
    for stage in ("step_time", "refresh", "memory", "kfac_vs_sgd"):
        assert f"run `python -m benchmarks.run --stages {stage}`" in text
    assert "No GPU figures" in text and "_none yet_" in text


def test_the_gpu_section_lists_each_gpu_run_as_ratios_to_its_own_sgd():
    from benchmarks.page import _gpu_text

    runs = [{"info": {"device": "cpu"}},
            {"info": {"device": "cuda", "GPU": "Some GPU", "torch": "9.9"}}]
    row = {"workload": "cnn", "update_freq": 30, "ratio_mean": 1.0}
    rows = [{**row, "method": "sgd", "mean": 0.004, "run": 0, "device": "cpu"},
            {**row, "method": "sgd", "mean": 0.002, "run": 1, "device": "cuda"},
            {**row, "method": "kfac", "mean": 0.005, "ratio_mean": 2.5, "run": 1,
             "device": "cuda"}]
    text = _gpu_text(runs, rows)
    assert text.startswith("GPU runs: 1 ")
    assert "- run 1, Some GPU, torch 9.9:\n  - cnn, N_u 30: sgd 2.00 ms, kfac 2.50x" in text
    assert "4.00 ms" not in text  # the CPU run's row is not a GPU figure
