import pytest

from neuroshard.feasibility import check_fits
from neuroshard.models import default_model_dir
from neuroshard.planner import Planner
from neuroshard.search import get_searcher
from neuroshard.types import (
    BackendError,
    PlanInfeasibleError,
    TableSpec,
    UnknownNameError,
    UsageError,
)

from factories import FakeEstimator, make_cluster, make_tables


def test_planner_defaults_to_the_shipped_model_and_neuroshard():
    plan = Planner().plan(make_tables(12), make_cluster(4))
    assert plan.meta["searcher"] == "neuroshard"
    assert plan.cost.model.startswith("neural-sim")
    assert default_model_dir(8).name == "sim-h100" and default_model_dir(4).name == "sim-h100"


def test_time_budget_reaches_the_beam():
    tables = make_tables(30)
    budgeted = Planner(FakeEstimator(), budget_s=1e-6).plan(tables, make_cluster(4))
    assert "budget_cut" in budgeted.meta and budgeted.meta["budget_cut"] > 0
    assert "budget_cut" not in Planner(FakeEstimator()).plan(tables, make_cluster(4)).meta
    # fast searchers take it and finish well inside it
    fast = Planner(FakeEstimator(), "lookup", budget_s=1.0).plan(tables, make_cluster(4))
    assert fast.meta["search_seconds"] < 1.0
    for bad in (0, -1.0, float("inf"), float("nan")):
        with pytest.raises(UsageError, match="time budget"):
            Planner(FakeEstimator(), budget_s=bad)


def test_check_fits_names_the_culprits():
    with pytest.raises(PlanInfeasibleError, match="'huge'.*largest device"):
        check_fits([TableSpec("huge", rows=10**9, dim=128)], make_cluster(4, 1))
    tables = [TableSpec(f"t{i}", rows=2 * 10**6, dim=128) for i in range(10)]
    with pytest.raises(PlanInfeasibleError, match=r"in total.*'t0'"):
        check_fits(tables, make_cluster(2, 1))


def test_the_planner_checks_feasibility_before_the_model_loads():
    loads = []

    def model_for(cluster):
        loads.append(cluster)
        return FakeEstimator()

    with pytest.raises(PlanInfeasibleError):
        Planner(model_for).plan([TableSpec("huge", rows=10**9, dim=128)], make_cluster(4, 1))
    assert loads == []
    Planner(model_for).plan(make_tables(6), make_cluster(2))
    assert len(loads) == 1


def test_the_planner_prices_and_labels_any_searcher_once():
    tables, cluster = make_tables(8), make_cluster(2)
    plain = get_searcher("greedy-grid")(tables, cluster, FakeEstimator())
    assert plain.cost is None and "searcher" not in plain.meta
    plan = Planner(FakeEstimator(), get_searcher("greedy-grid")).plan(tables, cluster)
    assert plan.shards == plain.shards
    assert plan.cost is not None and plan.meta["searcher"] == "greedy-grid"


def test_neuroshard_with_time_polishes_with_surco_and_is_never_worse():
    tables, cluster = make_tables(14, seed=3), make_cluster(4)
    beam = Planner(FakeEstimator()).plan(tables, cluster)
    polished = Planner(FakeEstimator(), budget_s=6.0).plan(tables, cluster)
    assert polished.meta["polish"]["kept"] in ("beam", "surco")
    assert polished.cost.max_ms <= beam.cost.max_ms + 1e-12
    assert polished.meta["polish"]["beam_ms"] == pytest.approx(beam.cost.max_ms, rel=1e-9)


class _Disagrees:
    """A verifier that disagrees with the model: a device's compute shrinks with the
    square of its shard count, so crowded devices look cheap."""

    name = "disagrees"

    def __init__(self, model):
        self.model = model

    def __getattr__(self, attr):
        return getattr(self.model, attr)

    def compute_ms(self, loads):
        return [ms / len(load) ** 2 for ms, load in zip(self.model.compute_ms(loads), loads)]


def test_verification_keeps_the_candidate_the_verifier_prices_cheapest():
    tables, cluster = make_tables(20), make_cluster(4)
    model = FakeEstimator()
    plain = Planner(model).plan(tables, cluster)
    same = Planner(model, verify=model, top=4).plan(tables, cluster)
    assert same.shards == plain.shards and same.meta["verify"]["chosen_rank"] == 1
    record = same.meta["verify"]
    assert record["candidates"] == 4 and record["model_ms"] == sorted(record["model_ms"])
    flipped = Planner(model, verify=_Disagrees(model), top=6).plan(tables, cluster)
    record = flipped.meta["verify"]
    chosen = record["chosen_rank"]
    assert chosen > 1 and min(record["verified_ms"]) == record["verified_ms"][chosen - 1]
    assert flipped.shards != plain.shards
    assert record["backend"] == "disagrees" and flipped.cost.model == plain.cost.model


def test_verification_refuses_a_searcher_with_one_plan_and_a_bad_top():
    with pytest.raises(UnknownNameError, match="greedy-grid.*nothing to verify"):
        Planner(FakeEstimator(), "greedy-grid", verify=FakeEstimator())
    with pytest.raises(UsageError, match="top"):
        Planner(FakeEstimator(), verify=FakeEstimator(), top=0)


def test_a_verifier_without_a_finite_cost_is_a_backend_error():
    class Broken(_Disagrees):
        name = "broken"

        def compute_ms(self, loads):
            return [float("nan")] * len(loads)

    model = FakeEstimator()
    with pytest.raises(BackendError, match="broken gave no finite cost"):
        Planner(model, verify=Broken(model), top=3).plan(make_tables(12), make_cluster(4))


def test_top_without_verify_is_refused():
    with pytest.raises(UsageError, match="top .*goes with verify"):
        Planner(FakeEstimator(), top=3)
