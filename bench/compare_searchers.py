"""Run every searcher on the same tasks in one process and compare them on a backend.

Costs are the backend's (``sim`` by default), not the model's: the model only guides the
search. Prints, per searcher: mean plan cost, mean ratio to the best heuristic baseline
on the same task, mean ratio to NeuroShard, win rate against the best baseline, and
median and p95 search seconds. Writes the same table as Markdown with ``--out``.

    .venv/bin/python bench/compare_searchers.py --tasks 100 --devices 4 --memory 4GB \
        --out bench/results/searchers_d4_100.md

``--margins 0,0.05`` adds rows ``neuroshard-m0`` and ``neuroshard-m0.05``: NeuroShard
returning the greedy grid's plan unless its own is priced that share cheaper (the default,
``search.beam.DEFAULT_MARGIN``, is the ``neuroshard`` row).

``--budgeted neuroshard:4,surco:4`` adds rows ``neuroshard@4s`` and ``surco@4s`` that
plan with ``budget_s`` (for ``neuroshard``: the beam, then a SurCo polish). Under the
table, NeuroShard against every other row and against the cheapest heuristic on each
task, on the tasks both planned (TorchRec's planner may find no plan where the others
do): the mean per-task ratio (the definition the table's ratio columns use), the ratio of
mean costs, and how often NeuroShard was cheaper and how often dearer; each ``--margins``
row gets the same table against the cheapest heuristic and the greedy grid.

Every plan is costed after all tasks are planned. ``--rounds R`` (for a measured backend,
``--truth cpu``) measures each task's distinct plans ``R`` times, in rounds that visit
every task's plans in a new random order, so that the machine's drift hits every searcher
alike, and keeps each plan's median; searchers that returned the same plan share its
measurements. The header gives the median spread between rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from neuroshard.models import resolve_cost_model
from neuroshard.planner import Planner
from neuroshard.search import BASELINES, get_searcher, searcher_names
from neuroshard.search.scoring import plan_cost
from neuroshard.types import Plan, PlanInfeasibleError

from _common import (
    add_margins_arg,
    add_task_args,
    add_verify_arg,
    emit,
    margin_variants,
    p95,
    task_setup,
    truth_backend,
    truth_name,
    verify_variants,
)


def pairwise_lines(name: str, ref: np.ndarray, others: dict[str, np.ndarray]) -> list[str]:
    """A Markdown table of ``name``'s cost against each of ``others`` (per-task costs, NaN
    where a searcher found no plan), on the tasks both planned: the mean per-task ratio,
    the ratio of mean costs, how often ``name`` was cheaper and how often dearer (ties, such as
    the same plan, are neither), and its highest per-task ratio."""
    lines = [
        f'{name} against each searcher, on the tasks both planned. "per-task" is the '
        f"mean over those tasks of {name}'s cost / the other's (the definition the "
        '"ratio to" columns above use); "of means" is the ratio of the mean costs '
        "over the same tasks.",
        "",
        f"| {name} vs | tasks both planned | per-task ratio | ratio of means | {name} cheaper "
        f"| {name} dearer | worst task |",
        "|---|---|---|---|---|---|---|",
    ]
    for other, c in others.items():
        both = ~np.isnan(ref) & ~np.isnan(c)
        if not both.any():
            lines.append(f"| {other} | 0 | | | | | |")
            continue
        a, b = ref[both], c[both]
        lines.append(
            f"| {other} | {int(both.sum())} | {np.mean(a / b):.3f} | "
            f"{a.mean() / b.mean():.3f} | {np.mean(a < b * (1 - 1e-9)):.0%} | "
            f"{np.mean(a > b * (1 + 1e-9)):.0%} | {np.max(a / b):.3f} |"
        )
    return lines


def costed(
    plans: list[dict[str, Plan]], names: list[str], truth, rounds: int, seed: int
) -> tuple[dict[str, np.ndarray], float]:
    """Each searcher's per-task cost (its plan's costliest device under ``truth``; NaN where
    it found none) and the median spread between rounds. Each task's distinct plans are
    costed ``rounds`` times, every round visiting all tasks' plans in a new random order;
    a plan's cost is the median of its rounds."""
    rng = np.random.default_rng(seed)
    distinct: list[Plan] = []
    index: dict[tuple[int, frozenset], int] = {}
    of: dict[tuple[str, int], int] = {}
    for i, by_name in enumerate(plans):
        for n, plan in by_name.items():
            key = (i, frozenset(plan.shards))
            if key not in index:
                index[key] = len(distinct)
                distinct.append(plan)
            of[n, i] = index[key]
    samples = np.full((rounds, len(distinct)), np.nan)
    for r in range(rounds):
        for j in rng.permutation(len(distinct)):
            samples[r, j] = plan_cost(distinct[j], truth).max_ms
        if rounds > 1:
            print(f"round {r + 1}/{rounds}: {len(distinct)} plans costed", file=sys.stderr)
    median = np.median(samples, axis=0)
    spread = float(np.median((samples.max(0) - samples.min(0)) / median)) if len(distinct) else 0.0
    cost = {n: np.full(len(plans), np.nan) for n in names}
    for (n, i), j in of.items():
        cost[n][i] = median[j]
    return cost, spread


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_task_args(p)
    p.add_argument("--model", type=Path, default=None)
    p.add_argument(
        "--estimator",
        choices=["model", "sim"],
        default="model",
        help="what guides the searchers: the cost model, or the --truth sim itself (an "
        "upper bound on what a better model could do with the same searchers)",
    )
    p.add_argument("--searchers", default=",".join(searcher_names()))
    p.add_argument(
        "--budgeted",
        default="",
        help="extra rows NAME:SECONDS planned with a time budget, comma-separated",
    )
    add_margins_arg(p)
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="times each distinct plan is costed, in interleaved rounds (median kept)",
    )
    add_verify_arg(p)
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")

    if args.estimator == "sim" and (args.truth != "sim" or args.model is not None):
        p.error("--estimator sim guides with the --truth sim: it needs --truth sim, no --model")
    cluster, truth, tasks = task_setup(args)
    if args.estimator == "sim":
        model = truth_backend(args, cluster.batch_size)
        guide = "guided by the sim itself (upper bound)"
    else:
        model = resolve_cost_model(
            args.model,
            num_devices=args.devices,
            batch_size=cluster.batch_size,
            backend="cpu" if args.truth == "cpu" else None,
            profile=args.profile,
        )
        guide = f"model {model.name}"
    names = [n.strip() for n in args.searchers.split(",") if n.strip()]
    planners: dict[str, dict] = {n: {"searcher": n} for n in names}
    for item in filter(None, (x.strip() for x in args.budgeted.split(","))):
        name, _, secs = item.partition(":")
        planners[f"{name}@{float(secs):g}s"] = {"searcher": name, "budget_s": float(secs)}
    planners.update(margin_variants(p, args.margins))
    # Verification measures on its own backend instance: the figures come from ``truth``.
    planners.update(verify_variants(args.verify_top, truth_backend(args, cluster.batch_size)))
    names = list(planners)
    for options in planners.values():
        if isinstance(options["searcher"], str):
            get_searcher(options["searcher"])  # fail early on a bad name

    plans: list[dict[str, Plan]] = []
    seconds = {n: [] for n in names}
    for i, task in enumerate(tasks):
        plans.append({})
        for n in names:
            start = time.perf_counter()
            try:
                planner = Planner(model, seed=args.seed + i, reserve=args.reserve, **planners[n])
                plans[i][n] = planner.plan(task, cluster)
            except PlanInfeasibleError:
                continue
            seconds[n].append(time.perf_counter() - start)
        print(f"task {i + 1}/{len(tasks)}: {len(task)} tables", file=sys.stderr)
    cost, spread = costed(plans, names, truth, args.rounds, args.seed)

    baselines = [n for n in names if n in BASELINES]
    best_base = np.nanmin(np.vstack([cost[n] for n in baselines]), axis=0) if baselines else None
    ref = cost.get("neuroshard")
    header = (
        "| searcher | mean cost ms | ratio to best baseline | ratio to neuroshard | "
        "wins vs best baseline | median s | p95 s | infeasible |"
    )
    lines = [
        f"Tasks: {len(tasks)} from the {args.split} pool, {args.min_tables}-{args.max_tables} "
        f"tables, {args.devices} devices x {args.memory}, batch {cluster.batch_size}. "
        f"Costs by {truth_name(args)}; "
        f"{guide}; seed {args.seed}."
        + (
            f" Each distinct plan costed {args.rounds} times in interleaved rounds (median "
            f"kept); median spread between rounds {100 * spread:.1f}% (max - min over median)."
            if args.rounds > 1
            else ""
        ),
        'Mean cost: over the tasks the searcher planned ("infeasible" counts the rest); '
        "ratios: means over those tasks of per-task ratios.",
        "",
        header,
        "|" + "---|" * (header.count("|") - 1),
    ]
    for n in names:
        c = cost[n]
        ok = ~np.isnan(c)
        ratio_base = np.nanmean(c / best_base) if best_base is not None else float("nan")
        ratio_ref = np.nanmean(c / ref) if ref is not None else float("nan")
        wins = (
            np.mean(c[ok] < best_base[ok] * (1 - 1e-9))
            if best_base is not None and ok.any()
            else float("nan")
        )
        s = seconds[n] or [float("nan")]
        lines.append(
            f"| {n} | {np.nanmean(c):.4f} | {ratio_base:.3f} | {ratio_ref:.3f} | {wins:.0%} | "
            f"{statistics.median(s):.3f} | {p95(s):.3f} | {int((~ok).sum())} |"
        )
    if ref is not None:
        others = {n: cost[n] for n in names if n != "neuroshard"}
        if best_base is not None:
            others = {"best heuristic on each task": best_base, **others}
        lines += ["", *pairwise_lines("neuroshard", ref, others)]
    for n in (n for n in names if n.startswith("neuroshard-m")):
        others = {"greedy-grid": cost["greedy-grid"]} if "greedy-grid" in cost else {}
        if best_base is not None:
            others = {"best heuristic on each task": best_base, **others}
        lines += ["", *pairwise_lines(n, cost[n], others)]
    text = "\n".join(lines)
    emit(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
