"""Time and peak memory of planning at scale: NeuroShard next to TorchRec's planner.

    OMP_NUM_THREADS=1 .venv/bin/python bench/scale.py --sizes 60x8,1000x128 --fills 0.85,0.6 \
        --budget 50 --out bench/results/scale.md

Each candidate runs in its own subprocess (``--timeout`` seconds at most), so its peak
resident memory (``getrusage`` max RSS, read as soon as the search returns) is its own;
the table also gives the RSS before the search (interpreter, torch, model, tables), so the
search's own share is the difference. Candidates:

* ``neuroshard`` -- the default search (no budget: its default time cap,
  :data:`neuroshard.search.beam.DEFAULT_CAP_S`);
* ``neuroshard-budget`` -- the same with ``budget_s=--budget``, one run per
  comma-separated value (:func:`neuroshard.search.beam.beam_search`: fewer beam children
  or steps when time runs short; the unsplit greedy grid always completes); the table
  gives seconds / budget, which the budget's contract keeps under 1.10;
* ``torchrec`` -- TorchRec's ``EmbeddingShardingPlanner``
  (:func:`neuroshard.search.torchrec_baseline.torchrec_plan`), when that module and
  torchrec import; else the row says why it was skipped.

Tasks: ``n`` tables from the ``--split`` pool (drawn with replacement and renamed beyond
the pool's size), ``fill`` = total table bytes / total device memory (0.85: tight caps;
TorchRec's storage estimate adds buffers to the weights, so it may find no plan there).
``--mixed-dims`` redraws every table's dim from 16, 32, 64, 128 (rows, pooling and reuse
kept): the pool's dims are mostly 128, and mixed dims make the grid's lanes diverge more,
the harder case for the search's time. Plans are costed by the sim backend (the truth the
benches use) and by the search's estimator (``--model``, else the shipped model, else the
sim backend; the header says). ``--devices-per-host`` puts the devices in hosts of that many
(default 0: all on one host, as the earlier results files ran; the any-cluster models were
trained on hosts of 1 to 8 devices and warn outside that).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from _common import emit
from search_speed import choose_estimator, hosts_cluster, make_task, parse_sizes

CANDIDATES = ("neuroshard", "neuroshard-budget", "torchrec")


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def run_child(args: argparse.Namespace) -> dict:
    """Plan one task with one candidate; the measurements as a dict."""
    from neuroshard.backends.sim import SimBackend
    from neuroshard.planner import Planner
    from neuroshard.pretrain.pool import load_pool
    from neuroshard.search.scoring import plan_cost

    num_tables, num_devices = parse_sizes(args.size)[0]
    est, source = choose_estimator(num_devices, args.model, args.profile, 65_536)
    rng = np.random.default_rng([args.seed, num_tables, num_devices])
    pool = load_pool(args.split)
    if args.mixed_dims:
        widths = rng.choice([16, 32, 64, 128], size=len(pool)).tolist()
        pool = [t.with_dim(w) for t, w in zip(pool, widths)]
    tables, cluster = make_task(
        pool, num_tables, num_devices, rng, fill=args.fill, devices_per_host=args.devices_per_host
    )
    out = {
        "candidate": args.child,
        "size": args.size,
        "estimator": source,
        "memory_per_device_gib": cluster.memory_per_device_bytes[0] / 2**30,
        "largest_table_gib": max(t.size_bytes for t in tables) / 2**30,
    }
    if args.child == "torchrec":
        try:
            import torchrec  # noqa: F401

            from neuroshard.search.torchrec_baseline import torchrec_plan
        except ImportError as e:
            return {**out, "skipped": f"torchrec baseline unavailable ({e})"}
        planner = Planner(est, torchrec_plan, reserve=0.0)
    else:
        budget = float(args.budget) if args.child == "neuroshard-budget" else None
        planner = Planner(est, "neuroshard", budget_s=budget, reserve=0.0)
    rss_before = _rss_bytes()
    start = time.perf_counter()
    try:
        plan = planner.plan(tables, cluster)
    except Exception as e:  # noqa: BLE001 -- report any planner failure as the row's result
        return {
            **out,
            "seconds": time.perf_counter() - start,
            "failed": f"{type(e).__name__}: {str(e)[:300]}",
        }
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    truth = SimBackend(args.profile, batch_size=cluster.batch_size)
    return {
        **out,
        "seconds": seconds,
        "rss_before_bytes": rss_before,
        "peak_rss_bytes": peak,
        "sim_cost_ms": plan_cost(plan, truth).max_ms,
        "model_cost_ms": plan_cost(plan, est).max_ms,
        "splits": len(plan.shards) - len(tables),
        "meta": {
            k: v
            for k, v in plan.meta.items()
            if k in ("beam_steps", "states_scored", "budget_cut", "time_cap_cut", "scale")
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="60x8,1000x128")
    p.add_argument("--fills", default="0.85", help="comma-separated fills to run")
    p.add_argument("--fill", type=float, default=0.85, help=argparse.SUPPRESS)
    p.add_argument(
        "--budget", default="50", help="seconds for neuroshard-budget; comma-separated: a run each"
    )
    p.add_argument("--candidates", default=",".join(CANDIDATES))
    p.add_argument("--split", default="test", choices=["train", "test", "all"])
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--profile", default="h100")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mixed-dims", action="store_true")
    p.add_argument(
        "--devices-per-host",
        type=int,
        default=0,
        help="devices per host (default 0: all devices on one host)",
    )
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--size", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for _, devices in parse_sizes(args.size or args.sizes):
        try:
            hosts_cluster(devices, 1, args.devices_per_host)
        except ValueError as e:
            p.error(f"--devices-per-host {args.devices_per_host} at {devices} devices: {e}")
    if args.child:
        print(json.dumps(run_child(args)))
        return 0

    names = [n.strip() for n in args.candidates.split(",") if n.strip()]
    budgets = [float(b) for b in args.budget.split(",")]
    runs = [
        (name, budget)
        for name in names
        for budget in (budgets if name == "neuroshard-budget" else [None])
    ]
    rows = []
    fills = [float(f) for f in args.fills.split(",")]
    for size, fill in ((s, f) for s in args.sizes.split(",") for f in fills):
        for name, budget in runs:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                name,
                "--size",
                size,
                "--fill",
                str(fill),
                "--budget",
                str(budget or budgets[0]),
                "--split",
                args.split,
                "--profile",
                args.profile,
                "--seed",
                str(args.seed),
                "--devices-per-host",
                str(args.devices_per_host),
            ]
            if args.model is not None:
                cmd += ["--model", str(args.model)]
            if args.mixed_dims:
                cmd += ["--mixed-dims"]
            started = time.perf_counter()
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                result = (
                    json.loads(done.stdout.strip().splitlines()[-1])
                    if done.stdout.strip()
                    else {"failed": done.stderr.strip().splitlines()[-1:]}
                )
            except subprocess.TimeoutExpired:
                result = {"failed": f"timed out after {args.timeout:.0f} s"}
            result["candidate"] = name if budget is None else f"{name} {budget:g}s"
            result.update(size=size, fill=fill, budget=budget)
            result["load"] = os.getloadavg()[0]
            rows.append(result)
            print(
                f"{size} fill {fill} {name}: {time.perf_counter() - started:.1f} s wall",
                file=sys.stderr,
            )

    estimators = {r["size"]: r["estimator"] for r in rows if "estimator" in r}
    dims = "dims redrawn from 16-128" if args.mixed_dims else "pool dims"
    lines = [
        f"Fill: total table bytes / total device memory. {args.split} pool ({dims}), "
        f"seed {args.seed}, "
        + (f"hosts of {args.devices_per_host} devices, " if args.devices_per_host else "one host, ")
        + f"budget {args.budget} s for neuroshard-budget, timeout "
        f"{args.timeout:g} s. Estimator per size: "
        + ("; ".join(f"{k}: {v}" for k, v in estimators.items()) or "?")
        + f". Costs: sim/"
        f"{args.profile} (truth) and the estimator.",
        "",
        "| size | fill | candidate | seconds | seconds / budget | peak RSS GiB | RSS before GiB | "
        "sim cost ms | model cost ms | splits | load avg | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "seconds" not in r or "failed" in r or "skipped" in r:
            note = r.get("skipped") or r.get("failed") or "?"
            sec = f"{r['seconds']:.1f}" if "seconds" in r else "-"
            lines.append(
                f"| {r['size']} | {r['fill']} | {r['candidate']} | {sec} | | | | | | | "
                f"{r['load']:.1f} | {note} |"
            )
            continue
        memo = (
            f"{r['memory_per_device_gib']:.2f} GiB/device, largest table "
            f"{r['largest_table_gib']:.2f} GiB; {r['meta']}"
        )
        lines.append(
            f"| {r['size']} | {r['fill']} | {r['candidate']} | {r['seconds']:.2f} | "
            f"{'-' if not r.get('budget') else format(r['seconds'] / r['budget'], '.3f')} | "
            f"{r['peak_rss_bytes'] / 2**30:.2f} | {r['rss_before_bytes'] / 2**30:.2f} | "
            f"{r['sim_cost_ms']:.4f} | {r['model_cost_ms']:.4f} | {r['splits']} | "
            f"{r['load']:.1f} | {memo} |"
        )
    emit("\n".join(lines), args.out, title="Planning at scale", argv=argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
