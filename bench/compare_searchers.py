"""Run every searcher on the same tasks in one process and compare them on a backend.

Costs are the backend's (``sim`` by default), not the model's: the model only guides the
search. Prints, per searcher: mean plan cost, mean ratio to the best heuristic baseline
on the same task, mean ratio to NeuroShard, win rate against the best baseline, and
median and p95 search seconds. Writes the same table as Markdown with ``--out``.

    .venv/bin/python bench/compare_searchers.py --tasks 20 --devices 4 --memory 4GB \
        --out bench/results/searchers_d4.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from neuroshard.backends import as_estimator, get_backend
from neuroshard.cli import parse_memory
from neuroshard.costmodel import load_cost_model
from neuroshard.planner import default_model_dir, plan_tables
from neuroshard.pretrain.pool import load_pool
from neuroshard.search import BASELINES, get_searcher, searcher_names
from neuroshard.search.scoring import plan_cost
from neuroshard.tasks import default_max_total_bytes, sample_tasks
from neuroshard.types import Cluster, PlanInfeasibleError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=20)
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--memory", default="4GB")
    p.add_argument("--split", default="test", choices=["train", "test", "all"])
    p.add_argument("--min-tables", type=int, default=10)
    p.add_argument("--max-tables", type=int, default=60)
    p.add_argument("--profile", default="h100")
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--searchers", default=",".join(searcher_names()))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    memory = parse_memory(args.memory)
    cluster = Cluster.uniform(args.devices, memory)
    model_dir = args.model or default_model_dir(args.devices)
    model = load_cost_model(model_dir, batch_size=cluster.batch_size)
    truth = as_estimator(get_backend("sim", profile=args.profile, batch_size=cluster.batch_size))
    tasks = sample_tasks(load_pool(args.split), args.tasks, seed=args.seed,
                         min_tables=args.min_tables, max_tables=args.max_tables,
                         max_total_bytes=default_max_total_bytes(args.devices, memory))
    names = [n.strip() for n in args.searchers.split(",") if n.strip()]
    for n in names:
        get_searcher(n)  # fail early on a bad name

    cost = {n: np.full(len(tasks), np.nan) for n in names}
    seconds = {n: [] for n in names}
    for i, task in enumerate(tasks):
        for n in names:
            start = time.perf_counter()
            try:
                plan = plan_tables(task, cluster, model, n, seed=args.seed + i)
            except PlanInfeasibleError:
                continue
            seconds[n].append(time.perf_counter() - start)
            cost[n][i] = plan_cost(plan, truth).max_ms
        print(f"task {i + 1}/{len(tasks)}: {len(task)} tables", file=sys.stderr)

    baselines = [n for n in names if n in BASELINES]
    best_base = np.nanmin(np.vstack([cost[n] for n in baselines]), axis=0) if baselines else None
    ref = cost.get("neuroshard")
    header = ("| searcher | mean cost ms | ratio to best baseline | ratio to neuroshard | "
              "wins vs best baseline | median s | p95 s | infeasible |")
    lines = [
        f"Tasks: {len(tasks)} from the {args.split} pool, {args.min_tables}-{args.max_tables} tables, "
        f"{args.devices} devices x {args.memory}, batch {cluster.batch_size}. Costs by sim/{args.profile} "
        f"(noise 0); model {model_dir.name}; seed {args.seed}.",
        "",
        header,
        "|" + "---|" * (header.count("|") - 1),
    ]
    for n in names:
        c = cost[n]
        ok = ~np.isnan(c)
        ratio_base = np.nanmean(c / best_base) if best_base is not None else float("nan")
        ratio_ref = np.nanmean(c / ref) if ref is not None else float("nan")
        wins = np.mean(c[ok] < best_base[ok] * (1 - 1e-9)) if best_base is not None and ok.any() else float("nan")
        s = sorted(seconds[n]) or [float("nan")]
        p95 = s[min(len(s) - 1, int(round(0.95 * (len(s) - 1))))]
        lines.append(f"| {n} | {np.nanmean(c):.4f} | {ratio_base:.3f} | {ratio_ref:.3f} | {wins:.0%} | "
                     f"{statistics.median(s):.3f} | {p95:.3f} | {int((~ok).sum())} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
