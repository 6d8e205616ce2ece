"""Do two revisions plan the same? Plan costs of every searcher, task by task.

Runs the deterministic searchers on the same seeded tasks (the compare_searchers task set)
in the working tree and in a base revision (exported with ``git archive`` into a temporary
folder and laid out as the installed package), each in its own process, costs every plan
by the sim backend, and prints per searcher how many plan costs are identical and the
mean ratio of the current cost to the base cost. A refactor should print 1.000000.
Revisions with the whole sharding space plan with no memory reserve and, for searchers
that take constraints, table- and column-wise types only, NeuroShard without its bulk
moves: the space and the column search both revisions have.

    OMP_NUM_THREADS=1 .venv/bin/python bench/plan_equivalence.py --base 172ff92 \
        --device-counts 4,8 --tasks 100 --out bench/results/plan_equivalence.md
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from _common import REPO, add_task_args, emit, export, run_python

SEARCHERS = (
    "neuroshard",
    "greedy-grid",
    "torchrec",
    "random",
    "dim",
    "size",
    "lookup",
    "size-lookup",
)

# Runs in the child: plans with whichever planner API the revision has.
CHILD = r"""
import json, sys
sys.path.insert(0, BENCH)
from _common import add_task_args, task_setup
import argparse
from neuroshard.search.scoring import plan_cost
from neuroshard.types import PlanInfeasibleError
p = argparse.ArgumentParser(); add_task_args(p)
args = p.parse_args(ARGV)
cluster, truth, tasks = task_setup(args)
try:
    from neuroshard.planner import Planner
    import inspect
    params = inspect.signature(Planner).parameters
    if "budget_s" not in params:  # not yet the one-path planner
        raise ImportError
    extra = {"reserve": 0.0} if "reserve" in params else {}  # today's caps: all for weights
    columns = None  # the table- and column-wise space, where the revisions can agree
    if "constraints" in params:
        from neuroshard.search import get_searcher
        from neuroshard.types import Constraints, TableConstraint
        columns = Constraints(default=TableConstraint(sharding_types=("table_wise", "column_wise")))
    def plan(task, name, seed):
        kw = dict(extra)
        takes = inspect.signature(get_searcher(name)).parameters
        if columns is not None and ("constraints" in takes or any(
                x.kind is x.VAR_KEYWORD for x in takes.values())):
            kw["constraints"] = columns
        searcher = name
        if name == "neuroshard" and columns is not None:  # the paper's column search
            searcher = get_searcher(name, bulk_moves=False)
            searcher.__name__ = name
        return Planner(searcher=searcher, seed=seed, **kw).plan(task, cluster)
except ImportError:
    from neuroshard.costmodel import load_cost_model
    from neuroshard.planner import default_model_dir, plan_tables
    model = load_cost_model(default_model_dir(args.devices), batch_size=cluster.batch_size)
    def plan(task, name, seed):
        return plan_tables(task, cluster, model, name, seed=seed)
out = {}
for name in SEARCHERS:
    costs = []
    for i, task in enumerate(tasks):
        try:
            costs.append(plan_cost(plan(task, name, args.seed + i), truth).max_ms)
        except PlanInfeasibleError:
            costs.append(None)
    out[name] = costs
json.dump(out, sys.stdout)
"""


def run(pythonpath: Path | None, bench: Path, argv: list[str]) -> dict[str, list]:
    code = (
        CHILD.replace("BENCH", repr(str(bench)))
        .replace("ARGV", repr(argv))
        .replace("SEARCHERS", repr(SEARCHERS))
    )
    return run_python(code, pythonpath, "planning")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_task_args(p)
    p.set_defaults(tasks=100)
    p.add_argument("--base", required=True, help="git revision to compare against")
    p.add_argument("--device-counts", default="4,8", help="comma-separated; overrides --devices")
    args = p.parse_args(argv)
    lines = [
        f"Base revision {args.base}; tasks: {args.tasks} from the {args.split} pool, "
        f"{args.min_tables}-{args.max_tables} tables, {args.memory} per device, seed "
        f"{args.seed}; every plan costed by sim/{args.profile} (noise 0); the default "
        "shipped model guides both.",
        "",
        "| devices | searcher | identical plan costs | mean cost ratio (current / base) |",
        "|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory(prefix="equivalence-") as tmp:
        base = export(args.base, Path(tmp))
        for devices in [int(d) for d in args.device_counts.split(",")]:
            child_argv = [
                "--tasks",
                str(args.tasks),
                "--devices",
                str(devices),
                "--memory",
                args.memory,
                "--split",
                args.split,
                "--min-tables",
                str(args.min_tables),
                "--max-tables",
                str(args.max_tables),
                "--profile",
                args.profile,
                "--seed",
                str(args.seed),
            ]
            old = run(base / "pkg", base / "src" / "bench", child_argv)
            new = run(None, REPO / "bench", child_argv)
            for name in SEARCHERS:
                a = np.array([np.nan if c is None else c for c in old[name]])
                b = np.array([np.nan if c is None else c for c in new[name]])
                same = int(np.sum((a == b) | (np.isnan(a) & np.isnan(b))))
                both = ~np.isnan(a) & ~np.isnan(b)
                ratio = float(np.mean(b[both] / a[both])) if both.any() else float("nan")
                lines.append(f"| {devices} | {name} | {same}/{len(a)} | {ratio:.6f} |")
            print(f"{devices} devices done", file=sys.stderr)
    emit("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
