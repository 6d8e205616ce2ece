from dataclasses import replace

import pytest

from neuroshard.planner import Planner
from neuroshard.search import (
    BASELINES,
    DEFAULT_SEARCHER,
    get_searcher,
    plan_cost,
    searcher_names,
)
from neuroshard.types import (
    DIM_MULTIPLE,
    Constraints,
    Searcher,
    TableConstraint,
    UnknownNameError,
)

from factories import FakeEstimator, assert_fake_plan_cost, make_cluster, make_tables

COLUMNS_ONLY = Constraints(default=TableConstraint(sharding_types=("table_wise", "column_wise")))


@pytest.mark.parametrize("num_devices", [4, 8])
@pytest.mark.parametrize("name", searcher_names())
def test_every_searcher_returns_a_valid_costed_plan(name, num_devices):
    tables, cluster = make_tables(30), make_cluster(num_devices)
    searcher = get_searcher(name)
    assert isinstance(searcher, Searcher)
    assert searcher(tables, cluster, FakeEstimator(), seed=0, budget_s=None).cost is None
    # full caps, and the table- and column-wise space the fake's reference costs know
    takes = (
        {"constraints": COLUMNS_ONLY} if name in ("neuroshard", "greedy-grid", "torchrec") else {}
    )
    plan = Planner(FakeEstimator(), name, reserve=0.0, **takes).plan(tables, cluster)

    assert plan.tables == tuple(tables) and plan.cluster == replace(cluster, io_buffers=True)
    for t in tables:
        shards = plan.shards_of(t.name)
        assert [(a.end, b.start) for a, b in zip(shards, shards[1:])] == [
            (a.end, a.end) for a in shards[:-1]
        ]  # contiguous, no overlap
        assert shards[0].start == 0 and shards[-1].end == t.dim
        assert all(s.width > 0 and s.width % DIM_MULTIPLE == 0 for s in shards)
        assert all(0 <= s.device < num_devices for s in shards)
    assert all(m <= cap for m, cap in zip(plan.memory_bytes(), cluster.memory_per_device_bytes))
    # the one formula that prices every plan, against a count by hand of this plan's cost
    assert_fake_plan_cost(plan, plan_cost(plan, FakeEstimator()))
    assert plan.meta["searcher"] == name
    assert plan.meta["search_seconds"] >= 0


def test_registry_names():
    names = searcher_names()
    assert DEFAULT_SEARCHER == "neuroshard"
    assert {"neuroshard", "greedy-grid", "surco", "torchrec"} | set(BASELINES) == set(names)


def test_unknown_searcher_lists_valid_names():
    with pytest.raises(UnknownNameError, match="greedy-grid.*neuroshard"):
        get_searcher("dreamshard")


def test_options_override_registered_defaults():
    tables, cluster = make_tables(12), make_cluster(4)
    narrow = get_searcher("neuroshard", width=1, max_splits=0)(tables, cluster, FakeEstimator())
    grid = get_searcher("greedy-grid")(tables, cluster, FakeEstimator())
    assert narrow == grid


def test_plan_shaped_searchers_take_the_plan_the_beam_prices_cheapest():
    from neuroshard.search import plan_shaped_searchers

    beam, grid = plan_shaped_searchers()
    assert (beam.__name__, grid.__name__) == ("neuroshard", "greedy-grid")
    assert beam.keywords["margin"] == 0.0  # the loads a model error would lure it to
