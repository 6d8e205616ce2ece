"""SurCo-style search (search/surco.py): valid plans, the incumbent rule, bounds, memory
errors, exact optimum on a tiny additive instance, and the prior variant."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import pytest

from neuroshard.models.surrogate import SurrogatePrior
from neuroshard.plan_io import validate_plan
from neuroshard.search import get_searcher, surco
from neuroshard.search.greedy import greedy_grid, shard_specs, to_plan
from neuroshard.search.scoring import plan_cost
from neuroshard.search.surco import (
    Solve,
    _lower_hull_lines,
    fit_comm,
    fit_compute,
    fit_surrogate_prior,
    surco_plan,
)
from neuroshard.types import Cluster, PlanInfeasibleError, TableSpec

from factories import GB, FakeEstimator, make_cluster, make_table, make_tables, priced

FAST = {"rounds": 3, "budget_s": 3.0}


class AdditiveFake:
    """Compute is a sum of per-shard costs; comm is linear in the dim sum (plus, forward,
    the straggler wait). Under it the SurCo surrogate is exact."""

    name = "additive-fake"
    batch_size = 65_536

    def compute_ms(self, loads: Sequence[Sequence[TableSpec]]) -> np.ndarray:
        return np.array([sum(t.dim * t.pooling_factor * 1e-3 for t in load) for load in loads])

    def bwd_comm_ms(self, dim_sums: np.ndarray) -> np.ndarray:
        return 0.05 + 0.003 * np.asarray(dim_sums, dtype=float)

    def fwd_comm_ms(self, dim_sums: np.ndarray, waits_ms: np.ndarray) -> np.ndarray:
        waits = np.asarray(waits_ms, dtype=float)
        return (
            0.02
            + 0.001 * np.asarray(dim_sums, dtype=float)
            + waits.max(axis=-1, keepdims=True)
            - waits
        )


def _assert_valid(plan, tables, cluster, estimator):
    validate_plan(plan)  # coverage, widths, device range, memory caps
    assert plan.tables == tuple(tables) and plan.cluster == cluster
    assert {s.table for s in plan.shards} == {t.name for t in tables}
    assert all(
        m <= cap
        for m, cap in zip(plan.memory_bytes(), cluster.memory_per_device_bytes, strict=True)
    )
    assert plan.cost is None or plan.cost == plan_cost(plan, estimator)


@pytest.mark.parametrize("num_devices", [4, 8])
def test_valid_plans(num_devices):
    tables, cluster = make_tables(24, seed=num_devices), make_cluster(num_devices)
    plan = priced(surco_plan(tables, cluster, FakeEstimator(), **FAST), FakeEstimator())
    _assert_valid(plan, tables, cluster, FakeEstimator())
    rounds = plan.meta["surco"]["rounds"]
    assert 1 <= len(rounds) <= FAST["rounds"]
    assert all(r["status"] in ("optimal", "time_limit") for r in rounds)


def test_registered_and_respects_splits():
    tables, cluster = make_tables(8, seed=3), make_cluster(4)
    wide = next(t for t in tables if t.dim >= 32)
    splits = {wide.name: (wide.dim // 2, wide.dim // 2)}
    plan = get_searcher("surco", splits=splits, **FAST)(tables, cluster, FakeEstimator())
    _assert_valid(plan, tables, cluster, FakeEstimator())
    assert [s.width for s in plan.shards_of(wide.name)] == list(splits[wide.name])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_never_worse_than_greedy_grid(seed):
    tables, cluster = make_tables(30, seed=seed), make_cluster(4)
    est = FakeEstimator()
    greedy = priced(greedy_grid(tables, cluster, est), est)
    plan = priced(surco_plan(tables, cluster, est, **FAST), est)
    assert plan.meta["surco"]["start_ms"] == pytest.approx(greedy.cost.max_ms, rel=1e-12)
    assert plan.cost.max_ms <= greedy.cost.max_ms + 1e-12
    assert plan.cost.max_ms == pytest.approx(plan.meta["surco"]["best_ms"], rel=1e-12)


def test_keeps_the_incumbent_when_the_solver_misleads(monkeypatch):
    # A solver that always answers "everything on device 0": every round is worse in
    # reality, so the plan stays the greedy grid's and the trust radius halves each round.
    tables, cluster = make_tables(12, seed=4), make_cluster(4, memory_gb=64.0)
    est = FakeEstimator()
    answer = Solve(np.zeros(12, dtype=np.int64), "time_limit", 0.0, 0.0, 0.0, 0.0, 0.0)
    monkeypatch.setattr(surco, "solve_surrogate", lambda *args, **kwargs: answer)
    plan = priced(surco_plan(tables, cluster, est, rounds=3, budget_s=5.0), est)
    greedy = priced(greedy_grid(tables, cluster, est), est)
    assert plan.shards == greedy.shards
    rounds = plan.meta["surco"]["rounds"]
    assert [r["improved"] for r in rounds] == [False] * 3
    assert all(r["real_ms"] > greedy.cost.max_ms for r in rounds)
    assert rounds[0]["trust_radius"] is None
    assert rounds[1]["trust_radius"] == max(1, rounds[0]["moved"] // 2)


def test_surrogate_is_exact_at_its_fitting_point():
    # FakeEstimator's comm is linear and its forward comm adds the straggler wait, so the
    # fitted surrogate prices the plan it was fitted around at its real cost.
    tables, cluster = make_tables(20, seed=5), make_cluster(4)
    plan = priced(surco_plan(tables, cluster, FakeEstimator(), **FAST), FakeEstimator())
    first = plan.meta["surco"]["rounds"][0]
    assert first["incumbent_surrogate_ms"] == pytest.approx(
        plan.meta["surco"]["start_ms"], rel=1e-9
    )


@pytest.mark.parametrize("num_devices", [2, 4, 8])
def test_lp_bound_below_milp_objective(num_devices):
    tables, cluster = make_tables(16, seed=num_devices), make_cluster(num_devices)
    plan = priced(surco_plan(tables, cluster, FakeEstimator(), **FAST), FakeEstimator())
    checked = 0
    for r in plan.meta["surco"]["rounds"]:
        if math.isfinite(r["surrogate_ms"]) and math.isfinite(r["lp_bound_ms"]):
            assert r["lp_bound_ms"] <= r["surrogate_ms"] + 1e-7
            assert r["dual_bound_ms"] <= r["surrogate_ms"] + 1e-7
            checked += 1
    assert checked >= 1


def test_total_memory_too_small_raises():
    tables = [make_table(f"t{i}", rows=5_000_000, dim=64) for i in range(4)]  # 1.19 GiB each
    with pytest.raises(PlanInfeasibleError, match="bytes"):
        surco_plan(tables, make_cluster(2, memory_gb=2.0), FakeEstimator(), **FAST)


def test_packing_infeasible_raises_naming_tables():
    # 3 x 0.6 GiB on 2 x 1 GiB: the total fits, no packing does; the MILP proves it.
    rows = int(0.6 * GB) // (16 * 4)
    tables = [make_table(f"big{i}", rows=rows, dim=16) for i in range(3)]
    with pytest.raises(PlanInfeasibleError, match=r"big0.*bytes|bytes.*big0"):
        surco_plan(tables, make_cluster(2, memory_gb=1.0), FakeEstimator(), **FAST)


def test_solves_a_packing_the_greedy_grid_misses():
    # Sizes 4, 3, 3, 5, 5 units on 2 x 10 units; the greedy's compute order (a, b, c, d,
    # e) fills the devices as {a, d} and {b, c} and leaves no room for e. Only
    # {a, b, c} + {d, e} fits.
    unit = 1_000_000
    sizes = {"a": 4, "b": 3, "c": 3, "d": 5, "e": 5}
    pooling = {"a": 40.0, "b": 30.0, "c": 29.0, "d": 5.0, "e": 4.0}
    tables = [make_table(n, rows=sizes[n] * unit, dim=16, pooling_factor=pooling[n]) for n in sizes]
    cluster = Cluster.uniform(2, 10 * unit * 16 * 4)
    with pytest.raises(PlanInfeasibleError):
        greedy_grid(tables, cluster, FakeEstimator())
    plan = priced(surco_plan(tables, cluster, FakeEstimator(), **FAST), FakeEstimator())
    _assert_valid(plan, tables, cluster, FakeEstimator())
    device = {s.table: s.device for s in plan.shards}
    assert device["d"] == device["e"] != device["a"]
    assert plan.meta["surco"]["start_ms"] == math.inf


def test_tiny_additive_instance_reaches_brute_force_optimum():
    tables = [
        make_table(f"t{i}", rows=r, dim=d, pooling_factor=p)
        for i, (r, d, p) in enumerate(
            [
                (50_000, 64, 20.0),
                (80_000, 32, 35.0),
                (20_000, 128, 8.0),
                (60_000, 16, 50.0),
                (90_000, 64, 12.0),
                (30_000, 32, 25.0),
            ]
        )
    ]
    # 64 MB of tables on 2 x 40 MB: memory rules out the most lopsided assignments
    cap = 40_000_000
    cluster = Cluster.uniform(2, cap)
    est = AdditiveFake()
    specs = shard_specs(tables)
    best = math.inf
    for devices in itertools.product(range(2), repeat=len(tables)):
        plan = to_plan(tables, cluster, specs, devices)
        if all(m <= cap for m in plan.memory_bytes()):
            best = min(best, plan_cost(plan, est).max_ms)
    assert math.isfinite(best)
    plan = priced(surco_plan(tables, cluster, est, rounds=2, budget_s=30.0, mip_rel_gap=0.0), est)
    first = plan.meta["surco"]["rounds"][0]
    assert first["status"] == "optimal"
    assert first["surrogate_ms"] == pytest.approx(best, rel=1e-9)  # surrogate is exact
    assert plan.cost.max_ms == pytest.approx(best, rel=1e-9)


def test_fit_compute_is_finite_differences():
    tables = make_tables(6, seed=1)
    specs = shard_specs(tables)
    est = FakeEstimator()
    devices = np.array([0, 1, 0, 1, 1, 0])
    calls = est.compute_calls
    c, k = fit_compute(specs, devices, 2, est)
    assert est.compute_calls == calls + 1  # one batched call for every (shard, device)
    load0 = [specs[i] for i in (0, 2, 5)]
    full = est.compute_ms([load0])[0]
    assert c[2, 0] == pytest.approx(full - est.compute_ms([[specs[0], specs[5]]])[0])
    assert c[1, 0] == pytest.approx(est.compute_ms([load0 + [specs[1]]])[0] - full)
    assert k[0] + c[[0, 2, 5], 0].sum() == pytest.approx(full)  # exact at the fitting point


def test_comm_envelope():
    xs = np.array([0.0, 1.0, 2.0, 3.0])
    convex = _lower_hull_lines(xs, xs**2)
    assert np.allclose([np.max(convex[:, 0] * x + convex[:, 1]) for x in xs], xs**2)
    concave = _lower_hull_lines(xs, -(xs**2))  # the envelope is the chord 0 -> 3
    assert len(concave) == 1 and concave[0] == pytest.approx([-3.0, 0.0])
    bwd, fwd = fit_comm(FakeEstimator(), np.array([100.0, 50.0, 30.0, 20.0]), 200.0)
    assert len(bwd) == len(fwd) == 4
    assert all(len(lines) == 1 for lines in bwd)  # linear comm: one line
    assert bwd[0][0] == pytest.approx([0.002, 0.05])


def test_prior_variant(tmp_path):
    cluster = make_cluster(4)
    est = FakeEstimator()
    train = [make_tables(12, seed=s) for s in (10, 11)]
    prior = fit_surrogate_prior(
        train, cluster, est, tmp_path / "prior", rounds=2, time_limit_s=1.0, max_epochs=15
    )
    assert prior.num_pairs_ > 0 and (tmp_path / "prior" / "meta.json").is_file()
    loaded = SurrogatePrior.load(tmp_path / "prior")
    x = np.random.default_rng(0).normal(size=(5, loaded.x_mean_.shape[0])).astype(np.float32)
    assert np.allclose(loaded.predict(x), prior.predict(x), atol=1e-6)

    tables = make_tables(16, seed=20)
    greedy = priced(greedy_grid(tables, cluster, est), est)
    for path in (tmp_path / "prior", None):
        plan = priced(
            surco_plan(tables, cluster, est, variant="prior", prior_path=path, **FAST), est
        )
        _assert_valid(plan, tables, cluster, est)
        assert plan.cost.max_ms <= greedy.cost.max_ms + 1e-12
        assert plan.meta["surco"]["variant"] == "prior"


def test_bad_arguments():
    tables, cluster = make_tables(4), make_cluster(2)
    with pytest.raises(ValueError, match="variant"):
        surco_plan(tables, cluster, FakeEstimator(), variant="best")
    with pytest.raises(ValueError, match="rounds"):
        surco_plan(tables, cluster, FakeEstimator(), rounds=0)


@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", "adam"])
def test_surco_counts_the_optimizer_state_in_device_memory(optimizer):
    from dataclasses import replace as _replace

    from neuroshard.plan_io import validate_plan
    from neuroshard.types import embedding_bytes

    tables = make_tables(12, seed=3)
    need = sum(embedding_bytes(t.rows, t.dim, optimizer) for t in tables)
    # Room for the weights with their optimizer state, with a third to spare over 4 devices.
    cluster = _replace(make_cluster(4, 1), optimizer=optimizer)
    cluster = _replace(cluster, memory_per_device_bytes=(int(need / 3),) * 4)
    plan = surco_plan(tables, cluster, FakeEstimator(), budget_s=2.0)
    validate_plan(plan)  # HBM caps with the optimizer state
