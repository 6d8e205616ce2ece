"""SurCo-style search against NeuroShard's beam, the greedy grid and the best baseline.

Tasks come from the test pool (10-60 tables, 4 devices x 4 GB by default, total size
capped by ``default_max_total_bytes``). The searchers plan under one estimator -- the
shipped model for the device count when ``neuroshard.models.shipped_models()`` has one,
else the sim backend itself (the table says which) -- and every plan is costed by the sim
backend (h100 profile, noise 0). Reports, per searcher: mean cost, mean ratio to the best
heuristic baseline, to the greedy grid and to NeuroShard (beam), wins and losses against
the beam, median and p95 search seconds; and for SurCo: how many rounds ran, how often
each solve proved optimality (to ``mip_rel_gap``) within its time limit, the mean MIP gap,
and the real cost over the LP bound under the surrogate.

``beam+surco`` polishes the beam's plan: SurCo on the beam's column splits, starting from
their greedy grid placement (the beam's own plan), so it is never worse than the beam; its
seconds are the beam's plus SurCo's.

``--prior DIR`` adds the prior variant with that :class:`SurrogatePrior`;
``--train-prior N`` first trains one on N training-pool tasks (into ``--prior``, or a
temporary directory).

    OMP_NUM_THREADS=1 .venv/bin/python bench/surco.py --tasks 20 --time-limit 2 \
        --out bench/results/surco_d4.md
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from neuroshard.models import resolve_cost_model, shipped_models
from neuroshard.planner import Planner
from neuroshard.pretrain.pool import load_pool
from neuroshard.search import BASELINES, get_searcher
from neuroshard.search.scoring import plan_cost
from neuroshard.search.surco import fit_surrogate_prior
from neuroshard.tasks import default_max_total_bytes, sample_tasks
from neuroshard.types import PlanInfeasibleError

from _common import add_task_args, emit, p95, task_setup, truth_name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_task_args(p)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument(
        "--time-limit",
        type=float,
        default=2.0,
        help="SurCo solver seconds per plan, shared by its rounds",
    )
    p.add_argument("--mip-rel-gap", type=float, default=1e-3)
    p.add_argument("--prior", type=Path, default=None, help="SurrogatePrior directory")
    p.add_argument(
        "--train-prior",
        type=int,
        default=0,
        help="first train a prior on this many training-pool tasks into --prior",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    cluster, truth, tasks = task_setup(args)
    if shipped_models():
        estimator = resolve_cost_model(num_devices=args.devices, batch_size=cluster.batch_size)
        guide = f"shipped model {estimator.name}"
    else:
        estimator = truth
        guide = f"the sim/{args.profile} backend itself (no shipped model)"
    cap = default_max_total_bytes(args.devices, cluster.memory_per_device_bytes[0])

    surco_options = {
        "rounds": args.rounds,
        "budget_s": args.time_limit,
        "mip_rel_gap": args.mip_rel_gap,
    }
    searchers = {"surco": get_searcher("surco", **surco_options)}
    prior_note = ""
    scratch = tempfile.TemporaryDirectory(prefix="surco-prior-")
    if args.train_prior:
        if args.prior is None:
            args.prior = Path(scratch.name)
        train = sample_tasks(
            load_pool("train"),
            args.train_prior,
            seed=args.seed + 1,
            min_tables=args.min_tables,
            max_tables=args.max_tables,
            max_total_bytes=cap,
        )
        started = time.perf_counter()
        prior = fit_surrogate_prior(
            train,
            cluster,
            estimator,
            args.prior,
            rounds=3,
            time_limit_s=args.time_limit,
            seed=args.seed,
        )
        prior_note = (
            f" Prior trained on {len(train)} training-pool tasks "
            f"({prior.num_pairs_} pairs, {time.perf_counter() - started:.0f} s, "
            f"validation MAE of c/single {prior.val_mae_:.3f})."
        )
    if args.prior is not None:
        searchers["surco-prior"] = get_searcher(
            "surco", variant="prior", prior_path=args.prior, **surco_options
        )
    searchers["neuroshard"] = get_searcher("neuroshard")
    searchers["beam+surco"] = None  # run after the beam, on its splits
    searchers["greedy-grid"] = get_searcher("greedy-grid")
    for name in BASELINES:
        searchers[name] = get_searcher(name)

    names = list(searchers)
    cost = {n: np.full(len(tasks), np.nan) for n in names}
    seconds: dict[str, list[float]] = {n: [] for n in names}
    solves = {n: [] for n in names if "surco" in n}  # per plan, its round records
    bench_started = time.perf_counter()
    for i, task in enumerate(tasks):
        beam_plan = None
        for n, search in searchers.items():
            extra_s = 0.0
            if n == "beam+surco":
                if beam_plan is None:
                    continue
                splits = {
                    t.name: tuple(s.width for s in beam_plan.shards_of(t.name))
                    for t in task
                    if len(beam_plan.shards_of(t.name)) > 1
                }
                search = get_searcher("surco", splits=splits, **surco_options)
                extra_s = beam_plan.meta["search_seconds"]
            try:
                plan = Planner(estimator, search, seed=args.seed + i, reserve=args.reserve).plan(
                    task, cluster
                )
            except PlanInfeasibleError:
                continue
            if n == "neuroshard":
                beam_plan = plan
            seconds[n].append(plan.meta["search_seconds"] + extra_s)
            cost[n][i] = plan_cost(plan, truth).max_ms
            if n in solves:
                solves[n].append((plan.meta["surco"], cost[n][i]))
        print(
            f"task {i + 1}/{len(tasks)}: {len(task)} tables, "
            f"{time.perf_counter() - bench_started:.0f} s so far",
            file=sys.stderr,
        )

    best_base = np.nanmin(np.vstack([cost[n] for n in BASELINES]), axis=0)
    beam, greedy = cost["neuroshard"], cost["greedy-grid"]
    header = (
        "| searcher | mean cost ms | / best baseline | / greedy-grid | / neuroshard | "
        "better / worse than neuroshard | median s | p95 s | infeasible |"
    )
    lines = [
        f"Tasks: {len(tasks)} from the {args.split} pool, {args.min_tables}-{args.max_tables} "
        f"tables, {args.devices} devices x {args.memory}, batch {cluster.batch_size}, task "
        f"size cap {cap / 2**30:.2f} GiB; seed {args.seed}. Search guided by {guide}; every "
        f"plan costed by {truth_name(args)}. SurCo: {args.rounds} rounds, "
        f"{args.time_limit:g} s of solver time per plan, MIP gap {args.mip_rel_gap:g}."
        + prior_note,
        "",
        header,
        "|" + "---|" * (header.count("|") - 1),
    ]
    for n in names + ["best baseline"]:
        c = best_base if n == "best baseline" else cost[n]
        ok = ~np.isnan(c)
        better = int(np.sum(c[ok] < beam[ok] * (1 - 1e-9)))
        worse = int(np.sum(c[ok] > beam[ok] * (1 + 1e-9)))
        secs = seconds.get(n, [])
        med = statistics.median(secs) if secs else math.nan
        lines.append(
            f"| {n} | {np.nanmean(c):.4f} | {np.nanmean(c / best_base):.4f} | "
            f"{np.nanmean(c / greedy):.4f} | {np.nanmean(c / beam):.4f} | {better} / {worse} | "
            f"{med:.2f} | {p95(secs):.2f} | {int((~ok).sum())} |"
        )

    lines += [
        "",
        "| SurCo | plans | rounds run (mean) | solves | proved optimal | hit time "
        "limit | plans with every solve optimal | mean MIP gap | real cost / last LP "
        "bound | plans improving on their start |",
        "|" + "---|" * 10,
    ]
    for n, records in solves.items():
        rounds = [r for meta, _ in records for r in meta["rounds"]]
        statuses = [r["status"] for r in rounds]
        gaps = [r["mip_gap"] for r in rounds if math.isfinite(r["mip_gap"])]
        all_opt = sum(all(r["status"] == "optimal" for r in meta["rounds"]) for meta, _ in records)
        over_lp = [
            real / meta["rounds"][-1]["lp_bound_ms"]
            for meta, real in records
            if math.isfinite(meta["rounds"][-1]["lp_bound_ms"])
        ]
        improved = sum(meta["best_ms"] < meta["start_ms"] for meta, _ in records)
        lines.append(
            f"| {n} | {len(records)} | {len(rounds) / max(len(records), 1):.2f} | {len(rounds)} "
            f"| {statuses.count('optimal')} ({statuses.count('optimal') / max(len(rounds), 1):.0%})"
            f" | {statuses.count('time_limit')} | {all_opt} | "
            f"{np.mean(gaps) if gaps else math.nan:.4f} | "
            f"{np.mean(over_lp) if over_lp else math.nan:.4f} | {improved} |"
        )
    lines += ["", f"Bench wall time {time.perf_counter() - bench_started:.0f} s."]
    text = "\n".join(lines)
    scratch.cleanup()
    emit(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
