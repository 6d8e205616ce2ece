"""Plan-shaped samples for the CPU model: measure the loads the search proposes, retrain.

    OMP_NUM_THREADS=1 .venv/bin/python bench/plan_shaped.py \
        --dataset data/datasets/cpu_b4096:2000 --plans data/datasets/cpu_b4096_plans \
        --tasks 40 --rounds 2 --out bench/results/plan_shaped_cpu.md [--save NEW_FOLDER]

The base model is the shipped CPU model's recipe (``bench/cpu_sessions.py``: a neural
model on the first N compute samples of ``--dataset`` and its comm samples). Each round
plans ``--tasks`` tasks of 10-60 tables of the pool's *training* half on 4 devices x
4 GiB at batch 4096 with the beam and the greedy grid under the current model
(:func:`neuroshard.pretrain.plan_loads.plan_load_samples`), measures every distinct
device load on this CPU with the settings of the dataset (``--plans``/compute_plans,
resumable) and trains the recipe again on all compute samples. Reported per model: MAPE
on the dataset's held-out loads (test-pool tables, random loads), on the round's plan
loads (measured before the model saw them), and the model's price of each searcher's
plans on those tasks against their measured loads. Plan quality on the test pool is
``bench/compare_searchers.py --truth cpu --model DIR`` with the saved model.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from neuroshard.backends import get_backend
from neuroshard.pretrain.collect import collect
from neuroshard.pretrain.dataset import load_comm, load_compute, sample_keys
from neuroshard.pretrain.fidelity import session_comm_noise_floors, session_noise_floor
from neuroshard.pretrain.plan_loads import plan_load_samples
from neuroshard.pretrain.pool import load_pool
from neuroshard.samples import ComputeData
from neuroshard.search import plan_shaped_searchers

from _common import emit
from cpu_sessions import fit_recipe

PLAN_INDEX = 10**7


def mape(model, data: ComputeData) -> float:
    pred = model.score_compute(data)
    return float(pred["mape"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", required=True, help="DIR[:N]: a CPU pretrain run's data")
    p.add_argument("--plans", type=Path, required=True, help="folder for the measured loads")
    p.add_argument("--tasks", type=int, default=40)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", type=Path, default=None, help="save the last model here")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.save and args.save.exists() and any(args.save.iterdir()):
        p.error(f"--save {args.save}: not empty; give a new folder")

    path, _, n = args.dataset.partition(":")
    data = Path(path)
    keys = {k for i, k in sample_keys(data / "compute").items() if not n or i < int(n)}
    compute = load_compute(data / "compute", keys)
    comm = load_comm(data / "comm")
    holdout = load_compute(data / "compute_holdout")
    settings = json.loads(compute.fingerprint)
    backend = get_backend(
        "cpu",
        batch_size=int(settings["batch_size"]),
        warmups=int(settings["warmups"]),
        repeats=int(settings["repeats"]),
    )
    searchers = dict(zip(("neuroshard", "greedy-grid"), plan_shaped_searchers(), strict=True))
    train_tables = load_pool("train")

    t0 = time.perf_counter()
    model = fit_recipe(compute, comm, seed=args.seed)
    rows = [
        "| model | compute samples | held-out MAPE (test pool) | next round's plan loads MAPE | "
        "fit s |",
        "|---|---|---|---|---|",
    ]
    row = ["base (the shipped recipe)", str(len(compute)), f"{mape(model, holdout):.2%}"]
    fit_s = time.perf_counter() - t0
    plan_keys: set[str] = set()
    joined = compute
    lines: list[str] = []
    for r in range(args.rounds):
        drawn = plan_load_samples(
            model,
            train_tables,
            args.tasks,
            np.random.default_rng([args.seed, 5, r]),
            searchers=list(searchers.values()),
            num_devices=4,
            memory_bytes=4 << 30,
            batch_size=int(settings["batch_size"]),
            start_index=(r + 1) * PLAN_INDEX,
        )
        t1 = time.perf_counter()
        got = collect(drawn, backend, args.plans / "compute_plans", kind="compute", progress=False)
        if got.failed:
            print(f"{got.failed} of {len(drawn)} loads failed to measure", file=sys.stderr)
            return 1
        measure_s = time.perf_counter() - t1
        new = load_compute(args.plans / "compute_plans", {x.key for x in drawn})
        sizes = np.diff(new.offsets)
        row.append(f"{mape(model, new):.2%}")
        rows.append("| " + " | ".join([*row, f"{fit_s:.0f}"]) + " |")
        lines.append(
            f"Round {r + 1}: {len(drawn)} distinct device loads of {args.tasks} training-pool "
            f"tasks, {sizes.min()}-{sizes.max()} shards (median {int(np.median(sizes))}); "
            f"{got.measured} measured now in {measure_s:.0f} s, {got.skipped} already in "
            f"`{args.plans}`."
        )
        plan_keys |= {x.key for x in drawn}
        joined = compute.concat(load_compute(args.plans / "compute_plans", plan_keys))
        t0 = time.perf_counter()
        model = fit_recipe(joined, comm, seed=args.seed)
        fit_s = time.perf_counter() - t0
        row = [f"after round {r + 1}", str(len(joined)), f"{mape(model, holdout):.2%}"]
    row.append("-")
    rows.append("| " + " | ".join([*row, f"{fit_s:.0f}"]) + " |")
    if args.save:
        model.metrics_["compute"]["test_pool"] = model.score_compute(holdout)
        floors = session_comm_noise_floors(data)
        floor = session_noise_floor(data, holdout)
        if floor is not None:
            floors["compute"] = floor
        if floors:
            model.metrics_["noise_floor"] = floors
        model.sample_counts_["compute_holdout"] = len(holdout)
        model.sample_counts_["compute_plans"] = len(plan_keys)
        model.provenance_ = {
            "recipe": "bench/plan_shaped.py (the shipped CPU recipe plus plan-shaped samples)",
            "dataset": str(args.dataset),
            "plans": str(args.plans),
            "plan_rounds": args.rounds,
            "plan_tasks": args.tasks,
            "seed": args.seed,
        }
        model.save(args.save)
    lines.append(f"Last model: {model.name}" + (f", saved to `{args.save}`." if args.save else "."))
    text = "\n".join(
        [
            f"Dataset `{args.dataset}` ({len(compute)} compute samples), CPU backend "
            f"{settings['warmups']} warm-ups / {settings['repeats']} repeats at batch "
            f"{settings['batch_size']}; held-out loads: the dataset's {len(holdout)} "
            "test-pool loads.",
            "",
            *rows,
            "",
            *lines,
        ]
    )
    emit(text, args.out, title="Plan-shaped samples for the CPU model")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
