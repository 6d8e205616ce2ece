import pytest

from neuroshard.models import default_model_dir
from neuroshard.planner import Planner, check_fits, plan_tables
from neuroshard.types import PlanInfeasibleError, TableSpec, UsageError

from factories import GB, FakeEstimator, make_cluster, make_tables


def test_planner_defaults_to_the_shipped_model_and_neuroshard():
    plan = Planner().plan(make_tables(12), make_cluster(4))
    assert plan.meta["searcher"] == "neuroshard"
    assert plan.cost.model.startswith("neural-sim")
    assert default_model_dir(8).name == "sim-h100-d8" and default_model_dir(3).name == "sim-h100-d4"


def test_time_budget_reaches_the_beam():
    tables = make_tables(30)
    budgeted = plan_tables(tables, make_cluster(4), FakeEstimator(), time_budget_s=1e-6)
    assert "budget_cut" in budgeted.meta and budgeted.meta["budget_cut"] > 0
    assert "budget_cut" not in plan_tables(tables, make_cluster(4), FakeEstimator()).meta
    # fast searchers ignore it rather than fail
    plan_tables(tables, make_cluster(4), FakeEstimator(), "lookup", time_budget_s=1.0)
    with pytest.raises(UsageError):
        plan_tables(tables, make_cluster(4), FakeEstimator(), time_budget_s=0)


def test_check_fits_names_the_culprits():
    with pytest.raises(PlanInfeasibleError, match="'huge'.*largest device"):
        check_fits([TableSpec("huge", rows=10**9, dim=128)], make_cluster(4, 1))
    tables = [TableSpec(f"t{i}", rows=2 * 10**6, dim=128) for i in range(10)]
    with pytest.raises(PlanInfeasibleError, match=r"in total.*'t0'"):
        check_fits(tables, make_cluster(2, 1))


def test_neuroshard_with_time_polishes_with_surco_and_is_never_worse():
    tables, cluster = make_tables(14, seed=3), make_cluster(4)
    beam = plan_tables(tables, cluster, FakeEstimator())
    polished = plan_tables(tables, cluster, FakeEstimator(), time_budget_s=6.0)
    assert polished.meta["polish"]["kept"] in ("beam", "surco")
    assert polished.cost.max_ms <= beam.cost.max_ms + 1e-12
    assert polished.meta["polish"]["beam_ms"] == pytest.approx(beam.cost.max_ms, rel=1e-9)
