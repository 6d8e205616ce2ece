"""How far each searcher's plans are from the oracle's on small tasks.

    OMP_NUM_THREADS=1 .venv/bin/python bench/oracle_gap.py --tasks 20 --max-evals 30000 \
        --out bench/results/oracle_gap_d4.md

``--margins 0,0.02`` adds ``neuroshard-m0`` and ``neuroshard-m0.02``: NeuroShard at
those margins instead of the default (see ``bench/compare_searchers.py``).

``--verify-top 5,20`` adds ``neuroshard+verify5`` and ``neuroshard+verify20``: the
planner's verification (``plan --verify sim --top K``), the K cheapest plans under the
estimator priced by the sim, the cheapest there kept.

Small tasks (``--min-tables`` to ``--max-tables`` tables, default 6 to 12) from the test
pool, ``--devices`` devices of ``--memory`` each, the protocol's task size cap. Every
searcher plans with its estimator: ``--model``, else the shipped model for the device
count, else the sim backend; ``--sim-estimator`` makes them plan with the sim backend's
true costs, which isolates the search's own gap from the model's error. The header says
which. Every plan is then costed by the sim backend, and
:func:`neuroshard.search.oracle.oracle_plan` searches with the sim backend as its cost,
starting from the searchers' plans too, so it is never worse than any of them: exact
among table-wise plans for these sizes, local search with column splits beyond (see its
module doc).

Reported per searcher: mean, median and worst ratio of its sim cost to the oracle's,
how often it is within 1% of the oracle, and its median seconds; for the oracle, its
median seconds, how often its best plan splits a table, and how much it gains over the
exact table-wise optimum.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from neuroshard.backends.sim import SimBackend
from neuroshard.planner import Planner
from neuroshard.pretrain.pool import load_pool
from neuroshard.search import BASELINES, get_searcher, searcher_names
from neuroshard.search.oracle import oracle_plan
from neuroshard.search.scoring import plan_cost
from neuroshard.tasks import default_max_total_bytes, sample_tasks
from neuroshard.types import Cluster, PlanInfeasibleError
from neuroshard.units import parse_memory

from _common import add_margins_arg, add_verify_arg, emit, margin_variants, verify_variants
from search_speed import choose_estimator

logger = logging.getLogger("bench.oracle_gap")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=20)
    p.add_argument("--min-tables", type=int, default=6)
    p.add_argument("--max-tables", type=int, default=12)
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--memory", default="4GB")
    p.add_argument("--split", default="test", choices=["train", "test", "all"])
    p.add_argument("--model", type=Path, default=None)
    p.add_argument(
        "--sim-estimator",
        action="store_true",
        help="searchers plan with the sim backend's (true) costs: the search's own gap",
    )
    p.add_argument("--profile", default="h100")
    p.add_argument("--searchers", default=",".join(searcher_names()))
    add_margins_arg(p)
    add_verify_arg(p)
    p.add_argument("--max-evals", type=int, default=30_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    memory = parse_memory(args.memory)
    cluster = Cluster.uniform(args.devices, memory)
    est, source = choose_estimator(
        args.devices, args.model, args.profile, cluster.batch_size, sim=args.sim_estimator
    )
    # the cluster as the planners below plan on it (reserve 0, the planner's I/O buffers and
    # optimizer): the oracle must search the same memory their plans come back with
    cluster = Planner(est, reserve=0.0).cluster_for(cluster)
    truth = SimBackend(args.profile, batch_size=cluster.batch_size)
    tasks = sample_tasks(
        load_pool(args.split),
        args.tasks,
        seed=args.seed,
        min_tables=args.min_tables,
        max_tables=args.max_tables,
        max_total_bytes=default_max_total_bytes(args.devices, memory),
    )
    names = [n.strip() for n in args.searchers.split(",") if n.strip()]
    for n in names:
        get_searcher(n)  # fail early on a bad name
    planners: dict[str, dict] = {n: {"searcher": n} for n in names}
    verifier = SimBackend(args.profile, batch_size=cluster.batch_size)  # the truth, noise 0
    planners.update(margin_variants(p, args.margins))
    planners.update(verify_variants(args.verify_top, verifier))
    names = list(planners)

    ratio = {n: np.full(len(tasks), np.nan) for n in names}
    seconds = {n: [] for n in names}
    oracle_s, oracle_split, oracle_gain, exhaustive = [], [], [], []
    oracle_ms = np.full(len(tasks), np.nan)
    cost_ms = {n: np.full(len(tasks), np.nan) for n in names}
    for i, task in enumerate(tasks):
        plans, costs = [], {}
        for n in names:
            start = time.perf_counter()
            try:
                planner = Planner(est, seed=args.seed + i, reserve=0.0, **planners[n])
                plan = planner.plan(task, cluster)
            except PlanInfeasibleError as e:
                logger.warning("%s: no plan for task %d: %s", n, i, e)
                continue
            seconds[n].append(time.perf_counter() - start)
            plans.append(plan)
            costs[n] = plan_cost(plan, truth).max_ms
        start = time.perf_counter()
        oracle = oracle_plan(
            task, cluster, truth, seed=args.seed + i, max_evals=args.max_evals, starts=plans
        )
        oracle = oracle.with_cost(plan_cost(oracle, truth))
        oracle_s.append(time.perf_counter() - start)
        best = oracle.cost.max_ms
        oracle_ms[i] = best
        for n, c in costs.items():
            ratio[n][i] = c / best
            cost_ms[n][i] = c
        oracle_split.append(len(oracle.shards) > len(task))
        exhaustive.append(bool(oracle.meta["exhaustive"]))
        if oracle.meta["tablewise_ms"] is not None:
            oracle_gain.append(1 - best / oracle.meta["tablewise_ms"])
        print(
            f"task {i + 1}/{len(tasks)}: {len(task)} tables, oracle {best:.4f} ms in "
            f"{oracle_s[-1]:.1f} s; " + ", ".join(f"{n} {ratio[n][i]:.3f}" for n in costs),
            file=sys.stderr,
        )

    lines = [
        f"{len(tasks)} tasks of {args.min_tables}-{args.max_tables} tables from the {args.split} "
        f"pool, {args.devices} devices x {args.memory}, seed {args.seed}. Searchers' estimator: "
        f"{source}. Costs by sim/{args.profile}; oracle: exhaustive table-wise "
        f"({sum(exhaustive)}/{len(tasks)} tasks) + local search with splits, "
        f"{args.max_evals} evaluations, started from every searcher's plan.",
        "",
        "| searcher | mean ratio to oracle | median | worst | within 1% of oracle | median s |",
        "|---|---|---|---|---|---|",
    ]
    for n in names:
        r = ratio[n][~np.isnan(ratio[n])]
        if not r.size:
            lines.append(f"| {n} | no plan | | | | |")
            continue
        lines.append(
            f"| {n} | {r.mean():.4f} | {np.median(r):.4f} | {r.max():.4f} | "
            f"{np.mean(r <= 1.01):.0%} | {statistics.median(seconds[n]):.3f} |"
        )
    gain = f"{np.mean(oracle_gain):.2%}" if oracle_gain else "-"
    lines += [
        "",
        f"Oracle: median {statistics.median(oracle_s):.1f} s per task (max "
        f"{max(oracle_s):.1f} s); its best plan splits a table on "
        f"{np.mean(oracle_split):.0%} of tasks; mean gain over the exact table-wise "
        f"optimum {gain}.",
    ]
    # The search issue's cost bars are ratios of mean costs; on these tasks the optimum's
    # own ratio is the best any searcher can reach.
    heuristics = [n for n in names if n in BASELINES and not np.isnan(cost_ms[n]).any()]
    if heuristics:
        best_h = min(heuristics, key=lambda n: cost_ms[n].mean())
        lines.append(
            f"Oracle mean cost / best heuristic's ({best_h}): "
            f"{oracle_ms.mean() / cost_ms[best_h].mean():.3f}."
        )
    if "torchrec" in cost_ms and not np.isnan(cost_ms["torchrec"]).any():
        lines.append(
            f"Oracle mean cost / torchrec's: {oracle_ms.mean() / cost_ms['torchrec'].mean():.3f}."
        )
    emit("\n".join(lines), args.out, title="Gap to the oracle", argv=argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
