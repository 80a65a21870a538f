"""Rewrite the status table of docs/results/README.md from the archived runs.

A run ``runs/<protocol>/<data set>/<solver>/seed<k>/`` is finished when its ``metrics.csv``
reaches the ``epochs`` of its ``config.json``; otherwise it is in progress at its last
epoch. The table sits between the two status markers of the README; run from the
repository root (``render.sh`` calls it). Standard library only.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent
BEGIN, END = "<!-- status:begin -->", "<!-- status:end -->"
NAMES = {"kfac": "K-FAC", "so": "SO", "q": "Q", "qe": "QE", "sgd": "SGD", "adam": "Adam"}
ORDER = list(NAMES)


def _seed_ranges(seeds: list[int]) -> str:
    """``0-4, 7`` from ``[0, 1, 2, 3, 4, 7]``."""
    parts, start = [], None
    for i, s in enumerate(seeds):
        if start is None:
            start = s
        if i + 1 == len(seeds) or seeds[i + 1] != s + 1:
            parts.append(f"{start}" if start == s else f"{start}-{s}")
            start = None
    return ", ".join(parts)


def _last_epoch(run: Path) -> int:
    with open(run / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return int(float(rows[-1]["epoch"])) if rows else 0


def rows(root: Path) -> list[str]:
    """One Markdown row per (protocol, data set, solver)."""
    out = []
    for proto in sorted(p for p in root.iterdir() if p.is_dir()):
        for data in sorted(d for d in proto.iterdir() if d.is_dir()):
            solvers = sorted((s for s in data.iterdir() if s.is_dir()),
                             key=lambda s: (ORDER.index(s.name) if s.name in ORDER else 99))
            for solver in solvers:
                done, partial, epochs = [], [], set()
                for run in sorted(solver.glob("seed*"), key=lambda r: int(r.name[4:])):
                    if not (run / "metrics.csv").is_file():
                        continue
                    target = int(json.loads((run / "config.json").read_text())["epochs"])
                    last = _last_epoch(run)
                    if last >= target:
                        done.append(int(run.name[4:]))
                        epochs.add(target)
                    else:
                        partial.append(f"seed {run.name[4:]} at epoch {last}")
                seeds = f"{len(done)} ({_seed_ranges(done)})" if done else "0"
                out.append(f"| {proto.name} | {data.name} | {NAMES.get(solver.name, solver.name)} "
                           f"| {seeds} | {', '.join(map(str, sorted(epochs))) or '—'} "
                           f"| {'; '.join(partial) or '—'} |")
    return out


def table(root: Path) -> str:
    head = ["| protocol | data set | solver | finished runs (seeds) | epochs | in progress |",
            "|---|---|---|---|---|---|"]
    return "\n".join(head + rows(root))


def main() -> None:
    readme = RESULTS / "README.md"
    text = readme.read_text()
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        sys.exit(f"{readme}: no {BEGIN} ... {END} block")
    block = f"{BEGIN}\n{table(RESULTS / 'runs')}\n{END}"
    readme.write_text(pattern.sub(lambda _: block, text))


if __name__ == "__main__":
    main()
