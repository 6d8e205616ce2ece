import pytest

from neuroshard.plan_io import validate_plan
from neuroshard.search import greedy
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

from factories import (
    GB,
    FakeEstimator,
    assert_fake_plan_cost,
    make_cluster,
    make_table,
    make_tables,
    priced,
)


def rows_for(gib: float, dim: int) -> int:
    return int(gib * GB) // (dim * 4)


def test_grid_covers_every_table_and_records_its_scale():
    tables, cluster, est = make_tables(20), make_cluster(4), FakeEstimator()
    plan = priced(greedy_grid(tables, cluster, est), est)
    validate_plan(plan)
    assert len(plan.shards) == len(tables)  # table-wise by default
    assert_fake_plan_cost(plan, plan_cost(plan, FakeEstimator()))
    assert plan.meta["scale"] in GRID_SCALES


def test_grid_respects_memory_caps():
    # Eight 0.45 GiB tables on four 1 GiB devices: only two fit per device. The first
    # table is so costly that, without the cap, the greedy would stack the rest elsewhere.
    dim = 32
    tables = [
        make_table(
            f"t{i}", rows=rows_for(0.45, dim), dim=dim, pooling_factor=200.0 if i == 0 else 1.0
        )
        for i in range(8)
    ]
    cluster = make_cluster(4, memory_gb=1)
    plan = priced(greedy_grid(tables, cluster, FakeEstimator()), FakeEstimator())
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
    tables = [make_table(f"t{i}", rows=100_000, dim=32, pooling_factor=10.0) for i in range(16)]
    plan = priced(greedy_grid(tables, make_cluster(4), FakeEstimator()), FakeEstimator())
    compute = [d.compute_ms for d in plan.cost.devices]
    assert max(compute) / min(compute) < 1.05
    assert plan.dim_sums() == [128] * 4


def test_grid_balances_mixed_tables_better_than_one_device():
    tables, est = make_tables(40, seed=1), FakeEstimator()
    plan = priced(greedy_grid(tables, make_cluster(8), est), est)
    compute = [d.compute_ms for d in plan.cost.devices]
    assert max(compute) / min(compute) < 1.5


def test_grid_keeps_the_best_scale():
    tables, cluster = make_tables(30, seed=2), make_cluster(4)
    best = priced(greedy_grid(tables, cluster, FakeEstimator()), FakeEstimator())
    each = [
        plan_cost(
            greedy_grid(tables, cluster, FakeEstimator(), scales=(s,)), FakeEstimator()
        ).max_ms
        for s in GRID_SCALES
    ]
    assert best.cost.max_ms == pytest.approx(min(each), rel=1e-12)
    assert best.meta["scale"] == GRID_SCALES[each.index(min(each))]


def test_grid_steps_are_batched_across_scales():
    tables, est = make_tables(25, seed=4), FakeEstimator()
    greedy_grid(tables, make_cluster(8), est)
    # singles + one call per placement step + plan_cost; scoring hits the cache.
    assert est.compute_calls <= len(tables) + 2


def test_dim_cap_falls_back_when_no_device_fits_it():
    # Total dim 592 on 2 devices: the cap is 296 at scale 1.0. "hot" (the costliest) goes
    # first, to device 0. "wide" (512 columns) fits the cap nowhere, so the cap is dropped
    # for it alone and it goes where compute is lowest: the empty device 1. The small
    # tables would be cheapest beside "wide" (its compute is a third of "hot"'s), but
    # device 1 is over the cap, which still holds for them: all four go to device 0.
    tables = [
        make_table("hot", dim=16, pooling_factor=100.0),
        make_table("wide", dim=512, pooling_factor=1.0),
    ] + [make_table(f"t{i}", dim=16, pooling_factor=1.0) for i in range(4)]
    plan = priced(
        greedy_grid(tables, make_cluster(2), FakeEstimator(), scales=(1.0,)), FakeEstimator()
    )
    validate_plan(plan)
    assert {s.table: s.device for s in plan.shards} == {
        "hot": 0,
        "wide": 1,
        "t0": 0,
        "t1": 0,
        "t2": 0,
        "t3": 0,
    }
    assert plan.dim_sums() == [80, 512]


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
    together = place_many(problems, cluster, Scorer(FakeEstimator(), cluster=cluster))
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
    plan = priced(
        greedy_grid(tables, make_cluster(4), FakeEstimator(), splits={"a": (32, 16, 16)}),
        FakeEstimator(),
    )
    validate_plan(plan)
    assert [s.width for s in plan.shards_of("a")] == [32, 16, 16]
    assert [s.width for s in plan.shards_of("b")] == [32]


@pytest.mark.parametrize("splits", [{"a": (32, 16)}, {"a": (62, 2)}, {"zz": (64,)}])
def test_bad_splits_are_rejected(splits):
    with pytest.raises(TableSpecError):
        greedy_grid([make_table("a", dim=64)], make_cluster(2), FakeEstimator(), splits=splits)


def test_dim_cap_spreads_cheap_wide_tables():
    # One hot table: by compute alone every cold table would join the other device.
    tables = [make_table("hot", dim=8, pooling_factor=1000.0)] + [
        make_table(f"cold{i}", dim=16, pooling_factor=1.0) for i in range(6)
    ]
    cluster = make_cluster(2)
    uncapped = priced(
        greedy_grid(tables, cluster, FakeEstimator(), scales=(10.0,)), FakeEstimator()
    )
    assert [len(load) for load in uncapped.device_loads()] in ([1, 6], [6, 1])
    capped = priced(greedy_grid(tables, cluster, FakeEstimator(), scales=(1.0,)), FakeEstimator())
    assert sorted(len(load) for load in capped.device_loads()) == [3, 4]


# --------------------------------------------------------------------------- additive path

from test_scoring import AdditiveEstimator, Opaque  # noqa: E402


def mixed_problems(tables):
    return [
        shard_specs(tables),
        shard_specs(tables, {tables[0].name: (tables[0].dim // 2,) * 2}),
        shard_specs(tables[:7]),
        shard_specs(tables, {t.name: (t.dim // 2,) * 2 for t in tables[:5]}),
        [],
    ]


@pytest.mark.parametrize("merge_devices", [False, True])
@pytest.mark.parametrize("num_devices", [2, 4, 8])
@pytest.mark.parametrize("seed", [0, 5])
def test_additive_path_equals_generic_path(num_devices, seed, merge_devices, monkeypatch):
    if merge_devices:  # price equal device contents once at any size
        monkeypatch.setattr(greedy, "_DEDUP_CELLS", 0)
        monkeypatch.setattr(greedy, "_DEDUP_ROWS", 0)
    tables, cluster = make_tables(24, seed=seed), make_cluster(num_devices)
    problems = mixed_problems(tables)
    fast = Scorer(AdditiveEstimator())
    arrays = place_many(problems, cluster, fast)
    keys = place_many(problems, cluster, Scorer(Opaque(AdditiveEstimator())))
    assert fast.additive
    assert arrays == keys
    assert all(isinstance(p, Placement) for p in arrays)


def test_additive_grid_equals_generic_grid_under_tight_memory():
    # Memory binds: ten 0.45 GiB tables on six 1 GiB devices, costs skewed.
    dim = 32
    tables = [
        make_table(f"t{i}", rows=rows_for(0.45, dim), dim=dim, pooling_factor=100.0 / (i + 1))
        for i in range(10)
    ]
    cluster = make_cluster(6, memory_gb=1)
    fast = greedy_grid(tables, cluster, AdditiveEstimator())
    slow = greedy_grid(tables, cluster, Opaque(AdditiveEstimator()))
    assert fast.shards == slow.shards and fast.meta["scale"] == slow.meta["scale"]
    assert max(fast.memory_bytes()) <= 1 * GB


def test_additive_path_reports_the_table_left_without_room():
    tables = [make_table(f"t{i}", rows=rows_for(0.6, 32), dim=32) for i in range(3)]
    with pytest.raises(PlanInfeasibleError, match=r"'t2'.*largest free device memory"):
        greedy_grid(tables, make_cluster(2, memory_gb=1), AdditiveEstimator())
    ok = [make_table("a")]
    out = place_many([ok, tables], make_cluster(2, memory_gb=1), Scorer(AdditiveEstimator()))
    assert isinstance(out[0], Placement)
    assert isinstance(out[1], PlanInfeasibleError) and "'t2'" in str(out[1])


def test_additive_dim_cap_falls_back_and_spreads_cold_tables():
    tables = [make_table("hot", dim=8, pooling_factor=1000.0)] + [
        make_table(f"cold{i}", dim=16, pooling_factor=1.0) for i in range(6)
    ]
    cluster = make_cluster(2)
    uncapped = greedy_grid(tables, cluster, AdditiveEstimator(), scales=(10.0,))
    assert [len(load) for load in uncapped.device_loads()] in ([1, 6], [6, 1])
    capped = greedy_grid(tables, cluster, AdditiveEstimator(), scales=(1.0,))
    assert sorted(len(load) for load in capped.device_loads()) == [3, 4]
    wide = [make_table("wide", dim=512)] + [make_table(f"t{i}", dim=16) for i in range(4)]
    plan = greedy_grid(wide, cluster, AdditiveEstimator(), scales=(1.0,))
    validate_plan(plan)


def test_additive_steps_are_one_head_call_each():
    tables, est = make_tables(25, seed=4), AdditiveEstimator()
    scorer = Scorer(est)
    place(shard_specs(tables), make_cluster(8), est, scorer=scorer)
    # singles + one call per placement step + final compute; never whole loads
    assert scorer.compute_calls <= len(tables) + 2
    assert est.compute_calls == 0 and est.embedded == len(tables)


@pytest.fixture(scope="module")
def neural_model(tmp_path_factory):
    """A small NeuralCostModel fitted on fake-backend samples (seconds)."""
    import numpy as np

    from neuroshard.models.neural import NeuralCostModel
    from neuroshard.pretrain.augment import augment_tables, sample_comm_tasks, sample_compute_loads
    from neuroshard.pretrain.collect import collect
    from neuroshard.pretrain.dataset import load_comm, load_compute

    from factories import FakeBackend

    root = tmp_path_factory.mktemp("neural")
    tables = make_tables(30, seed=5)
    loads = sample_compute_loads(augment_tables(tables), 300, np.random.default_rng(0))
    tasks = sample_comm_tasks(tables, 100, np.random.default_rng(1), [4, 8])
    collect(loads, FakeBackend(), root / "compute", progress=False)
    collect(tasks, FakeBackend(), root / "comm", kind="comm", progress=False)
    return NeuralCostModel(max_epochs=3, patience=3, train_batch_size=64, seed=0).fit(
        load_compute(root / "compute"), load_comm(root / "comm")
    )


@pytest.mark.slow
@pytest.mark.parametrize("num_devices", [4, 8])
def test_neural_model_takes_the_additive_path_with_the_same_costs(neural_model, num_devices):
    tables, cluster = make_tables(24, seed=7), make_cluster(num_devices)
    fast = Scorer(neural_model)
    assert fast.additive
    problems = mixed_problems(tables)
    arrays = place_many(problems, cluster, fast)
    keys = place_many(problems, cluster, Scorer(Opaque(neural_model)))
    # Sums of float32 embeddings in another order: the same placements up to near-ties.
    assert [a.cost_ms for a in arrays] == pytest.approx([k.cost_ms for k in keys], rel=1e-4)
    plan = priced(greedy_grid(tables, cluster, neural_model), neural_model)
    assert plan.cost.max_ms == pytest.approx(arrays[0].cost_ms, rel=1e-5)


def test_equal_device_contents_are_priced_once(monkeypatch):
    tables, cluster = make_tables(24, seed=5), make_cluster(8)
    problems = mixed_problems(tables)
    plain = Scorer(AdditiveEstimator())
    expected = place_many(problems, cluster, plain)
    monkeypatch.setattr(greedy, "_DEDUP_CELLS", 0)
    monkeypatch.setattr(greedy, "_DEDUP_ROWS", 0)
    merged = Scorer(AdditiveEstimator())
    assert place_many(problems, cluster, merged) == expected
    assert merged.loads_computed < 0.8 * plain.loads_computed
