"""The sharded-refresh benchmark runs, and what its sharded fold all-reduces is the size of
the decompositions (eigenvalues, eigenvectors and tail of every factor), counted here
from the layer widths."""

from __future__ import annotations

import argparse

from benchmarks.sharded_refresh import run, table


def test_a_small_run_reports_both_modes_and_the_bytes_of_the_decompositions():
    args = argparse.Namespace(ranks="1,2", width=16, layers=2, batch=32, steps=2, warmup=1,
                              update_freq=1)
    rows = run(args)
    modes = ("replicated", "sharded", "owned")
    assert [(r["ranks"], r["mode"]) for r in rows] == [(w, m) for w in (1, 2) for m in modes]
    # Linear 64→16, 16→16, 16→10 with biases: A of 65, 17, 17; Γ of 16, 16, 10
    floats = sum(n * n + n + 1 for n in (65, 17, 17, 16, 16, 10))
    assert rows[4]["shared_bytes"] == 4 * floats
    assert rows[3]["shared_bytes"] == rows[1]["shared_bytes"] == 0
    assert all(r["fold_cpu"] > 0 and r["state_bytes"] > 0 for r in rows)
    # owned: the 65-wide block (65² + 16² of each of Ā and its eigenvectors) on one rank,
    # the two others on the other: the busiest rank holds less than the whole
    assert rows[5]["state_bytes"] < rows[3]["state_bytes"] == rows[0]["state_bytes"]
    assert table(rows).count("\n") == 7
