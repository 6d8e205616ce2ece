"""NeuroShard plans under TorchRec's DistributedModelParallel, CPU + gloo, 2 and 4 ranks.

Each rank shards an EmbeddingBagCollection with a NeuroShard plan (table-wise tables,
uneven column splits, two shards of one table on one rank) obtained through
``NeuroShardPlanner.collective_plan``, then checks against an unsharded copy:

* its local shards in the sharded state_dict are exactly the plan's shards for its rank;
  (DMP on CPU does not copy the unsharded weights in, so the ranks copy them with
  ``copy_unsharded_weights`` first);
* the pooled embeddings of its local batch equal the unsharded module's exactly;
* after one step (fused exact SGD in backward vs plain SGD on the unsharded copy over the
  global batch, mean of the ranks' losses) its shards hold the same weights as the copy's
  columns (to 1e-6: the fused update rounds differently in the last bit).

A second scenario, at 2 ranks, is a TorchRec user's model: an EBC nested at
``sparse_arch.embedding_bag_collection`` (a table with two features), a weighted EBC and an
``EmbeddingCollection`` whose table reuses a name, planned by ``NeuroShardPlanner`` under a
``table_wise`` constraint, written as plan JSON and loaded for the model with
``load_sharding_plan`` (no unpickling): every module is sharded (none left whole on every
rank), the ranks together hold exactly the plan's shards, and the outputs equal the
unsharded modules'.

Ranks write what they saw to JSON; the test process asserts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchrec")

from neuroshard.types import Cluster, Plan, Shard, TableSpec  # noqa: E402

from factories import FakeEstimator, gloo_group, spawn_ranks  # noqa: E402

pytestmark = pytest.mark.slow

LR = 0.5
LOCAL_BATCH = 6
TABLES = (
    TableSpec("a", rows=50, dim=96, pooling_factor=3.0),
    TableSpec("b", rows=40, dim=32, pooling_factor=2.0),
    TableSpec("c", rows=30, dim=64, pooling_factor=2.0),
    TableSpec("d", rows=20, dim=16, pooling_factor=1.0),
)
# device -> shards, per world size: table-wise, uneven column-wise, two shards of "c"
# on one rank, and (at 4 ranks) a rank left empty of "a"'s pieces.
SHARDS = {
    2: (
        Shard("a", 0, 32, 1),
        Shard("a", 32, 96, 0),
        Shard("b", 0, 32, 1),
        Shard("c", 0, 16, 0),
        Shard("c", 16, 64, 0),
        Shard("d", 0, 16, 1),
    ),
    4: (
        Shard("a", 0, 32, 1),
        Shard("a", 32, 96, 0),
        Shard("b", 0, 32, 3),
        Shard("c", 0, 16, 2),
        Shard("c", 16, 64, 2),
        Shard("d", 0, 16, 0),
    ),
}


def _plan(world: int) -> Plan:
    return Plan(TABLES, SHARDS[world], Cluster.uniform(world, 1 << 30))


def _batch(rank: int):
    """Rank ``rank``'s local batch: a KeyedJaggedTensor over every table's feature."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    g = torch.Generator().manual_seed(100 + rank)
    lengths, values = [], []
    for t in TABLES:
        n = torch.randint(0, 5, (LOCAL_BATCH,), generator=g)
        lengths.append(n)
        values.append(torch.randint(0, t.rows, (int(n.sum()),), generator=g))
    return KeyedJaggedTensor(
        keys=[f"f_{t.name}" for t in TABLES], values=torch.cat(values), lengths=torch.cat(lengths)
    )


def _loss(pooled, rank: int):
    """A loss whose gradient differs per column and per sample: sum(pooled * fixed noise)."""
    g = torch.Generator().manual_seed(200 + rank)
    total = 0.0
    for t in TABLES:
        x = pooled[f"f_{t.name}"]
        total = total + (x * torch.randn(x.shape, generator=g)).sum()
    return total


def _worker(rank: int, world: int, port: int, out_dir: str, nested: bool) -> None:
    torch.set_num_threads(1)
    from torch import nn
    from torch.distributed.optim import _apply_optimizer_in_backward
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    from neuroshard.torchrec_adapter import cluster_topology, copy_unsharded_weights
    from neuroshard.torchrec_planner import NeuroShardPlanner

    with gloo_group(rank, world, port):
        configs = [
            EmbeddingBagConfig(
                name=t.name,
                embedding_dim=t.dim,
                num_embeddings=t.rows,
                feature_names=[f"f_{t.name}"],
            )
            for t in TABLES
        ]
        torch.manual_seed(0)  # same weights on every rank
        ebc = EmbeddingBagCollection(tables=configs, device=torch.device("cpu"))
        ref = EmbeddingBagCollection(tables=configs, device=torch.device("cpu"))
        ref.load_state_dict(ebc.state_dict())
        initial = {
            n.removeprefix("embedding_bags.").removesuffix(".weight"): w.clone()
            for n, w in ref.state_dict().items()
        }

        if nested:  # the EBC sits at "sparse.ebc" inside a bigger model
            model = nn.Module()
            model.sparse = nn.Module()
            model.sparse.ebc = ebc
        else:
            model = ebc
        prefix = "sparse.ebc." if nested else ""

        def fixed_plan(tables, cluster, estimator, *, seed=0, budget_s=None):
            assert [t.name for t in tables] == [t.name for t in TABLES]
            return _plan(world)

        topology = cluster_topology(Cluster.uniform(world, 1 << 30), "cpu")
        planner = NeuroShardPlanner(topology, searcher=fixed_plan, estimator=FakeEstimator())
        sharding_plan = planner.collective_plan(model, [EmbeddingBagCollectionSharder()])

        _apply_optimizer_in_backward(torch.optim.SGD, ebc.parameters(), {"lr": LR})
        dmp = DistributedModelParallel(
            model,
            device=torch.device("cpu"),
            plan=sharding_plan,
            sharders=[EmbeddingBagCollectionSharder()],
        )
        sharded = dmp.module.sparse.ebc if nested else dmp.module
        # DMP leaves CPU shards freshly initialised: start from the unsharded weights.
        assert not copy_unsharded_weights(sharded, ref.state_dict())

        # 1. placement: local shards in the sharded state_dict
        placement = []
        for key, value in dmp.state_dict().items():
            name = key.removeprefix(prefix).removeprefix("embedding_bags.").removesuffix(".weight")
            for s in value.local_shards():
                md = s.metadata
                placement.append([name, *md.shard_offsets, *md.shard_sizes, md.placement.rank()])

        # 2. forward on this rank's local batch
        kjt = _batch(rank)
        pooled = sharded(kjt)
        pooled = pooled.wait() if hasattr(pooled, "wait") else pooled
        pooled_ref = ref(kjt)
        fwd_diff = max(
            (pooled[f"f_{t.name}"] - pooled_ref[f"f_{t.name}"]).abs().max().item() for t in TABLES
        )
        fwd_equal = all(
            torch.equal(pooled[f"f_{t.name}"], pooled_ref[f"f_{t.name}"]) for t in TABLES
        )

        # 3. one step: fused SGD in backward vs plain SGD over the global batch. TorchRec
        # divides embedding gradients by the world size (comm_ops gradient division, as
        # DDP averages dense ones), so the reference loss is the mean of the ranks' losses.
        _loss(pooled, rank).backward()
        opt = torch.optim.SGD(ref.parameters(), lr=LR)
        opt.zero_grad()
        (sum(_loss(ref(_batch(r)), r) for r in range(world)) / world).backward()
        opt.step()
        ref_weights = {
            n.removeprefix("embedding_bags.").removesuffix(".weight"): w
            for n, w in ref.state_dict().items()
        }
        weight_diff, moved = 0.0, 0.0
        for key, value in dmp.state_dict().items():
            name = key.removeprefix(prefix).removeprefix("embedding_bags.").removesuffix(".weight")
            for s in value.local_shards():
                r0, c0 = s.metadata.shard_offsets
                nr, nc = s.metadata.shard_sizes
                want = ref_weights[name][r0 : r0 + nr, c0 : c0 + nc]
                weight_diff = max(weight_diff, (s.tensor.detach() - want).abs().max().item())
                start = initial[name][r0 : r0 + nr, c0 : c0 + nc]
                moved = max(moved, (want - start).abs().max().item())
        result = {
            "placement": placement,
            "fwd_diff": fwd_diff,
            "fwd_equal": fwd_equal,
            "weight_diff": weight_diff,
            "moved": moved,
        }
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def _spawn(world: int, out_dir: Path, nested: bool, timeout_s: float = 80.0) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    spawn_ranks(
        _worker, world, (str(out_dir), nested), timeout_s=timeout_s, what=f"DMP at {world} ranks"
    )


@pytest.mark.parametrize("world,nested", [(2, False), (4, True)])
def test_dmp_matches_unsharded(tmp_path, world, nested):
    _spawn(world, tmp_path, nested)
    plan = _plan(world)
    for rank in range(world):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        want = sorted(
            [s.table, 0, s.start, plan.table(s.table).rows, s.width, rank]
            for s in plan.shards
            if s.device == rank
        )
        assert sorted(got["placement"]) == want, f"rank {rank} holds the wrong shards"
        assert got["fwd_equal"], f"rank {rank}: pooled embeddings differ by {got['fwd_diff']}"
        assert got["moved"] > 1e-3, f"rank {rank}: the step left its shards unchanged"
        assert got["weight_diff"] <= 1e-6, (
            f"rank {rank}: weights after one step differ by {got['weight_diff']}"
        )


# --------------------------------------------------------------------------- every module

SEQ_DIM = 16


def _modules_model(device):
    """A DLRM-like model: an EBC at ``sparse_arch.embedding_bag_collection`` (``t0`` with
    two features), a weighted EBC, and an EmbeddingCollection whose table reuses the name
    ``t0``."""
    from torch import nn
    from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

    model = nn.Module()
    model.sparse_arch = nn.Module()
    model.sparse_arch.embedding_bag_collection = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(
                name="t0", num_embeddings=50, embedding_dim=32, feature_names=["f_t0a", "f_t0b"]
            ),
            EmbeddingBagConfig(
                name="t1", num_embeddings=40, embedding_dim=64, feature_names=["f_t1"]
            ),
            EmbeddingBagConfig(
                name="t2", num_embeddings=30, embedding_dim=16, feature_names=["f_t2"]
            ),
        ],
        device=device,
    )
    model.weighted = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(name="w", num_embeddings=20, embedding_dim=8, feature_names=["f_w"]),
        ],
        is_weighted=True,
        device=device,
    )
    model.seq = EmbeddingCollection(
        tables=[
            EmbeddingConfig(
                name="t0", num_embeddings=25, embedding_dim=SEQ_DIM, feature_names=["s_t0"]
            ),
        ],
        device=device,
    )
    return model


def _kjt(keys, rows, rank, weighted=False):
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    g = torch.Generator().manual_seed(300 + rank)
    lengths = torch.randint(0, 4, (len(keys) * LOCAL_BATCH,), generator=g)
    values = torch.cat(
        [
            torch.randint(0, r, (int(n),), generator=g)
            for r, n in zip([r for r in rows for _ in range(LOCAL_BATCH)], lengths, strict=True)
        ]
    )
    weights = torch.rand(values.shape, generator=g) if weighted else None
    return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths, weights=weights)


def _modules_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    import logging

    import torch.distributed as dist
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner.types import ParameterConstraints

    from neuroshard.plan_io import write_plan
    from neuroshard.torchrec_adapter import (
        cluster_topology,
        copy_unsharded_weights,
        load_sharding_plan,
    )
    from neuroshard.torchrec_planner import NeuroShardPlanner

    logging.basicConfig(level=logging.INFO, filename=str(Path(out_dir, f"log{rank}.txt")))
    with gloo_group(rank, world, port):
        torch.manual_seed(0)
        model = _modules_model(torch.device("cpu"))
        ref = _modules_model(torch.device("cpu"))
        ref.load_state_dict(model.state_dict())
        sharders = [EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder()]
        planner = NeuroShardPlanner(
            cluster_topology(Cluster.uniform(world, 1 << 30), "cpu"),
            searcher="neuroshard",
            estimator=FakeEstimator(),
            batch_size=65_536 // world,
            constraints={"t1": ParameterConstraints(sharding_types=["table_wise"])},
        )
        path = Path(out_dir, "plan.json")
        if rank == 0:
            planner.plan(model, sharders)
            write_plan(planner.last_plan, path)
        dist.barrier()
        sharding_plan = load_sharding_plan(path, model, device_type="cpu")  # JSON, no pickle
        dmp = DistributedModelParallel(
            model, device=torch.device("cpu"), plan=sharding_plan, sharders=sharders
        )
        parts = {
            "sparse_arch.embedding_bag_collection": ["f_t0a", "f_t0b", "f_t1", "f_t2"],
            "weighted": ["f_w"],
            "seq": ["s_t0"],
        }
        rows = {"f_t0a": 50, "f_t0b": 50, "f_t1": 40, "f_t2": 30, "f_w": 20, "s_t0": 25}
        result = {"types": {}, "equal": {}, "placement": []}
        for path_, keys in parts.items():
            sharded = dmp.module.get_submodule(path_)
            result["types"][path_] = type(sharded).__name__
            unsharded = ref.get_submodule(path_)
            assert not copy_unsharded_weights(sharded, unsharded.state_dict())
            kjt = _kjt(keys, [rows[k] for k in keys], rank, weighted=path_ == "weighted")
            out = sharded(kjt)
            out = out.wait() if hasattr(out, "wait") else out
            want = unsharded(kjt)
            result["equal"][path_] = all(
                torch.allclose(
                    out[k].values() if path_ == "seq" else out[k],
                    want[k].values() if path_ == "seq" else want[k],
                    atol=1e-6,
                )
                for k in keys
            )
            for key, value in sharded.state_dict().items():
                if not hasattr(value, "local_shards"):  # a data-parallel replica
                    result["placement"].append([path_, key, 0, 0, *value.shape, rank])
                    continue
                for s in value.local_shards():
                    md = s.metadata
                    result["placement"].append(
                        [path_, key, *md.shard_offsets, *md.shard_sizes, md.placement.rank()]
                    )
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def test_dmp_shards_every_module_from_plan_json(tmp_path):
    os.environ["OMP_NUM_THREADS"] = "1"
    world = 2
    spawn_ranks(
        _modules_worker, world, (str(tmp_path),), timeout_s=80.0, what="DMP of every module"
    )
    from neuroshard.plan_io import read_plan

    plan = read_plan(tmp_path / "plan.json")
    names = {t.name: t for t in plan.tables}
    assert set(names) == {"sparse_arch.embedding_bag_collection.t0", "t1", "t2", "w", "seq.t0"}
    assert names["seq.t0"].pooled is False and names["seq.t0"].module == "seq"
    assert names["sparse_arch.embedding_bag_collection.t0"].pooling_factor == 2.0  # 2 features
    assert len(plan.shards_of("t1")) == 1  # the table_wise constraint
    held = []
    for rank in range(world):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["types"] == {
            "sparse_arch.embedding_bag_collection": "ShardedEmbeddingBagCollection",
            "weighted": "ShardedEmbeddingBagCollection",
            "seq": "ShardedEmbeddingCollection",
        }
        assert all(got["equal"].values()), f"rank {rank}: outputs differ: {got['equal']}"
        held += got["placement"]
    # every table's shards (or replicas), over both ranks, are the plan's
    by_key = {
        (
            "sparse_arch.embedding_bag_collection",
            "embedding_bags.t0.weight",
        ): "sparse_arch.embedding_bag_collection.t0",
        ("sparse_arch.embedding_bag_collection", "embedding_bags.t1.weight"): "t1",
        ("sparse_arch.embedding_bag_collection", "embedding_bags.t2.weight"): "t2",
        ("weighted", "embedding_bags.w.weight"): "w",
        ("seq", "embeddings.t0.weight"): "seq.t0",
    }
    got = sorted([by_key[(p, k)], c0, w, r] for p, k, _, c0, _, w, r in held)
    want = sorted([s.table, s.start, s.width, s.device] for s in plan.shards)
    assert got == want
