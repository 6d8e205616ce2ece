"""The whole sharding space (issue 14): what each type costs, memory as a training job has
it, the search over types, kernels and constraints, and the scenarios that must plan."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from neuroshard.backends.sim import SimBackend
from neuroshard.feasibility import check_fits
from neuroshard.plan_io import plan_from_dict, plan_to_dict, validate_plan
from neuroshard.planner import Planner
from neuroshard.search.scoring import Scorer, alltoall_dim_sums, plan_cost
from neuroshard.search.space import Layout, Space, row_blocks
from neuroshard.traffic import (
    BWD_INTRA,
    DP_GROUP,
    FWD_INTER,
    FWD_INTRA,
    RW_GROUP,
    XH_RECV,
    XH_SEND,
    finish,
    fixed_traffic,
    plan_traffic,
    uvm_miss_rows,
)
from neuroshard.types import (
    Cluster,
    ConstraintError,
    Constraints,
    FeatureSpec,
    Plan,
    PlanFormatError,
    PlanInfeasibleError,
    Shard,
    TableConstraint,
    TableSpec,
    embedding_bytes,
    io_buffer_bytes,
    optimizer_state_bytes,
)

from factories import GB, FakeEstimator, make_cluster, make_table, make_tables

MB = 10**6
SIM = SimBackend("h100")
NO_TWRW = Constraints(
    default=TableConstraint(
        sharding_types=("table_wise", "column_wise", "row_wise", "data_parallel")
    )
)
COLUMNS_ONLY = Constraints(default=TableConstraint(sharding_types=("table_wise", "column_wise")))


def plan_with(tables, cluster, **kw):
    plan = Planner(SIM, "neuroshard", **kw).plan(tables, cluster)
    validate_plan(plan)
    assert all(m <= cap for m, cap in zip(plan.memory_bytes(), plan.cluster.hbm_budget_bytes))
    return plan


# --------------------------------------------------------------------------- scenarios


def test_a_table_larger_than_a_device_and_four_wide_plans_row_wise():
    # 4M x 4 = 64 MB on 2 devices of 40 MB: no column split exists, row blocks of 32 MB fit
    # (with their I/O buffers at TorchRec's default per-rank batch of 512)
    plan = plan_with(
        [TableSpec("big", 4_000_000, 4, pooling_factor=10)],
        Cluster.uniform(2, 40 * MB, batch_size=1024),
    )
    assert plan.sharding_type_of("big") in ("row_wise", "table_row_wise")
    assert sorted(s.rows for s in plan.shards) == [(0, 2_000_000), (2_000_000, 4_000_000)]


def test_tables_larger_than_hbm_plan_on_host_memory_caching():
    # 27 MB of tables on 2 devices of 8 MB HBM with 32 GB of host memory
    tables = [TableSpec(f"t{i}", 562_500, 4, pooling_factor=5) for i in range(3)]
    assert sum(t.size_bytes for t in tables) == 27 * MB
    cluster = Cluster.uniform(2, 8 * MB, host_memory_bytes=32 * GB)
    plan = plan_with(tables, cluster)
    assert "fused_uvm_caching" in {s.compute_kernel for s in plan.shards}
    assert all(m <= cap for m, cap in zip(plan.host_memory_bytes(), cluster.host_budget_bytes))
    with pytest.raises(PlanInfeasibleError, match="'t0'.*bytes"):  # no host memory: no plan
        Planner(SIM, "neuroshard").plan(tables, Cluster.uniform(2, 8 * MB))


def test_table_row_wise_pays_off_on_two_hosts_of_two_devices():
    # two 2 GiB tables (one per host fits, one per device does not), slow NIC
    tables = [TableSpec(f"huge{i}", 4_000_000, 128, pooling_factor=300) for i in range(2)]
    tables += [TableSpec(f"s{i}", 100_000, 32, pooling_factor=4) for i in range(4)]
    cluster = Cluster.uniform(4, 2 * GB, devices_per_host=2, inter_host_bw_bytes_per_ms=12.5e6)
    plan = plan_with(tables, cluster)
    assert {plan.sharding_type_of(t) for t in ("huge0", "huge1")} == {"table_row_wise"}
    hosts = {cluster.host_of(s.device) for s in plan.shards_of("huge0")}
    assert len(hosts) == 1 and hosts != {cluster.host_of(s.device) for s in plan.shards_of("huge1")}
    best_without = plan_with(tables, cluster, constraints=NO_TWRW)
    assert plan.cost.max_ms < 0.95 * best_without.cost.max_ms


def test_a_two_terabyte_table_plans_on_128_devices_of_80_gb():
    giant = TableSpec("giant", 4_000_000_000, 128, pooling_factor=20)
    assert giant.size_bytes == 2_048_000_000_000
    tables = [giant] + [TableSpec(f"s{i}", 1_000_000, 64, pooling_factor=10) for i in range(8)]
    cluster = Cluster.uniform(128, 80 * 10**9, devices_per_host=8)
    plan = plan_with(tables, cluster)
    assert len(plan.shards_of("giant")) >= 32  # spread over many devices
    assert max(plan.memory_bytes()) <= min(plan.cluster.hbm_budget_bytes)


def test_a_second_host_changes_the_cost_of_the_same_plan():
    tables = make_tables(12, seed=3)
    one = make_cluster(4)
    two = Cluster.uniform(4, 4 * GB, devices_per_host=2, inter_host_bw_bytes_per_ms=12.5e6)
    plan = Planner(SIM, "greedy-grid", reserve=0.0).plan(tables, one)
    on_two = Plan(plan.tables, plan.shards, two)
    assert plan_cost(on_two, SIM).max_ms > 1.2 * plan_cost(plan, SIM).max_ms


# --------------------------------------------------------------------------- what each type moves


def test_row_wise_reduce_scatter_and_all_gather_bytes():
    t = make_table("t", rows=1000, dim=64)
    c = Cluster.uniform(4, GB, batch_size=1024)
    fixed = fixed_traffic(t, "row_wise", [0, 1, 2, 3], c)
    ring = 3 / 4 * 1024 * 64 * 4
    np.testing.assert_allclose(fixed[FWD_INTRA], ring)
    np.testing.assert_allclose(fixed[BWD_INTRA], ring)
    assert fixed[FWD_INTER].sum() == 0 and (fixed[RW_GROUP] == 1).all()
    two_hosts = Cluster.uniform(4, GB, batch_size=1024, devices_per_host=2)
    fixed = fixed_traffic(t, "row_wise", [0, 1, 2, 3], two_hosts)
    np.testing.assert_allclose(fixed[FWD_INTER], ring)  # a ring across hosts: the NIC's pace


def test_table_row_wise_sends_across_hosts_what_the_others_receive():
    t = make_table("t", rows=1000, dim=64)
    c = Cluster.uniform(8, GB, batch_size=1024, devices_per_host=4)
    fixed = fixed_traffic(t, "table_row_wise", [4, 5, 6, 7], c)
    pooled = 1024 * 64 * 4
    np.testing.assert_allclose(fixed[FWD_INTRA, 4:], 3 / 4 * pooled)
    assert fixed[FWD_INTRA, :4].sum() == 0
    assert fixed[XH_SEND].sum() == pytest.approx(fixed[XH_RECV].sum())
    np.testing.assert_allclose(fixed[XH_RECV, :4], pooled / 8)


def test_data_parallel_all_reduces_its_gradient_and_routes_no_ids():
    t = make_table("t", rows=1000, dim=64)
    c = Cluster.uniform(4, GB, batch_size=1024)
    fixed = fixed_traffic(t, "data_parallel", range(4), c)
    np.testing.assert_allclose(fixed[BWD_INTRA], 2 * 3 / 4 * t.size_bytes)
    assert fixed[FWD_INTRA].sum() == 0 and (fixed[DP_GROUP] == 1).all()
    plan = Plan(
        (t,),
        tuple(
            Shard("t", 0, 64, d, sharding_type="data_parallel", compute_kernel="dense")
            for d in range(4)
        ),
        c,
    )
    validate_plan(plan)
    assert plan_traffic(plan).ids_intra_bytes.sum() == 0
    assert alltoall_dim_sums(plan) == [0.0] * 4
    loads = plan.device_loads()
    assert all(load[0].pooling_factor == pytest.approx(t.pooling_factor / 4) for load in loads)


def test_ids_sent_and_received_balance():
    c = Cluster.uniform(4, GB, devices_per_host=2)
    ids = np.array([[100.0, 0.0, 300.0, 0.0]])
    traffic = finish(np.zeros((1, 10, 4)), ids, np.zeros((1, 4)), c)
    total = traffic.ids_intra_bytes.sum() + traffic.ids_inter_bytes.sum()
    assert total > 0 and traffic.fwd_calls.sum() == 0


def test_uvm_cache_misses_fall_as_the_cache_grows():
    t = make_table("t", rows=10_000_000, dim=64, pooling_factor=20)
    misses = [uvm_miss_rows(t, f, 65_536) for f in (0.001, 0.01, 0.1, 1.0)]
    assert misses == sorted(misses, reverse=True)
    assert misses[-1] == 0.0 and misses[0] > 0


def test_row_blocks_follow_torchrec():
    assert row_blocks(10, 4) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert row_blocks(5, 4) == [(0, 2), (2, 4), (4, 5)]


def test_column_plans_cost_as_before_on_one_host():
    """For table- and column-wise plans on one host the extra terms are 0: the scorer with a
    cluster gives the costs the all-to-all alone gives."""
    tables, cluster = make_tables(20, seed=4), make_cluster(4)
    plan = Planner(FakeEstimator(), "greedy-grid", reserve=0.0).plan(tables, cluster)
    scorer_new, scorer_old = Scorer(FakeEstimator(), cluster=cluster), Scorer(FakeEstimator())
    keys = [
        tuple(sorted(scorer.item(v) for v in load))
        for scorer in (scorer_new,)
        for load in plan.device_loads()
    ]
    old_keys = [tuple(sorted(scorer_old.item(v) for v in load)) for load in plan.device_loads()]
    assert scorer_new.score([keys]) == scorer_old.score([old_keys])
    assert plan_cost(plan, FakeEstimator()).max_ms == scorer_old.score([old_keys])[0]


# --------------------------------------------------------------------------- memory


def test_optimizer_state_and_footprints():
    assert optimizer_state_bytes(10, 8, "sgd") == 0
    assert optimizer_state_bytes(10, 8, "rowwise_adagrad") == 40
    assert optimizer_state_bytes(10, 8, "adam") == 640
    assert embedding_bytes(10, 8, "adam") == 3 * 10 * 8 * 4


def test_the_planner_keeps_a_reserve_and_counts_optimizer_state():
    tables, cluster = make_tables(8, seed=2), make_cluster(4, memory_gb=4)
    plan = Planner(FakeEstimator(), "greedy-grid").plan(tables, cluster)
    assert plan.cluster.hbm_reserve_fraction == 0.15
    assert max(plan.memory_bytes()) <= 0.85 * 4 * GB
    adam = Planner(FakeEstimator(), "greedy-grid", optimizer="adam", io_buffers=False).plan(
        tables, cluster
    )
    assert sum(adam.memory_bytes()) == 3 * sum(t.size_bytes for t in tables)
    back = plan_from_dict(plan_to_dict(adam))
    validate_plan(back)
    assert back.cluster == adam.cluster


def test_io_buffers_count_as_torchrec_counts_them():
    t = TableSpec("t", 1_000, 64, features=(FeatureSpec("a", 3.0), FeatureSpec("b", 0.5)))
    c = Cluster.uniform(8, GB, batch_size=8 * 512, devices_per_host=4, io_buffers=True)
    ids, outs = 3.5 * 512, (1.0 + 0.5) * 512  # per rank: sum of pooling, of min(1, pooling)
    assert io_buffer_bytes(t, "table_wise", 64, c) == ids * 8 * 8 + outs * 8 * 64 * 4
    assert io_buffer_bytes(t, "column_wise", 16, c) == ids * 8 * 8 + outs * 8 * 16 * 4
    assert io_buffer_bytes(t, "row_wise", 64, c) == ids * 8 + outs * 8 * 64 * 4
    assert io_buffer_bytes(t, "table_row_wise", 64, c) == ids * 2 * 8 + outs * 8 * 64 * 4
    assert io_buffer_bytes(t, "data_parallel", 64, c) == ids * 8 + outs * 64 * 4
    seq = TableSpec("s", 1_000, 64, pooling_factor=3.0, pooled=False)
    assert io_buffer_bytes(seq, "table_wise", 64, c) == (3 * 512 * 8) * (8 + 64 * 4)
    assert io_buffer_bytes(t, "table_wise", 64, replace(c, io_buffers=False)) == 0


def test_the_planner_counts_io_buffers_and_the_plan_file_keeps_the_choice(tmp_path):
    tables, cluster = make_tables(8, seed=2), make_cluster(4, memory_gb=4)
    plan = Planner(FakeEstimator(), "greedy-grid").plan(tables, cluster)
    lean = Planner(FakeEstimator(), "greedy-grid", io_buffers=False).plan(tables, cluster)
    assert plan.cluster.io_buffers and not lean.cluster.io_buffers
    io = sum(io_buffer_bytes(t, "table_wise", t.dim, plan.cluster) for t in tables)
    assert io > 0 and sum(plan.memory_bytes()) == sum(lean.memory_bytes()) + io
    back = plan_from_dict(plan_to_dict(plan))
    assert back.cluster.io_buffers and back.memory_bytes() == plan.memory_bytes()
    assert not plan_from_dict(plan_to_dict(lean)).cluster.io_buffers  # absent: off
    # A cap that holds the weights but not the buffers: validation says so.
    weights_only = replace(
        plan.cluster, memory_per_device_bytes=tuple(lean.memory_bytes()), hbm_reserve_fraction=0.0
    )
    validate_plan(replace(lean, cluster=replace(weights_only, io_buffers=False)))
    with pytest.raises(PlanFormatError, match="exceeds cap"):
        validate_plan(replace(plan, cluster=weights_only))


def test_check_fits_names_tables_and_bytes_for_every_type():
    big = TableSpec("big", 100_000_000, 128)  # 51 GB
    with pytest.raises(PlanInfeasibleError, match="'big'.*bytes"):
        check_fits([big], Cluster.uniform(4, 10 * GB))
    check_fits([big], Cluster.uniform(8, 10 * GB))  # row blocks of 6.4 GB fit
    only_tw = Constraints({"big": TableConstraint(sharding_types=("table_wise",))})
    with pytest.raises(PlanInfeasibleError, match="'big'"):
        check_fits([big], Cluster.uniform(8, 10 * GB), only_tw)


# --------------------------------------------------------------------------- constraints


def test_pins_types_kernels_and_colocation_hold():
    tables = make_tables(10, seed=5)
    cluster = Cluster.uniform(4, 4 * GB, devices_per_host=2)
    rules = Constraints(
        tables={
            "t0": TableConstraint(devices=(3,)),
            "t1": TableConstraint(sharding_types=("row_wise",)),
            "t2": TableConstraint(hosts=(1,), sharding_types=("column_wise",)),
            "t3": TableConstraint(sharding_types=("data_parallel",)),
        },
        colocate=(("t4", "t5", "t6"),),
    )
    for searcher in ("neuroshard", "greedy-grid"):
        plan = Planner(FakeEstimator(), searcher, constraints=rules).plan(tables, cluster)
        assert {s.device for s in plan.shards_of("t0")} == {3}
        assert plan.sharding_type_of("t1") == "row_wise"
        assert plan.sharding_type_of("t2") == "column_wise"
        assert {cluster.host_of(s.device) for s in plan.shards_of("t2")} == {1}
        assert plan.sharding_type_of("t3") == "data_parallel"
        assert len({s.device for n in ("t4", "t5", "t6") for s in plan.shards_of(n)}) == 1


def test_constraints_that_cannot_hold_fail_clearly():
    tables = make_tables(4, seed=1)
    cluster = make_cluster(2)
    with pytest.raises(ConstraintError, match="'t0'.*devices \\[5\\]"):
        Planner(
            FakeEstimator(), constraints=Constraints({"t0": TableConstraint(devices=(5,))})
        ).plan(tables, cluster)
    with pytest.raises(ConstraintError, match="'nope'"):
        Planner(FakeEstimator(), constraints=Constraints({"nope": TableConstraint()})).plan(
            tables, cluster
        )
    with pytest.raises(ConstraintError, match="'size'.*constraints"):
        Planner(FakeEstimator(), "size", constraints=COLUMNS_ONLY).plan(tables, cluster)
    big = [TableSpec("big", 400_000_000, 8)]  # 12.8 GB on 4 GB devices, table-wise only
    with pytest.raises(PlanInfeasibleError, match="'big'"):
        Planner(
            FakeEstimator(),
            constraints=Constraints({"big": TableConstraint(sharding_types=("table_wise",))}),
        ).plan(big, cluster)


def test_space_round_trips_every_layout_through_plan_json():
    tables = [
        make_table("a", rows=1000),
        make_table("b", rows=5000),
        make_table("c"),
        make_table("d", rows=4000),
    ]
    cluster = Cluster.uniform(4, GB, devices_per_host=2, host_memory_bytes=GB)
    space = Space(tables, cluster, Scorer(FakeEstimator(), cluster=cluster))
    state = (
        Layout("row_wise", (64,)),
        Layout("table_row_wise", (64,), host=1),
        Layout("data_parallel", (64,), "dense"),
        Layout("columns", (32, 32), "fused_uvm_caching", 0.1),
    )
    from neuroshard.search.greedy import place_many

    placement = place_many([space.problem(state)], cluster, space.scorer)[0]
    plan = space.to_plan(state, placement)
    validate_plan(plan)
    assert [plan.sharding_type_of(n) for n in "abcd"] == [
        "row_wise",
        "table_row_wise",
        "data_parallel",
        "column_wise",
    ]
    assert {s.device for s in plan.shards_of("b")} == {2, 3}
    again = plan_from_dict(plan_to_dict(plan))
    assert (
        again.shards == plan.shards
        or sorted(again.shards, key=repr) == sorted(plan.shards, key=repr)
        or [again.sharding_type_of(n) for n in "abcd"] == [plan.sharding_type_of(n) for n in "abcd"]
    )
    assert math.isclose(plan_cost(again, SIM).max_ms, plan_cost(plan, SIM).max_ms)
    assert placement.cost_ms == pytest.approx(plan_cost(plan, FakeEstimator()).max_ms)


# --------------------------------------------------------------------------- the plan verb


def test_plan_verb_takes_reserve_optimizer_hosts_and_host_memory(tmp_path):
    import json

    from typer.testing import CliRunner

    from neuroshard.cli import app
    from neuroshard.plan_io import read_plan

    config = tmp_path / "tables.json"
    config.write_text(
        json.dumps([{"name": "big", "rows": 4_000_000, "dim": 4, "pooling_factor": 10}])
    )
    out = tmp_path / "plan.json"
    args = [
        "plan",
        str(config),
        "-n",
        "4",
        "-m",
        "40MB",
        "--searcher",
        "greedy-grid",
        "--out",
        str(out),
        "--reserve",
        "0.1",
        "--optimizer",
        "rowwise_adagrad",
        "--devices-per-host",
        "2",
        "--host-memory",
        "1GB",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    plan = read_plan(out)
    assert (plan.cluster.hbm_reserve_fraction, plan.cluster.optimizer) == (0.1, "rowwise_adagrad")
    assert plan.cluster.num_hosts == 2 and plan.cluster.host_memory_per_device_bytes[0] == 1 << 30
    result = CliRunner().invoke(app, args[:-8] + ["--optimizer", "lion"])
    assert result.exit_code == 2 and "optimizer" in result.output


def test_an_all_to_all_across_hosts_is_never_cheaper_than_the_nic():
    from neuroshard.traffic import nic_alltoall_ms

    tables = make_tables(12, seed=3)
    two = Cluster.uniform(4, 4 * GB, devices_per_host=2, inter_host_bw_bytes_per_ms=12.5e6)
    plan = Planner(FakeEstimator(), "greedy-grid", reserve=0.0).plan(tables, make_cluster(4))
    on_two = Plan(plan.tables, plan.shards, two)
    floor = nic_alltoall_ms(np.asarray([alltoall_dim_sums(on_two)]), two)[0]
    cost = plan_cost(on_two, FakeEstimator())
    assert floor.max() > 0.5  # the fake's own all-to-all knows no hosts
    assert all(d.bwd_comm_ms >= f for d, f in zip(cost.devices, floor))
    one = plan_cost(plan, FakeEstimator())
    assert one.max_ms < cost.max_ms


def test_sequence_tables_are_never_table_row_wise():
    cluster = Cluster.uniform(4, 4 * GB, devices_per_host=2)
    seq = TableSpec("seq", 10_000_000, 64, pooling_factor=20, pooled=False)
    space = Space([seq], cluster, Scorer(FakeEstimator(), cluster=cluster))
    state = space.initial_state()
    assert all(m.kind != "table_row_wise" for m in space.moves(state, 0))
    pooled = Space(
        [TableSpec("p", 10_000_000, 64, pooling_factor=20)],
        cluster,
        Scorer(FakeEstimator(), cluster=cluster),
    )
    assert any(m.kind == "table_row_wise" for m in pooled.moves(state, 0))
