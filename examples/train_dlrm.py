"""Train a small DLRM on CPU with gloo ranks, its embedding tables sharded by a plan.

    python examples/train_dlrm.py --world-size 2 --steps 20                 # NeuroShard plan
    python examples/train_dlrm.py --planner torchrec                        # TorchRec's plan
    python examples/train_dlrm.py --cost-model cpu --searcher greedy-grid \
        --save-plan plan.json                                               # costs measured here
    python examples/train_dlrm.py --plan plan.json                          # reuse a saved plan

The model: an EmbeddingBagCollection over a few tables (``sparse.ebc``), a bottom MLP on
13 dense features, their concatenation, and a top MLP to one logit, trained with BCE on
synthetic clicks. The tables are sharded by a NeuroShard plan
(:class:`~neuroshard.torchrec_planner.NeuroShardPlanner`, planned once in this process)
or by TorchRec's ``EmbeddingShardingPlanner`` for comparison; embeddings are trained
with TorchRec's fused exact SGD, the MLPs with SGD under DDP.

Each step logs the loss and the embedding-stage time: the sharded EBC's forward (input
all-to-all, lookups, output all-to-all) plus its backward (from the moment the gradient
reaches the pooled embeddings to the end of the backward pass), the max over ranks. The
summary is the median over the steps after ``--warmup`` with the interquartile spread.

Library code logs; this script configures logging and writes a JSON summary with
``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import time
from pathlib import Path

import numpy as np

from neuroshard.types import Cluster, TableSpec

logger = logging.getLogger("train_dlrm")

NUM_DENSE = 13
# A small task: rows, widths and pooling factors spread like the public DLRM tables.
DEFAULT_TABLES = (
    TableSpec("t0", rows=200_000, dim=64, pooling_factor=20.0),
    TableSpec("t1", rows=50_000, dim=128, pooling_factor=8.0),
    TableSpec("t2", rows=300_000, dim=32, pooling_factor=30.0),
    TableSpec("t3", rows=20_000, dim=96, pooling_factor=4.0),
    TableSpec("t4", rows=100_000, dim=16, pooling_factor=12.0),
    TableSpec("t5", rows=150_000, dim=64, pooling_factor=2.0),
    TableSpec("t6", rows=10_000, dim=32, pooling_factor=1.0),
    TableSpec("t7", rows=250_000, dim=128, pooling_factor=6.0),
)


# --------------------------------------------------------------------------- model


def build_model(tables, device):
    """DLRM-style model; the EBC lives at ``sparse.ebc`` on ``device`` (meta to plan)."""
    import torch
    from torch import nn
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    class DLRM(nn.Module):
        def __init__(self):
            super().__init__()
            self.sparse = nn.Module()
            self.sparse.ebc = EmbeddingBagCollection(
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
            self.keys = [f"f_{t.name}" for t in tables]
            self.bottom = nn.Sequential(
                nn.Linear(NUM_DENSE, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU()
            )
            width = 32 + sum(t.dim for t in tables)
            self.top = nn.Sequential(nn.Linear(width, 64), nn.ReLU(), nn.Linear(64, 1))
            # perf_counter readings of the embedding stage, filled by each forward/backward
            self.marks: dict[str, float] = {}

        def forward(self, dense, kjt):
            marks = self.marks
            marks.clear()
            marks["fwd_start"] = time.perf_counter()
            pooled = self.sparse.ebc(kjt)
            pooled = pooled.wait() if hasattr(pooled, "wait") else pooled  # output all-to-all
            marks["fwd_end"] = time.perf_counter()
            values = pooled.values()
            if values.requires_grad:

                def at_embeddings(grad):
                    marks["bwd_start"] = time.perf_counter()
                    return grad

                values.register_hook(at_embeddings)
            x = torch.cat([self.bottom(dense)] + [pooled[k] for k in self.keys], dim=1)
            return self.top(x).squeeze(1)

    return DLRM()


def synthetic_batch(tables, batch_size: int, generator):
    """Dense features, a KeyedJaggedTensor with bags ~ Poisson(pooling factor) of
    power-law indices, and clicks that depend on the dense features and one lookup."""
    import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    dense = torch.randn(batch_size, NUM_DENSE, generator=generator)
    lengths, values = [], []
    for t in tables:
        n = torch.poisson(torch.full((batch_size,), t.pooling_factor), generator=generator).long()
        u = torch.rand(int(n.sum()), generator=generator)
        lengths.append(n)
        values.append((u.pow(3.0) * t.rows).long().clamp_(max=t.rows - 1))
    kjt = KeyedJaggedTensor(
        keys=[f"f_{t.name}" for t in tables], values=torch.cat(values), lengths=torch.cat(lengths)
    )
    first = torch.zeros(batch_size)
    has = lengths[0] > 0
    starts = torch.cumsum(lengths[0], 0) - lengths[0]
    first[has] = (values[0][starts[has]] % 2).float()
    labels = ((dense[:, 0] + dense[:, 1] + first - 0.5) > 0).float()
    return dense, kjt, labels


# --------------------------------------------------------------------------- planning


def make_plan(
    tables,
    world_size: int,
    batch_size: int,
    planner: str,
    searcher: str,
    cost_model: str,
    memory_bytes: int,
    plan_path: Path | None = None,
):
    """A TorchRec ShardingPlan for the model's EBC, planned once in this process (or read
    from a NeuroShard plan file), and the NeuroShard plan behind it if there is one."""
    import torch
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner
    from torchrec.distributed.planner.types import ParameterConstraints

    from neuroshard.torchrec_adapter import cluster_topology
    from neuroshard.torchrec_planner import NeuroShardPlanner

    model = build_model(tables, torch.device("meta"))
    topology = cluster_topology(Cluster.uniform(world_size, memory_bytes, batch_size), "cpu")
    sharders = [EmbeddingBagCollectionSharder()]
    if plan_path is not None:
        from neuroshard.plan_io import read_plan
        from neuroshard.torchrec_adapter import load_sharding_plan

        ns_plan = read_plan(plan_path)
        if ns_plan.cluster.num_devices != world_size:
            raise SystemExit(
                f"{plan_path} is for {ns_plan.cluster.num_devices} devices, not {world_size}"
            )
        return load_sharding_plan(plan_path, model, device_type="cpu"), ns_plan
    if planner == "torchrec":
        # its default search, with the fused kernel and the sharding types that kernel
        # runs on CPU (row-wise needs reduce-scatter, which gloo lacks)
        constraints = {
            t.name: ParameterConstraints(
                sharding_types=["table_wise", "column_wise", "table_column_wise"],
                compute_kernels=["fused"],
                pooling_factors=[t.pooling_factor],
            )
            for t in tables
        }
        plan = EmbeddingShardingPlanner(
            topology=topology,
            batch_size=batch_size // world_size,
            constraints=constraints,
            debug=False,
        ).plan(model, sharders)
        return plan, None

    estimator, backend = None, None
    if cost_model != "shipped":
        from neuroshard.backends import as_estimator, get_backend

        backend = get_backend(cost_model, batch_size=batch_size)
        estimator = as_estimator(backend)
    try:
        # TorchRec's batch_size is per rank; the shipped model for this CPU topology is
        # the CPU-measured one, which prices a global batch of 4,096
        ns = NeuroShardPlanner(
            topology,
            table_stats={t.name: t for t in tables},
            searcher=searcher,
            estimator=estimator,
            batch_size=batch_size // world_size,
        )
        plan = ns.plan(model, sharders)
    finally:
        if backend is not None and hasattr(backend, "close"):
            backend.close()
    return plan, ns.last_plan


# --------------------------------------------------------------------------- training


def _worker(
    rank: int, args: argparse.Namespace, tables, sharding_plan, port: int, out_path: str | None
) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.optim import _apply_optimizer_in_backward
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    _setup_logging(f"[rank {rank}] ")
    torch.set_num_threads(args.threads)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.world_size
    )
    try:
        torch.manual_seed(args.seed)
        model = build_model(tables, torch.device("meta"))
        _apply_optimizer_in_backward(
            torch.optim.SGD, model.sparse.ebc.parameters(), {"lr": args.lr}
        )
        dmp = DistributedModelParallel(
            model,
            device=torch.device("cpu"),
            plan=sharding_plan,
            sharders=[EmbeddingBagCollectionSharder()],
        )
        dense_params = [p for _, p in in_backward_optimizer_filter(dmp.named_parameters())]
        dense_opt = torch.optim.SGD(dense_params, lr=args.lr)
        marks = dmp.module.marks
        local = args.batch_size // args.world_size
        gen = torch.Generator().manual_seed(args.seed * 1000 + rank)
        batches = [synthetic_batch(tables, local, gen) for _ in range(min(args.steps, 4))]

        stage_ms, losses = [], []
        for step in range(args.steps):
            dense, kjt, labels = batches[step % len(batches)]
            dense_opt.zero_grad()
            dist.barrier()
            logits = dmp(dense, kjt)  # DDP over the dense part, sharded EBC inside
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
            loss.backward()  # the embedding backward runs last: it ends the pass
            done = time.perf_counter()
            dense_opt.step()
            fwd_ms = (marks["fwd_end"] - marks["fwd_start"]) * 1e3
            bwd_ms = (done - marks["bwd_start"]) * 1e3
            t = torch.tensor([fwd_ms + bwd_ms, loss.item()])
            dist.all_reduce(t[:1], op=dist.ReduceOp.MAX)
            dist.all_reduce(t[1:], op=dist.ReduceOp.SUM)
            stage_ms.append(float(t[0]))
            losses.append(float(t[1]) / args.world_size)
            if rank == 0:
                logger.info(
                    "step %d loss %.4f embedding stage %.2f ms (rank 0: fwd %.2f, bwd %.2f)",
                    step,
                    losses[-1],
                    stage_ms[-1],
                    fwd_ms,
                    bwd_ms,
                )
        if rank == 0:
            timed = np.asarray(stage_ms[args.warmup :])
            p25, med, p75 = np.percentile(timed, [25, 50, 75])
            summary = {
                "planner": args.planner,
                "world_size": args.world_size,
                "batch_size": args.batch_size,
                "steps": len(timed),
                "embedding_stage_median_ms": float(med),
                "embedding_stage_iqr_ms": [float(p25), float(p75)],
                "spread": float((p75 - p25) / med),
                "losses": losses,
                "stage_ms": stage_ms,
            }
            logger.info(
                "embedding stage: median %.2f ms over %d steps (IQR %.2f-%.2f ms, "
                "spread %.1f%%); loss %.4f -> %.4f",
                med,
                len(timed),
                p25,
                p75,
                100 * summary["spread"],
                losses[0],
                losses[-1],
            )
            if out_path:
                Path(out_path).write_text(json.dumps(summary, indent=1))
    finally:
        dist.destroy_process_group()


def _setup_logging(prefix: str) -> None:
    """Our messages at INFO; TorchRec's (very chatty at INFO) at WARNING."""
    logging.basicConfig(level=logging.WARNING, format=prefix + "%(message)s", force=True)
    for name in ("train_dlrm", "neuroshard"):
        logging.getLogger(name).setLevel(logging.INFO)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the summary")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=4096,
        help="global batch (the shipped CPU model prices 4,096)",
    )
    parser.add_argument("--lr", type=float, default=0.3)
    parser.add_argument("--planner", choices=("neuroshard", "torchrec"), default="neuroshard")
    parser.add_argument("--searcher", default="neuroshard", help="NeuroShard searcher name")
    parser.add_argument(
        "--cost-model",
        default="shipped",
        help="'shipped' (pre-trained model) or a backend name, e.g. 'cpu'",
    )
    parser.add_argument("--memory-gb", type=float, default=2.0, help="memory cap per rank")
    parser.add_argument("--tables", type=Path, help="table config (default: 8 built-in tables)")
    parser.add_argument(
        "--plan", type=Path, help="use this NeuroShard plan file instead of planning"
    )
    parser.add_argument("--save-plan", type=Path, help="write the NeuroShard plan here")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the JSON summary here")
    args = parser.parse_args(argv)
    _setup_logging("")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    if args.tables:
        from neuroshard.tables import load_tables

        tables = tuple(load_tables(args.tables))
    else:
        tables = DEFAULT_TABLES
    sharding_plan, ns_plan = make_plan(
        tables,
        args.world_size,
        args.batch_size,
        args.planner,
        args.searcher,
        args.cost_model,
        int(args.memory_gb * (1 << 30)),
        args.plan,
    )
    logger.info("sharding plan (%s):%s", args.planner, sharding_plan)
    if ns_plan is not None and ns_plan.cost is not None:
        logger.info(
            "NeuroShard predicted cost %.3f ms (%s)", ns_plan.cost.max_ms, ns_plan.cost.model
        )
    if args.save_plan and ns_plan is not None:
        from neuroshard.plan_io import write_plan

        write_plan(ns_plan, args.save_plan)

    import torch.multiprocessing as mp

    mp.start_processes(
        _worker,
        args=(args, tables, sharding_plan, _free_port(), str(args.out) if args.out else None),
        nprocs=args.world_size,
        start_method="spawn",
    )


if __name__ == "__main__":
    main()
