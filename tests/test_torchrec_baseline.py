"""TorchRec's planner as a baseline searcher (search/torchrec_baseline.py)."""

from __future__ import annotations

import pytest

pytest.importorskip("torchrec")

from neuroshard.plan_io import validate_plan  # noqa: E402
from neuroshard.search.scoring import plan_cost  # noqa: E402
from neuroshard.search.torchrec_baseline import torchrec_plan  # noqa: E402
from neuroshard.types import PlanInfeasibleError, TableSpec  # noqa: E402

from factories import FakeEstimator, make_cluster, make_tables  # noqa: E402


@pytest.mark.parametrize("cost_source", ["torchrec", "neuroshard"])
def test_torchrec_plans_ten_tables_on_four_devices(cost_source):
    tables = make_tables(10, seed=3)
    cluster = make_cluster(4, memory_gb=4.0)
    est = FakeEstimator(cluster.batch_size)
    plan = torchrec_plan(tables, cluster, est, seed=0, cost_source=cost_source)
    validate_plan(plan)  # every table tiled once, widths % 4, within memory caps
    assert plan.tables == tuple(tables)
    assert plan.cluster == cluster
    assert plan.cost is None and plan.meta["cost_source"] == cost_source
    assert plan_cost(plan, est).max_ms > 0
    assert len({s.device for s in plan.shards}) > 1  # it spreads the tables


def test_torchrec_respects_memory_caps_by_splitting_or_spreading():
    # four 1 GB tables on four 1.2 GB devices: only one table fits per device
    tables = [TableSpec(f"t{i}", rows=(1 << 30) // (4 * 64), dim=64) for i in range(4)]
    cluster = make_cluster(4, memory_gb=1.2)
    plan = torchrec_plan(tables, cluster, FakeEstimator())
    validate_plan(plan)
    assert sorted(plan.memory_bytes()) == [1 << 30] * 4


def test_no_plan_is_a_one_line_infeasible_error():
    tables = make_tables(10, seed=1)
    with pytest.raises(PlanInfeasibleError) as err:
        torchrec_plan(tables, make_cluster(4, memory_gb=0.5), FakeEstimator())
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("TorchRec found no plan for 10 tables needing ")
    assert "on 4 devices of at most 536870912 bytes" in message
    assert "insufficient storage" in message and "Global storage requirement" in message


def test_unknown_cost_source():
    with pytest.raises(ValueError, match="cost_source"):
        torchrec_plan(make_tables(2), make_cluster(2), FakeEstimator(), cost_source="magic")


# --------------------------------------------------------------------------- the whole space


def test_torchrec_plans_row_wise_when_no_table_split_fits():
    # a 4-wide table of 64 MB on 2 devices of 40 MB: only row blocks fit
    from neuroshard.types import Cluster

    tables = [TableSpec("big", rows=4_000_000, dim=4, pooling_factor=10.0)]
    plan = torchrec_plan(tables, Cluster.uniform(2, 40 * 10**6), FakeEstimator())
    validate_plan(plan)
    assert plan.sharding_type_of("big") in ("row_wise", "table_row_wise")


def test_torchrec_takes_type_constraints_and_refuses_pins():
    from neuroshard.types import ConstraintError, Constraints, TableConstraint

    tables, cluster = make_tables(6, seed=2), make_cluster(4)
    columns = Constraints(default=TableConstraint(sharding_types=("table_wise", "column_wise")))
    plan = torchrec_plan(tables, cluster, FakeEstimator(), constraints=columns)
    assert {plan.sharding_type_of(t.name) for t in tables} <= {"table_wise", "column_wise"}
    with pytest.raises(ConstraintError, match="'t0'.*pin"):
        torchrec_plan(
            tables,
            cluster,
            FakeEstimator(),
            constraints=Constraints({"t0": TableConstraint(devices=(1,))}),
        )
