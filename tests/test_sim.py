"""The simulated backend: protocols, determinism, the shape of its costs, speed."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest

from neuroshard.backends import as_estimator, get_backend
from neuroshard.backends.sim import PROFILES, SimBackend, profile_names
from neuroshard.types import CostEstimator, HardwareBackend, UnknownNameError

from factories import make_table, make_tables

REF = make_table("ref", rows=1_000_000, dim=128, pooling_factor=10.0)
HOT = make_table("hot", rows=5_000_000, dim=128, pooling_factor=50.0)


def one(backend: SimBackend, *tables) -> float:
    return backend.measure_compute(list(tables)).median_ms


def test_implements_both_protocols_and_is_registered():
    sim = get_backend("sim", profile="a100", batch_size=4096)
    assert isinstance(sim, SimBackend)
    assert isinstance(sim, HardwareBackend) and isinstance(sim, CostEstimator)
    assert as_estimator(sim) is sim
    assert sim.name == "sim" and sim.batch_size == 4096


def test_profiles_and_unknown_profile():
    assert {"v100", "a100", "h100", "h200"} <= set(profile_names())
    assert profile_names() == sorted(PROFILES)
    with pytest.raises(UnknownNameError, match="h100"):
        SimBackend("tpu")


def test_fingerprint_names_profile_constants_batch_and_noise():
    fp = SimBackend("v100", batch_size=1024, noise=0.03, seed=7).fingerprint()
    assert fp["backend"] == "sim" and fp["profile"] == "v100"
    assert fp["batch_size"] == 1024 and fp["noise"] == 0.03
    assert fp["constants"]["hbm_bytes_per_ms"] == pytest.approx(900e6)
    assert fp["constants"]["l2_bytes"] == 6 * 2**20


def test_reference_figures_are_in_the_documented_range():
    sim = SimBackend("h100")
    assert 0.2 <= one(sim, REF) <= 3.0
    bwd = sim.bwd_comm_ms(np.full((1, 4), 1000.0))[0]
    assert np.all((bwd >= 0.1) & (bwd <= 1.0))


@pytest.mark.parametrize(
    "profile, ref_ms, both_ms, a2a_ms",
    [
        ("v100", 1.63, 10.54, 1.77),
        ("a100", 0.66, 4.93, 0.90),
        ("h100", 0.32, 2.30, 0.60),
        ("h200", 0.24, 1.64, 0.60),
    ],
)
def test_documented_reference_figures_hold(profile, ref_ms, both_ms, a2a_ms):
    """The table in the module doc: a changed constant must update the doc."""
    sim = SimBackend(profile)
    assert one(sim, REF) == pytest.approx(ref_ms, abs=0.01)
    assert one(sim, REF, HOT) == pytest.approx(both_ms, abs=0.01)
    assert sim.bwd_comm_ms(np.full(4, 1000.0))[0] == pytest.approx(a2a_ms, abs=0.01)


def test_deterministic_without_noise():
    loads = [make_tables(5, seed=s) for s in range(4)]
    a, b = SimBackend(), SimBackend(seed=123)
    np.testing.assert_array_equal(a.compute_ms(loads), a.compute_ms(loads))
    np.testing.assert_array_equal(a.compute_ms(loads), b.compute_ms(loads))
    assert a.measure_compute(loads[0]).spread == 0.0


def test_noise_is_seeded_and_multiplicative():
    loads = [make_tables(5, seed=s) for s in range(20)]
    clean = SimBackend().compute_ms(loads)
    a = SimBackend(noise=0.05, seed=1)
    b = SimBackend(noise=0.05, seed=1)
    first_a, first_b = a.compute_ms(loads), b.compute_ms(loads)
    np.testing.assert_array_equal(first_a, first_b)
    assert not np.array_equal(first_a, a.compute_ms(loads))  # successive draws differ
    assert not np.array_equal(first_a, SimBackend(noise=0.05, seed=2).compute_ms(loads))
    ratio = first_a / clean
    assert np.all((ratio > np.exp(-0.3)) & (ratio < np.exp(0.3))) and np.std(np.log(ratio)) > 0.01
    t = a.measure_compute(loads[0])
    assert t.spread == 0.05 and t.repeats == 1


def test_costs_positive_and_grow_with_pooling_rows_and_width():
    sim = SimBackend()
    base = one(sim, REF)
    assert base > 0
    assert one(sim, replace(REF, pooling_factor=20.0)) > base
    assert one(sim, replace(REF, rows=4_000_000)) > base
    assert one(sim, REF.with_dim(64)) < base


def test_narrow_shards_are_not_proportionally_cheap():
    """Sector granularity, row-rate limits and fixed costs: a 4-wide shard costs far more
    than 1/32 of a 128-wide one."""
    sim = SimBackend()
    assert one(sim, REF.with_dim(4)) > 10 * one(sim, REF) / 32


def test_cost_is_not_a_function_of_dim_times_pooling():
    sim = SimBackend()
    a = make_table("a", rows=1_000_000, dim=128, pooling_factor=10.0)
    b = make_table("b", rows=1_000_000, dim=64, pooling_factor=20.0)
    c = make_table("c", rows=10_000, dim=128, pooling_factor=10.0)
    assert one(sim, a) != pytest.approx(one(sim, b), rel=0.02)
    assert one(sim, a) != pytest.approx(one(sim, c), rel=0.02)


def test_shared_l2_makes_hot_tables_super_additive():
    sim = SimBackend("h100")
    together, alone = one(sim, REF, HOT), one(sim, REF) + one(sim, HOT)
    assert together > alone * 1.05
    # Without a cache the only interaction left is shared launches: sub-additive.
    no_cache = SimBackend(replace(PROFILES["h100"], l2_bytes=0))
    assert one(no_cache, REF, HOT) < one(no_cache, REF) + one(no_cache, HOT)


def test_cost_does_not_depend_on_shard_order():
    sim = SimBackend()
    load = make_tables(9, seed=3) + [REF, REF.with_dim(32)]
    assert one(sim, *load) == pytest.approx(one(sim, *reversed(load)), rel=1e-12)


def test_empty_device_costs_nothing():
    sim = SimBackend()
    assert sim.measure_compute([]).median_ms == 0.0
    out = sim.compute_ms([[], [REF], []])
    assert out[0] == 0.0 and out[2] == 0.0 and out[1] > 0
    assert SimBackend(noise=0.1).compute_ms([[]])[0] == 0.0


def test_forward_comm_includes_the_straggler_gap():
    sim = SimBackend()
    dims = np.array([[512.0, 256.0, 384.0, 128.0]])
    waits = np.array([[0.0, 5.0, 2.0, 1.5]])
    fwd, bwd = sim.fwd_comm_ms(dims, waits), sim.bwd_comm_ms(dims)
    np.testing.assert_allclose(fwd - bwd, waits.max() - waits)
    assert fwd[0, 0] == pytest.approx(bwd[0, 0] + 5.0)
    assert fwd[0, 1] == pytest.approx(bwd[0, 1])


def test_comm_grows_with_dim_sums_and_crosses_hosts_slowly():
    sim = SimBackend()
    small = sim.bwd_comm_ms(np.full((1, 4), 256.0))
    big = sim.bwd_comm_ms(np.full((1, 4), 1024.0))
    assert np.all(big > small) and np.all(small > 0)
    # One device gaining columns costs it (sends more) and its peers (receive more).
    uneven = sim.bwd_comm_ms(np.array([[2048.0, 256.0, 256.0, 256.0]]))
    assert uneven[0, 0] > small[0, 0] and uneven[0, 1] > small[0, 1]
    # 16 devices span two hosts: InfiniBand makes the same bytes per peer slower.
    eight = sim.bwd_comm_ms(np.full((1, 8), 512.0))
    sixteen = sim.bwd_comm_ms(np.full((1, 16), 1024.0))
    assert sixteen.min() > 2 * eight.max()
    assert np.all(sim.bwd_comm_ms(np.array([[640.0]])) == 0.0)


def test_faster_profiles_are_faster():
    v, a, h = (SimBackend(p) for p in ("v100", "a100", "h100"))
    assert one(v, REF) > one(a, REF) > one(h, REF)
    d = np.full((1, 4), 1000.0)
    assert v.bwd_comm_ms(d).max() > a.bwd_comm_ms(d).max() > h.bwd_comm_ms(d).max()


def test_h200_is_h100_with_faster_bigger_hbm_and_the_l2_pytorch_reports():
    h100, h200 = PROFILES["h100"], PROFILES["h200"]
    assert h200.sm_count == h100.sm_count == 132
    assert h200.hbm_bytes_per_ms == pytest.approx(4.8e9)  # 4.8 TB/s in bytes per ms
    assert h200.hbm_capacity_bytes == 141 * 10**9 and h200.l2_bytes == 60 * 2**20
    assert h200.nvlink_bytes_per_ms == h100.nvlink_bytes_per_ms == pytest.approx(450e6)
    fast, slow = SimBackend("h200"), SimBackend("h100")
    assert one(fast, REF) < one(slow, REF) and one(fast, REF, HOT) < one(slow, REF, HOT)
    d = np.array([[900.0, 100.0, 500.0, 40.0, 0.0, 640.0, 320.0, 64.0]])
    np.testing.assert_array_equal(fast.bwd_comm_ms(d), slow.bwd_comm_ms(d))


def test_batched_equals_one_at_a_time():
    sim = SimBackend("a100")
    loads = [make_tables(k, seed=k) for k in range(0, 12)]
    batched = sim.compute_ms(loads)
    assert batched.shape == (len(loads),)
    np.testing.assert_allclose(
        batched, [sim.measure_compute(ld).median_ms for ld in loads], rtol=1e-12
    )
    dims = np.array([[128.0, 256.0, 64.0], [512.0, 0.0, 32.0]])
    waits = np.array([[0.0, 1.0, 3.0], [2.0, 0.0, 0.5]])
    fwd, bwd = sim.fwd_comm_ms(dims, waits), sim.bwd_comm_ms(dims)
    for i in range(2):
        f1, b1 = sim.measure_comm(list(dims[i]), list(waits[i]))
        np.testing.assert_allclose(fwd[i], [t.median_ms for t in f1], rtol=1e-12)
        np.testing.assert_allclose(bwd[i], [t.median_ms for t in b1], rtol=1e-12)


def test_ten_thousand_loads_evaluate_quickly():
    rng = np.random.default_rng(0)
    tables = make_tables(200, seed=1)
    loads = [
        [tables[i].with_dim(int(rng.choice([4, 16, 64, 128]))) for i in rng.choice(len(tables), 8)]
        for _ in range(10_000)
    ]
    start = time.perf_counter()
    out = SimBackend().compute_ms(loads)
    assert time.perf_counter() - start < 5.0
    assert out.shape == (10_000,) and np.all(out > 0)


def test_a_sequence_table_writes_one_row_per_id():
    sim = SimBackend("h100")
    pooled = make_table("t", rows=1_000_000, dim=64, pooling_factor=20.0)
    sequence = replace(pooled, pooled=False)
    one = make_table("u", rows=1_000_000, dim=64, pooling_factor=1.0)
    cost = sim.compute_ms([[pooled], [sequence], [one], [replace(one, pooled=False)]])
    assert cost[1] > cost[0] * 1.5  # 20 outputs per sample instead of one
    assert cost[3] == cost[2]  # one id per sample: the same rows either way
