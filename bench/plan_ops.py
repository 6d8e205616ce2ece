"""Time the per-plan operations every planned plan goes through, on one large plan.

``validate_plan``, ``plan_to_dict`` (the JSON writer's work) and ``plan_cost`` under the sim
bound to the cluster, on a synthetic plan of ``--tables`` tables split in two column shards
each over ``--devices`` devices in hosts of 8. Median of ``--repeats`` runs. With
``--base REV`` the same timings run on that revision too (exported as installed, in a
child process), in ``--rounds`` interleaved rounds, and the table gives both and the ratio.

    OMP_NUM_THREADS=1 .venv/bin/python bench/plan_ops.py --tables 5000 --devices 128 \\
        --base b402ab9 --out bench/results/plan_ops.md
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from neuroshard.backends.sim import SimBackend
from neuroshard.plan_io import plan_to_dict, validate_plan
from neuroshard.search.scoring import plan_cost
from neuroshard.types import Cluster, Plan, Shard, TableSpec

from _common import emit, export, run_python

OPS = ("validate_plan", "plan_to_dict", "plan_cost")


def time_ops(tables: int, devices: int, repeats: int) -> dict[str, float]:
    """Median seconds of each operation, each run on a freshly built plan."""
    specs = tuple(TableSpec(f"t{i}", 10_000, 64, 2.0) for i in range(tables))
    shards = []
    for i in range(tables):
        shards += [Shard(f"t{i}", 0, 32, i % devices), Shard(f"t{i}", 32, 64, (i + 1) % devices)]
    cluster = Cluster.uniform(devices, 80 << 30, devices_per_host=8)
    sim = SimBackend("h100").for_cluster(cluster)
    ops = {
        "validate_plan": lambda plan: validate_plan(plan),
        "plan_to_dict": lambda plan: plan_to_dict(plan),
        "plan_cost": lambda plan: plan_cost(plan, sim),
    }
    medians = {}
    for name in OPS:
        seconds = []
        for _ in range(repeats):
            plan = Plan(specs, tuple(shards), cluster)  # nothing cached from a previous run
            start = time.perf_counter()
            ops[name](plan)
            seconds.append(time.perf_counter() - start)
        medians[name] = statistics.median(seconds)
    return medians


def _child(pythonpath: Path, argv: list[str]) -> dict[str, float]:
    code = (
        "import json, sys; sys.path.insert(0, " + repr(str(Path(__file__).parent)) + ")\n"
        "import plan_ops; print(json.dumps(plan_ops.time_ops(*" + repr(argv) + ")))"
    )
    return run_python(code, pythonpath, "the base revision's timing")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tables", type=int, default=5000)
    p.add_argument("--devices", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--base", default=None, help="a git revision to time beside this tree")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds with --base")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    sizes = [args.tables, args.devices, args.repeats]
    lines = [
        f"A plan of {args.tables} tables x 2 column shards on {args.devices} devices "
        f"(hosts of 8); each operation on a freshly built plan, median of {args.repeats}"
        + (f", then the median over {args.rounds} interleaved rounds." if args.base else "."),
        "",
    ]
    if args.base is None:
        here = time_ops(*sizes)
        lines += ["| operation | median s |", "|---|---|"]
        lines += [f"| {name} | {here[name]:.3f} |" for name in OPS]
    else:
        rounds: dict[str, list[dict[str, float]]] = {"base": [], "here": []}
        with tempfile.TemporaryDirectory() as tmp:
            base = export(args.base, Path(tmp)) / "pkg"
            for _ in range(args.rounds):
                rounds["base"].append(_child(base, sizes))
                rounds["here"].append(time_ops(*sizes))
        med = {
            side: {n: statistics.median(r[n] for r in runs) for n in OPS}
            for side, runs in rounds.items()
        }
        spread = {
            side: max(
                (max(r[n] for r in runs) - min(r[n] for r in runs)) / med[side][n] for n in OPS
            )
            for side, runs in rounds.items()
        }
        lines += [
            f"| operation | {args.base} s | this tree s | this tree / {args.base} |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {n} | {med['base'][n]:.3f} | {med['here'][n]:.3f} | "
            f"{med['here'][n] / med['base'][n]:.3f} |"
            for n in OPS
        ]
        lines += [
            "",
            f"Largest spread between rounds (max - min over the median): {args.base} "
            f"{spread['base']:.0%}, this tree {spread['here']:.0%}.",
        ]
    emit("\n".join(lines), args.out, title="Per-plan operations on a large plan")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
