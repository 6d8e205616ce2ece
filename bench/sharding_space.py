"""The whole sharding space on multi-host clusters: NeuroShard against the heuristics and
TorchRec's full-space planner (issue 14).

    OMP_NUM_THREADS=1 .venv/bin/python bench/sharding_space.py --sizes 60x16,120x32,300x128 \
        --tasks 3 --budget 30 --out bench/results/sharding_space.md

Tasks: ``n`` tables from the ``--split`` pool (drawn with replacement and renamed) on ``d``
devices in hosts of ``--devices-per-host`` (8), HBM per device ``total / d / --fill``
(the 15% reserve is taken from it, as TorchRec's default does, for every searcher); the
``--giants`` largest tables are then grown in rows to ``--giant-size`` x a device's HBM
(a synthetic choice: the pool has no table larger than 2 GB, production models have
multi-terabyte ones), so that some tables cannot be table-wise; ``--host-memory`` of host
memory per device for ``fused_uvm_caching``; the sim profile's bandwidths (NVLink and NIC
per direction) given to every searcher through the cluster. Every plan is costed by the
sim backend (noise 0) on the cluster's topology.

Searchers, all through :class:`neuroshard.planner.Planner` with the same reserve:

* ``neuroshard`` -- the default search (the beam over the whole space), ``--budget`` seconds
  and at most ``--max-steps`` beam steps, guided by the ``--estimator``: ``model`` is the
  shipped model the planner picks for the cluster (its all-to-all, learned on one host, is
  floored at the NIC's time across hosts;
  row-wise, table-row-wise and data-parallel collectives, ids and cache misses are priced
  analytically from the cluster's bandwidths), ``sim`` the sim backend itself (the truth as
  its guide: an upper bound on what a better model could do, labelled so);
* ``greedy-grid`` -- the greedy grid on the start layout, no beam;
* ``torchrec`` -- TorchRec 1.9's ``EmbeddingShardingPlanner`` over all five sharding types
  and the ``fused``, ``fused_uvm_caching`` and ``dense`` kernels, on the same topology
  (``local_world_size``, both bandwidths, HBM and host memory, the same reserve);
* the table-wise heuristics (``size-lookup``, ``lookup``): they plan only tasks where every
  table fits a device.

Ratios are per task, on the tasks both searchers planned: the mean over those tasks of
NeuroShard's cost over the other's.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections import Counter
from pathlib import Path

import numpy as np

from neuroshard.backends.sim import PROFILES, SimBackend
from neuroshard.planner import Planner
from neuroshard.pretrain.pool import load_pool
from neuroshard.search import get_searcher
from neuroshard.search.scoring import plan_cost
from neuroshard.types import Cluster, NeuroShardError, Plan, TableSpec

from _common import emit, renamed_draws

SEARCHERS = ("neuroshard", "greedy-grid", "torchrec", "size-lookup", "lookup")


def make_task(
    pool: list[TableSpec],
    num_tables: int,
    num_devices: int,
    rng: np.random.Generator,
    args: argparse.Namespace,
) -> tuple[list[TableSpec], Cluster]:
    """``num_tables`` tables (renamed draws from ``pool``) and their tight cluster."""
    tables = renamed_draws(pool, num_tables, rng)
    memory = int(sum(t.size_bytes for t in tables) / num_devices / args.fill)
    for i in sorted(range(num_tables), key=lambda j: -tables[j].size_bytes)[: args.giants]:
        t = tables[i]
        rows = int(args.giant_size * memory / (t.dim * 4))
        tables[i] = TableSpec(
            f"{t.name}-giant", max(rows, t.rows), t.dim, t.pooling_factor, t.reuse_hist
        )
    prof = PROFILES[args.profile]
    cluster = Cluster.uniform(
        num_devices,
        memory,
        args.batch_size,
        devices_per_host=args.devices_per_host,
        host_memory_bytes=int(args.host_memory * 2**30),
        intra_host_bw_bytes_per_ms=prof.nvlink_bytes_per_ms,
        inter_host_bw_bytes_per_ms=prof.inter_host_bytes_per_ms,
    )
    return tables, cluster


def run_one(
    name: str,
    tables: list[TableSpec],
    cluster: Cluster,
    truth: SimBackend,
    args: argparse.Namespace,
) -> dict:
    """Plan with one searcher; its sim cost, seconds and sharding types (or why not)."""
    if name == "neuroshard":
        estimator = truth if args.estimator == "sim" else None
        searcher = get_searcher("neuroshard", polish_fraction=0.0, max_splits=args.max_steps)
        searcher.__name__ = "neuroshard"  # type: ignore[attr-defined]
        planner = Planner(estimator, searcher, budget_s=args.budget, seed=args.seed)
    else:
        estimator = truth if args.estimator == "sim" else None
        planner = Planner(estimator, name, seed=args.seed)
    started = time.perf_counter()
    try:
        plan: Plan = planner.plan(tables, cluster)
    except NeuroShardError as e:
        return {"ok": False, "why": str(e)[:160], "seconds": time.perf_counter() - started}
    seconds = time.perf_counter() - started
    cost = plan_cost(plan, truth)
    worst = max(cost.devices, key=lambda d: d.total_ms)
    types = Counter(plan.sharding_type_of(t.name) for t in plan.tables)
    kernels = Counter(s.compute_kernel for s in plan.shards)
    return {
        "ok": True,
        "ms": cost.max_ms,
        "seconds": seconds,
        "guide": plan.cost.model if plan.cost is not None else "?",
        "worst": (worst.compute_ms, worst.fwd_comm_ms, worst.bwd_comm_ms),
        "types": dict(types),
        "uvm": kernels.get("fused_uvm_caching", 0),
    }


def fmt_types(counts: Counter) -> str:
    short = {
        "table_wise": "TW",
        "column_wise": "CW",
        "row_wise": "RW",
        "table_row_wise": "TWRW",
        "data_parallel": "DP",
    }
    return " ".join(f"{short[k]} {v}" for k, v in sorted(counts.items()) if v)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="60x16,120x32,300x128", help="comma-separated TABLESxDEVICES")
    p.add_argument("--tasks", type=int, default=3, help="tasks per size")
    p.add_argument("--devices-per-host", type=int, default=8)
    p.add_argument(
        "--fill", type=float, default=0.5, help="drawn tables' bytes / total HBM before the reserve"
    )
    p.add_argument("--giants", type=int, default=2, help="tables grown past a device")
    p.add_argument("--giant-size", type=float, default=2.0, help="a giant's bytes / a device's HBM")
    p.add_argument("--host-memory", type=float, default=64.0, help="GiB per device")
    p.add_argument("--budget", type=float, default=30.0, help="NeuroShard's seconds")
    p.add_argument(
        "--max-steps",
        type=int,
        default=10,
        help="NeuroShard's beam steps at most (the budget may stop it first)",
    )
    p.add_argument("--estimator", choices=["model", "sim"], default="model")
    p.add_argument("--searchers", default=",".join(SEARCHERS))
    p.add_argument("--split", default="test", choices=["train", "test", "all"])
    p.add_argument("--profile", default="h100")
    p.add_argument("--batch-size", type=int, default=65_536)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("torchrec").setLevel(logging.CRITICAL)

    pool = load_pool(args.split)
    truth = SimBackend(args.profile, batch_size=args.batch_size)
    searchers = args.searchers.split(",")
    rng = np.random.default_rng(args.seed)
    sections = []
    for size in args.sizes.split(","):
        n, d = (int(x) for x in size.lower().split("x"))
        rows = {s: [] for s in searchers}
        for k in range(args.tasks):
            tables, cluster = make_task(pool, n, d, rng, args)
            for s in searchers:
                rows[s].append(run_one(s, tables, cluster, truth, args))
                r = rows[s][-1]
                print(
                    f"{n}x{d} task {k} {s}: "
                    + (
                        f"{r['ms']:.3f} ms in {r['seconds']:.1f} s, {r['types']}"
                        if r["ok"]
                        else f"no plan ({r['why'][:100]})"
                    ),
                    flush=True,
                )
        caps = cluster.memory_per_device_bytes[0] / 2**30
        lines = [
            f"### {n} tables on {d} devices ({d // args.devices_per_host} hosts of "
            f"{args.devices_per_host}), {args.tasks} tasks",
            "",
            f"HBM per device (last task) {caps:.2f} GiB before the 15% reserve, "
            f"{args.host_memory:g} GiB host memory.",
            "",
            "| searcher | planned | mean ms | NeuroShard / it (tasks both planned) | "
            "median s | critical device compute / fwd / bwd ms | sharding types (all tasks) |",
            "|---|---|---|---|---|---|---|",
        ]
        ours = rows.get("neuroshard")
        per_task: dict[str, list[float]] = {}  # NeuroShard / searcher, tasks both planned
        for s in searchers:
            ok = [r for r in rows[s] if r["ok"]]
            mean = f"{statistics.fmean(r['ms'] for r in ok):.3f}" if ok else "-"
            ratio = "-"
            if ours is not None and s != "neuroshard":
                per_task[s] = [
                    a["ms"] / b["ms"]
                    for a, b in zip(ours, rows[s], strict=True)
                    if a["ok"] and b["ok"]
                ]
                if per_task[s]:
                    ratio = f"{statistics.fmean(per_task[s]):.3f} ({len(per_task[s])} tasks)"
            secs = f"{statistics.median(r['seconds'] for r in rows[s]):.1f}"
            worst = "-"
            if ok:
                w = np.mean([r["worst"] for r in ok], axis=0)
                worst = f"{w[0]:.2f} / {w[1]:.2f} / {w[2]:.2f}"
            types: Counter = Counter()
            for r in ok:
                types.update(r["types"])
            uvm = sum(r["uvm"] for r in ok)
            kinds = fmt_types(types) + (f"; {uvm} shards on uvm caching" if uvm else "")
            lines.append(
                f"| {s} | {len(ok)}/{len(rows[s])} | {mean} | {ratio} | {secs} | "
                f"{worst} | {kinds} |"
            )
        for s, label in (("torchrec", "TorchRec"), ("greedy-grid", "the greedy grid")):
            if per_task.get(s):
                lines += [
                    "",
                    f"Per task, NeuroShard / {label}: "
                    + ", ".join(f"{x:.4f}" for x in per_task[s])
                    + f" (mean {statistics.fmean(per_task[s]):.5f}).",
                ]
        guides = sorted({r["guide"] for r in rows.get("neuroshard", []) if r["ok"]})
        if guides:
            lines += ["", f"NeuroShard's estimator: {', '.join(guides)}."]
        failed = [f"{s}: {r['why']}" for s in searchers for r in rows[s] if not r["ok"]]
        if failed:
            lines += ["", "No plan: " + "; ".join(sorted(set(failed))[:4])]
        sections.append("\n".join(lines))
    guide = (
        "the sim backend itself (upper bound: the truth guides the search)"
        if args.estimator == "sim"
        else "the shipped model the planner picks per cluster"
    )
    text = (
        f"Costs: sim/{args.profile} (noise 0) on each cluster's topology. NeuroShard's "
        f"guide: {guide}; budget {args.budget:g} s. Tasks from the {args.split} pool, "
        f"seed {args.seed}, batch {args.batch_size}, at most {args.max_steps} beam steps.\n\n"
        + "\n\n".join(sections)
    )
    emit(text, args.out, title="The whole sharding space: NeuroShard, heuristics, TorchRec")


if __name__ == "__main__":
    main()
