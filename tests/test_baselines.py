import pytest

from neuroshard.search.baselines import KEYS, greedy_baseline, greedy_by, random_plan
from neuroshard.types import PlanInfeasibleError, UnknownNameError

from factories import GB, FakeEstimator, make_cluster, make_table, make_tables, priced


def four_tables():
    """Each key ranks these differently. Key values (dim, size, lookup, size-lookup):
    A 128, 1280, 128, 128; B 16, 16e6, 16, 96; C 32, 3200, 320, 640; D 32, 3.2e6, 256, 1280.
    """
    return [
        make_table("A", rows=10, dim=128, pooling_factor=1.0),
        make_table("B", rows=1_000_000, dim=16, pooling_factor=1.0),
        make_table("C", rows=100, dim=32, pooling_factor=10.0),
        make_table("D", rows=100_000, dim=32, pooling_factor=8.0),
    ]


# With four empty devices, the k-th table in key order lands on device k.
@pytest.mark.parametrize(
    "key, ranks",
    [
        ("dim", {"A": 0, "C": 1, "D": 2, "B": 3}),  # C and D tie at 32: input order kept
        ("size", {"B": 0, "D": 1, "C": 2, "A": 3}),
        ("lookup", {"C": 0, "D": 1, "A": 2, "B": 3}),
        ("size-lookup", {"D": 0, "C": 1, "A": 2, "B": 3}),
    ],
)
def test_each_key_sorts_by_its_own_value(key, ranks):
    plan = priced(
        greedy_baseline(four_tables(), make_cluster(4), FakeEstimator(), key=key), FakeEstimator()
    )
    assert {s.table: s.device for s in plan.shards} == ranks


def test_greedy_puts_each_table_on_the_smallest_running_sum():
    dims = [64, 32, 32, 16, 8]
    tables = [make_table(f"t{i}", dim=d) for i, d in enumerate(dims)]
    plan = priced(
        greedy_baseline(tables, make_cluster(2), FakeEstimator(), key="dim"), FakeEstimator()
    )
    # 64 -> d0; 32 -> d1; 32 -> d1 (32 < 64); 16 -> d0 (tie 64/64: lowest index); 8 -> d1.
    assert [s.device for s in plan.shards] == [0, 1, 1, 0, 1]
    assert plan.dim_sums() == [80, 72]


def test_greedy_skips_devices_without_memory_left():
    rows = int(0.6 * GB) // (16 * 4)  # 0.6 GiB each: one per 1 GiB device
    tables = [
        make_table("big", rows=rows, dim=16, pooling_factor=50.0),
        make_table("big2", rows=rows, dim=16, pooling_factor=1.0),
        make_table("tiny", rows=100, dim=16, pooling_factor=1.0),
    ]
    plan = priced(
        greedy_baseline(tables, make_cluster(2, memory_gb=1), FakeEstimator(), key="lookup"),
        FakeEstimator(),
    )
    # big -> d0, big2 -> d1 although d0 has the larger lookup sum... then tiny -> d1.
    assert [s.device for s in plan.shards] == [0, 1, 1]
    assert max(plan.memory_bytes()) <= GB


def test_greedy_by_is_the_keyed_greedy():
    tables, cluster = make_tables(20), make_cluster(4)
    for key in KEYS:
        plan = greedy_by(key)(tables, cluster, FakeEstimator())
        assert plan == greedy_baseline(tables, cluster, FakeEstimator(), key=key)


def test_greedy_accepts_a_key_function():
    tables = four_tables()
    plan = priced(
        greedy_baseline(tables, make_cluster(4), FakeEstimator(), key=lambda t: 1 / t.rows),
        FakeEstimator(),
    )
    assert {s.table: s.device for s in plan.shards} == {"A": 0, "C": 1, "D": 2, "B": 3}


def test_unknown_key_lists_valid_keys():
    with pytest.raises(UnknownNameError, match="size-lookup"):
        greedy_by("rows")


def test_baselines_are_table_wise_and_plain():
    tables, cluster = make_tables(20), make_cluster(4)
    for plan in [random_plan(tables, cluster, FakeEstimator())] + [
        greedy_baseline(tables, cluster, FakeEstimator(), key=k) for k in KEYS
    ]:
        assert [(s.table, s.start, s.end) for s in plan.shards] == [
            (t.name, 0, t.dim) for t in tables
        ]
        assert plan.cost is None  # the planner prices plans


def test_random_is_seeded():
    tables, cluster = make_tables(30), make_cluster(8)
    a = priced(random_plan(tables, cluster, FakeEstimator(), seed=1), FakeEstimator())
    b = priced(random_plan(tables, cluster, FakeEstimator(), seed=1), FakeEstimator())
    c = priced(random_plan(tables, cluster, FakeEstimator(), seed=2), FakeEstimator())
    assert a == b
    assert a.shards != c.shards


def test_random_respects_memory():
    rows = int(0.3 * GB) // (32 * 4)
    tables = [make_table(f"t{i}", rows=rows, dim=32) for i in range(12)]  # 3 per device
    cluster = make_cluster(4, memory_gb=1)
    for seed in range(5):
        plan = priced(random_plan(tables, cluster, FakeEstimator(), seed=seed), FakeEstimator())
        assert max(plan.memory_bytes()) <= GB


@pytest.mark.parametrize("search", [random_plan, greedy_by("size")])
def test_baselines_name_a_table_that_cannot_fit(search):
    tables = [make_table("ok"), make_table("huge", rows=int(1.2 * GB) // 256, dim=64)]
    with pytest.raises(PlanInfeasibleError, match="'huge'.*largest free device memory"):
        search(tables, make_cluster(2, memory_gb=1), FakeEstimator())


def test_greedy_names_the_table_left_without_room():
    rows = int(0.6 * GB) // (32 * 4)
    tables = [make_table(f"t{i}", rows=rows, dim=32) for i in range(3)]
    with pytest.raises(PlanInfeasibleError, match="'t2'.*largest free device memory"):
        greedy_baseline(tables, make_cluster(2, memory_gb=1), FakeEstimator(), key="dim")
