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

Ranks write what they saw to JSON; the test process asserts.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchrec")

import torch.multiprocessing as mp  # noqa: E402

from factories import FakeEstimator  # noqa: E402
from neuroshard.types import Cluster, Plan, Shard, TableSpec  # noqa: E402

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
    2: (Shard("a", 0, 32, 1), Shard("a", 32, 96, 0), Shard("b", 0, 32, 1),
        Shard("c", 0, 16, 0), Shard("c", 16, 64, 0), Shard("d", 0, 16, 1)),
    4: (Shard("a", 0, 32, 1), Shard("a", 32, 96, 0), Shard("b", 0, 32, 3),
        Shard("c", 0, 16, 2), Shard("c", 16, 64, 2), Shard("d", 0, 16, 0)),
}


def _plan(world: int) -> Plan:
    return Plan(TABLES, SHARDS[world], Cluster.uniform(world, 1 << 30))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch(rank: int):
    """Rank ``rank``'s local batch: a KeyedJaggedTensor over every table's feature."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    g = torch.Generator().manual_seed(100 + rank)
    lengths, values = [], []
    for t in TABLES:
        n = torch.randint(0, 5, (LOCAL_BATCH,), generator=g)
        lengths.append(n)
        values.append(torch.randint(0, t.rows, (int(n.sum()),), generator=g))
    return KeyedJaggedTensor(keys=[f"f_{t.name}" for t in TABLES],
                             values=torch.cat(values), lengths=torch.cat(lengths))


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
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.optim import _apply_optimizer_in_backward
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    from neuroshard.torchrec_adapter import cluster_topology, copy_unsharded_weights
    from neuroshard.torchrec_planner import NeuroShardPlanner

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world)
    try:
        configs = [EmbeddingBagConfig(name=t.name, embedding_dim=t.dim, num_embeddings=t.rows,
                                      feature_names=[f"f_{t.name}"]) for t in TABLES]
        torch.manual_seed(0)  # same weights on every rank
        ebc = EmbeddingBagCollection(tables=configs, device=torch.device("cpu"))
        ref = EmbeddingBagCollection(tables=configs, device=torch.device("cpu"))
        ref.load_state_dict(ebc.state_dict())
        initial = {n.removeprefix("embedding_bags.").removesuffix(".weight"): w.clone()
                   for n, w in ref.state_dict().items()}

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
        dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=sharding_plan,
                                       sharders=[EmbeddingBagCollectionSharder()])
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
            (pooled[f"f_{t.name}"] - pooled_ref[f"f_{t.name}"]).abs().max().item()
            for t in TABLES
        )
        fwd_equal = all(torch.equal(pooled[f"f_{t.name}"], pooled_ref[f"f_{t.name}"])
                        for t in TABLES)

        # 3. one step: fused SGD in backward vs plain SGD over the global batch. TorchRec
        # divides embedding gradients by the world size (comm_ops gradient division, as
        # DDP averages dense ones), so the reference loss is the mean of the ranks' losses.
        _loss(pooled, rank).backward()
        opt = torch.optim.SGD(ref.parameters(), lr=LR)
        opt.zero_grad()
        (sum(_loss(ref(_batch(r)), r) for r in range(world)) / world).backward()
        opt.step()
        ref_weights = {n.removeprefix("embedding_bags.").removesuffix(".weight"): w
                       for n, w in ref.state_dict().items()}
        weight_diff, moved = 0.0, 0.0
        for key, value in dmp.state_dict().items():
            name = key.removeprefix(prefix).removeprefix("embedding_bags.").removesuffix(".weight")
            for s in value.local_shards():
                r0, c0 = s.metadata.shard_offsets
                nr, nc = s.metadata.shard_sizes
                want = ref_weights[name][r0:r0 + nr, c0:c0 + nc]
                weight_diff = max(weight_diff, (s.tensor.detach() - want).abs().max().item())
                moved = max(moved, (want - initial[name][r0:r0 + nr, c0:c0 + nc]).abs().max().item())
        result = {"placement": placement, "fwd_diff": fwd_diff, "fwd_equal": fwd_equal,
                  "weight_diff": weight_diff, "moved": moved}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _spawn(world: int, out_dir: Path, nested: bool, timeout_s: float = 80.0) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    ctx = mp.start_processes(_worker, args=(world, _free_port(), str(out_dir), nested),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail(f"DMP at {world} ranks did not finish in {timeout_s:.0f} s")


@pytest.mark.parametrize("world,nested", [(2, False), (4, True)])
def test_dmp_matches_unsharded(tmp_path, world, nested):
    _spawn(world, tmp_path, nested)
    plan = _plan(world)
    for rank in range(world):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        want = sorted(
            [s.table, 0, s.start, plan.table(s.table).rows, s.width, rank]
            for s in plan.shards if s.device == rank
        )
        assert sorted(got["placement"]) == want, f"rank {rank} holds the wrong shards"
        assert got["fwd_equal"], f"rank {rank}: pooled embeddings differ by {got['fwd_diff']}"
        assert got["moved"] > 1e-3, f"rank {rank}: the step left its shards unchanged"
        assert got["weight_diff"] <= 1e-6, f"rank {rank}: weights after one step differ by {got['weight_diff']}"
