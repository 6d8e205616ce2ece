import itertools

import numpy as np
import pytest

from neuroshard.plan_io import validate_plan
from neuroshard.search.greedy import greedy_grid, to_plan
from neuroshard.search.oracle import (
    devices_interchangeable,
    exhaustive_tablewise,
    oracle_plan,
    placement_count,
)
from neuroshard.search.scoring import plan_cost
from neuroshard.types import Cluster, PlanInfeasibleError

from factories import GB, FakeEstimator, make_cluster, make_table, make_tables, priced


def brute_force(tables, cluster, est):
    best = None
    for devices in itertools.product(range(cluster.num_devices), repeat=len(tables)):
        plan = to_plan(tables, cluster, tables, devices)
        if any(m > c for m, c in zip(plan.memory_bytes(), cluster.memory_per_device_bytes)):
            continue
        cost = plan_cost(plan, est).max_ms
        if best is None or cost < best:
            best = cost
    return best


class RackEstimator(FakeEstimator):
    """Comm that depends on the device index (device 0 sits behind a slow link)."""

    def bwd_comm_ms(self, dim_sums):
        out = super().bwd_comm_ms(dim_sums)
        out[..., 0] *= 3
        return out


def test_placement_counts():
    assert placement_count(12, 4, symmetric=True) == 700_075  # sum of S(12, k), k <= 4
    assert placement_count(12, 4, symmetric=False) == 4**12
    assert placement_count(3, 4, symmetric=True) == 5  # Bell number B3
    assert placement_count(0, 4, symmetric=True) == 1


def test_interchangeable_devices_are_probed():
    assert devices_interchangeable(make_cluster(4), FakeEstimator())
    assert not devices_interchangeable(make_cluster(4), RackEstimator())
    uneven = Cluster(2, (GB, 2 * GB))
    assert not devices_interchangeable(uneven, FakeEstimator())


@pytest.mark.parametrize("symmetric", [True, False])
def test_exhaustive_equals_brute_force(symmetric):
    tables, cluster, est = make_tables(6, seed=2), make_cluster(3), FakeEstimator()
    devices, cost, count = exhaustive_tablewise(tables, cluster, est, symmetric=symmetric)
    assert cost == pytest.approx(brute_force(tables, cluster, est), rel=1e-12)
    assert count == placement_count(6, 3, symmetric)  # nothing pruned: memory is ample
    plan = to_plan(tables, cluster, tables, devices)
    assert plan_cost(plan, est).max_ms == pytest.approx(cost, rel=1e-12)


def test_exhaustive_with_device_dependent_comm_equals_brute_force():
    tables, cluster, est = make_tables(5, seed=3), make_cluster(3), RackEstimator()
    _, cost, count = exhaustive_tablewise(tables, cluster, est)
    assert count == 3**5  # no symmetry to break
    assert cost == pytest.approx(brute_force(tables, cluster, est), rel=1e-12)


def test_exhaustive_prunes_placements_over_memory():
    rows = int(0.45 * GB) // (32 * 4)
    tables = [
        make_table(f"t{i}", rows=rows, dim=32, pooling_factor=50.0 / (i + 1)) for i in range(6)
    ]
    cluster, est = make_cluster(3, memory_gb=1), FakeEstimator()
    devices, cost, count = exhaustive_tablewise(tables, cluster, est)
    assert count < placement_count(6, 3, symmetric=True)
    assert sorted(np.bincount(devices, minlength=3)) == [2, 2, 2]
    assert cost == pytest.approx(brute_force(tables, cluster, est), rel=1e-12)
    with pytest.raises(PlanInfeasibleError):
        exhaustive_tablewise(tables + tables[:1], cluster, est)  # 7 tables, room for 6


def test_exhaustive_refuses_too_many_placements():
    with pytest.raises(ValueError, match="exceed the limit"):
        exhaustive_tablewise(make_tables(12), make_cluster(4), FakeEstimator(), limit=1000)


class WorkEstimator(FakeEstimator):
    """Compute is each shard's width x pooling factor, summed; comm costs nothing. A
    plan's cost is then its busiest device's work, which a hand count can optimise."""

    def compute_ms(self, loads):
        return np.asarray([float(sum(t.dim * t.pooling_factor for t in load)) for load in loads])

    def bwd_comm_ms(self, dim_sums):
        return np.zeros(np.shape(dim_sums))

    def fwd_comm_ms(self, dim_sums, waits_ms):
        return np.zeros(np.shape(dim_sums))


def test_oracle_finds_the_optimum_known_by_construction():
    # Tables of width 4 cannot be split (a half would be 2 wide). Works 12, 12, 8, 8, 8
    # on 2 devices: the total is 48, so no plan beats 24, and {12, 12} | {8, 8, 8} is 24.
    # Placing the costliest first on the least loaded device gives 12+8+8 = 28.
    est = WorkEstimator()
    works = [3.0, 3.0, 2.0, 2.0, 2.0]
    tables = [
        make_table(f"w{i}", rows=1000, dim=4, pooling_factor=pf) for i, pf in enumerate(works)
    ]
    cluster = make_cluster(2)
    assert plan_cost(greedy_grid(tables, cluster, est), est).max_ms == 28.0
    plan = priced(oracle_plan(tables, cluster, est, max_evals=3000), est)
    validate_plan(plan)
    cost = plan_cost(plan, est)
    assert cost.max_ms == 24.0 and plan.meta["tablewise_ms"] == 24.0
    assert [d.compute_ms for d in cost.devices] == [24.0, 24.0]
    assert plan.meta["exhaustive"]

    # Width 8 and pooling 3 make "a" worth 24, split at most once into two halves of 12
    # (4 wide); "b" is worth 8. Table-wise the best is 24; with "a" split, the pieces
    # 12, 12, 8 give at best 12+8 | 12 = 20, and no plan can do better.
    tables = [
        make_table("a", rows=1000, dim=8, pooling_factor=3.0),
        make_table("b", rows=1000, dim=4, pooling_factor=2.0),
    ]
    plan = priced(oracle_plan(tables, cluster, est, max_evals=3000), est)
    validate_plan(plan)
    assert plan.meta["tablewise_ms"] == 24.0
    assert plan_cost(plan, est).max_ms == 20.0
    assert [s.width for s in plan.shards_of("a")] == [4, 4]


def test_oracle_splits_a_hot_table_beyond_the_tablewise_optimum():
    tables = [make_table("hot", rows=500_000, dim=128, pooling_factor=60.0)] + [
        make_table(f"t{i}", rows=50_000, dim=16, pooling_factor=2.0) for i in range(5)
    ]
    plan = priced(
        oracle_plan(tables, make_cluster(4), FakeEstimator(), max_evals=3000), FakeEstimator()
    )
    validate_plan(plan)
    assert len(plan.shards_of("hot")) > 1
    assert plan.cost.max_ms < 0.9 * plan.meta["tablewise_ms"]


def test_oracle_without_exhaustive_part_and_with_a_table_too_big_for_a_device():
    rows = int(1.6 * GB) // (128 * 4)
    tables = [make_table("big", rows=rows, dim=128)] + make_tables(5, seed=1)
    plan = priced(
        oracle_plan(tables, make_cluster(4, memory_gb=1), FakeEstimator(), max_evals=1000),
        FakeEstimator(),
    )
    validate_plan(plan)
    assert not plan.meta["exhaustive"] and plan.meta["tablewise_ms"] is None
    small = oracle_plan(
        make_tables(10), make_cluster(4), FakeEstimator(), max_evals=500, exhaustive_limit=10
    )
    assert not small.meta["exhaustive"]
    validate_plan(small)


def test_oracle_is_seeded():
    tables, cluster = make_tables(7, seed=6), make_cluster(4)
    a = priced(
        oracle_plan(tables, cluster, FakeEstimator(), max_evals=1500, seed=1), FakeEstimator()
    )
    b = priced(
        oracle_plan(tables, cluster, FakeEstimator(), max_evals=1500, seed=1), FakeEstimator()
    )
    assert a == b


def test_oracle_rejects_start_plans_of_other_tables():
    tables, cluster = make_tables(5), make_cluster(2)
    other = priced(greedy_grid(make_tables(4), cluster, FakeEstimator()), FakeEstimator())
    with pytest.raises(ValueError, match="start plans"):
        oracle_plan(tables, cluster, FakeEstimator(), max_evals=10, starts=[other])


def test_the_oracle_gap_bench_runs_with_the_planners_defaults(tmp_path, monkeypatch):
    # its plans come back on a cluster with I/O buffers (the planner's default); the
    # oracle must search that same cluster
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench"
    monkeypatch.syspath_prepend(str(bench))
    import oracle_gap

    out = tmp_path / "gap.md"
    argv = ["--tasks", "1", "--max-evals", "50", "--searchers", "greedy-grid,lookup"]
    assert oracle_gap.main([*argv, "--verify-top", "2", "--out", str(out)]) == 0
    assert "greedy-grid" in out.read_text()
