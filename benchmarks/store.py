"""The benchmark store, ``docs/benchmarks.json``: every measured row with the run that made it.

A row is identified by its stage's key fields (:data:`STAGE_KEYS`); a new row replaces the
stored row with the same key, so a partial rerun keeps every other figure.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

__all__ = ["KEY_DEFAULTS", "STAGE_KEYS", "load_store", "merge", "merge_store"]

#: the fields that identify a row of each stage (a new row replaces the stored one)
STAGE_KEYS = {
    "step_time": ("workload", "update_freq", "method", "device"),
    "refresh": ("workload", "method", "device"),
    "memory": ("workload", "method", "device"),
    "accuracy": ("dataset", "method", "device"),
    "rank_tradeoff": ("method", "device"),
}
#: the value of a key field that a stored row lacks (the first accuracy rows were MNIST's)
KEY_DEFAULTS = {"dataset": "mnist"}


def load_store(path: Path) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return {"runs": [], "stages": {}}


def merge(old: list[dict], new: list[dict], key: Sequence[str]) -> list[dict]:
    """``old`` rows whose ``key`` no new row has, then the new rows (in order)."""
    def k(r: dict) -> tuple:
        return tuple(r.get(f, KEY_DEFAULTS.get(f)) for f in key)

    replaced = {k(r) for r in new}
    return [r for r in old if k(r) not in replaced] + list(new)


def merge_store(store: dict, other: dict, source: str = "") -> None:
    """Add ``other``'s runs to ``store`` (renumbered after its own, their note naming
    ``source``) and let their rows replace the stored rows with the same key;
    ``kfac_vs_sgd`` is replaced whole."""
    offset = len(store["runs"])
    store["runs"] += [{**r, "note": f"{r.get('note', '')} (merged from {source})".strip()}
                      if source else r for r in other["runs"]]
    for stage, entry in other["stages"].items():
        if stage == "kfac_vs_sgd":
            store["stages"][stage] = {**entry, "run": entry["run"] + offset}
            continue
        rows = [{**r, "run": r["run"] + offset} for r in entry["rows"]]
        mine = store["stages"].setdefault(stage, {"rows": []})
        mine["rows"] = merge(mine["rows"], rows, STAGE_KEYS[stage])
        for m, sw in entry.get("sweeps", {}).items():
            mine.setdefault("sweeps", {})[m] = {**sw, "run": sw["run"] + offset}
