"""Peak memory and optimizer state size per method.

Each (workload, method) runs in a fresh subprocess so that the peak resident set size
(``getrusage`` on CPU) or ``torch.cuda.max_memory_allocated`` (GPU) belongs to that method
alone. The process builds the model and batches, records its memory, trains
``update_freq + 1`` steps (two curvature refreshes) and records the peak.

State size: ``optimizer.state_bytes()`` for this library's optimizers (factors,
eigendecompositions and per-parameter recursion vectors), the sum of the state tensors for
``torch.optim.SGD``/``Adam``. The target of issue 7 is per-parameter state (everything but
the curvature) <= 3x the parameter count (in parameter-sized float32 vectors).

Run alone: ``python -m benchmarks.memory --workload cnn``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence

import torch

from .common import (
    REPO_ROOT,
    WORKLOADS,
    available_methods,
    current_rss_bytes,
    factor_bytes,
    n_params,
    peak_rss_bytes,
    state_bytes,
)
from .step_time import build_runners, workload_label


def _one(workload: str, method: str, device: str, update_freq: int, threads: int) -> dict:
    """Measure one method in this process (called in a subprocess)."""
    torch.set_num_threads(threads)
    dev = torch.device(device)
    w = WORKLOADS[workload]
    r = build_runners(w, [method], update_freq, dev)[0]
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        base = current_rss_bytes()
    for _ in range(update_freq + 1):
        r.step()
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else peak_rss_bytes()
    p = n_params(r.model)
    total = state_bytes(r.opt)
    fac = factor_bytes(r.opt)
    return dict(workload=workload, method=method, params=p, base=base, peak=peak,
                state=total, factors=fac, per_param=(total - fac) / (4 * p),
                window=int(getattr(r.opt, "window", 0)))


def measure(workload: str, methods: Sequence[str], device: str, update_freq: int = 30,
            threads: int = 2) -> list[dict]:
    """One subprocess per method; returns the rows of :func:`_one`."""
    rows = []
    for m in available_methods(methods):
        cmd = [sys.executable, "-m", "benchmarks.memory", "--one", workload, m,
               "--device", device, "--update-freq", str(update_freq),
               "--threads", str(threads)]
        out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            print(f"[memory] {workload}/{m} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def format_rows(rows: Sequence[dict], device: str = "cpu") -> str:
    """Markdown table (MiB, and state in units of the parameter count).

    The peak is the RSS for CPU rows and ``torch.cuda.max_memory_allocated`` for CUDA rows
    (a row's ``device``, else ``device``); a CUDA row's workload names its device.
    """
    devices = {r.get("device", device) for r in rows} or {device}
    kinds = ["peak RSS" if d == "cpu" else "peak allocated" for d in sorted(devices)]
    kind = " / ".join(dict.fromkeys(kinds))
    mib = 2.0**20
    out = [f"| workload | method | params | {kind} MiB | above start MiB | state bytes "
           "| of which curvature | per-parameter state / (4 B x params) |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(
            f"| {workload_label(r)} | {r['method']} | {r['params']:,} | {r['peak'] / mib:.1f} "
            f"| {(r['peak'] - r['base']) / mib:.1f} | {r['state']:,} | {r['factors']:,} "
            f"| {r['per_param']:.2f}x |"
        )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--one", nargs=2, metavar=("WORKLOAD", "METHOD"))
    p.add_argument("--workload", choices=list(WORKLOADS), action="append")
    p.add_argument("--methods", default="sgd,adam,kfac,so,q,qe", help="a rank as in kfac-r128")
    p.add_argument("--device", default="cpu")
    p.add_argument("--update-freq", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(_one(a.one[0], a.one[1], a.device, a.update_freq, a.threads)))
        return
    rows = []
    for wl in a.workload or ["cnn", "mlp"]:
        rows += measure(wl, a.methods.split(","), a.device, a.update_freq, a.threads)
    print(format_rows(rows, a.device))


if __name__ == "__main__":
    main()
