"""A paper model of the curvature work per rank at 8 to 1024 ranks (issue 24, item 4).

Not a measurement of many GPUs (none is available here): it combines

* the *measured* cost of one symmetric eigendecomposition on this machine (``eigh`` of
  ``n × n`` float32 for a few ``n``, 1 thread, median of 3, fitted as ``c · n³``), and
* an *assumed* ring all-reduce, ``2 (R-1)/R · bytes / bandwidth + 2 (R-1) · latency``
  (``--bandwidth`` GB/s per rank, ``--latency`` µs; defaults typical of InfiniBand),

for a GPT-2-medium-shaped stack (``--layers`` blocks of attention QKV/out and a 4x MLP,
``--width`` wide: 4 Kronecker blocks per layer), and gives the seconds one refresh costs
the busiest rank with the decompositions replicated, sharded (each block decomposed by one
rank, :func:`kldwrm.distributed.assign_by_cost`, results all-reduced) or owned (the same
division, nothing to all-reduce at the refresh: each step then all-reduces the
preconditioned gradient instead), plus each mode's curvature state per rank.

Run: ``python -m benchmarks.scaling_model`` (``--ranks 8,64,1024``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kldwrm.distributed import assign_by_cost


def eigh_seconds(sizes: tuple[int, ...] = (256, 512, 768)) -> float:
    """``c`` of ``t(n) = c n³``, least squares over the measured sizes."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    num = den = 0.0
    for n in sizes:
        x = torch.randn(n, n, generator=g)
        mat = x @ x.T / n + torch.eye(n)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            torch.linalg.eigh(mat)
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        num += t * n**3
        den += float(n) ** 6
    return num / den


def blocks(width: int, layers: int) -> list[tuple[int, int]]:
    """``(d_in + 1, d_out)`` of every Kronecker block of the stack (biases included)."""
    per_layer = [(width, 3 * width), (width, width), (width, 4 * width), (4 * width, width)]
    return [(i + 1, o) for _ in range(layers) for i, o in per_layer]


def allreduce_seconds(nbytes: float, ranks: int, bandwidth_gbs: float, latency_us: float
                      ) -> float:
    if ranks == 1:
        return 0.0
    return (2 * (ranks - 1) / ranks * nbytes / (bandwidth_gbs * 1e9)
            + 2 * (ranks - 1) * latency_us * 1e-6)


def model_rows(c: float, sizes: list[tuple[int, int]], ranks: list[int], bandwidth: float,
               latency: float) -> list[dict[str, float]]:
    costs = [c * (a**3 + g**3) for a, g in sizes]
    state = [4.0 * 2 * (a * a + g * g) for a, g in sizes]  # factors and eigenvectors, fp32
    shared = sum(4.0 * (a * a + a + 1 + g * g + g + 1) for a, g in sizes)
    grad = sum(4.0 * a * g for a, g in sizes)
    rows = []
    for r in ranks:
        load = [0.0] * r  # sharded: dealt by decomposition cost
        for j, o in enumerate(assign_by_cost(costs, r)):
            load[o] += costs[j]
        owned, held = [0.0] * r, [0.0] * r  # owned: dealt by state size, as the library does
        for j, o in enumerate(assign_by_cost(state, r)):
            owned[o] += costs[j]
            held[o] += state[j]
        rows.append({
            "ranks": r, "replicated_s": sum(costs),
            "sharded_s": max(load) + allreduce_seconds(shared, r, bandwidth, latency),
            "owned_s": max(owned),
            "owned_step_s": allreduce_seconds(grad, r, bandwidth, latency),
            "state_gb": sum(state) / 1e9, "owned_state_gb": max(held) / 1e9,
        })
    return rows


def table(rows: list[dict[str, float]]) -> str:
    lines = ["| ranks | replicated refresh s | sharded refresh s | owned refresh s | "
             "owned: extra all-reduce per step s | curvature state per rank GB (replicated "
             "/ owned) |", "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['ranks']} | {r['replicated_s']:.1f} | {r['sharded_s']:.2f} | "
                     f"{r['owned_s']:.2f} | {r['owned_step_s']:.4f} | {r['state_gb']:.2f} / "
                     f"{r['owned_state_gb']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--ranks", default="1,8,16,32,64,128,256,512,1024")
    ap.add_argument("--bandwidth", type=float, default=25.0, help="GB/s per rank")
    ap.add_argument("--latency", type=float, default=10.0, help="µs per ring step")
    args = ap.parse_args()
    c = eigh_seconds()
    sizes = blocks(args.width, args.layers)
    print(f"eigh: t(n) = {c:.3e} n^3 s on this machine (1 thread); {len(sizes)} blocks")
    print(table(model_rows(c, sizes, [int(r) for r in args.ranks.split(",")], args.bandwidth,
                           args.latency)))


if __name__ == "__main__":
    main()
