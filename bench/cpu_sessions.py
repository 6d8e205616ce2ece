"""CPU cost models across measurement sessions: every model on every session's held-out loads.

    OMP_NUM_THREADS=1 .venv/bin/python bench/cpu_sessions.py \
        --dataset data/datasets/cpu_b4096:2000 --dataset data/datasets/cpu_b4096_r10 \
        --out bench/results/cpu_sessions.md

Each ``--dataset DIR[:N]`` is the ``data/`` directory of a CPU ``pretrain`` run (the same
sample keys in every run with seed 0, so the held-out loads are the same loads). For each:

* its **noise floor**: the held-out samples it measured twice (``compute_retest``), as in
  the model metadata (retest MAPE / sqrt 2; ``session_noise_floor``);
* neural models trained here on its first N compute samples (all without N) and its comm
  samples, with ``--members`` compute nets each (1: one net; 5: an ensemble of 5).

Between two sessions, the same held-out loads measured in both give a cross-session floor.
``--model DIR`` adds fitted models (default: the shipped CPU models). Every model is then
scored on every session's held-out loads: MAPE, Spearman, and MAPE / that session's floor;
and it plans ``--tasks`` test-pool tasks with the ``neuroshard`` searcher, side by side,
for its planning time (an ensemble's wider embeddings cost search time).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from neuroshard.models import load_cost_model
from neuroshard.models.metrics import noise_floor
from neuroshard.models.neural import NeuralCostModel
from neuroshard.planner import Planner
from neuroshard.pretrain.dataset import load_comm, load_compute, sample_keys
from neuroshard.pretrain.fidelity import session_noise_floor
from neuroshard.samples import CommData, ComputeData

from _common import add_task_args, emit, task_setup

SHIPPED = ["data/models/cpu-b4096-d4", "data/models/cpu-b4096-d4-lightgbm"]
MODEL_KWARGS = {
    "train_batch_size": 64,
    "max_epochs": 1500,
    "patience": 100,
    "lr_decay_patience": 20,
    "comm_train_batch_size": 32,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--dataset",
        action="append",
        required=True,
        help="DIR[:N] of a CPU pretrain run's data; train on its first N samples",
    )
    p.add_argument("--members", default="1,5", help="compute nets per trained model")
    p.add_argument("--model", action="append", default=None, help="a fitted model directory")
    p.add_argument("--repeats", type=int, default=3, help="plans per task and model")
    add_task_args(p)
    p.set_defaults(tasks=5, batch_size=4096)
    return p.parse_args(argv)


def cross_floor(a: ComputeData, b: ComputeData) -> dict[str, float]:
    """Noise floor of the held-out loads both sessions measured."""
    a_ms, b_ms = dict(zip(a.keys, a.label_ms)), dict(zip(b.keys, b.label_ms))
    keys = sorted(set(a_ms) & set(b_ms))
    return noise_floor(np.array([a_ms[k] for k in keys]), np.array([b_ms[k] for k in keys]))


def plan_seconds(
    models: list, tasks: list, cluster, repeats: int, reserve: float = 0.0
) -> tuple[list[float], float]:
    """Median seconds of a ``neuroshard`` plan per model (models interleaved on every task),
    and the timing noise: the median over (task, model) of (max - min) / median."""
    seconds = [[] for _ in models]
    noise = []
    for task in tasks:
        for i, (_, model, _) in enumerate(models):
            runs = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                Planner(model, "neuroshard", reserve=reserve).plan(task, cluster)
                runs.append(time.perf_counter() - t0)
            seconds[i].append(statistics.median(runs))
            noise.append((max(runs) - min(runs)) / statistics.median(runs))
    return [statistics.median(s) for s in seconds], statistics.median(noise)


def fit_recipe(
    compute: ComputeData, comm: CommData, members: int = 1, seed: int = 0
) -> NeuralCostModel:
    """The shipped CPU model's recipe (:data:`MODEL_KWARGS`, 4 devices) on these samples."""
    model = NeuralCostModel(compute_members=members, seed=seed, **MODEL_KWARGS)
    return model.fit(compute, comm, backend_name="cpu", num_devices=4)


def train(data: Path, n: int | None, members: int) -> NeuralCostModel:
    keys = sample_keys(data / "compute")
    chosen = {k for i, k in keys.items() if n is None or i < n}
    return fit_recipe(load_compute(data / "compute", chosen), load_comm(data / "comm"), members)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    sessions: list[tuple[str, Path, int | None]] = []
    for spec in args.dataset:
        path, _, n = spec.partition(":")
        sessions.append((Path(path).name, Path(path), int(n) if n else None))
    held = {name: load_compute(path / "compute_holdout") for name, path, _ in sessions}
    floors = {name: session_noise_floor(path, held[name]) for name, path, _ in sessions}

    models: list[tuple[str, object, str]] = []
    for name, path, n in sessions:
        for members in (int(m) for m in args.members.split(",")):
            t0 = time.perf_counter()
            model = train(path, n, members)
            what = f"{n if n else 'all'} samples of {name}, {members} compute net(s)"
            models.append((f"trained: {what}", model, f"{time.perf_counter() - t0:.0f} s"))
    for directory in args.model or SHIPPED:
        models.append(
            (
                f"`{directory}`",
                load_cost_model(directory, batch_size=4096, backend="cpu"),
                "shipped",
            )
        )
    cluster, _, tasks = task_setup(args)
    seconds, noise = plan_seconds(models, tasks, cluster, args.repeats, args.reserve)

    lines = [
        "| session | held-out loads | retest pairs | retest MAPE | floor |",
        "|---|---|---|---|---|",
    ]
    for name, _, _ in sessions:
        f = floors[name]
        lines.append(
            f"| {name} | {len(held[name])} | {f['n']} | {100 * f['mape']:.2f}% "
            f"| {100 * f['floor_mape']:.2f}% |"
        )
    for (na, _, _), (nb, _, _) in zip(sessions, sessions[1:]):
        f = cross_floor(held[na], held[nb])
        lines.append(
            f"| {na} vs {nb} (same loads) | {f['n']} | {f['n']} "
            f"| {100 * f['mape']:.2f}% | {100 * f['floor_mape']:.2f}% |"
        )
    head = "| model | fit |" + "".join(f" {n}: MAPE | Spearman | /floor |" for n, _, _ in sessions)
    head += " plan s | plan s / first |"
    lines += ["", head, "|---|---|" + "---|---|---|" * len(sessions) + "---|---|"]
    for (label, model, how), secs in zip(models, seconds):
        cells = []
        for name, _, _ in sessions:
            s = model.score_compute(held[name])
            cells.append(
                f" {100 * s['mape']:.2f}% | {s['spearman']:.4f} "
                f"| {s['mape'] / floors[name]['floor_mape']:.3f} |"
            )
        lines.append(
            f"| {label} | {how} |" + "".join(cells) + f" {secs:.3f} | {secs / seconds[0]:.2f} |"
        )
    lines += [
        "",
        f"Plan seconds: median over {len(tasks)} test-pool tasks of "
        f"{args.min_tables}-{args.max_tables} tables on {args.devices} devices x "
        f"{args.memory} (batch {args.batch_size}) of the median of {args.repeats} "
        f"`neuroshard` plans, models interleaved per task, one thread; timing noise "
        f"(median (max - min) / median of one task's repeats) {100 * noise:.1f}%.",
    ]
    emit("\n".join(lines), args.out, title="CPU cost models across measurement sessions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
