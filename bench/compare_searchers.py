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

from _common import add_task_args, emit, p95, task_setup
from neuroshard.costmodel import load_cost_model
from neuroshard.planner import default_model_dir, plan_tables
from neuroshard.search import BASELINES, get_searcher, searcher_names
from neuroshard.search.scoring import plan_cost
from neuroshard.types import PlanInfeasibleError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_task_args(p)
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--searchers", default=",".join(searcher_names()))
    args = p.parse_args(argv)

    cluster, truth, tasks = task_setup(args)
    model_dir = args.model or default_model_dir(args.devices)
    model = load_cost_model(model_dir, batch_size=cluster.batch_size)
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
        s = seconds[n] or [float("nan")]
        lines.append(f"| {n} | {np.nanmean(c):.4f} | {ratio_base:.3f} | {ratio_ref:.3f} | {wins:.0%} | "
                     f"{statistics.median(s):.3f} | {p95(s):.3f} | {int((~ok).sum())} |")
    text = "\n".join(lines)
    emit(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
