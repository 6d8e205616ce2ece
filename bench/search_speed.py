"""Seconds per plan of the searchers, side by side in one process.

    OMP_NUM_THREADS=1 .venv/bin/python bench/search_speed.py --sizes 60x8,30x4,120x16 \
        --tasks 5 --repeats 3 --out bench/results/search_speed.md

Candidates, run interleaved on the same tasks:

* ``neuroshard`` -- the default searcher (beam width 3, 10 splits, 11-scale greedy grid);
  with an additive estimator (the neural model) it prices devices from cached shard
  embeddings (:attr:`neuroshard.search.scoring.Scorer.additive`);
* ``neuroshard-generic`` -- the same search with the estimator hidden behind an adapter
  that only has ``compute_ms``, so it takes the generic load-key path: what a plan cost
  before the additive path, and the ratio shows what that path buys;
* ``greedy-grid`` -- the grid alone, table-wise.

The estimator is ``--model DIR`` if given, else the shipped model for the device count
(:func:`neuroshard.models.shipped_models`), else (or with ``--sim-estimator``) the sim
backend -- and the table's header says which: under the sim backend both neuroshard rows
take the generic path.

Tasks: ``--tasks`` per size, ``n`` distinct tables from the ``--split`` pool (drawn with
replacement and renamed when ``n`` exceeds the pool), ``--memory`` per device or, with
``--fill F``, the memory that makes the task fill a fraction ``F`` of the cluster. Each
task runs ``--repeats`` times per candidate. Reported: median and p95 seconds over all
runs (wall clock), timing noise (median over tasks of (max - min) / median of one task's
repeats), median and p95 CPU seconds of the process (``time.process_time``: one core's
work, less sensitive than wall clock to other jobs on a shared machine; the searches are
single-threaded with ``OMP_NUM_THREADS=1``), the ratio of wall-clock medians to
``neuroshard``, and the mean cost ratio to ``neuroshard`` under
the search's own estimator.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from neuroshard.backends.sim import SimBackend
from neuroshard.models import default_model_dir, load_cost_model, shipped_models
from neuroshard.planner import Planner
from neuroshard.pretrain.pool import load_pool
from neuroshard.search.scoring import WithoutEmbeddings
from neuroshard.tasks import default_max_total_bytes, sample_task
from neuroshard.types import Cluster, CostEstimator, PlanInfeasibleError, TableSpec
from neuroshard.units import parse_memory

from _common import emit, renamed_draws

logger = logging.getLogger("bench.search_speed")

CANDIDATES = ("neuroshard", "neuroshard-generic", "greedy-grid")


def choose_estimator(
    num_devices: int, model: Path | None, profile: str, batch_size: int, *, sim: bool = False
) -> tuple[CostEstimator, str]:
    """``--model``, else the shipped model nearest ``num_devices``, else (or with ``sim``)
    the sim backend; with a line saying which."""
    if sim:
        return (
            SimBackend(profile, batch_size=batch_size),
            f"sim/{profile} backend as the estimator (--sim-estimator): true costs, "
            "the generic search path",
        )
    if model is not None:
        est = load_cost_model(model, batch_size=batch_size)
        return est, f"model {est.name} from {model}"
    if shipped_models():
        path = default_model_dir(num_devices)
        est = load_cost_model(path, batch_size=batch_size)
        return est, f"shipped model {est.name} ({path.name})"
    return (
        SimBackend(profile, batch_size=batch_size),
        f"sim/{profile} backend as the estimator (no shipped model, no --model): "
        "the generic search path, not the neural one",
    )


def make_task(
    pool: Sequence[TableSpec],
    num_tables: int,
    num_devices: int,
    rng: np.random.Generator,
    *,
    memory_bytes: int | None = None,
    fill: float | None = None,
    devices_per_host: int = 0,
) -> tuple[list[TableSpec], Cluster]:
    """``num_tables`` tables from ``pool`` and a uniform cluster for them, in hosts of
    ``devices_per_host`` (at most all devices; 0: one host).

    With ``fill``, each device gets ``total / num_devices / fill`` bytes (tight caps for
    ``fill`` near 1); else ``memory_bytes`` per device and the protocol's size cap on the
    task. Beyond the pool's size, tables are drawn with replacement and renamed.
    """
    if num_tables <= len(pool):
        cap = None if fill is not None else default_max_total_bytes(num_devices, memory_bytes)
        tables = sample_task(
            pool, rng, min_tables=num_tables, max_tables=num_tables, max_total_bytes=cap
        )
    else:
        tables = renamed_draws(pool, num_tables, rng)
    if fill is not None:
        memory_bytes = int(sum(t.size_bytes for t in tables) / num_devices / fill)
    return tables, hosts_cluster(num_devices, int(memory_bytes), devices_per_host)


def hosts_cluster(num_devices: int, memory_bytes: int, devices_per_host: int) -> Cluster:
    """A uniform cluster in hosts of ``devices_per_host`` (at most all devices; 0: one
    host); a ``ValueError`` from :class:`Cluster` when that does not divide the devices."""
    per_host = min(devices_per_host, num_devices)
    return Cluster.uniform(num_devices, memory_bytes, devices_per_host=per_host)


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for part in text.split(","):
        n, d = part.lower().split("x")
        sizes.append((int(n), int(d)))
    return sizes


def percentile(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="60x8,30x4,120x16", help="tables x devices, comma-separated")
    p.add_argument("--tasks", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--memory", default="4GB")
    p.add_argument("--fill", type=float, default=None)
    p.add_argument("--split", default="test", choices=["train", "test", "all"])
    p.add_argument("--model", type=Path, default=None)
    p.add_argument(
        "--sim-estimator",
        action="store_true",
        help="search with the sim backend's costs instead of a model",
    )
    p.add_argument("--profile", default="h100")
    p.add_argument("--candidates", default=",".join(CANDIDATES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    pool = load_pool(args.split)
    names = [n.strip() for n in args.candidates.split(",") if n.strip()]
    unknown = set(names) - set(CANDIDATES)
    if unknown:
        p.error(f"unknown candidates {sorted(unknown)}; valid: {', '.join(CANDIDATES)}")
    lines = []
    for num_tables, num_devices in parse_sizes(args.sizes):
        est, source = choose_estimator(
            num_devices, args.model, args.profile, 65_536, sim=args.sim_estimator
        )
        rng = np.random.default_rng([args.seed, num_tables, num_devices])
        tasks = [
            make_task(
                pool,
                num_tables,
                num_devices,
                rng,
                memory_bytes=parse_memory(args.memory),
                fill=args.fill,
            )
            for _ in range(args.tasks)
        ]
        load_before = os.getloadavg()[0]
        runs = {n: [[] for _ in tasks] for n in names}
        cpu = {n: [] for n in names}
        cost = {n: [np.nan] * len(tasks) for n in names}
        for i, (tables, cluster) in enumerate(tasks):
            for _ in range(args.repeats):
                for n in names:
                    searcher = "greedy-grid" if n == "greedy-grid" else "neuroshard"
                    estimator = WithoutEmbeddings(est) if n == "neuroshard-generic" else est
                    start, start_cpu = time.perf_counter(), time.process_time()
                    try:
                        plan = Planner(estimator, searcher, reserve=0.0).plan(tables, cluster)
                    except PlanInfeasibleError as e:
                        logger.warning("%s infeasible on task %d: %s", n, i, e)
                        continue
                    runs[n][i].append(time.perf_counter() - start)
                    cpu[n].append(time.process_time() - start_cpu)
                    cost[n][i] = plan.cost.max_ms
            print(f"{num_tables}x{num_devices}: task {i + 1}/{len(tasks)} done", file=sys.stderr)
        ref = "neuroshard" if "neuroshard" in names else names[0]
        ref_median = statistics.median(s for r in runs[ref] for s in r)
        lines += [
            f"### {num_tables} tables x {num_devices} devices",
            "",
            f"{len(tasks)} tasks from the {args.split} pool x {args.repeats} repeats; "
            f"memory {tasks[0][1].memory_per_device_bytes[0] / 2**30:.2f} GiB per device "
            f"(first task); estimator: {source}. 1-minute load average "
            f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after, on "
            f"{os.cpu_count()} cores.",
            "",
            "| candidate | median s | p95 s | min s | max s | noise | median CPU s | "
            f"p95 CPU s | time ratio to {ref} | cost ratio to {ref} |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for n in names:
            flat = [s for r in runs[n] for s in r]
            if not flat:
                lines.append(f"| {n} | infeasible | | | | | | | | |")
                continue
            noise = statistics.median(
                (max(r) - min(r)) / statistics.median(r) for r in runs[n] if r
            )
            ratio = np.nanmean(np.asarray(cost[n]) / np.asarray(cost[ref]))
            lines.append(
                f"| {n} | {statistics.median(flat):.3f} | {percentile(flat, 0.95):.3f} | "
                f"{min(flat):.3f} | {max(flat):.3f} | {noise:.0%} | "
                f"{statistics.median(cpu[n]):.3f} | {percentile(cpu[n], 0.95):.3f} | "
                f"{statistics.median(flat) / ref_median:.2f} | {ratio:.4f} |"
            )
        lines.append("")
    emit("\n".join(lines), args.out, title="Search speed", argv=argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
