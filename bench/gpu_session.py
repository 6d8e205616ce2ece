"""One prepared GPU session: measure compute samples, train, plan, measure the plans.

On the GPU machine (its own python, torch only: no fbgemm, torchrec, ray or lightgbm, no
installs), from the repository root::

    python3 bench/gpu_session.py --archive --out $OUT/h200

Here, on CPU::

    .venv/bin/python bench/gpu_session.py --quick --out /tmp/gpu_quick   # dry run, ~1 min
    .venv/bin/python bench/gpu_session.py --make-torchrec-plans          # the tasks file

The session keeps to ``--budget-s`` of wall time (default 420 s, inside an 8-minute
slot), in stages, each timed:

1. **setup** -- ``neuroshard`` imported from the checkout (:func:`use_checkout` maps the
   ``pretrain``, ``search`` and ``data`` folders to their package names as setuptools
   does), the pool's halves, the samples drawn as ``pretrain`` draws them (same seeds and
   keys): training loads from the train half (augmented, one shrunken copy per table),
   held-out loads from the test half, and retests of the first held-out loads;
2. **indices** -- the index batch of every table the session measures, generated on all
   cores before CUDA starts (forked workers);
3. **preflight** -- the fused kernel against ``nn.EmbeddingBag`` + SGD on the device, a
   CUDA-graph capture, one timed load; graphs are switched off if capture fails;
4. **collect** -- the compute samples in interleaved rounds (each round a slice of the
   training and held-out loads, and the retests of loads an earlier round measured),
   written to Parquet as they go, until the stage's deadline;
5. **comm** -- comm samples of the ``sim`` backend's ``h200`` profile: one GPU cannot
   measure a collective, so the model's comm nets learn the simulator (its ``meta.json``
   says so under ``provenance``);
6. **train** -- the neural cost model on the measured compute samples and the sim comm
   samples, with three compute members whose spread prices loads conservatively (mean +
   0.25 x spread in log ms, as the shipped range models); held-out MAPE, Spearman and the
   retest noise floor go into its metrics;
7. **plan** -- the tasks of ``bench/gpu_tasks/tasks_d8.json`` (20 tasks of 20-60 test-pool
   tables, 8 devices x 4 GB) with NeuroShard guided by the model just trained, NeuroShard
   with verification (``neuroshard+verify``: its 3 cheapest plans under the model, the one
   whose device loads measure cheapest here kept), the greedy grid and the five
   heuristics; TorchRec's planner's plans come from the same file (made here, where
   torchrec imports, by ``--make-torchrec-plans``);
8. **measure** -- every device's load of every plan, task by task, each device index in
   turn across the plans (drift hits all plans alike), in passes; the second pass retests
   the first and gives the noise floor of the plan figures;
9. **report** -- ``results.json`` and ``results.md``.

Under ``--out``: ``data/`` (the dataset: ``compute``, ``compute_holdout``,
``compute_retest``, ``comm``), ``model/`` (the model directory), ``plans.json``,
``plan_loads.csv`` (every measured device load), ``results.json``, ``results.md`` and
``session.log``.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TASKS_FILE = ROOT / "bench" / "gpu_tasks" / "tasks_d8.json"
TASKS_FORMAT = "neuroshard.gpu_tasks/v1"
# Table fields the tasks file leaves out of TorchRec's plans: the pool holds them.
_POOL_FIELDS = ("reuse_hist", "features", "pooling_factor")
GB = 1 << 30

logger = logging.getLogger("gpu_session")


def use_checkout(root: Path = ROOT) -> None:
    """Import ``neuroshard`` from the checkout at ``root`` without installing it.

    ``neuroshard.pretrain``, ``.search`` and ``.data`` live in the top-level folders
    ``pretrain/``, ``search/`` and ``data/`` (setuptools ``package-dir``); where no
    installation maps them, the checkout's root joins ``neuroshard.__path__`` so that
    ``neuroshard.<folder>`` finds them.
    """
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import neuroshard

    where = Path(neuroshard.__file__).resolve().parent
    if where != (root / "neuroshard").resolve():
        raise ImportError(f"neuroshard imports from {where}, not from the checkout {root}")
    for sub in ("pretrain", "search", "data"):
        name = f"neuroshard.{sub}"
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            if str(root) not in neuroshard.__path__:
                neuroshard.__path__.append(str(root))
            importlib.import_module(name)


# --------------------------------------------------------------------------- settings


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass(frozen=True)
class SessionConfig:
    """What a session measures, on what, and in how much time.

    Stage deadlines are shares of ``budget_s`` from the session's start: collection
    stops at ``collect_share``, training's nets share the time to ``train_share``, and
    plan measurement stops at ``measure_share``. ``row_cap`` (dry runs) caps every
    measured table's rows so that a CPU holds it.
    """

    out: Path
    device: str = "cuda"
    batch_size: int = 65_536
    budget_s: float = 420.0
    collect_share: float = 0.50
    train_share: float = 0.68
    measure_share: float = 0.97
    compute_samples: int = 3_000
    holdout_samples: int = 300
    retest_samples: int = 150
    comm_samples: int = 2_000
    rounds: int = 10
    chunk_size: int = 100
    max_tables: int = 40
    memory_cap_bytes: int = 4 * GB
    num_devices: int = 8
    tasks: int = 20
    # A captured graph is steady after its first replay, and the first H200 run's retests
    # agreed far inside the model's error at 7 repeats (bench/results/one-off/
    # h200_2026-11-29): 3 keep the median and buy samples.
    warmups: int = 1
    repeats: int = 3
    compute_members: int = 3  # the compute nets whose spread prices uncertain loads
    conservative_k: float = 0.25  # prices at mean + k x spread (log ms), as sim-h100
    verify_top: int = 3  # neuroshard+verify: the K cheapest plans, measured compute
    plan_passes: int = 2
    graphs: bool = True
    row_cap: int | None = None
    workers: int = field(default_factory=lambda: max(1, _cores() - 1))
    train_threads: int = field(default_factory=lambda: max(1, min(4, _cores())))
    max_epochs: int = 1_000
    seed: int = 0
    comm_profile: str = "h200"
    tasks_file: Path = TASKS_FILE

    @classmethod
    def quick(cls, out: Path, **overrides: Any) -> SessionConfig:
        """A CPU dry run of every stage in about a minute (meaningless figures)."""
        small = dict(
            device="cpu",
            batch_size=256,
            budget_s=150.0,
            compute_samples=60,
            holdout_samples=16,
            retest_samples=8,
            comm_samples=200,
            rounds=2,
            chunk_size=10,
            tasks=2,
            warmups=1,
            repeats=3,
            verify_top=2,
            row_cap=20_000,
            workers=2,
            train_threads=1,
            max_epochs=40,
        )
        return cls(out=out, **{**small, **overrides})


class Clock:
    """Seconds since the session started, stage deadlines and stage timings."""

    def __init__(self, budget_s: float, on_stage_end: Callable[[], None] | None = None):
        self.started = time.monotonic()
        self.budget_s = budget_s
        self.stages: dict[str, float] = {}
        self.on_stage_end = on_stage_end

    def now(self) -> float:
        return time.monotonic() - self.started

    def deadline(self, share: float) -> float:
        return self.budget_s * share

    def left(self, share: float) -> float:
        return self.deadline(share) - self.now()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        logger.info("stage %s starts at %.1f s", name, self.now())
        try:
            yield
        finally:
            self.stages[name] = round(time.monotonic() - t0, 2)
            logger.info("stage %s took %.1f s", name, self.stages[name])
            if self.on_stage_end is not None:
                self.on_stage_end()


# --------------------------------------------------------------------------- tasks file


def make_torchrec_plans(
    path: Path = TASKS_FILE,
    *,
    tasks: int = 20,
    num_devices: int = 8,
    memory_bytes: int = 4 * GB,
    batch_size: int = 65_536,
    min_tables: int = 20,
    max_tables: int = 60,
    seed: int = 0,
) -> Path:
    """Draw the session's tasks from the test pool and plan each with TorchRec's planner
    (which needs torchrec: run it here, not on the GPU machine); write them to ``path``."""
    from neuroshard.backends.sim import SimBackend
    from neuroshard.plan_io import plan_to_dict
    from neuroshard.planner import Planner
    from neuroshard.pretrain.pool import load_pool
    from neuroshard.tasks import default_max_total_bytes, sample_tasks
    from neuroshard.types import Cluster

    cluster = Cluster.uniform(num_devices, memory_bytes, batch_size)
    drawn = sample_tasks(
        load_pool("test"),
        tasks,
        seed=seed,
        min_tables=min_tables,
        max_tables=max_tables,
        max_total_bytes=default_max_total_bytes(num_devices, memory_bytes),
    )
    costs = SimBackend("h200", batch_size=batch_size)  # only prices the plans in the file
    entries = []
    for i, task in enumerate(drawn):
        plan = Planner(costs, "torchrec", seed=seed + i).plan(task, cluster)
        doc = plan_to_dict(plan)
        for table in doc["tables"]:  # the pool has them; readers take the pool's tables
            for key in _POOL_FIELDS:
                table.pop(key, None)
        entries.append({"tables": [t.name for t in task], "torchrec": doc})
        logger.info("task %d: %d tables planned by torchrec", i, len(task))
    doc = {
        "format": TASKS_FORMAT,
        "pool": "test",
        "seed": seed,
        "num_devices": num_devices,
        "memory_per_device_bytes": memory_bytes,
        "batch_size": batch_size,
        "min_tables": min_tables,
        "max_tables": max_tables,
        "made_by": "bench/gpu_session.py --make-torchrec-plans",
        "tasks": entries,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, sort_keys=True, separators=(",", ":")) + "\n")
    os.replace(tmp, path)
    return path


def load_tasks(path: Path, test_pool: Sequence[Any]) -> tuple[dict[str, Any], list[Any], list]:
    """The tasks file: its header, each task's tables (from the test pool, by name) and
    TorchRec's plan of it."""
    from neuroshard.plan_io import plan_from_dict

    doc = json.loads(path.read_text())
    if doc.get("format") != TASKS_FORMAT:
        raise ValueError(f"{path}: format {doc.get('format')!r}, expected {TASKS_FORMAT!r}")
    by_name = {t.name: t for t in test_pool}
    tasks, torchrec = [], []
    for i, entry in enumerate(doc["tasks"]):
        missing = [n for n in entry["tables"] if n not in by_name]
        if missing:
            raise ValueError(f"{path}: task {i} names tables not in the test pool: {missing[:3]}")
        task = [by_name[n] for n in entry["tables"]]
        plan = plan_from_dict(entry["torchrec"])
        if {(t.name, t.rows, t.dim) for t in plan.tables} != {
            (t.name, t.rows, t.dim) for t in task
        }:
            raise ValueError(
                f"{path}: task {i}'s TorchRec plan has other tables or table "
                "shapes than the test pool (was the pool regenerated?)"
            )
        tasks.append(task)
        torchrec.append(replace(plan, tables=tuple(by_name[t.name] for t in plan.tables)))
    return doc, tasks, torchrec


# --------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class Job:
    """One sample set of the interleaved collection (as ``pretrain --rounds`` runs it)."""

    name: str
    samples: Sequence[Any]
    retest: bool = False

    def head(self, r: int, rounds: int) -> int:
        """Samples measured once round ``r`` of ``rounds`` is done; a retest set lags one
        round, so each retest comes a round after its first measurement."""
        done = r - 1 if self.retest else r
        return -(-len(self.samples) * done // rounds)


def capped(tables: Sequence[Any], row_cap: int | None) -> list[Any]:
    if row_cap is None:
        return list(tables)
    return [t if t.rows <= row_cap else replace(t, rows=row_cap) for t in tables]


def draw_samples(cfg: SessionConfig, train: Sequence[Any], test: Sequence[Any]) -> list[Job]:
    """Training, held-out and retest loads, drawn with ``pretrain``'s seeds and streams."""
    import numpy as np

    from neuroshard.pretrain.augment import (
        augment_tables,
        sample_compute_loads,
        shrink_tables,
    )
    from neuroshard.pretrain.fidelity import RETEST_INDEX_OFFSET

    variants = list(train) + shrink_tables(train, np.random.default_rng([cfg.seed, 4]), copies=1)
    training = sample_compute_loads(
        augment_tables(variants),
        cfg.compute_samples,
        np.random.default_rng([cfg.seed, 1]),
        max_tables=cfg.max_tables,
        memory_cap_bytes=cfg.memory_cap_bytes,
    )
    holdout = sample_compute_loads(
        augment_tables(list(test)),
        cfg.holdout_samples,
        np.random.default_rng([cfg.seed, 3]),
        max_tables=cfg.max_tables,
        memory_cap_bytes=cfg.memory_cap_bytes,
    )
    retest = [
        replace(s, index=s.index + RETEST_INDEX_OFFSET) for s in holdout[: cfg.retest_samples]
    ]
    return [
        Job("compute", training),
        Job("compute_holdout", holdout),
        Job("compute_retest", retest, retest=True),
    ]


def collect_rounds(
    backend: Any, jobs: Sequence[Job], data: Path, cfg: SessionConfig, clock: Clock
) -> dict[str, int]:
    """Measure the jobs in ``cfg.rounds`` interleaved rounds, a chunk at a time, until the
    collection deadline; returns the samples measured per job."""
    from neuroshard.pretrain.collect import collect
    from neuroshard.types import BackendError

    done = {job.name: 0 for job in jobs}
    failed = {job.name: 0 for job in jobs}

    def measure(job: Job, end: int) -> None:
        try:
            got = collect(
                job.samples[:end],
                backend,
                data / job.name,
                kind="compute",
                chunk_size=cfg.chunk_size,
                progress=False,
                description=job.name,
            )
            failed[job.name] += got.failed
        except BackendError as exc:  # e.g. out of memory: lose the chunk, not the session
            logger.error("%s up to %d: %s", job.name, end, exc)
            failed[job.name] += end - done[job.name]
            if sum(failed.values()) > 4 * cfg.chunk_size:
                raise
        done[job.name] = end

    def ends(job: Job, head: int) -> Iterator[int]:
        while done[job.name] < head:
            if clock.left(cfg.collect_share) <= 0:
                return
            yield min(head, done[job.name] + cfg.chunk_size)

    for r in range(1, cfg.rounds + 1):
        for job in jobs:
            for end in ends(job, job.head(r, cfg.rounds)):
                measure(job, end)
        logger.info("round %d/%d at %.0f s: %s", r, cfg.rounds, clock.now(), done)
        if clock.left(cfg.collect_share) <= 0:
            logger.info("collection deadline after round %d of %d", r, cfg.rounds)
            break
    for job in (j for j in jobs if j.retest):  # the rounds measured every original
        for end in ends(job, len(job.samples)):
            measure(job, end)
    if any(failed.values()):
        logger.warning("samples not measured: %s", failed)
    return done


def retest_pairs(data: Path, retests: Sequence[Any]) -> tuple[Any, Any]:
    """First and second label of every retest found on disk."""
    import numpy as np

    from neuroshard.pretrain.dataset import load_compute
    from neuroshard.pretrain.fidelity import RETEST_INDEX_OFFSET

    firsts = {s.key: replace(s, index=s.index - RETEST_INDEX_OFFSET).key for s in retests}
    if not list((data / "compute_retest").glob("part-*.parquet")):
        return np.zeros(0), np.zeros(0)
    again = load_compute(data / "compute_retest", set(firsts))
    first = load_compute(data / "compute_holdout", set(firsts.values()))
    row = {k: i for i, k in enumerate(first.keys)}
    pairs = [(row[firsts[k]], j) for j, k in enumerate(again.keys) if firsts[k] in row]
    a = np.array([first.label_ms[i] for i, _ in pairs])
    b = np.array([again.label_ms[j] for _, j in pairs])
    return a, b


# --------------------------------------------------------------------------- stages


def preflight(backend: Any, cfg: SessionConfig, sample_load: Sequence[Any]) -> dict[str, Any]:
    """The fused kernel against nn.EmbeddingBag + SGD on the device (fails the session if
    wrong), graph replays against eager steps (graphs off if they differ), one timing."""
    from neuroshard.backends.cuda import check_fused_kernel

    found = check_fused_kernel(cfg.device)
    if backend.timer.graphs and not found["graphs_ok"]:
        logger.warning("CUDA graph replays differ from eager steps (%s): timing eager steps", found)
        backend.graphs = backend.timer.graphs = False  # before any row carries the fingerprint
    started = time.monotonic()
    timing = backend.measure_compute(capped(sample_load, cfg.row_cap))
    return {
        **found,
        "graphs": backend.timer.graphs,
        "graph_failures": backend.timer.graph_failures,
        "sample_tables": len(sample_load),
        "sample_ms": timing.median_ms,
        "sample_spread": timing.spread,
        "sample_seconds": round(time.monotonic() - started, 3),
    }


def train_model(cfg: SessionConfig, data: Path, backend_name: str, clock: Clock) -> Any:
    """The neural model on the GPU compute samples and the sim comm samples."""
    from neuroshard.models.neural import NeuralCostModel
    from neuroshard.models.training import fit_net
    from neuroshard.pretrain.dataset import load_comm, load_compute

    compute = load_compute(data / "compute")
    comm = load_comm(data / "comm")
    left = max(clock.left(cfg.train_share), 10.0)
    seconds = {"compute": 0.6 * left, "bwd comm": 0.2 * left, "fwd comm": 0.2 * left}

    def budgeted(net, train, val, config, label):
        config = replace(config, max_seconds=seconds.get(label, 0.2 * left))
        return fit_net(net, train, val, config, label)

    model = NeuralCostModel(
        seed=cfg.seed,
        num_threads=cfg.train_threads,
        max_epochs=cfg.max_epochs,
        patience=60,
        train_batch_size=64,
        lr_decay_patience=20,
        compute_members=cfg.compute_members,
        conservative_k=cfg.conservative_k,
    )
    return model.fit(
        compute, comm, backend_name=backend_name, num_devices=cfg.num_devices, trainer=budgeted
    )


VERIFIED = "neuroshard+verify"


class MeasuredCompute:
    """``model`` with each load's compute measured on ``backend`` instead of predicted:
    what verification prices the candidates with here. One GPU measures compute only, so
    the collectives stay the model's."""

    def __init__(
        self,
        model: Any,
        backend: Any,
        row_cap: int | None = None,
        measured: dict[tuple, float] | None = None,
    ):
        self.model, self.backend, self.row_cap = model, backend, row_cap
        self.name = f"{backend.name} compute + {model.name} comm"
        # Candidates of one task share most device loads: each is timed once.
        self.measured = {} if measured is None else measured

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.model, attr)

    def for_cluster(self, cluster: Any) -> MeasuredCompute:
        bound = getattr(self.model, "for_cluster", None)
        model = bound(cluster) if callable(bound) else self.model
        return MeasuredCompute(model, self.backend, self.row_cap, self.measured)

    def compute_ms(self, loads: Sequence[Sequence[Any]]) -> list[float]:
        out = []
        for load in loads:
            key = tuple(load)
            if load and key not in self.measured:
                timing = self.backend.measure_compute(capped(load, self.row_cap))
                self.measured[key] = timing.median_ms
            out.append(self.measured[key] if load else 0.0)
        return out


def plan_tasks(
    tasks: Sequence[Sequence[Any]],
    torchrec: Sequence[Any],
    cluster: Any,
    model: Any,
    cfg: SessionConfig,
    backend: Any = None,
) -> tuple[list[str], list[dict[str, Any]]]:
    """Every searcher's plan of every task (TorchRec's from the tasks file); with a
    ``backend`` and ``cfg.verify_top``, also :data:`VERIFIED`: NeuroShard's
    ``verify_top`` cheapest plans under the model, the one whose device loads measure
    cheapest on the backend kept (``plan --verify``)."""
    from neuroshard.planner import Planner
    from neuroshard.search import BASELINES
    from neuroshard.search.scoring import plan_cost
    from neuroshard.types import PlanInfeasibleError

    names = ["neuroshard", "greedy-grid", *BASELINES]
    options: dict[str, dict[str, Any]] = {n: {"searcher": n} for n in names}
    if backend is not None and cfg.verify_top > 0:
        verifier = MeasuredCompute(model, backend, cfg.row_cap)
        options[VERIFIED] = {"searcher": "neuroshard", "verify": verifier, "top": cfg.verify_top}
        names.insert(1, VERIFIED)
    plans: list[dict[str, Any]] = []
    for i, task in enumerate(tasks):
        row: dict[str, Any] = {}
        for name in names:
            try:
                row[name] = Planner(model, seed=cfg.seed + i, **options[name]).plan(task, cluster)
            except PlanInfeasibleError as exc:
                logger.warning("task %d: %s found no plan: %s", i, name, exc)
        row["torchrec"] = replace(torchrec[i], cost=plan_cost(torchrec[i], model))
        plans.append(row)
    return names + ["torchrec"], plans


def measure_plans(
    backend: Any,
    plans: Sequence[dict[str, Any]],
    names: Sequence[str],
    cfg: SessionConfig,
    clock: Clock,
) -> list[dict[str, Any]]:
    """Every device load of every plan, passes x tasks x device index x plans (rotated
    per task and pass), until the measurement deadline."""
    from neuroshard.types import BackendError

    rows: list[dict[str, Any]] = []
    for p in range(cfg.plan_passes):
        for i, row in enumerate(plans):
            have = [n for n in names if n in row]
            k = (i + p) % len(have)
            order = have[k:] + have[:k]
            loads = {n: row[n].device_loads() for n in order}
            for d in range(cfg.num_devices):
                for n in order:
                    if clock.left(cfg.measure_share) <= 0:
                        logger.info("measurement deadline in pass %d, task %d", p + 1, i)
                        return rows
                    load = capped(loads[n][d], cfg.row_cap)
                    try:
                        t = backend.measure_compute(load)
                    except BackendError as exc:  # the plan gets no figure in this pass
                        logger.error("task %d, %s, device %d: %s", i, n, d, exc)
                        continue
                    rows.append(
                        {
                            "pass": p,
                            "task": i,
                            "searcher": n,
                            "device": d,
                            "shards": len(load),
                            "ms": t.median_ms,
                            "spread": t.spread,
                        }
                    )
        logger.info("plan pass %d done at %.0f s", p + 1, clock.now())
    return rows


# --------------------------------------------------------------------------- results


def plan_figures(
    rows: Sequence[dict[str, Any]], names: Sequence[str], plans: Sequence[dict], cfg: SessionConfig
) -> dict[str, Any]:
    """Max-device compute per plan and pass; ratios to the best heuristic and TorchRec per
    pass; the noise floor between passes."""
    import numpy as np

    from neuroshard.models.metrics import noise_floor
    from neuroshard.search import BASELINES

    per: dict[tuple[int, int, str], dict[int, float]] = {}
    for r in rows:
        per.setdefault((r["pass"], r["task"], r["searcher"]), {})[r["device"]] = r["ms"]
    maxes = {k: max(v.values()) for k, v in per.items() if len(v) == cfg.num_devices}
    passes = sorted({p for p, _, _ in maxes})
    out: dict[str, Any] = {"passes": {}}
    heuristics = [n for n in BASELINES if n in names]
    for p in passes:
        tasks = [
            i for i in range(len(plans)) if all((p, i, n) in maxes for n in names if n in plans[i])
        ]
        if not tasks:
            continue
        cost = {n: np.array([maxes.get((p, i, n), np.nan) for i in tasks]) for n in names}
        means = {n: float(np.nanmean(c)) for n, c in cost.items()}
        best_h = min(heuristics, key=lambda n: means[n])
        per_task_best = np.nanmin(np.vstack([cost[n] for n in heuristics]), axis=0)
        ns = cost["neuroshard"]
        out["passes"][p] = {
            "tasks": len(tasks),
            "mean_max_ms": means,
            "best_heuristic": best_h,
            "neuroshard_over_best_heuristic": means["neuroshard"] / means[best_h],
            "neuroshard_over_per_task_best_heuristic": float(np.nanmean(ns / per_task_best)),
            "neuroshard_over_torchrec": means["neuroshard"] / means["torchrec"],
            "neuroshard_over_greedy_grid": means["neuroshard"] / means["greedy-grid"],
            "neuroshard_wins_vs_torchrec": float(np.mean(ns < cost["torchrec"])),
        }
        if VERIFIED in cost:
            out["passes"][p].update(
                verified_over_best_heuristic=means[VERIFIED] / means[best_h],
                verified_over_per_task_best_heuristic=float(
                    np.nanmean(cost[VERIFIED] / per_task_best)
                ),
                verified_over_torchrec=means[VERIFIED] / means["torchrec"],
                verified_over_neuroshard=means[VERIFIED] / means["neuroshard"],
            )
    both = [
        (maxes[(0, i, n)], maxes[(1, i, n)]) for (p, i, n) in maxes if p == 0 and (1, i, n) in maxes
    ]
    if both:
        a, b = np.array(both).T
        out["plan_noise_floor"] = noise_floor(a, b)
    pairs: dict[tuple[int, str, int], dict[int, float]] = {}
    for r in rows:
        pairs.setdefault((r["task"], r["searcher"], r["device"]), {})[r["pass"]] = r["ms"]
    loads = [(v[0], v[1]) for v in pairs.values() if 0 in v and 1 in v and v[0] > 0]
    if loads:
        a, b = np.array(loads).T
        out["load_noise_floor"] = noise_floor(a, b)
    return out


def predicted_vs_measured(
    rows: Sequence[dict[str, Any]], plans: Sequence[dict], model: Any, cfg: SessionConfig
) -> dict[str, Any]:
    """The model's compute for every measured device load of the first pass, scored."""
    import numpy as np

    from neuroshard.models.metrics import regression_metrics

    first = [r for r in rows if r["pass"] == 0 and r["shards"] > 0]
    if not first:
        return {}
    loads = [
        capped(plans[r["task"]][r["searcher"]].device_loads()[r["device"]], cfg.row_cap)
        for r in first
    ]
    pred = np.asarray(model.compute_ms(loads), dtype=float)
    true = np.array([r["ms"] for r in first])
    return regression_metrics(pred, true, 1e-3)


def _pct(x: Any) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}%"


def write_report(out: Path, results: dict[str, Any]) -> None:
    """``results.json`` and a Markdown summary ``results.md``."""
    (out / "results.json").write_text(
        json.dumps(results, indent=2, sort_keys=True, default=str) + "\n"
    )
    m = results.get("model", {})
    hw = results.get("hardware", {})
    lines = [
        f"# GPU session ({results['mode']})",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Device: {hw.get('gpu') or hw.get('processor')}; kernel {hw.get('kernel')}, "
        f"graphs {hw.get('graphs')} (capture failures {hw.get('graph_failures')}); "
        f"batch {results['config']['batch_size']}; torch {hw.get('torch')}.",
        "",
        "## Samples",
        "",
        "| set | measured | asked |",
        "|---|---|---|",
    ]
    for name, n in results.get("collected", {}).items():
        lines.append(f"| {name} | {n} | {results['asked'][name]} |")
    lines += [
        "",
        "## Compute model (held-out test-pool loads)",
        "",
        "| metric | value |",
        "|---|---|",
        f"| MAPE | {_pct(m.get('mape'))} |",
        f"| Spearman | {m.get('spearman', float('nan')):.4f} |",
        f"| noise floor (floor MAPE of {m.get('retest_pairs', 0)} retests) | "
        f"{_pct(m.get('floor_mape'))} |",
        f"| MAPE / floor | {m.get('mape_over_floor', float('nan')):.2f} |",
        f"| MAPE on training-pool test split | {_pct(m.get('train_test_mape'))} |",
        "",
        "Comm nets: trained on sim/h200 samples (one GPU cannot measure a collective).",
        "",
    ]
    plans = results.get("plans", {})
    for p, fig in sorted(plans.get("passes", {}).items()):
        lines += [
            f"## Plans, pass {int(p) + 1}: measured max-device compute ({fig['tasks']} tasks)",
            "",
            "| searcher | mean max-device ms |",
            "|---|---|",
        ]
        lines += [f"| {n} | {v:.4f} |" for n, v in fig["mean_max_ms"].items()]
        lines += [
            "",
            f"* NeuroShard / best heuristic ({fig['best_heuristic']}): "
            f"{fig['neuroshard_over_best_heuristic']:.3f} (per-task best: "
            f"{fig['neuroshard_over_per_task_best_heuristic']:.3f})",
            f"* NeuroShard / TorchRec: {fig['neuroshard_over_torchrec']:.3f} "
            f"(NeuroShard lower on {100 * fig['neuroshard_wins_vs_torchrec']:.0f}% "
            "of tasks)",
            f"* NeuroShard / greedy grid: {fig['neuroshard_over_greedy_grid']:.3f}",
        ]
        if "verified_over_best_heuristic" in fig:
            lines += [
                f"* {VERIFIED} / best heuristic: {fig['verified_over_best_heuristic']:.3f} "
                f"(per-task best: {fig['verified_over_per_task_best_heuristic']:.3f}); / "
                f"TorchRec: {fig['verified_over_torchrec']:.3f}; / NeuroShard: "
                f"{fig['verified_over_neuroshard']:.3f}",
            ]
        lines.append("")
    if "plan_noise_floor" in plans:
        lines.append(
            f"Noise floor of a plan's max-device compute between passes: "
            f"{_pct(plans['plan_noise_floor']['floor_mape'])} (retest MAPE "
            f"{_pct(plans['plan_noise_floor']['mape'])}); of one device load: "
            f"{_pct(plans.get('load_noise_floor', {}).get('floor_mape'))}."
        )
    pv = results.get("plan_prediction", {})
    if pv:
        lines.append(
            f"Model on the plans' device loads (pass 1): MAPE {_pct(pv.get('mape'))}, "
            f"Spearman {pv.get('spearman', float('nan')):.4f}."
        )
    lines += ["", "## Stages", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in results["stages"].items()]
    lines.append(f"| total | {results['total_s']:.1f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- the session


def run_session(cfg: SessionConfig, command: str = "") -> dict[str, Any]:
    """Every stage; returns the results (also written under ``cfg.out``)."""
    out = cfg.out
    data = out / "data"
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "mode": "quick (CPU dry run)" if cfg.device == "cpu" else "full",
        "command": command,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
    }

    def progress() -> None:  # what a session that dies later still leaves behind
        results["stages"] = dict(clock.stages)
        results["total_s"] = round(clock.now(), 1)
        (out / "results.json").write_text(
            json.dumps(results, indent=2, sort_keys=True, default=str) + "\n"
        )

    clock = Clock(cfg.budget_s, progress)

    with clock.stage("setup"):
        import numpy as np

        from neuroshard.pretrain.pool import load_pool
        from neuroshard.types import Cluster

        train_pool = capped(load_pool("train"), cfg.row_cap)
        test_pool = load_pool("test")
        jobs = draw_samples(cfg, train_pool, capped(test_pool, cfg.row_cap))
        header, tasks, torchrec = load_tasks(cfg.tasks_file, test_pool)
        tasks, torchrec = tasks[: cfg.tasks], torchrec[: cfg.tasks]
        cluster = Cluster.uniform(
            cfg.num_devices, int(header["memory_per_device_bytes"]), cfg.batch_size
        )
        results["asked"] = {j.name: len(j.samples) for j in jobs}

    with clock.stage("indices"):
        from neuroshard.backends.cuda import generate_batches

        measured = {t for job in jobs for s in job.samples for t in s.tables}
        measured |= set(capped([t for task in tasks for t in task], cfg.row_cap))
        batches = generate_batches(measured, cfg.batch_size, seed=cfg.seed, workers=cfg.workers)
        results["index_batches"] = len(batches)

    with clock.stage("preflight"):
        from neuroshard.backends.cuda import CudaBackend

        backend = CudaBackend(
            cfg.batch_size,
            kernel="auto",
            warmups=cfg.warmups,
            repeats=cfg.repeats,
            device=cfg.device,
            graphs=cfg.graphs,
            index_cache_bytes=64 * GB,
            module_cache_bytes=8 * GB,
            device_index_cache_bytes=48 * GB,
        )
        backend.preload(batches)
        del batches
        backend.reserve(cfg.memory_cap_bytes if cfg.row_cap is None else 256 << 20)
        results["preflight"] = preflight(backend, cfg, jobs[0].samples[0].tables)

    with clock.stage("collect"):
        results["collected"] = collect_rounds(backend, jobs, data, cfg, clock)
        if not results["collected"]["compute"] or not results["collected"]["compute_holdout"]:
            raise RuntimeError(
                f"no training or held-out samples measured by the collection "
                f"deadline ({clock.deadline(cfg.collect_share):.0f} s): "
                f"{results['collected']}; give the session more --budget-s"
            )

    with clock.stage("comm"):
        from neuroshard.backends.sim import SimBackend
        from neuroshard.pretrain.augment import sample_comm_tasks
        from neuroshard.pretrain.collect import collect

        comm = sample_comm_tasks(
            train_pool, cfg.comm_samples, np.random.default_rng([cfg.seed, 2]), [cfg.num_devices]
        )
        collect(
            comm,
            SimBackend(cfg.comm_profile, batch_size=cfg.batch_size),
            data / "comm",
            kind="comm",
            chunk_size=1_000,
            progress=False,
        )
        results["asked"]["comm"] = results["collected"]["comm"] = len(comm)

    with clock.stage("train"):
        from neuroshard.models.metrics import noise_floor
        from neuroshard.pretrain.dataset import load_compute

        model = train_model(cfg, data, backend.name, clock)
        holdout = load_compute(data / "compute_holdout")
        scored = model.score_compute(holdout)
        a, b = retest_pairs(data, jobs[2].samples)
        floor = noise_floor(a, b) if len(a) else {"floor_mape": float("nan"), "mape": 0.0}
        model.metrics_["compute"]["test_pool"] = scored
        model.metrics_["noise_floor"] = {"compute": floor}
        model.sample_counts_["compute_holdout"] = len(holdout)
        model.provenance_ = {
            "pipeline": "bench/gpu_session.py",
            "seed": cfg.seed,
            "num_devices": cfg.num_devices,
            "max_tables": cfg.max_tables,
            "memory_cap_bytes": cfg.memory_cap_bytes,
            "shrink_copies": 1,
            "compute": f"measured on this device ({backend.name}, kernel {backend.kernel})",
            "comm": (
                f"sim backend, profile {cfg.comm_profile}: one GPU cannot measure a "
                "collective, so the comm nets learn the simulator's all-to-all"
            ),
            "collected": results["collected"],
        }
        model.save(out / "model")
        results["model"] = {
            "name": model.name,
            "mape": scored["mape"],
            "spearman": scored["spearman"],
            "floor_mape": floor["floor_mape"],
            "retest_mape": floor["mape"],
            "retest_pairs": len(a),
            "mape_over_floor": scored["mape"] / floor["floor_mape"]
            if floor["floor_mape"] and floor["floor_mape"] > 0
            else float("nan"),
            "train_test_mape": model.metrics_["compute"]["test"]["mape"],
            "training": getattr(model, "training_summary_", {}),
        }

    with clock.stage("plan"):
        from neuroshard.plan_io import plan_to_dict

        names, plans = plan_tasks(tasks, torchrec, cluster, model, cfg, backend)
        (out / "plans.json").write_text(
            json.dumps([{n: plan_to_dict(p) for n, p in row.items()} for row in plans]) + "\n"
        )
        results["search_seconds"] = {
            n: float(
                np.median([row[n].meta.get("search_seconds", 0.0) for row in plans if n in row])
            )
            for n in names
        }

    with clock.stage("measure"):
        rows = measure_plans(backend, plans, names, cfg, clock)
        with open(out / "plan_loads.csv", "w", newline="") as f:
            writer = csv.DictWriter(
                f, ["pass", "task", "searcher", "device", "shards", "ms", "spread"]
            )
            writer.writeheader()
            writer.writerows(rows)
        results["plan_loads_measured"] = len(rows)

    with clock.stage("report"):
        results["plans"] = plan_figures(rows, names, plans, cfg)
        results["plan_prediction"] = predicted_vs_measured(rows, plans, model, cfg)
        fp = backend.fingerprint()
        results["hardware"] = {
            "gpu": (fp.get("gpu") or {}).get("name") if cfg.device != "cpu" else None,
            "processor": fp.get("processor"),
            "kernel": backend.kernel,
            "graphs": backend.timer.graphs,
            "graph_failures": backend.timer.graph_failures,
            "torch": fp.get("versions", {}).get("torch"),
            "fingerprint": fp,
        }
    backend.close()
    results["stages"] = dict(clock.stages)
    results["total_s"] = round(clock.now(), 1)
    write_report(out, results)
    logger.info("session done in %.0f s: %s", clock.now(), out / "results.md")
    return results


def archive(out: Path, folders: Sequence[str], name: str = "data_model.tar.gz") -> Path:
    """Pack ``folders`` of ``out`` into one gzipped tar beside them, written atomically;
    the folders are removed only once the archive reads back with every file in it."""
    import shutil
    import tarfile

    target = out / name
    tmp = target.with_name(f".{name}.tmp")
    present = [f for f in folders if (out / f).is_dir()]
    with tarfile.open(tmp, "w:gz") as tar:
        for folder in present:
            tar.add(out / folder, arcname=folder)
    with tarfile.open(tmp, "r:gz") as tar:
        packed = {m.name for m in tar.getmembers() if m.isfile()}
    for folder in present:
        for path in (out / folder).rglob("*"):
            if path.is_file() and str(path.relative_to(out)) not in packed:
                raise RuntimeError(f"{path} is missing from {tmp}; nothing removed")
    os.replace(tmp, target)
    for folder in present:
        shutil.rmtree(out / folder)
    logger.info("packed %s into %s", ", ".join(present), target)
    return target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="output folder (the dataset, model, results)")
    p.add_argument("--quick", action="store_true", help="CPU dry run of every stage")
    p.add_argument(
        "--make-torchrec-plans",
        action="store_true",
        help=f"draw the tasks and write TorchRec's plans to {TASKS_FILE}",
    )
    p.add_argument("--budget-s", type=float, default=None, help="wall-time budget")
    p.add_argument("--device", default=None, help="cuda (default), cuda:N or cpu")
    p.add_argument("--no-graphs", action="store_true", help="time eager steps")
    p.add_argument("--tasks", type=int, default=None, help="the first N tasks of the file")
    p.add_argument(
        "--archive",
        action="store_true",
        help="at the end, even a failed one, pack data/ and model/ into data_model.tar.gz "
        "(for machines that send back a few flat files)",
    )
    args = p.parse_args(argv)
    use_checkout()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr
    )
    if args.make_torchrec_plans:
        print(make_torchrec_plans())
        return 0
    if args.out is None:
        p.error("--out is required")
    overrides: dict[str, Any] = {}
    for key in ("budget_s", "device", "tasks"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if args.no_graphs:
        overrides["graphs"] = False
    cfg = (
        SessionConfig.quick(args.out, **overrides)
        if args.quick
        else SessionConfig(out=args.out, **overrides)
    )
    cfg.out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(cfg.out / "session.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
    logging.getLogger().addHandler(handler)
    command = " ".join(
        [
            Path(sys.executable).name,
            "bench/gpu_session.py",
            *(argv if argv is not None else sys.argv[1:]),
        ]
    )
    try:
        run_session(cfg, command)
    except BaseException:
        logger.exception("the session failed; results.json holds the stages it finished")
        raise
    finally:
        if args.archive:
            archive(cfg.out, ("data", "model"))
    print((cfg.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
