"""Plan <-> TorchRec ShardingPlan conversion, the NeuroShard planner and shard estimator."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchrec")

from torch import nn  # noqa: E402
from torch.distributed._shard.metadata import ShardMetadata  # noqa: E402
from torch.distributed._shard.sharding_spec import EnumerableShardingSpec  # noqa: E402
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder  # noqa: E402
from torchrec.distributed.planner.types import (  # noqa: E402
    ParameterConstraints,
    Topology,
)
from torchrec.distributed.types import (  # noqa: E402
    EmbeddingModuleShardingPlan,
    ParameterSharding,
    ShardingPlan,
)
from torchrec.modules.embedding_configs import EmbeddingBagConfig  # noqa: E402
from torchrec.modules.embedding_modules import EmbeddingBagCollection  # noqa: E402

from neuroshard.torchrec_adapter import (  # noqa: E402
    FWD_COMPUTE_SHARE,
    NeuroShardEstimator,
    embedding_bag_collections,
    from_sharding_plan,
    module_tables,
    table_specs,
    to_sharding_plan,
)
from neuroshard.types import (  # noqa: E402
    DLRM_REUSE_HIST,
    Cluster,
    Plan,
    PlanFormatError,
    Shard,
    TableSpec,
    TableSpecError,
)

from factories import FakeEstimator, make_cluster, make_table  # noqa: E402

META = torch.device("meta")


def ebc_of(tables, device=META) -> EmbeddingBagCollection:
    return EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(
                name=t.name,
                num_embeddings=t.rows,
                embedding_dim=t.dim,
                feature_names=[f"f_{t.name}"],
            )
            for t in tables
        ],
        device=device,
    )


class TwoTower(nn.Module):
    """Tables split over two EBCs at nested paths."""

    def __init__(self, first, second):
        super().__init__()
        self.sparse = nn.Module()
        self.sparse.ebc = ebc_of(first)
        self.user_ebc = ebc_of(second)
        self.dense = nn.Linear(4, 4, device=META)


def topology(n: int, device: str = "cpu", cap: int = 1 << 30) -> Topology:
    kwargs = {"ddr_cap": cap} if device == "cpu" else {"hbm_cap": cap}
    return Topology(world_size=n, compute_device=device, **kwargs)


# --------------------------------------------------------------------------- round trips

TW_TABLES = (
    make_table("t0", rows=100, dim=16, pooling_factor=2.5),
    make_table("t1", rows=200, dim=32, pooling_factor=7.0),
    make_table("t2", rows=300, dim=8, pooling_factor=1.5),
)
TW_PLAN = Plan(
    TW_TABLES, (Shard("t0", 0, 16, 2), Shard("t1", 0, 32, 0), Shard("t2", 0, 8, 2)), make_cluster(3)
)

CW_TABLES = (
    make_table("wide", rows=64, dim=96, pooling_factor=3.0),
    make_table("pair", rows=48, dim=64, pooling_factor=2.0),
    make_table("solo", rows=32, dim=20, pooling_factor=1.0),
)
CW_PLAN = Plan(
    CW_TABLES,
    (
        Shard("wide", 0, 32, 1),
        Shard("wide", 32, 96, 0),  # uneven, ranks 1 then 0
        Shard("pair", 0, 16, 2),
        Shard("pair", 16, 64, 2),  # two shards on one rank
        Shard("solo", 0, 20, 0),
    ),  # table-wise
    make_cluster(4),
)


def test_table_wise_round_trip():
    module = ebc_of(TW_TABLES)
    sp = to_sharding_plan(TW_PLAN, module)
    assert list(sp.plan) == [""]
    ps = sp.plan[""]["t1"]
    assert (ps.sharding_type, ps.compute_kernel, ps.ranks) == ("table_wise", "fused", [0])
    (md,) = ps.sharding_spec.shards
    assert (md.shard_offsets, md.shard_sizes, str(md.placement)) == (
        [0, 0],
        [200, 32],
        "rank:0/cpu",
    )
    assert sp.plan[""]["t0"].ranks == [2] and sp.plan[""]["t2"].ranks == [2]
    back = from_sharding_plan(sp, module, tables=TW_TABLES, cluster=TW_PLAN.cluster)
    assert back == TW_PLAN


def test_uneven_column_wise_round_trip_nested_modules():
    module = TwoTower(CW_TABLES[:2], CW_TABLES[2:])
    assert set(embedding_bag_collections(module)) == {"sparse.ebc", "user_ebc"}
    sp = to_sharding_plan(CW_PLAN, module)
    assert set(sp.plan) == {"sparse.ebc", "user_ebc"}
    wide = sp.plan["sparse.ebc"]["wide"]
    assert (wide.sharding_type, wide.compute_kernel, wide.ranks) == ("column_wise", "fused", [1, 0])
    assert [
        (m.shard_offsets, m.shard_sizes, str(m.placement)) for m in wide.sharding_spec.shards
    ] == [([0, 0], [64, 32], "rank:1/cpu"), ([0, 32], [64, 64], "rank:0/cpu")]
    pair = sp.plan["sparse.ebc"]["pair"]
    assert pair.ranks == [2, 2]
    assert [m.shard_sizes for m in pair.sharding_spec.shards] == [[48, 16], [48, 48]]
    assert sp.plan["user_ebc"]["solo"].sharding_type == "table_wise"
    back = from_sharding_plan(sp, module, tables=CW_TABLES, cluster=CW_PLAN.cluster)
    assert back == CW_PLAN
    assert back.shards == CW_PLAN.shards  # same order too


def test_round_trip_is_order_insensitive_in_shards():
    shuffled = Plan(CW_PLAN.tables, tuple(reversed(CW_PLAN.shards)), CW_PLAN.cluster)
    module = TwoTower(CW_TABLES[:2], CW_TABLES[2:])
    back = from_sharding_plan(
        to_sharding_plan(shuffled, module), module, CW_TABLES, CW_PLAN.cluster
    )
    assert back == CW_PLAN


def test_cuda_placements_use_local_device_index():
    module = ebc_of(CW_TABLES)
    plan = Plan(CW_PLAN.tables, CW_PLAN.shards, make_cluster(4))
    sp = to_sharding_plan(plan, module, device_type="cuda", local_world_size=2)
    placements = [str(m.placement) for m in sp.plan[""]["wide"].sharding_spec.shards]
    assert placements == ["rank:1/cuda:1", "rank:0/cuda:0"]
    assert str(sp.plan[""]["pair"].sharding_spec.shards[0].placement) == "rank:2/cuda:0"
    assert from_sharding_plan(sp, module, CW_TABLES, plan.cluster) == plan


def test_from_sharding_plan_defaults_without_tables_or_cluster():
    module = ebc_of(CW_TABLES)
    back = from_sharding_plan(to_sharding_plan(CW_PLAN, module), module)
    assert [t.pooling_factor for t in back.tables] == [1.0, 1.0, 1.0]
    assert all(t.reuse_hist == DLRM_REUSE_HIST for t in back.tables)
    assert back.shards == CW_PLAN.shards
    assert back.cluster.num_devices == 3  # highest rank used + 1
    assert max(back.memory_bytes()) == back.cluster.memory_per_device_bytes[0]


# --------------------------------------------------------------------------- errors


def test_missing_and_extra_tables_are_named():
    module = ebc_of(TW_TABLES[:2] + (make_table("only_in_module", rows=10, dim=8),))
    with pytest.raises(TableSpecError, match="only_in_module") as err:
        to_sharding_plan(TW_PLAN, module)
    assert "t2" in str(err.value)


def test_dim_mismatch_is_named():
    module = ebc_of((TW_TABLES[0], make_table("t1", rows=200, dim=64), TW_TABLES[2]))
    with pytest.raises(TableSpecError, match=r"'t1'.*'dim'"):
        to_sharding_plan(TW_PLAN, module)


def test_column_shards_must_be_multiples_of_four_and_tile_the_table():
    t = make_table("t", rows=10, dim=20)
    module = ebc_of([t])
    odd = Plan((t,), (Shard("t", 0, 10, 0), Shard("t", 10, 20, 1)), make_cluster(2))
    with pytest.raises(PlanFormatError, match="multiple of 4"):
        to_sharding_plan(odd, module)
    gap = Plan((t,), (Shard("t", 0, 8, 0), Shard("t", 12, 20, 1)), make_cluster(2))
    with pytest.raises(PlanFormatError, match="exactly once"):
        to_sharding_plan(gap, module)
    far = Plan((t,), (Shard("t", 0, 20, 5),), make_cluster(2))
    with pytest.raises(PlanFormatError, match="device 5"):
        to_sharding_plan(far, module)


def test_reused_table_names_are_keyed_by_module_path():
    module = TwoTower([make_table("x", rows=4, dim=4)], [make_table("x", rows=8, dim=8)])
    assert list(module_tables(module)) == ["sparse.ebc.x", "user_ebc.x"]
    with pytest.raises(TableSpecError, match="sparse.ebc.x, user_ebc.x"):
        to_sharding_plan(Plan((), (), make_cluster(1)), module)
    specs = table_specs(module)
    assert [(t.name, t.module, t.rows) for t in specs] == [
        ("sparse.ebc.x", "sparse.ebc", 4),
        ("user_ebc.x", "user_ebc", 8),
    ]
    plan = Plan(
        tuple(specs),
        (Shard("sparse.ebc.x", 0, 4, 1), Shard("user_ebc.x", 0, 8, 0)),
        make_cluster(2),
    )
    sp = to_sharding_plan(plan, module)
    assert (sp.plan["sparse.ebc"]["x"].ranks, sp.plan["user_ebc"]["x"].ranks) == ([1], [0])
    assert from_sharding_plan(sp, module, specs, plan.cluster) == plan
    # a plan made with the table's own name and its module path still matches
    short = Plan(
        (TableSpec("x", rows=4, dim=4, module="sparse.ebc"), specs[1]),
        (Shard("x", 0, 4, 1), Shard("user_ebc.x", 0, 8, 0)),
        make_cluster(2),
    )
    assert to_sharding_plan(short, module) == sp


@pytest.mark.parametrize("sharding_type", ["row_wise", "table_row_wise", "data_parallel"])
def test_row_splits_and_replication_are_read(sharding_type):
    t = make_table("t", rows=10, dim=8)
    spec = (
        None
        if sharding_type == "data_parallel"
        else EnumerableShardingSpec(
            [
                ShardMetadata([0, 0], [5, 8], "rank:0/cpu"),
                ShardMetadata([5, 0], [5, 8], "rank:1/cpu"),
            ]
        )
    )
    ps = ParameterSharding(
        sharding_type=sharding_type, compute_kernel="fused", ranks=[0, 1], sharding_spec=spec
    )
    sp = ShardingPlan({"": EmbeddingModuleShardingPlan({"t": ps})})
    plan = from_sharding_plan(sp, ebc_of([t]), [t], make_cluster(2))
    assert plan.sharding_type_of("t") == sharding_type
    assert sorted(s.device for s in plan.shards) == [0, 1]


def test_grid_shards_are_refused():
    t = make_table("t", rows=10, dim=8)
    ps = ParameterSharding(
        sharding_type="grid_shard",
        compute_kernel="fused",
        ranks=[0, 1],
        sharding_spec=EnumerableShardingSpec(
            [
                ShardMetadata([0, 0], [5, 8], "rank:0/cpu"),
                ShardMetadata([5, 0], [5, 8], "rank:1/cpu"),
            ]
        ),
    )
    sp = ShardingPlan({"": EmbeddingModuleShardingPlan({"t": ps})})
    with pytest.raises(PlanFormatError, match="grid_shard.*table-wise, column-wise"):
        from_sharding_plan(sp, ebc_of([t]))


def test_column_type_with_row_split_shard_is_refused():
    t = make_table("t", rows=10, dim=8)
    ps = ParameterSharding(
        "column_wise",
        "fused",
        [0, 1],
        EnumerableShardingSpec(
            [
                ShardMetadata([0, 0], [5, 8], "rank:0/cpu"),
                ShardMetadata([5, 0], [5, 8], "rank:1/cpu"),
            ]
        ),
    )
    sp = ShardingPlan({"": EmbeddingModuleShardingPlan({"t": ps})})
    with pytest.raises(PlanFormatError, match="rows"):
        from_sharding_plan(sp, ebc_of([t]))


# --------------------------------------------------------------------------- table specs


def test_table_specs_ignore_stats_shapes_but_keep_module_shapes(caplog):
    specs = table_specs(ebc_of(TW_TABLES), {"t0": {"rows": 5, "dim": 4, "pooling_factor": 3.0}})
    assert (specs[0].rows, specs[0].dim, specs[0].pooling_factor) == (100, 16, 3.0)
    assert "statistics say rows=5" in caplog.text
    with pytest.raises(TableSpecError, match="pooling_factor"):
        table_specs(ebc_of(TW_TABLES), {"t0": {"pooling_factor": -1}})


# --------------------------------------------------------------------------- estimator


def test_shard_estimator_sets_perf_from_the_cost_model():
    from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
    from torchrec.distributed.planner.shard_estimators import EmbeddingStorageEstimator

    tables = [
        make_table("a", rows=1000, dim=64, pooling_factor=5.0),
        make_table("b", rows=4000, dim=32, pooling_factor=2.0),
    ]
    world = 4
    topo = topology(world, "cuda", cap=1 << 30)
    constraints = {
        t.name: ParameterConstraints(
            sharding_types=["table_wise", "column_wise"],
            compute_kernels=["fused"],
            pooling_factors=[t.pooling_factor],
        )
        for t in tables
    }
    est = FakeEstimator()
    ours = NeuroShardEstimator(topo, constraints, est, batch_size=16_384)
    enumerator = EmbeddingEnumerator(
        topology=topo,
        batch_size=16_384,
        constraints=constraints,
        estimator=[ours, EmbeddingStorageEstimator(topo, constraints)],
    )
    calls_before = est.compute_calls
    options = enumerator.enumerate(ebc_of(tables), [EmbeddingBagCollectionSharder()])
    assert est.compute_calls == calls_before + 1  # one batched call for every shard
    assert {o.sharding_type for o in options} == {"table_wise", "column_wise"}
    by_name = {t.name: t for t in tables}
    for option in options:
        for shard in option.shards:
            t = by_name[option.name].with_dim(shard.size[1])
            compute = est.compute_ms([[t]])[0]
            row = np.zeros((2, world))
            row[0, 0] = t.dim
            bwd = est.bwd_comm_ms(row)[:, 0]
            fwd = est.fwd_comm_ms(row, np.zeros_like(row))[:, 0]
            perf = shard.perf
            assert perf.fwd_compute == pytest.approx(compute * FWD_COMPUTE_SHARE)
            assert perf.bwd_compute == pytest.approx(compute * (1 - FWD_COMPUTE_SHARE))
            assert perf.bwd_comms == pytest.approx(bwd[0] - bwd[1])
            assert perf.fwd_comms == pytest.approx(fwd[0] - fwd[1])
            assert perf.total == pytest.approx(compute + bwd[0] - bwd[1] + fwd[0] - fwd[1])


def test_from_sharding_plan_reads_shards_listed_out_of_column_order():
    t = make_table("t", rows=10, dim=96)
    ps = ParameterSharding(
        "column_wise",
        "fused",
        [3, 1],
        EnumerableShardingSpec(
            [
                ShardMetadata([0, 32], [10, 64], "rank:3/cpu"),
                ShardMetadata([0, 0], [10, 32], "rank:1/cpu"),
            ]
        ),
    )
    sp = ShardingPlan({"": EmbeddingModuleShardingPlan({"t": ps})})
    back = from_sharding_plan(sp, ebc_of([t]), [t], make_cluster(4))
    assert back.shards == (Shard("t", 0, 32, 1), Shard("t", 32, 96, 3))


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_cluster_and_topology_convert_both_ways(device):
    from neuroshard.torchrec_adapter import cluster_topology, topology_cluster

    cluster = Cluster(3, (1 << 30, 2 << 30, 3 << 30), batch_size=8192)
    if device == "cuda":  # host memory travels as DDR
        cluster = Cluster(
            3,
            cluster.memory_per_device_bytes,
            8192,
            host_memory_per_device_bytes=(4 << 30, 5 << 30, 6 << 30),
        )
    topo = cluster_topology(cluster, device)
    assert (topo.world_size, topo.compute_device) == (3, device)
    assert topology_cluster(topo, batch_size=8192) == cluster
    hosts = Cluster.uniform(4, 1 << 30, 8192, devices_per_host=2)
    assert topology_cluster(cluster_topology(hosts, "cpu"), 8192) == hosts
    half = topology_cluster(topo, batch_size=8192, memory_headroom=0.5)
    assert half.memory_per_device_bytes == tuple(c // 2 for c in cluster.memory_per_device_bytes)
