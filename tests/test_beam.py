import numpy as np
import pytest

from neuroshard.plan_io import validate_plan
from neuroshard.search.beam import (
    DEFAULT_MARGIN,
    affordable,
    beam_candidates,
    beam_search,
    beats_start,
    expand,
    grid_search,
    halve,
    initial_state,
)
from neuroshard.search.greedy import greedy_grid
from neuroshard.search.scoring import Scorer, plan_cost
from neuroshard.types import Cluster, Constraints, PlanInfeasibleError, TableConstraint

from factories import (
    GB,
    FakeEstimator,
    assert_fake_plan_cost,
    make_cluster,
    make_table,
    make_tables,
    priced,
)

# Table- and column-wise only: the space the fake's reference costs (factories) know.
COLUMNS_ONLY = Constraints(default=TableConstraint(sharding_types=("table_wise", "column_wise")))


def hot_tables():
    """One table doing most of the work: worth splitting across devices."""
    return [make_table("hot", rows=500_000, dim=128, pooling_factor=60.0)] + [
        make_table(f"cold{i}", rows=50_000, dim=16, pooling_factor=2.0) for i in range(7)
    ]


@pytest.mark.parametrize("num_devices", [4, 8])
def test_width_one_without_splits_equals_greedy_grid(num_devices):
    tables, cluster = make_tables(30, seed=6), make_cluster(num_devices)
    beam = priced(
        beam_search(tables, cluster, FakeEstimator(), width=1, max_splits=0), FakeEstimator()
    )
    grid = priced(greedy_grid(tables, cluster, FakeEstimator()), FakeEstimator())
    assert beam == grid  # shards, tables, cluster and cost; meta is not compared
    assert beam.meta["splits"] == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("num_devices", [4, 8])
def test_beam_is_never_worse_than_greedy_grid(seed, num_devices):
    tables, cluster = make_tables(20, seed=seed), make_cluster(num_devices)
    beam = priced(beam_search(tables, cluster, FakeEstimator(), max_splits=4), FakeEstimator())
    grid = priced(greedy_grid(tables, cluster, FakeEstimator()), FakeEstimator())
    assert beam.cost.max_ms <= grid.cost.max_ms * (1 + 1e-12)


def test_beam_splits_a_hot_table_and_beats_the_grid():
    tables, cluster = hot_tables(), make_cluster(4)
    beam = priced(
        beam_search(tables, cluster, FakeEstimator(), constraints=COLUMNS_ONLY), FakeEstimator()
    )
    grid = priced(greedy_grid(tables, cluster, FakeEstimator()), FakeEstimator())
    validate_plan(beam)
    assert len(beam.shards_of("hot")) > 1
    assert beam.meta["splits"] > 0
    assert beam.cost.max_ms < 0.9 * grid.cost.max_ms
    assert_fake_plan_cost(beam, plan_cost(beam, FakeEstimator()))


def test_beats_start_needs_the_whole_margin_from_every_member():
    assert beats_start([97.9], [100.0], 0.02)
    assert not beats_start([98.0], [100.0], 0.02)
    assert beats_start([99.9], [100.0], 0.0)
    assert not beats_start([100.0], [100.0], 0.0)
    assert beats_start([97.9, 9.7], [100.0, 10.0], 0.02)
    assert not beats_start([97.9, 9.9], [100.0, 10.0], 0.02)  # the second member disputes it


class _Indifferent(FakeEstimator):
    """Prices every busy device alike: it sees no gain in any plan."""

    def compute_ms(self, loads):
        return np.asarray([1.0 if load else 0.0 for load in loads])

    def bwd_comm_ms(self, dim_sums):
        return np.full(np.shape(dim_sums), 0.05)

    def fwd_comm_ms(self, dim_sums, waits_ms):
        return np.full(np.shape(dim_sums), 0.05)


class _Ensemble(FakeEstimator):
    """The fake, with members that price on their own."""

    def __init__(self, *members):
        super().__init__()
        self._members = members

    def members(self):
        return list(self._members)


def test_a_gain_one_member_disputes_keeps_the_greedy_grids_plan():
    tables, cluster = hot_tables(), make_cluster(4)

    def search(estimator):
        return beam_search(tables, cluster, estimator, constraints=COLUMNS_ONLY)

    agreed = search(_Ensemble(FakeEstimator(), FakeEstimator()))
    assert agreed.meta["kept_start"] is False and len(agreed.shards_of("hot")) > 1
    assert len(agreed.meta["start_member_ms"]) == 2
    disputed = search(_Ensemble(FakeEstimator(), _Indifferent()))
    assert disputed.meta["kept_start"] is True and len(disputed.shards_of("hot")) == 1


def test_a_searched_plan_replaces_the_greedy_grids_only_by_the_margin():
    tables, cluster = hot_tables(), make_cluster(4)

    def search(margin):
        return beam_search(
            tables, cluster, FakeEstimator(), constraints=COLUMNS_ONLY, margin=margin
        )

    best = priced(search(0.0), FakeEstimator())
    grid = priced(greedy_grid(tables, cluster, FakeEstimator()), FakeEstimator())
    gain = 1 - best.cost.max_ms / grid.cost.max_ms
    assert gain > DEFAULT_MARGIN
    assert best.meta["start_ms"] == pytest.approx(grid.cost.max_ms, rel=1e-9)
    assert best.meta["kept_start"] is False
    below = priced(search(gain * 0.99), FakeEstimator())
    assert below.shards == best.shards and below.meta["kept_start"] is False
    above = priced(search(gain * 1.01), FakeEstimator())
    assert above.shards == grid.shards and above.cost.max_ms == pytest.approx(grid.cost.max_ms)
    assert above.meta["kept_start"] is True
    assert len(above.shards_of("hot")) == 1


@pytest.mark.parametrize("margin", [-0.1, 1.0])
def test_margin_must_be_a_fraction(margin):
    with pytest.raises(ValueError, match="margin"):
        beam_search(hot_tables(), make_cluster(4), FakeEstimator(), margin=margin)


def test_beam_splits_stay_multiples_of_four_and_cover_columns():
    tables = [
        make_table("a", dim=24, pooling_factor=80.0),
        make_table("b", dim=8),
        make_table("c", dim=12, pooling_factor=50.0),
    ]
    plan = priced(
        beam_search(tables, make_cluster(4), FakeEstimator(), width=3, max_splits=10),
        FakeEstimator(),
    )
    validate_plan(plan)


def test_max_splits_bounds_the_number_of_splits():
    plan = priced(
        beam_search(hot_tables(), make_cluster(8), FakeEstimator(), max_splits=2), FakeEstimator()
    )
    assert plan.meta["splits"] <= 2


def test_table_larger_than_any_device_is_split_to_fit():
    rows = int(1.6 * GB) // (128 * 4)  # 1.6 GiB at dim 128: halves are 0.8 GiB
    tables = [make_table("big", rows=rows, dim=128), make_table("small")]
    cluster = make_cluster(4, memory_gb=1)
    with pytest.raises(PlanInfeasibleError, match="'big'"):
        greedy_grid(tables, cluster, FakeEstimator())
    plan = priced(beam_search(tables, cluster, FakeEstimator(), max_splits=0), FakeEstimator())
    validate_plan(plan)
    assert [s.width for s in plan.shards_of("big")] == [64, 64]
    assert max(plan.memory_bytes()) <= 1 * GB


def test_table_that_cannot_be_split_to_fit_is_named():
    rows = int(1.5 * GB) // (8 * 4)  # even 4 columns take 0.75 GiB > 0.5 GiB
    tables = [make_table("wide", rows=rows, dim=8), make_table("small")]
    with pytest.raises(PlanInfeasibleError, match="'wide'.*fits no device"):
        beam_search(
            tables, make_cluster(4, memory_gb=0.5), FakeEstimator(), constraints=COLUMNS_ONLY
        )
    # row blocks of 0.375 GiB do fit
    plan = beam_search(tables, make_cluster(4, memory_gb=0.5), FakeEstimator())
    validate_plan(plan)
    assert plan.sharding_type_of("wide") in ("row_wise", "table_row_wise")


def test_beam_is_deterministic():
    tables, cluster = make_tables(15, seed=9), make_cluster(4)
    a = priced(beam_search(tables, cluster, FakeEstimator(), max_splits=3), FakeEstimator())
    b = priced(beam_search(tables, cluster, FakeEstimator(), max_splits=3, seed=7), FakeEstimator())
    assert a == b


def test_halve_splits_the_widest_shard_in_multiples_of_four():
    assert halve((64,)) == (32, 32)
    assert halve((32, 16, 16)) == (16, 16, 16, 16)
    assert halve((8, 4)) == (4, 4, 4)
    assert halve((4, 4)) is None  # half would be 2
    assert halve((12,)) is None  # half 6 is not a multiple of 4
    assert halve((24, 8)) == (12, 12, 8)


def test_expand_takes_largest_and_costliest_tables():
    # 12 tables: the 10 largest (by rows) and the 10 costliest (by pooling) differ.
    tables = [
        make_table(f"t{i}", rows=1000 * (i + 1), dim=64, pooling_factor=100.0 * 0.5**i)
        for i in range(12)
    ]
    cluster = make_cluster(4)
    state = initial_state(tables, cluster)
    children = expand(
        state,
        tables,
        Scorer(FakeEstimator(), cluster=cluster),
        top_k=2,
        constraints=COLUMNS_ONLY,
        bulk_moves=False,
    )
    split = sorted(
        next(i for i, (c, s) in enumerate(zip(child, state)) if c != s) for child in children
    )
    assert split == [0, 1, 10, 11]  # costliest: t0, t1 (pooling); largest: t11, t10 (rows)
    assert all(child[i].widths == (32, 32) for child, i in zip(children, split))


def test_expand_skips_tables_that_cannot_be_halved():
    tables = [make_table("a", dim=4), make_table("b", dim=12), make_table("c", dim=16)]
    cluster = make_cluster(2)
    state = initial_state(tables, cluster)
    children = expand(
        state,
        tables,
        Scorer(FakeEstimator(), cluster=cluster),
        constraints=COLUMNS_ONLY,
        bulk_moves=False,
    )
    assert [tuple(layout.widths for layout in child) for child in children] == [
        ((4,), (12,), (8, 8))
    ]


# --------------------------------------------------------------------------- additive path, budget

from test_scoring import AdditiveEstimator, Opaque  # noqa: E402


@pytest.mark.parametrize("num_devices", [4, 8])
def test_beam_additive_path_equals_generic_path(num_devices):
    tables, cluster = make_tables(20, seed=11) + hot_tables(), make_cluster(num_devices)
    fast = beam_search(tables, cluster, AdditiveEstimator(), max_splits=4)
    slow = beam_search(tables, cluster, Opaque(AdditiveEstimator()), max_splits=4)
    assert fast.shards == slow.shards
    assert fast.meta["splits"] == slow.meta["splits"]
    if num_devices == 8:  # at 4 devices no split pays under this estimator
        assert fast.meta["splits"] > 0


def test_time_budget_keeps_a_valid_plan_no_worse_than_the_grid(caplog):
    tables, cluster = hot_tables(), make_cluster(4)
    grid = priced(greedy_grid(tables, cluster, FakeEstimator()), FakeEstimator())
    with caplog.at_level("WARNING", logger="neuroshard.search.beam"):
        tight = beam_search(tables, cluster, FakeEstimator(), budget_s=1e-6)
    assert "start placement alone took" in caplog.text  # a budget it cannot keep is named
    tight = priced(tight, FakeEstimator())
    validate_plan(tight)
    assert tight.meta["beam_steps"] == 0 and tight.meta["budget_cut"] > 0
    assert tight.shards == grid.shards
    caplog.clear()
    with caplog.at_level("WARNING", logger="neuroshard.search.beam"):
        roomy = beam_search(tables, cluster, FakeEstimator(), budget_s=600.0)
    assert "start placement" not in caplog.text
    roomy = priced(roomy, FakeEstimator())
    free = priced(beam_search(tables, cluster, FakeEstimator()), FakeEstimator())
    assert roomy.meta["budget_cut"] == 0 and roomy.shards == free.shards
    assert "budget_cut" not in free.meta


def test_time_budget_must_be_positive():
    with pytest.raises(ValueError, match="budget_s"):
        beam_search(hot_tables(), make_cluster(4), FakeEstimator(), budget_s=0)


def test_affordable_children_are_the_most_promising():
    a, b, c = ((8,),), ((4, 4),), ((16,),)
    candidates = [((1, -5.0, 0), a), ((0, -1.0, 1), b), ((0, -3.0, 2), c)]
    assert affordable(candidates, 10.0, 1.0) == [a, b, c]  # all fit: order kept
    assert affordable(candidates, 2.5, 1.0) == [c, b]  # best beam state, costlier shard first
    assert affordable(candidates, 0.5, 1.0) == []
    assert affordable(candidates, -1.0, 1.0) == []


def test_beam_candidates_are_the_cheapest_distinct_plans_the_beam_placed():
    tables, cluster, fake = hot_tables(), make_cluster(4), FakeEstimator()
    plans = beam_candidates(tables, cluster, fake, keep=6, constraints=COLUMNS_ONLY)
    best = beam_search(tables, cluster, fake, constraints=COLUMNS_ONLY)
    assert plans[0].shards == best.shards and plans[0].meta == best.meta
    costs = [plan_cost(p, fake).max_ms for p in plans]
    assert len(plans) == 6 and costs == sorted(costs)
    assert len({p.shards for p in plans}) == 6  # distinct placements
    for p in plans:
        validate_plan(p)
    assert beam_candidates(tables, cluster, fake, keep=1, constraints=COLUMNS_ONLY)[0].shards == (
        best.shards
    )
    with pytest.raises(ValueError, match="keep >= 1"):
        beam_candidates(tables, cluster, fake, keep=0)


def test_without_a_budget_the_default_cap_bounds_the_beam_and_says_so(caplog):
    tables, cluster, fake = make_tables(30), make_cluster(4), FakeEstimator()
    free = beam_search(tables, cluster, fake, cap_s=None)
    assert "time_cap_cut" not in free.meta and "budget_cut" not in free.meta
    assert beam_search(tables, cluster, fake).shards == free.shards  # far inside the default
    with caplog.at_level("WARNING", logger="neuroshard.search.beam"):
        capped = beam_search(tables, cluster, fake, cap_s=1e-6)
    assert capped.meta["time_cap_cut"] > 0 and "time cap" in caplog.text
    budgeted = beam_search(tables, cluster, fake, cap_s=1e-6, budget_s=60.0)
    assert budgeted.shards == free.shards and budgeted.meta["budget_cut"] == 0
    with pytest.raises(ValueError, match="cap_s must be positive"):
        beam_search(tables, cluster, fake, cap_s=0.0)


def test_a_step_near_its_deadline_is_placed_in_chunks_that_stop_in_time(monkeypatch):
    import neuroshard.search.beam as beam

    tables, cluster, fake = make_tables(30), make_cluster(4), FakeEstimator()
    space = beam.Space(tables, cluster, Scorer(fake, cluster=cluster), None)
    start = space.initial_state()
    children = [c for c, _ in beam._children(start, space, 10, True)][:12]
    assert len(children) == 12
    clock = {"now": 0.0}
    calls = []

    def fake_place_many(problems, cluster_, scorer):
        calls.append(len(problems))
        clock["now"] += 1.0 * len(problems)  # one second per child
        return ["placed"] * len(problems)

    monkeypatch.setattr(beam.time, "perf_counter", lambda: clock["now"])
    monkeypatch.setattr(beam, "place_many", fake_place_many)
    # No deadline, or one far away: one lockstep call.
    assert len(beam._place_until(children, space, cluster, None, None, 0.0, 1.0)) == 12
    assert len(beam._place_until(children, space, cluster, None, 100.0, 0.0, 1.0)) == 12
    assert calls == [12, 12]
    # 7 s to the deadline at 1 s per child: chunks of 3, stopping before the one that
    # would end past it.
    calls.clear()
    clock["now"] = 0.0
    placed = beam._place_until(children, space, cluster, None, 7.0, 0.0, 1.0)
    assert calls == [3, 3] and len(placed) == 6 and clock["now"] <= 7.0


def test_beam_candidates_always_hold_the_greedy_grid_plan():
    tables, cluster, fake = hot_tables(), make_cluster(4), FakeEstimator()
    grid = grid_search(tables, cluster, fake, constraints=COLUMNS_ONLY)
    for keep in (2, 3, 6):
        plans = beam_candidates(tables, cluster, fake, keep=keep, constraints=COLUMNS_ONLY)
        assert len(plans) == keep and any(p.shards == grid.shards for p in plans)
        assert plans[0].shards != grid.shards  # the beam found better, first


def test_greedy_grid_searches_on_when_its_start_does_not_pack():
    # three tables of 60% of a device on two devices: each fits alone, table-wise they do
    # not pack, a column split of one of them does
    tables = [make_table(f"t{i}", rows=2_343, dim=64, pooling_factor=2.0) for i in range(3)]
    cluster = Cluster.uniform(2, 1_000_000)
    with pytest.raises(PlanInfeasibleError):
        beam_search(tables, cluster, FakeEstimator(), max_splits=0, constraints=COLUMNS_ONLY)
    plan = grid_search(tables, cluster, FakeEstimator(), constraints=COLUMNS_ONLY)
    validate_plan(plan)
    assert plan.meta["start_packed"] is False and len(plan.shards) > len(tables)


def test_without_a_packing_start_the_margin_is_taken_from_the_greedy_grids_plan():
    # five tables of 60% of a device on four do not pack table-wise (see above), and a hot
    # table is worth splitting: the greedy grid's plan is the first packing step's cheapest
    # state, and the beam replaces it only by the margin, as it would the start
    tables = [make_table(f"t{i}", rows=2_343, dim=64, pooling_factor=2.0) for i in range(5)]
    tables.append(make_table("hot", rows=100, dim=128, pooling_factor=20.0))
    cluster, fake = Cluster.uniform(4, 1_000_000), FakeEstimator()
    grid = priced(grid_search(tables, cluster, fake, constraints=COLUMNS_ONLY), fake)
    free = priced(beam_search(tables, cluster, fake, constraints=COLUMNS_ONLY, margin=0.0), fake)
    assert free.cost.max_ms < grid.cost.max_ms  # the search finds better than the grid's
    assert free.meta["start_packed"] is False and free.meta["kept_start"] is False
    assert free.meta["start_ms"] == pytest.approx(grid.cost.max_ms, rel=1e-9)
    gain = 1 - free.cost.max_ms / grid.cost.max_ms
    kept = beam_search(tables, cluster, fake, constraints=COLUMNS_ONLY, margin=gain * 1.01)
    assert kept.shards == grid.shards and kept.meta["kept_start"] is True
    plans = beam_candidates(tables, cluster, fake, keep=2, constraints=COLUMNS_ONLY)
    assert any(p.shards == grid.shards for p in plans)


@pytest.mark.parametrize("above", [False, True])
def test_the_polish_replaces_the_greedy_grids_plan_only_by_the_margin(monkeypatch, above):
    from neuroshard.search import polish, surco

    tables, cluster = hot_tables(), make_cluster(4)
    split = beam_search(tables, cluster, FakeEstimator(), constraints=COLUMNS_ONLY, margin=0.0)
    grid = priced(greedy_grid(tables, cluster, FakeEstimator()), FakeEstimator())
    gain = 1 - plan_cost(split, FakeEstimator()).max_ms / grid.cost.max_ms
    monkeypatch.setattr(surco, "surco_plan", lambda *args, **kwargs: split)
    margin = gain * (1.01 if above else 0.99)
    # No beam steps: the beam returns the greedy grid's plan and the polish offers ``split``.
    plan = polish.neuroshard_search(
        tables, cluster, FakeEstimator(), budget_s=4.0, max_splits=0, margin=margin
    )
    assert plan.meta["polish"]["kept"] == ("beam" if above else "surco")
    assert plan.shards == (grid.shards if above else split.shards)


def test_a_budget_leaves_states_unexpanded_when_an_expansion_would_overrun_it(monkeypatch):
    import time

    from neuroshard.search import beam

    slow = beam._children

    def children(*args, **kwargs):  # an expansion as slow as at 1,000 tables
        time.sleep(0.2)
        return slow(*args, **kwargs)

    monkeypatch.setattr(beam, "_children", children)
    started = time.perf_counter()
    plan = beam_search(make_tables(30), make_cluster(4), FakeEstimator(), budget_s=0.5)
    assert plan.meta["unexpanded_states"] > 0
    assert time.perf_counter() - started < 1.0  # without the check: 0.2 s per state, 10 steps
