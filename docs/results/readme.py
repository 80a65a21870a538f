"""Rewrite the generated tables of docs/results/README.md; ``render.sh`` calls it last.

Each table sits between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``:

- ``status``: the archived runs. A run ``runs/<protocol>/<data set>/<solver>/seed<k>/`` is
  finished when its ``metrics.csv`` reaches the ``epochs`` of its ``config.json``;
  otherwise it is in progress at its last epoch. Seeds trained on a GPU, wholly or in part
  (``part:``, resumed on the CPU), are listed from the config's device history.
- ``mnist-table``, ``fashion-table``: mean ± SD at epoch 50 from the reports'
  ``<data set>_table1.csv`` (``paper-protocol/<protocol>/``), with the paper's row.
- ``mnist-claims``, ``fashion-claims``: each KLD-WRM solver against K-FAC from the
  reports' ``<data set>_claims.csv``; a p-value below 0.05 is in bold.

The prose around the tables is written by hand. Standard library only.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent
REPORTS = RESULTS / "paper-protocol"
PROTOCOLS = {"corrected": "corrected", "released": "faithful as released"}
VIEWS = ("normalised", "raw")
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


def _devices(config: dict) -> list[str]:
    """The device types a run trained on (``devices`` in its config.json, else ``device``)."""
    return config.get("devices") or [str(config.get("device", "cpu")).split(":")[0]]


def _gpu_text(whole: list[int], part: list[int]) -> str:
    """``3-4; part: 5`` (seeds trained wholly / partly off the CPU)."""
    parts = ([_seed_ranges(whole)] if whole else []) + (
        [f"part: {_seed_ranges(part)}"] if part else [])
    return "; ".join(parts) or "—"


def rows(root: Path) -> list[str]:
    """One Markdown row per (protocol, data set, solver)."""
    out = []
    for proto in sorted(p for p in root.iterdir() if p.is_dir()):
        for data in sorted(d for d in proto.iterdir() if d.is_dir()):
            solvers = sorted((s for s in data.iterdir() if s.is_dir()),
                             key=lambda s: (ORDER.index(s.name) if s.name in ORDER else 99))
            for solver in solvers:
                done, partial, epochs, whole, part = [], [], set(), [], []
                for run in sorted(solver.glob("seed*"), key=lambda r: int(r.name[4:])):
                    if not (run / "metrics.csv").is_file():
                        continue
                    config = json.loads((run / "config.json").read_text())
                    target, last = int(config["epochs"]), _last_epoch(run)
                    if last >= target:
                        done.append(int(run.name[4:]))
                        epochs.add(target)
                    else:
                        partial.append(f"seed {run.name[4:]} at epoch {last}")
                    devices = _devices(config)
                    if set(devices) != {"cpu"}:
                        (part if "cpu" in devices else whole).append(int(run.name[4:]))
                seeds = f"{len(done)} ({_seed_ranges(done)})" if done else "0"
                out.append(f"| {proto.name} | {data.name} | {NAMES.get(solver.name, solver.name)} "
                           f"| {seeds} | {', '.join(map(str, sorted(epochs))) or '—'} "
                           f"| {_gpu_text(whole, part)} | {'; '.join(partial) or '—'} |")
    return out


def status_table(root: Path) -> str:
    head = ["| protocol | data set | solver | finished runs (seeds) | epochs | "
            "seeds trained on a GPU | in progress |",
            "|---|---|---|---|---|---|---|"]
    return "\n".join(head + rows(root))


# ----------------------------------------------------------------------------- numbers


def _read(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _signed(x: float, digits: int) -> str:
    return f"{x:+.{digits}f}".replace("-", "−")


def _p(p: float) -> str:
    """Two significant digits; ``9e-6`` style below 0.001; bold below 0.05."""
    text = f"{p:.0e}".replace("e-0", "e-") if p < 1e-3 else f"{p:#.2g}".rstrip(".")
    return f"**{text}**" if p < 0.05 else text


def _ratio(r: float) -> str:
    return f"{r:#.3g}" if r >= 1 else f"{r:#.2g}"


def _mean_sd(row: dict[str, str] | None, key: str, digits: int) -> str:
    if row is None or int(row["runs"]) == 0:
        return "—"
    mean, sd = float(row[f"{key}_mean"]), float(row[f"{key}_sd"])
    if row["source"] != "this run":  # the paper's values, as printed
        return f"{mean:.2f} ± {sd:g}" if key == "acc" else f"{mean:.2f} ± {sd:.2f}"
    return f"{mean:.{digits}f}" + ("" if sd != sd else f" ± {sd:.{digits}f}")


def _solvers(rows: list[dict[str, str]]) -> list[str]:
    present = {r["solver"] for r in rows}
    return [s for s in ORDER if s in present and s not in ("sgd", "adam")]


def results_table(dataset: str, protocols: dict[str, str], paper: bool) -> str:
    """Mean ± SD of test accuracy and loss per protocol and view, runs per solver."""
    tables = {p: _read(REPORTS / p / f"{dataset}_table1.csv") for p in protocols}
    solvers = _solvers([r for rows in tables.values() for r in rows])
    head = ["protocol", "view", *(f"{NAMES[s]} acc" for s in solvers),
            *(f"{NAMES[s]} loss" for s in solvers), "runs"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def line(label: str, view: str, by: dict[str, dict[str, str]]) -> str:
        runs = " / ".join(by[s]["runs"] if s in by else "0" for s in solvers)
        cells = [label, view, *(_mean_sd(by.get(s), "acc", 2) for s in solvers),
                 *(_mean_sd(by.get(s), "loss", 3) for s in solvers), runs]
        return "| " + " | ".join(cells) + " |"

    for proto, label in protocols.items():
        for view in VIEWS:
            by = {r["solver"]: r for r in tables[proto]
                  if r["view"] == view and r["source"] == "this run"}
            if by:
                out.append(line(label, view, by))
    if paper:
        by = {r["solver"]: r for rows in tables.values() for r in rows
              if r["view"] == "raw" and r["source"] != "this run"}
        if by:
            out.append(line("paper, Table 1", "raw", by))
    return "\n".join(out)


def claims_table(dataset: str, protocols: dict[str, str]) -> str:
    """Each KLD-WRM solver (B) against K-FAC (A): Δ, interval, tests, variance ratio."""
    head = ["protocol, view", "pair", "runs (B / A)", "Δ acc [95% CI]", "p (Welch / perm.)",
            "Δ loss [95% CI]", "p (Welch / perm.)", "var. ratio acc (F p / BF p)"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for proto in protocols:
        rows = _read(REPORTS / proto / f"{dataset}_claims.csv")
        for view in VIEWS:
            for solver in ORDER:
                pair = {r["metric"]: r for r in rows if r["view"] == view
                        and r["solver_a"] == "kfac" and r["solver_b"] == solver}
                if set(pair) != {"acc", "loss"} or int(pair["acc"]["n_b"]) < 2:
                    continue
                acc, loss = pair["acc"], pair["loss"]
                cells = [f"{proto}, {view}", f"{NAMES[solver]} − K-FAC",
                         f"{acc['n_b']} / {acc['n_a']}"]
                for r, digits in ((acc, 2), (loss, 3)):
                    cells.append(f"{_signed(float(r['diff']), digits)} "
                                 f"[{_signed(float(r['ci_low']), digits)}, "
                                 f"{_signed(float(r['ci_high']), digits)}]")
                    cells.append(f"{_p(float(r['welch_p']))} / {_p(float(r['perm_p']))}")
                cells.append(f"{_ratio(float(acc['var_ratio']))} ({_p(float(acc['f_p']))} / "
                             f"{_p(float(acc['bf_p']))})")
                out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


BLOCKS = {
    "status": lambda: status_table(RESULTS / "runs"),
    "mnist-table": lambda: results_table("mnist", PROTOCOLS, paper=True),
    "mnist-claims": lambda: claims_table("mnist", PROTOCOLS),
    "fashion-table": lambda: results_table("fashion-mnist", {"corrected": "corrected"},
                                           paper=False),
    "fashion-claims": lambda: claims_table("fashion-mnist", {"corrected": "corrected"}),
}


def main() -> None:
    readme = RESULTS / "README.md"
    text = readme.read_text()
    for name, make in BLOCKS.items():
        begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
        pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
        if not pattern.search(text):
            sys.exit(f"{readme}: no {begin} ... {end} block")
        block = f"{begin}\n{make()}\n{end}"
        text = pattern.sub(lambda _, b=block: b, text)
    readme.write_text(text)


if __name__ == "__main__":
    main()
