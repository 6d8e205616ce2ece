import pytest

from factories import GB, FakeEstimator, make_cluster, make_table, make_tables
from neuroshard.search.greedy import (
    GRID_SCALES,
    Placement,
    greedy_grid,
    place,
    place_many,
    shard_specs,
)
from neuroshard.search.scoring import Scorer, plan_cost
from neuroshard.types import PlanInfeasibleError, TableSpecError


def rows_for(gib: float, dim: int) -> int:
    return int(gib * GB) // (dim * 4)


def covers_exactly(plan):
    for t in plan.tables:
        shards = plan.shards_of(t.name)
        assert shards[0].start == 0 and shards[-1].end == t.dim
        assert all(a.end == b.start for a, b in zip(shards, shards[1:]))
        assert all(s.width % 4 == 0 and s.width > 0 for s in shards)


def test_grid_covers_every_table_and_attaches_cost():
    tables, cluster, est = make_tables(20), make_cluster(4), FakeEstimator()
    plan = greedy_grid(tables, cluster, est)
    covers_exactly(plan)
    assert len(plan.shards) == len(tables)  # table-wise by default
    assert plan.cost == plan_cost(plan, FakeEstimator())
    assert plan.meta["searcher"] == "greedy-grid" and plan.meta["scale"] in GRID_SCALES


def test_grid_respects_memory_caps():
    # Eight 0.45 GiB tables on four 1 GiB devices: only two fit per device. The first
    # table is so costly that, without the cap, the greedy would stack the rest elsewhere.
    dim = 32
    tables = [make_table(f"t{i}", rows=rows_for(0.45, dim), dim=dim,
                         pooling_factor=200.0 if i == 0 else 1.0) for i in range(8)]
    cluster = make_cluster(4, memory_gb=1)
    plan = greedy_grid(tables, cluster, FakeEstimator())
    assert max(plan.memory_bytes()) <= 1 * GB
    assert sorted(plan.memory_bytes()) == [2 * tables[0].size_bytes] * 4


def test_grid_names_a_table_larger_than_any_device():
    tables = [make_table("small"), make_table("huge", rows=rows_for(1.5, 64), dim=64)]
    with pytest.raises(PlanInfeasibleError, match=r"'huge'.*bytes.*largest device memory"):
        greedy_grid(tables, make_cluster(2, memory_gb=1), FakeEstimator())


def test_grid_names_the_table_left_without_room():
    # Three 0.6 GiB tables, two 1 GiB devices: 1.8 GiB fits in total but not per device.
    tables = [make_table(f"t{i}", rows=rows_for(0.6, 32), dim=32) for i in range(3)]
    with pytest.raises(PlanInfeasibleError, match=r"'t2'.*largest free device memory"):
        greedy_grid(tables, make_cluster(2, memory_gb=1), FakeEstimator())


def test_grid_reports_total_memory_shortfall():
    tables = [make_table(f"t{i}", rows=rows_for(0.9, 32), dim=32) for i in range(3)]
    with pytest.raises(PlanInfeasibleError, match=r"3 tables need .* in total"):
        greedy_grid(tables, make_cluster(2, memory_gb=1), FakeEstimator())


def test_grid_balances_equal_tables():
    tables = [make_table(f"t{i}", rows=100_000, dim=32, pooling_factor=10.0)
              for i in range(16)]
    plan = greedy_grid(tables, make_cluster(4), FakeEstimator())
    compute = [d.compute_ms for d in plan.cost.devices]
    assert max(compute) / min(compute) < 1.05
    assert plan.dim_sums() == [128] * 4


def test_grid_balances_mixed_tables_better_than_one_device():
    tables, est = make_tables(40, seed=1), FakeEstimator()
    plan = greedy_grid(tables, make_cluster(8), est)
    compute = [d.compute_ms for d in plan.cost.devices]
    assert max(compute) / min(compute) < 1.5


def test_grid_keeps_the_best_scale():
    tables, cluster = make_tables(30, seed=2), make_cluster(4)
    best = greedy_grid(tables, cluster, FakeEstimator())
    each = [greedy_grid(tables, cluster, FakeEstimator(), scales=(s,)).cost.max_ms
            for s in GRID_SCALES]
    assert best.cost.max_ms == pytest.approx(min(each), rel=1e-12)
    assert best.meta["scale"] == GRID_SCALES[each.index(min(each))]


def test_grid_steps_are_batched_across_scales():
    tables, est = make_tables(25, seed=4), FakeEstimator()
    greedy_grid(tables, make_cluster(8), est)
    # singles + one call per placement step + plan_cost; scoring hits the cache.
    assert est.compute_calls <= len(tables) + 2


def test_dim_cap_falls_back_when_no_device_fits_it():
    # A 512-wide table exceeds total_dim / 2 at every scale; it still gets placed.
    tables = [make_table("wide", dim=512)] + [make_table(f"t{i}", dim=16) for i in range(4)]
    plan = greedy_grid(tables, make_cluster(2), FakeEstimator(), scales=(1.0,))
    covers_exactly(plan)


def test_place_many_equals_placing_each_alone():
    tables = make_tables(20, seed=5)
    cluster = make_cluster(4)
    problems = [
        shard_specs(tables),
        shard_specs(tables, {tables[0].name: (tables[0].dim // 2,) * 2}),
        shard_specs(tables[:7]),
        shard_specs(tables, {t.name: (t.dim // 2,) * 2 for t in tables[:5]}),
        [],
    ]
    together = place_many(problems, cluster, Scorer(FakeEstimator()))
    alone = [place(specs, cluster, FakeEstimator()) for specs in problems]
    assert together == alone
    assert all(isinstance(p, Placement) for p in together)


def test_place_many_returns_errors_instead_of_raising():
    ok = [make_table("a")]
    bad = [make_table("b", rows=rows_for(2, 64), dim=64)]
    out = place_many([ok, bad], make_cluster(2, memory_gb=1), Scorer(FakeEstimator()))
    assert isinstance(out[0], Placement)
    assert isinstance(out[1], PlanInfeasibleError) and "'b'" in str(out[1])


def test_splits_give_column_shards_of_the_given_widths():
    tables = [make_table("a", dim=64), make_table("b", dim=32)]
    plan = greedy_grid(tables, make_cluster(4), FakeEstimator(), splits={"a": (32, 16, 16)})
    covers_exactly(plan)
    assert [s.width for s in plan.shards_of("a")] == [32, 16, 16]
    assert [s.width for s in plan.shards_of("b")] == [32]


@pytest.mark.parametrize("splits", [{"a": (32, 16)}, {"a": (62, 2)}, {"zz": (64,)}])
def test_bad_splits_are_rejected(splits):
    with pytest.raises(TableSpecError):
        greedy_grid([make_table("a", dim=64)], make_cluster(2), FakeEstimator(), splits=splits)


def test_dim_cap_spreads_cheap_wide_tables():
    # One hot table: by compute alone every cold table would join the other device.
    tables = [make_table("hot", dim=8, pooling_factor=1000.0)] + [
        make_table(f"cold{i}", dim=16, pooling_factor=1.0) for i in range(6)]
    cluster = make_cluster(2)
    uncapped = greedy_grid(tables, cluster, FakeEstimator(), scales=(10.0,))
    assert [len(load) for load in uncapped.device_loads()] in ([1, 6], [6, 1])
    capped = greedy_grid(tables, cluster, FakeEstimator(), scales=(1.0,))
    assert sorted(len(load) for load in capped.device_loads()) == [3, 4]
