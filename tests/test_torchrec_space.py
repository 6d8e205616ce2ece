"""Every sharding type to TorchRec and back (issue 14).

The ``ParameterSharding`` NeuroShard writes for a table-wise, column-wise, row-wise,
table-row-wise or data-parallel table equals the one TorchRec's own helpers
(``torchrec.distributed.sharding_plan``) build for the same ranks; TorchRec's plans of
every type read back into NeuroShard plans that validate; and
``DistributedModelParallel`` on gloo at 2 and 4 ranks runs a plan with table-wise, column-wise
and data-parallel tables with outputs equal to the unsharded module's. Row-wise types
need a reduce-scatter, which gloo lacks, so they are checked through their metadata only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchrec")

from torchrec.distributed.sharding_plan import (  # noqa: E402
    column_wise,
    construct_module_sharding_plan,
    data_parallel,
    row_wise,
    table_row_wise,
    table_wise,
)

from neuroshard.plan_io import validate_plan  # noqa: E402
from neuroshard.search.scoring import Scorer  # noqa: E402
from neuroshard.search.space import Layout, Space  # noqa: E402
from neuroshard.torchrec_adapter import (  # noqa: E402
    from_sharding_plan,
    meta_ebc,
    to_sharding_plan,
)
from neuroshard.types import Cluster, Plan, PlanFormatError, Shard  # noqa: E402

from factories import FakeEstimator, gloo_group, make_table, spawn_ranks  # noqa: E402

WORLD, LOCAL = 8, 4  # two hosts of four


def _cluster() -> Cluster:
    return Cluster.uniform(WORLD, 1 << 34, devices_per_host=LOCAL)


def _ours(layouts, fixed_devices=None):
    """A plan of one 1003-row, 64-wide table per layout, laid out by the search space."""
    tables = [make_table(f"t{i}", rows=1003, dim=64) for i in range(len(layouts))]
    cluster = _cluster()
    space = Space(tables, cluster, Scorer(FakeEstimator(), cluster=cluster))
    from neuroshard.search.greedy import Placement

    state = tuple(layouts)
    pieces = space.problem(state).pieces
    devices = fixed_devices or tuple(range(len(pieces)))
    return space.to_plan(state, Placement(tuple(devices), 0.0, 1.0)), tables


def _helpers(tables, generators):
    ebc = meta_ebc(tables)
    return construct_module_sharding_plan(
        ebc,
        dict(zip([t.name for t in tables], generators, strict=True)),
        local_size=LOCAL,
        world_size=WORLD,
        device_type="cuda",
    )


def _same(ours, theirs, *, kernel=True):
    assert ours.sharding_type == theirs.sharding_type
    assert list(ours.ranks) == list(theirs.ranks)
    if kernel:
        assert ours.compute_kernel == theirs.compute_kernel
    if theirs.sharding_spec is None:
        assert ours.sharding_spec is None
    else:
        assert ours.sharding_spec.shards == theirs.sharding_spec.shards


def test_each_type_exports_as_torchrec_builds_it():
    plan, tables = _ours(
        [
            Layout("columns", (64,)),
            Layout("columns", (32, 32)),
            Layout("row_wise", (64,)),
            Layout("table_row_wise", (64,), host=1),
            Layout("data_parallel", (64,), "dense"),
        ],
        fixed_devices=(5, 2, 6),
    )
    validate_plan(plan)
    ours = to_sharding_plan(
        plan, meta_ebc(tables), device_type="cuda", local_world_size=LOCAL
    ).plan[""]
    theirs = _helpers(
        tables,
        [
            table_wise(rank=5, compute_kernel="fused"),
            column_wise(ranks=[2, 6], compute_kernel="fused"),
            row_wise(compute_kernel="fused"),
            table_row_wise(host_index=1),
            data_parallel(),
        ],
    )
    for t in tables:
        # table_row_wise() takes no kernel: TorchRec's helper picks dense for a plain module
        _same(ours[t.name], theirs[t.name], kernel=t.name != "t3")
    assert ours["t3"].compute_kernel == "fused"
    assert [md.shard_sizes[0] for md in ours["t2"].sharding_spec.shards] == [126] * 7 + [121]


def test_torchrec_plans_of_every_type_read_back():
    tables = [make_table(f"t{i}", rows=1003, dim=64) for i in range(5)]
    theirs = _helpers(
        tables,
        [
            table_wise(rank=5, compute_kernel="fused"),
            column_wise(ranks=[2, 6], compute_kernel="fused"),
            row_wise(compute_kernel="fused"),
            table_row_wise(host_index=1),
            data_parallel(),
        ],
    )
    from torchrec.distributed.types import ShardingPlan

    plan = from_sharding_plan(ShardingPlan({"": theirs}), meta_ebc(tables), tables, _cluster())
    validate_plan(plan)
    assert [plan.sharding_type_of(t.name) for t in tables] == [
        "table_wise",
        "column_wise",
        "row_wise",
        "table_row_wise",
        "data_parallel",
    ]
    assert {s.device for s in plan.shards_of("t3")} == {4, 5, 6, 7}
    assert len(plan.shards_of("t4")) == WORLD
    again = to_sharding_plan(plan, meta_ebc(tables), device_type="cuda", local_world_size=LOCAL)
    for t in tables[2:]:
        _same(again.plan[""][t.name], theirs[t.name], kernel=t.name != "t3")


def test_row_blocks_torchrec_cannot_route_are_refused():
    t = make_table("t", rows=100, dim=8)
    cluster = Cluster.uniform(2, 1 << 30)
    swapped = Plan(
        (t,),
        (Shard("t", 0, 8, 1, (0, 50), "row_wise"), Shard("t", 0, 8, 0, (50, 100), "row_wise")),
        cluster,
    )
    validate_plan(swapped)  # a valid NeuroShard plan ...
    with pytest.raises(PlanFormatError, match="not TorchRec's"):  # ... TorchRec cannot route
        to_sharding_plan(swapped, meta_ebc([t]))


# --------------------------------------------------------------------------- DMP on gloo

LOCAL_BATCH = 5
DMP_TABLES = (
    make_table("tw", rows=40, dim=16, pooling_factor=2.0),
    make_table("cw", rows=30, dim=32, pooling_factor=2.0),
    make_table("dp", rows=20, dim=8, pooling_factor=3.0),
)


def _dmp_shards(world: int) -> tuple[Shard, ...]:
    """Table-wise on the last rank, column halves on rank 0 and the middle one, a replica
    of the data-parallel table on every rank."""
    return (
        Shard("tw", 0, 16, world - 1),
        Shard("cw", 0, 16, 0),
        Shard("cw", 16, 32, world // 2),
        *(Shard("dp", 0, 8, d, None, "data_parallel", "dense") for d in range(world)),
    )


def _batch(rank: int):
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    g = torch.Generator().manual_seed(300 + rank)
    lengths, values = [], []
    for t in DMP_TABLES:
        n = torch.randint(0, 4, (LOCAL_BATCH,), generator=g)
        lengths.append(n)
        values.append(torch.randint(0, t.rows, (int(n.sum()),), generator=g))
    return KeyedJaggedTensor(
        keys=[f"f_{t.name}" for t in DMP_TABLES],
        values=torch.cat(values),
        lengths=torch.cat(lengths),
    )


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    from neuroshard.torchrec_adapter import copy_unsharded_weights

    with gloo_group(rank, world, port):
        configs = [
            EmbeddingBagConfig(
                name=t.name,
                embedding_dim=t.dim,
                num_embeddings=t.rows,
                feature_names=[f"f_{t.name}"],
            )
            for t in DMP_TABLES
        ]
        torch.manual_seed(0)
        ebc = EmbeddingBagCollection(tables=configs, device=torch.device("cpu"))
        ref = EmbeddingBagCollection(tables=configs, device=torch.device("cpu"))
        ref.load_state_dict(ebc.state_dict())
        plan = Plan(DMP_TABLES, _dmp_shards(world), Cluster.uniform(world, 1 << 30))
        sharding_plan = to_sharding_plan(plan, ebc)
        dmp = DistributedModelParallel(
            ebc,
            device=torch.device("cpu"),
            plan=sharding_plan,
            sharders=[EmbeddingBagCollectionSharder()],
        )
        missing = copy_unsharded_weights(dmp.module, ref.state_dict())
        kjt = _batch(rank)
        pooled = dmp.module(kjt)
        pooled = pooled.wait() if hasattr(pooled, "wait") else pooled
        expected = ref(kjt)
        diffs = {
            t.name: (pooled[f"f_{t.name}"] - expected[f"f_{t.name}"]).abs().max().item()
            for t in DMP_TABLES
        }
        kinds = {t.name: sharding_plan.plan[""][t.name].sharding_type for t in DMP_TABLES}
        Path(out_dir, f"rank{rank}.json").write_text(
            json.dumps({"diffs": diffs, "kinds": kinds, "missing": missing})
        )


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_dmp_runs_table_column_and_data_parallel_plans_like_the_unsharded_module(tmp_path, world):
    os.environ["OMP_NUM_THREADS"] = "1"
    spawn_ranks(
        _worker, world, (str(tmp_path),), timeout_s=60 * world, what=f"DMP at {world} ranks"
    )
    for rank in range(world):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["kinds"] == {"tw": "table_wise", "cw": "column_wise", "dp": "data_parallel"}
        assert max(got["diffs"].values()) == 0.0, got["diffs"]
