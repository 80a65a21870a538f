"""The scaling model's arithmetic, checked by hand on a tiny stack."""

from __future__ import annotations

from benchmarks.scaling_model import allreduce_seconds, blocks, model_rows


def test_the_blocks_of_one_layer():
    assert blocks(8, 1) == [(9, 24), (9, 8), (9, 32), (33, 8)]


def test_ring_allreduce_time():
    assert allreduce_seconds(1e9, 1, 25.0, 10.0) == 0.0
    # 2·(3/4)·1 GB / 25 GB/s + 2·3·10 µs
    assert abs(allreduce_seconds(1e9, 4, 25.0, 10.0) - (0.06 + 6e-5)) < 1e-12


def test_division_is_bounded_by_the_largest_block():
    c = 1e-9
    sizes = blocks(8, 2)  # 8 blocks
    costs = [c * (a**3 + g**3) for a, g in sizes]
    rows = model_rows(c, sizes, [1, 2, 8, 64], bandwidth=25.0, latency=10.0)
    assert rows[0]["sharded_s"] == rows[0]["owned_s"] == rows[0]["replicated_s"] == sum(costs)
    assert all(r["replicated_s"] == sum(costs) for r in rows)
    for r in rows[2:]:  # as many ranks as blocks or more: one block each at most
        assert abs(r["owned_s"] - max(costs)) < 1e-15
    assert rows[3]["owned_state_gb"] == max(4.0 * 2 * (a * a + g * g) for a, g in sizes) / 1e9
    assert rows[1]["owned_s"] >= sum(costs) / 2
